"""Runs that never lose or corrupt work: what a cluster does to a run (corrupted files, an error while a
checkpoint is being written, non-finite training, a second launch, a rejected config)."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_module, smoke_config
from vlmjax import run as runner
from vlmjax.train import checkpoint as ckpt_lib
from vlmjax.train import workdir_lock
from vlmjax.train.metrics import read_metrics

MAIN = ["-m", "vlmjax.main", "--config=configs/lm.py:smoke"]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


def _flip_bytes(step_dir, n=64):
    """Inverts ``n`` bytes in the middle of the largest array-data file of a step (size unchanged)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
        f.seek(0)
        f.write(data)
    return path


def _tmp_steps(workdir):
    return glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*"))


def test_rejected_run_changes_nothing_on_disk(tmp_path, capsys):
    wd = str(tmp_path / "run")
    runner.run(smoke_config(**{"sample.max_new_tokens": 0}), wd)
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(wd, "*")) if os.path.isfile(p)}
    for bad in ({"model.hidden_size": 48}, {"optim.frozen": ("embed",)}):
        with pytest.raises(ValueError, match="different model or optimizer"):
            runner.run(smoke_config(total_steps=8, **bad), wd)
        after = {p: open(p, "rb").read() for p in glob.glob(os.path.join(wd, "*")) if os.path.isfile(p)}
        assert after == before  # config.json byte-identical, no lock file left, metrics untouched
    # An accepted change (more steps, another lr) is resumed, said, and then recorded.
    capsys.readouterr()
    runner.run(smoke_config(**{"total_steps": 7, "optim.lr": 1e-3, "sample.max_new_tokens": 0}), wd)
    out = capsys.readouterr().out
    assert "Resuming with a changed config (2 field(s)): optim.lr: 0.003 -> 0.001; total_steps: 6 -> 7" in out
    assert '"total_steps": 7' in open(os.path.join(wd, "config.json")).read()


def test_bit_flipped_checkpoint_is_detected_and_the_previous_step_used(tmp_path, capsys):
    full, wd = str(tmp_path / "full"), str(tmp_path / "run")
    cfg = dict(total_steps=9, **{"sample.max_new_tokens": 0})
    runner.run(smoke_config(**cfg), full)
    runner.run(smoke_config(stop_after=6, **cfg), wd)  # checkpoints at 3 and 6
    assert os.path.exists(os.path.join(wd, "checkpoints", "6", ckpt_lib.CHECKSUMS))
    flipped = _flip_bytes(os.path.join(wd, "checkpoints", "6"))
    capsys.readouterr()
    s = runner.run(smoke_config(**cfg), wd)
    out = capsys.readouterr().out
    rel = os.path.relpath(flipped, os.path.join(wd, "checkpoints", "6"))
    assert f"checkpoint step 6 in {wd}/checkpoints is unusable (CorruptCheckpoint: {rel} has SHA-256" in out
    assert "Resumed from checkpoint step 3" in out and s["step"] == 9 and s["finished"]
    assert glob.glob(os.path.join(wd, "corrupt_checkpoints", "6.*.reason.txt"))
    # Steps 4..9 were trained again from step 3's state: the losses equal an uninterrupted run's.
    assert [r["step"] for r in read_metrics(wd, "train")] == [1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9]
    assert _losses(wd) == _losses(full)


def test_nonfinite_restored_state_is_quarantined(tmp_path, capsys, monkeypatch):
    # A checkpoint that reads fine and matches its checksums but holds NaN (written by a buggy run, or
    # from before checksums existed) is not trained on.
    wd = str(tmp_path / "run")
    runner.run(smoke_config(stop_after=3, **{"sample.max_new_tokens": 0}), wd)
    os.remove(os.path.join(wd, "checkpoints", "3", ckpt_lib.CHECKSUMS))  # "an older vlmjax wrote it"
    monkeypatch.setattr(ckpt_lib, "nonfinite_paths", lambda state, limit=5: ["params/embed_tokens/embedding"])
    with pytest.raises(ckpt_lib.NoReadableCheckpoint, match="step.s. 3 failed now"):
        runner.run(smoke_config(**{"sample.max_new_tokens": 0}), wd)
    out = capsys.readouterr().out
    assert "non-finite values in params/embed_tokens/embedding" in out


def test_all_checkpoints_unusable_stops_with_the_list(tmp_path, capsys):
    wd = str(tmp_path / "run")
    cfg = {"sample.max_new_tokens": 0, "total_steps": 8}
    runner.run(smoke_config(stop_after=6, **cfg), wd)  # checkpoints 3 and 6
    for step in (3, 6):
        _flip_bytes(os.path.join(wd, "checkpoints", str(step)))
    with pytest.raises(ckpt_lib.NoReadableCheckpoint, match=r"step\(s\) 6, 3 failed now.*"
                       r"allow_fresh_start=True"):
        runner.run(smoke_config(**cfg), wd)
    # The next launch does not quietly start from scratch either: the quarantined steps are named.
    with pytest.raises(ckpt_lib.NoReadableCheckpoint, match=r"it is empty; quarantined in .*: 3\.\d+, 6\.\d+"):
        runner.run(smoke_config(**cfg), wd)
    capsys.readouterr()
    s = runner.run(smoke_config(allow_fresh_start=True, **cfg), wd)
    assert s["step"] == 8 and s["finished"] and "Resumed" not in capsys.readouterr().out


