"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by tests/test_vlm_task.py).

The smoke VLM (vision tower -> Perceiver -> decoder with LoRA on a 4-bit base, random init, no decoder
stage): one train step and one eval step (teacher-forced losses + generated answers) on an 8-device
(data=2, fsdp=4) mesh vs on one device. Prints ``RESULT {json}``.
"""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import load_config  # noqa: E402

from vlmjax import sharding as shd  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax import tree  # noqa: E402
from vlmjax.models import quant as quant_lib  # noqa: E402
from vlmjax.train import Trainer  # noqa: E402


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = load_config("trm_vlm_qa", "smoke", **{"optim.warmup_steps": 0, "stages": {}})
    task = tasks.build(cfg, None)
    batch = next(iter(task.train_dataset(global_batch_size=8, seed=0, process_index=0, process_count=1)))
    eval_batch = task.eval_batches(global_batch_size=8, process_index=0, process_count=1)[0]
    results, states = {}, {}
    for name, mesh_cfg, devices in [("single", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                                    ("mesh24", dict(data=2, fsdp=4, tensor=1), None)]:
        mesh = shd.make_mesh(mesh_cfg, devices)
        tr = Trainer(cfg, task, mesh)
        state = tr.init()
        state, m = tr.train_step(state, tr.put(batch))
        out = jax.device_get(tr.eval_step(state.params, state.model_state, tr.put(eval_batch)))
        results[name] = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                         "eval_vqa_nll": float(out["vqa_nll"]), "generated": np.asarray(out["generated"]).tolist()}
        states[name] = state
    a, b = (tree.flatten(jax.device_get(states[k].params)) for k in ("single", "mesh24"))
    results["max_param_diff"] = max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)
    qa, qb = (tree.flatten(jax.device_get(states[k].model_state)) for k in ("single", "mesh24"))
    results["quant_leaves"] = len(qa)
    # The random 4-bit init quantises the same normal draws on both meshes; a value within rounding of
    # an NF4 decision boundary may land in the neighbouring code, so count differing elements.
    results["quant_diff_frac"] = (sum(int(np.sum(np.asarray(qa[k]) != np.asarray(qb[k]))) for k in qa)
                                  / sum(np.asarray(qa[k]).size for k in qa))
    # What the codes mean: the dequantised 4-bit bases of the two meshes (a flipped code moves one
    # weight by one NF4 step; a flipped double-quant scale code rescales a block by < 1/127.5).
    da, db = (tree.flatten(quant_lib.dequantize_params(jax.device_get(states[k].params["decoder"]),
                                                       jax.device_get(states[k].model_state["quant"]["decoder"]),
                                                       task.decoder_config.quant)) for k in ("single", "mesh24"))
    results["dequant_rel_l1"] = (sum(float(np.sum(np.abs(np.asarray(da[k]) - np.asarray(db[k])))) for k in da)
                                 / sum(float(np.sum(np.abs(np.asarray(da[k])))) for k in da))
    results["sharded_params"] = sum(1 for x in jax.tree.leaves(states["mesh24"].params)
                                    if len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
