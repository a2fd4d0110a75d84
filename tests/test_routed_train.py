"""Routed LMs through the trainer: telemetry, both evaluation modes, resume, causal router learning."""

import numpy as np
import pytest
from conftest import load_config

from vlmjax import run as runner
from vlmjax.train.metrics import read_metrics


def test_dtf_smoke_trains_logs_telemetry_resumes_and_generates(tmp_path, capsys):
    wd = str(tmp_path / "dtf")
    s1 = runner.run(load_config("dtf", "smoke", stop_after=3), wd)
    assert s1["step"] == 3
    s2 = runner.run(load_config("dtf", "smoke"), wd)
    out = capsys.readouterr().out
    # The log line labels the optimised loss as the total and shows the LM loss beside the routers.
    assert "Resumed from checkpoint step 3" in out and " total-loss " in out and "| lm-loss " in out
    assert " sel 0.500 G " in out
    assert s2["step"] == 6 and s2["sample"]
    end = s2["eval_end"]
    for k in ("loss", "perplexity", "loss_topk", "perplexity_topk", "selected_frac", "selected_frac_topk"):
        assert np.isfinite(end[k]), k
    assert end["selected_frac_topk"] == 0.5
    rec = read_metrics(wd, "train")[-1]
    for stat in ("d_st", "d_ch", "ce", "cu", "ma", "s_ce", "s_cu", "g_cont", "beta_ce", "beta_cu", "o_ce",
                 "m_cu", "selected_frac", "causal_acc", "causal_precision", "causal_recall"):
        assert f"router/1/{stat}" in rec, stat  # smoke: 2 layers, decision 0 -> dynamic 1
    assert rec["loss"] > rec["lm_loss"] > 0 and "loss/prior" in rec and "loss/causal" in rec
    np.testing.assert_allclose(rec["router/1/o_ce"] > 0 and rec["router/1/m_cu"] > 0, True)


@pytest.mark.parametrize("name,fall", [("dtf", 0.005), ("mod", 0.05)])
def test_causal_router_bce_falls_during_training(tmp_path, name, fall):
    """DTF: the linear causal router on [x_t; x_{t-1}] chasing top-k of G (a moving target);
    MoD: the aux BCE on the router logits themselves (self-consistent, so it falls much faster)."""
    wd = str(tmp_path / name)
    runner.run(load_config(name, "smoke", total_steps=60, eval_every=0, ckpt_every=0, log_every=1,
                          **{"sample.max_new_tokens": 0, "eval.max_batches": 1}), wd)
    recs = read_metrics(wd, "train")
    bce = [r["loss/causal"] for r in recs]
    acc = [r["router/1/causal_acc"] for r in recs]
    assert np.mean(bce[-10:]) < np.mean(bce[:5]) - fall, (bce[:5], bce[-10:])
    assert np.mean(acc[-10:]) > np.mean(acc[:5]) + 0.03, (acc[:5], acc[-10:])


def test_dtf_pretrained_lora_variant_trains_only_lora_and_routers(tmp_path):
    """configs/dtf.py:pretrained_lora on a tiny random Qwen2 checkpoint: the base weights load and stay frozen,
    LoRA B starts at zero (an exact no-op), the adapters and the DTF routers/PriorFFNs move."""
    import jax
    from test_convert_llama import _hf_model, _with_tokenizer

    from vlmjax import sharding as shd
    from vlmjax import tasks
    from vlmjax.train import trainer as trainer_lib
    from vlmjax.tree import path_str

    _, path = _hf_model("qwen2_bias", tmp_path, vocab_size=320, num_hidden_layers=2, bos_token_id=1,
                        eos_token_id=2)
    _with_tokenizer(path)
    cfg = load_config("dtf", "pretrained_lora", init_from=path, total_steps=4, batch_size=4,
                      **{"data.seq_len": 32, "model.dtype": "float32", "optim.warmup_steps": 0,
                         "sample.max_new_tokens": 4, "eval.max_batches": 1})
    task = tasks.build(cfg, str(tmp_path / "wd"))
    assert task.model_config.lora_rank == 16 and task.model_config.lora_alpha == 32.0
    mesh = shd.make_mesh(cfg.mesh)
    tr = trainer_lib.Trainer(cfg, task, mesh)
    loaded = task.pretrained_params(tr.abstract_state.params, tr.state_shardings.params)
    state = tr.init(loaded)  # the run's start: the checkpoint's arrays, only the rest initialised
    before = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert all(not v.any() for k, v in before.items() if k.endswith("lora_b"))
    hf_names = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    assert hf_names and not any("lora_" in k or k.startswith("routers_") for k in hf_names)

    batch = tr.put(next(iter(task.train_dataset(global_batch_size=4, seed=0, process_index=0,
                                                process_count=1))))
    for _ in range(2):
        state, m = tr.train_step(state, batch)
    assert np.isfinite(float(m["loss"]))
    after = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    trainable = [k for k in before if "lora_" in k or k.startswith("routers_")]
    frozen = [k for k in before if k not in trainable]
    assert len(frozen) == len(hf_names)
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    moved = [k for k in trainable if not np.array_equal(after[k], before[k])]
    assert set(moved) == set(trainable), sorted(set(trainable) - set(moved))
    assert task.on_end(state, mesh)["sample"]


def test_pretrained_variant_without_a_checkpoint_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match="set --config.init_from="):
        runner.run(load_config("dtf", "pretrained_lora"), str(tmp_path))
    with pytest.raises(ValueError, match="set --config.init_from="):
        runner.run(load_config("mod", "pretrained"), str(tmp_path / "b"))


def test_routed_eval_is_blind_to_padding(tmp_path):
    """Issue 12 bug 1 at the task level: the padded last evaluation window carries attention_mask, so
    what sits in the padding changes neither mode's NLL of the real tokens (before, top-k let padding
    take routed slots) and selected_frac counts real tokens."""
    import jax
    import jax.numpy as jnp
    from vlmjax import tasks

    task = tasks.build(load_config("dtf", "smoke"), str(tmp_path))
    v = jax.jit(task.init_variables)(jax.random.key(0))  # jitted: eagerly, every op compiles alone
    params, state = v["params"], {k: x for k, x in v.items() if k != "params"}
    t = task.seq_len
    inputs = jax.random.randint(jax.random.key(1), (2, t), 3, 200)
    real = jnp.arange(t)[None, :] < jnp.asarray([[t], [t // 3]])
    batch = {"targets": jnp.roll(inputs, -1, 1), "loss_mask": real.astype(jnp.float32),
             "attention_mask": real.astype(jnp.int32)}
    eval_fn = jax.jit(task.eval_fn)
    sums = [eval_fn(params, state, {**batch, "inputs": jnp.where(real, inputs, pad)}) for pad in (0, 7)]
    for key in ("nll_sum", "nll_sum_topk", "selected_frac_sum", "selected_frac_sum_topk"):
        np.testing.assert_allclose(float(sums[0][key]), float(sums[1][key]), rtol=1e-6, err_msg=key)