def test_nonfinite_near_the_end_fails_the_run(tmp_path):
    wd = str(tmp_path / "run")
    cfg = smoke_config(**{"total_steps": 15, "optim.lr": 1e6, "sample.max_new_tokens": 0})
    with pytest.raises(FloatingPointError, match=r"reached step 15 but its training went non-finite: "
                       r"the last \d+ update\(s\) were skipped"):
        runner.run(cfg, wd)
    assert not os.path.exists(os.path.join(wd, "summary.json"))
    (summary,) = [r for r in read_metrics(wd) if r["kind"] == "summary"]
    assert summary["nonfinite_skipped"] > 0 and not summary["finished"]
    with pytest.raises(FloatingPointError, match="went non-finite"):  # a rerun does not call it done
        runner.run(cfg, wd)


def test_too_many_skips_in_a_run_fail_it(tmp_path, monkeypatch, capsys):
    # Skips scattered through a run (never the last step) still fail it past the allowed fraction.
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    cls = tasks.task_class("lm")
    orig = cls.loss_fn

    def nan_every_third(self, params, model_state, batch, rng, step):
        loss, aux = orig(self, params, model_state, batch, rng, step)
        return loss * jnp.where(step % 3 == 1, jnp.nan, 1.0), aux  # steps 2 and 5 of 6

    monkeypatch.setattr(cls, "loss_fn", nan_every_third)
    cfg = {"sample.max_new_tokens": 0, "log_every": 1}
    with pytest.raises(FloatingPointError, match=r"2 of 6 updates were skipped \(over "
                       r"config.optim.max_nonfinite_fraction=0.05\)"):
        runner.run(smoke_config(**cfg), str(tmp_path / "a"))
    assert "skipped 2" in capsys.readouterr().out  # the log line counts them
    s = runner.run(smoke_config(**{**cfg, "optim.max_nonfinite_fraction": 0.5}), str(tmp_path / "b"))
    assert s["finished"] and s["nonfinite_skipped"] == 2
    assert "(2 of 6 updates skipped as non-finite)" in capsys.readouterr().out


def test_consecutive_limit_is_checked_every_step(tmp_path):
    # log_every=10 > the limit of 3: the run stops at exactly 3 consecutive skips, not at the next log.
    with pytest.raises(FloatingPointError, match=r"for 3 consecutive steps up to step \d+ "
                       r"\(config.optim.max_consecutive_nonfinite=3\)"):
        runner.run(smoke_config(**{"optim.lr": 1e6, "log_every": 10, "total_steps": 30, "ckpt_every": 0,
                                   "optim.max_consecutive_nonfinite": 3}), str(tmp_path))


def test_error_while_a_checkpoint_is_in_flight_keeps_it_and_is_shown_last(tmp_path):
    wd = tmp_path / "run"
    p = run_module([*MAIN, f"--workdir={wd}", "--config.optim.lr=1e6", "--config.ckpt_every=1",
                    "--config.total_steps=40", "--config.optim.max_consecutive_nonfinite=3"])
    assert p.returncode == 1, p.stderr[-3000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("vlmjax: error: Non-finite loss, gradients or updates for 3 consecutive"), lines[-5:]
    assert "Traceback" not in p.stderr and "cannot schedule new futures" not in p.stderr
    assert not _tmp_steps(str(wd))
    # Every step saved before the error is committed, with its checksums.
    steps = sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())
    assert steps and all((wd / "checkpoints" / str(s) / ckpt_lib.CHECKSUMS).exists() for s in steps)


def test_ctrl_c_checkpoints_and_exits_cleanly(tmp_path):
    wd = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, *MAIN, f"--workdir={wd}", "--config.total_steps=100000",
                             "--config.log_every=1", "--config.ckpt_every=50", "--config.eval_every=0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        for line in proc.stdout:  # wait for training to be under way
            if line.startswith("step 60/") or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C: checkpointing at step" in out and "stopped early (Ctrl-C)" in out
    assert "Traceback" not in err
    assert not _tmp_steps(str(wd)) and not (wd / workdir_lock.LOCK_NAME).exists()
    stopped = int(out.split("Ctrl-C: checkpointing at step ")[1].split()[0])
    assert stopped in [int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()]


def test_second_launch_on_a_locked_workdir_fails_at_once(tmp_path):
    wd = tmp_path / "run"
    with workdir_lock.WorkdirLock(str(wd), heartbeat_s=0):  # "a run is using it"
        t0 = time.time()
        p = run_module([*MAIN, f"--workdir={wd}"])
        took = time.time() - t0
    assert p.returncode == 1 and took < 120, (took, p.stderr[-2000:])
    last = [l for l in p.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("vlmjax: error:") and f"pid {os.getpid()}" in last and "another --workdir" in last
    assert "looks like a bug" not in last
    assert sorted(os.listdir(wd)) == []  # nothing written: no config.json, no checkpoints


def test_load_params_skips_a_damaged_step(tmp_path):
    # init_from=<vlmjax workdir> reads params through load_params: it verifies checksums too.
    import grain  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints", keep=3, every=1, async_save=False)
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    for step in (1, 2):
        ck.save(step, {"params": {"w": jnp.full((4096,), step, jnp.float32)}}, it, {})
    ck.close()
    assert ckpt_lib.load_params(str(tmp_path))[1] == 2
    _flip_bytes(str(tmp_path / "checkpoints" / "2"))
    with pytest.raises(ckpt_lib.CorruptCheckpoint, match="has SHA-256"):
        ckpt_lib.verify_checksums(tmp_path / "checkpoints" / "2")
    params, step = ckpt_lib.load_params(str(tmp_path))
    assert step == 1 and float(params["w"][0]) == 1.0
