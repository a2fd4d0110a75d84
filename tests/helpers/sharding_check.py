"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by tests/test_sharding.py).

Usage: sharding_check.py [lm] [dtf] [tdtf] [mod] (default: all)

lm: one train step of the smoke LM on a (data=2, fsdp=2, tensor=2) mesh vs on a single device, then a
checkpoint written on that mesh restored onto a (data=4, fsdp=1, tensor=2) mesh, and an HF checkpoint
loaded onto the mesh. dtf / tdtf / mod: two train steps of that routed smoke LM on the mesh vs one
device. Prints JSON.
"""

import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import load_config, smoke_config  # noqa: E402

from vlmjax import sharding as shd  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax.train import Trainer  # noqa: E402
from vlmjax.train.checkpoint import Checkpointer  # noqa: E402
from vlmjax.tree import path_str  # noqa: E402


def spec_list(sharding):
    """PartitionSpec as a JSON-able list, e.g. ['fsdp', 'tensor', None] (trailing Nones kept)."""
    return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def flat(tree):
    return {path_str(k): np.asarray(jax.device_get(v)) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(parts):
    assert jax.device_count() == 8, jax.devices()
    results = {}
    if "lm" in parts:
        results.update(check_lm())
    for kind in ("dtf", "tdtf", "mod"):
        if kind in parts:
            results[f"routed_{kind}"] = check_routed(kind)
    print("RESULT " + json.dumps(results))


def check_lm():
    # fp32 and a wider model than smoke so tensor=2 splits heads/mlp evenly.
    cfg = smoke_config(**{"model.num_attention_heads": 4, "model.num_key_value_heads": 2,
                          "batch_size": 8, "optim.warmup_steps": 0})
    task = tasks.build(cfg, None)
    batch = next(iter(task.train_dataset(global_batch_size=8, seed=0, process_index=0, process_count=1)))

    results = {}
    states = {}
    for name, mesh_cfg, devices in [("single", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                                    ("mesh222", dict(data=2, fsdp=2, tensor=2), None)]:
        mesh = shd.make_mesh(mesh_cfg, devices)
        tr = Trainer(cfg, task, mesh)
        state = tr.init()
        state, m = tr.train_step(state, tr.put(batch))
        results[name] = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
        states[name] = (tr, state)

    a, b = flat(states["single"][1].params), flat(states["mesh222"][1].params)
    results["max_param_diff"] = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    results["param_names"] = sorted(a)

    tr, state = states["mesh222"]
    specs = {path_str(k): spec_list(v.sharding) for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    shard_shapes = {path_str(k): [list(v.shape), list(v.addressable_shards[0].data.shape)]
                    for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    results["specs"] = specs
    results["shard_shapes"] = shard_shapes
    # The Adam moments follow their parameter's sharding.
    mu_specs = sorted({repr(spec_list(x.sharding)) for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2})
    results["opt_specs"] = mu_specs

    # Checkpoint on (2,2,2), restore on (4,1,2).
    with tempfile.TemporaryDirectory() as d:
        data_iter = iter(task.train_dataset(global_batch_size=8, seed=0, process_index=0, process_count=1))
        ck = Checkpointer(d, keep=2, every=1, async_save=False)
        ck.save(1, state, data_iter, {"note": "test"}, force=True)
        ck.close()
        mesh2 = shd.make_mesh(dict(data=4, fsdp=1, tensor=2))
        tr2 = Trainer(cfg, task, mesh2)
        ck2 = Checkpointer(d, keep=2, every=1, async_save=False)
        restored, step = ck2.restore_latest(tr2.abstract_state, iter(task.train_dataset(
            global_batch_size=8, seed=0, process_index=0, process_count=1)))
        ck2.close()
        c = flat(restored.params)
        results["restore_step"] = step
        results["restore_max_diff"] = max(float(np.max(np.abs(b[k] - c[k]))) for k in b)
        results["restore_mesh"] = {str(v.sharding.mesh.shape_tuple) for v in jax.tree.leaves(restored.params)}.pop()
        # The restored state trains on the new mesh.
        _, m2 = tr2.train_step(restored, tr2.put(batch))
        results["restore_next_loss"] = float(m2["loss"])
    # An HF checkpoint loaded straight onto the mesh: each tensor placed with its logical sharding.
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top
    from vlmjax import convert  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        mesh = shd.make_mesh(dict(data=2, fsdp=2, tensor=2))
        model, params = convert.load_hf(d, mesh=mesh)
        toks = np.arange(16).reshape(2, 8) % 64
        with torch.no_grad():
            ref = hf(torch.tensor(toks)).logits.numpy()
        out, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, toks)
        results["hf_mesh_max_err"] = float(np.max(np.abs(np.asarray(out) - ref)))
        k = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
        results["hf_mesh_q_spec"] = spec_list(k.sharding)
        results["hf_mesh_q_shard"] = list(k.addressable_shards[0].data.shape)
    return results


def check_routed(kind):
    """Routed decoders (gather / top_k / scatter, router_state) on the mesh equal one device."""
    rcfg = load_config(kind, "smoke", **{"model.num_attention_heads": 4, "model.num_key_value_heads": 2,
                                         "batch_size": 8, "optim.warmup_steps": 0})
    rtask = tasks.build(rcfg, None)
    rbatch = next(iter(rtask.train_dataset(global_batch_size=8, seed=0, process_index=0, process_count=1)))
    out = {}
    for name, mesh_cfg, devices in [("single", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                                    ("mesh222", dict(data=2, fsdp=2, tensor=2), None)]:
        tr = Trainer(rcfg, rtask, shd.make_mesh(mesh_cfg, devices))
        st = tr.init()
        for _ in range(2):
            st, m = tr.train_step(st, tr.put(rbatch))
        out[name] = (float(m["loss"]), flat(st.params), flat(st.model_state))
    return {
        "loss_single": out["single"][0], "loss_mesh": out["mesh222"][0],
        "max_param_diff": max(float(np.max(np.abs(out["single"][1][k] - out["mesh222"][1][k])))
                              for k in out["single"][1]),
        "max_state_diff": max([float(np.max(np.abs(out["single"][2][k] - out["mesh222"][2][k])))
                               for k in out["single"][2]] or [0.0]),
    }


if __name__ == "__main__":
    main(sys.argv[1:] or ["lm", "dtf", "tdtf", "mod"])
