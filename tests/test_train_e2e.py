"""End-to-end: main with :smoke, checkpoints, exact resume, corrupt-checkpoint fallback, config errors."""

import glob
import os
import shutil

import numpy as np
import pytest

from conftest import run_module, smoke_config
from vlmjax import run as runner
from vlmjax.train.metrics import read_metrics


def _losses(workdir):
    """step -> loss of the LAST logged record for that step (a resumed run may repeat steps)."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted smoke run (checkpoints at 3 and 6), shared: tests that change a workdir copy it."""
    wd = str(tmp_path_factory.mktemp("e2e") / "full")
    runner.run(smoke_config(), wd)
    return wd


def _copy(run_dir, tmp_path):
    return shutil.copytree(run_dir, str(tmp_path / "run"))


def test_main_smoke_cli_runs_and_writes_everything(tmp_path):
    wd = tmp_path / "run"
    p = run_module(["-m", "vlmjax.main", "--config=configs/lm.py:smoke", f"--workdir={wd}"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (wd / "config.json").exists()
    recs = read_metrics(str(wd))
    kinds = {r["kind"] for r in recs}
    assert {"train", "eval", "summary"} <= kinds
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    for r in recs:
        if r["kind"] == "train":
            assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
            for k in ("lr", "tokens_per_s", "step_time_s", "data_wait_frac"):
                assert k in r
    steps = sorted(int(os.path.basename(d)) for d in glob.glob(str(wd / "checkpoints" / "*"))
                   if os.path.basename(d).isdigit())
    assert steps == [3, 6]
    assert "sample" in p.stdout and "done: step 6" in p.stdout
    # The summary (evals at start and end, the sample) is in metrics.jsonl and summary.json.
    (summary,) = [r for r in recs if r["kind"] == "summary"]
    assert summary["step"] == 6 and summary["finished"] and "sample" in summary
    assert np.isfinite(summary["eval_start/loss"]) and np.isfinite(summary["eval_end/loss"])
    assert (wd / "summary.json").exists()
    # Running a finished run again does nothing and appends nothing.
    again = run_module(["-m", "vlmjax.main", "--config=configs/lm.py:smoke", f"--workdir={wd}"])
    assert again.returncode == 0 and "Already finished: step 6 of 6" in again.stdout, again.stderr[-2000:]
    assert read_metrics(str(wd)) == recs


def test_resume_gives_identical_losses(finished_run, tmp_path, capsys):
    full, part = finished_run, str(tmp_path / "part")
    # "Preempted" after step 3 (the checkpoint interval), then resumed from the workdir.
    s1 = runner.run(smoke_config(stop_after=3), part)
    assert s1["step"] == 3 and not s1["finished"]
    assert "stopped early (config.stop_after=3): step 3 of 6" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(part, "summary.json"))
    s2 = runner.run(smoke_config(), part)
    assert s2["step"] == 6 and s2["finished"]
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([a[s] for s in range(1, 7)], [b[s] for s in range(1, 7)], rtol=1e-5)
    # Steps 4..6 of the resumed run really came after a restore (not a rerun from scratch).
    resumed = [r["step"] for r in read_metrics(part, "train")]
    assert resumed == [1, 2, 3, 4, 5, 6]


def test_corrupt_latest_checkpoint_falls_back(finished_run, tmp_path, capsys):
    wd = _copy(finished_run, tmp_path)  # checkpoints at 3 and 6
    files = [f for f in glob.glob(os.path.join(wd, "checkpoints", "6", "state", "**", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:  # truncate every file of the latest state: unreadable, but still listed
        with open(f, "wb") as fh:
            fh.write(b"\0garbage")
    s = runner.run(smoke_config(total_steps=8), wd)
    out = capsys.readouterr().out
    assert "checkpoint step 6" in out and "is unusable" in out
    assert "Resumed from checkpoint step 3" in out
    assert s["step"] == 8
    # The bad step was kept for inspection, not deleted, and training redid steps 4..8.
    assert glob.glob(os.path.join(wd, "corrupt_checkpoints", "6.*"))
    steps = [r["step"] for r in read_metrics(wd, "train")]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]


def test_config_typo_fails_with_hint(tmp_path):
    p = run_module(["-m", "vlmjax.main", "--config=configs/lm.py:smoke", f"--workdir={tmp_path}",
                    "--config.totl_steps=5"])
    assert p.returncode != 0
    assert "total_steps" in p.stderr  # ml_collections: "Did you mean 'total_steps'?"


@pytest.mark.parametrize("field,value,expect", [
    ("batch_size", 0, "config.batch_size"),
    ("optim.schedule", "cosin", "config.optim.schedule"),
    ("optim.frozen", ("no_such_param",), "config.optim.frozen"),
    ("mesh.data", 3, "config.mesh"),
    ("task", "lmm", "did you mean 'lm'"),
])
def test_bad_config_values_name_the_field(tmp_path, field, value, expect):
    with pytest.raises(ValueError, match=expect.replace("(", r"\(")):
        runner.run(smoke_config(**{field: value}), str(tmp_path))


def test_nonfinite_updates_are_skipped_then_stop(tmp_path):
    # An absurd learning rate blows the loss up; updates with non-finite grads are skipped and
    # counted, and after max_consecutive_nonfinite the run stops with a message naming the fix.
    with pytest.raises(FloatingPointError, match="config.optim.lr"):
        runner.run(smoke_config(**{"optim.lr": 1e30, "optim.clip_norm": 0.0, "optim.warmup_steps": 0,
                                  "optim.max_consecutive_nonfinite": 2, "total_steps": 12,
                                  "ckpt_every": 0}), str(tmp_path))


@pytest.mark.slow  # default-suite time; an optional logger's offline run
def test_wandb_offline_logs_and_disabled_never_imports_it(tmp_path):
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import smoke_config; "
            "from vlmjax import run; run.run(smoke_config(**{'total_steps': 2, 'sample.max_new_tokens': 0}), "
            f"{str(tmp_path / 'off')!r}); print('WANDB_IMPORTED', 'wandb' in sys.modules)")
    p = run_module(["-c", code])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "WANDB_IMPORTED False" in p.stdout
    wd = tmp_path / "on"
    p = run_module(["-m", "vlmjax.main", "--config=configs/lm.py:smoke", f"--workdir={wd}",
                    "--config.wandb.mode=offline", "--config.total_steps=2"], env_extra={"WANDB_SILENT": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    runs = glob.glob(str(wd / "wandb" / "offline-run-*"))
    assert runs and glob.glob(os.path.join(runs[0], "*.wandb"))


def test_resume_with_a_different_model_is_a_clear_error_and_keeps_checkpoints(finished_run, tmp_path):
    wd = _copy(finished_run, tmp_path)
    with pytest.raises(ValueError, match=r"different model or optimizer config.*shape mismatches: \[params/embed_tokens/embedding: "
                       r"checkpoint \(264, 32\) vs config \(264, 48\)"):
        runner.run(smoke_config(**{"model.hidden_size": 48}), wd)
    # Nothing was moved aside: the checkpoints are still there and resumable with the right config.
    assert not os.path.exists(os.path.join(wd, "corrupt_checkpoints"))
    assert runner.run(smoke_config(total_steps=7), wd)["step"] == 7
