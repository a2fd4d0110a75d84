"""Slow checks, excluded from CI's default suite: ``python -m pytest -q -m slow``."""

import pytest

from conftest import run_module
from vlmjax.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_default_lm_config_learns(tmp_path):
    """The README's main job (configs/lm.py default, 5-15 min on 2 cores) clearly lowers val loss."""
    p = run_module(["-m", "vlmjax.main", "--config=configs/lm.py", f"--workdir={tmp_path}"], timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    evals = read_metrics(str(tmp_path), "eval")
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 500
    assert end["loss"] < start["loss"] - 2.5, (start, end)
    assert end["bits_per_byte"] < 2.5
    assert "sample (temperature" in p.stdout


def test_default_dtf_config_learns_and_reports_both_modes(tmp_path):
    """The README's main job (configs/dtf.py default) lowers val loss under both selection modes."""
    p = run_module(["-m", "vlmjax.main", "--config=configs/dtf.py", f"--workdir={tmp_path}"], timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    evals = read_metrics(str(tmp_path), "eval")
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 500
    for key in ("loss", "loss_topk"):
        assert end[key] < start[key] - 2.0, (key, start, end)
    assert 0.0 < end["selected_frac"] <= 1.0 and end["selected_frac_topk"] == 0.5
    assert "sample (temperature" in p.stdout and "L_prior" in p.stdout
