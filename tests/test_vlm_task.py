"""The ``vlm`` task: the smoke experiment (decoder stage, then the VLM on a 4-bit base with LoRA)
trains, evaluates by generation and resumes; freezing; PixMo-style files; a pretrained HF decoder
quantised on load; 8 fake devices equal one."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import load_config, run_module

from vlmjax import run as runner
from vlmjax import tasks
from vlmjax import tree
from vlmjax.train.metrics import read_metrics


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


def test_smoke_experiment_trains_evaluates_and_resumes(tmp_path, capsys):
    full = str(tmp_path / "full")
    s = runner.run(load_config("trm_vlm_qa", "smoke", log_every=1, ckpt_every=2), full)
    assert s["finished"] and s["step"] == 4
    out = capsys.readouterr().out
    # The decoder stage ran text-only first, then the VLM started from its decoder.
    assert "stage 1/2: 'decoder'" in out and "(text only: no image)" in out
    assert "VQA exact match on" in out and "prior" in out
    end = s["eval_end"]
    for key in ("vqa_accuracy", "prior_accuracy", "caption_loss", "caption_perplexity", "vqa_loss"):
        assert key in end and np.isfinite(end[key])
    assert 0.0 <= end["vqa_accuracy"] <= 1.0
    assert any(k.startswith("vqa_accuracy/") for k in end)
    # Resume after a preemption at step 2 gives the same losses.
    part = str(tmp_path / "part")
    assert not runner.run(load_config("trm_vlm_qa", "smoke", log_every=1, ckpt_every=2, stop_after=2), part)["finished"]
    runner.run(load_config("trm_vlm_qa", "smoke", log_every=1, ckpt_every=2), part)
    a, b = _train_losses(os.path.join(full, "vlm")), _train_losses(os.path.join(part, "vlm"))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[i] for i in a], [b[i] for i in a], rtol=1e-5)
