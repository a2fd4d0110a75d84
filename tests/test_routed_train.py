"""Routed LMs through the trainer: telemetry, both evaluation modes, resume, causal router learning."""

import numpy as np
import pytest

from conftest import load_config
from vlmjax import train
from vlmjax.train.metrics import read_metrics


def test_dtf_smoke_trains_logs_telemetry_resumes_and_generates(tmp_path, capsys):
    wd = str(tmp_path / "dtf")
    s1 = train.run(load_config("dtf", "smoke", stop_after=3), wd)
    assert s1["step"] == 3
    s2 = train.run(load_config("dtf", "smoke"), wd)
    out = capsys.readouterr().out
    assert "Resumed from checkpoint step 3" in out and "| sel 0.500 G " in out
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
    train.run(load_config(name, "smoke", total_steps=60, eval_every=0, ckpt_every=0, log_every=1,
                          **{"sample.max_new_tokens": 0, "eval.max_batches": 1}), wd)
    recs = read_metrics(wd, "train")
    bce = [r["loss/causal"] for r in recs]
    acc = [r["router/1/causal_acc"] for r in recs]
    assert np.mean(bce[-10:]) < np.mean(bce[:5]) - fall, (bce[:5], bce[-10:])
    assert np.mean(acc[-10:]) > np.mean(acc[:5]) + 0.03, (acc[:5], acc[-10:])
