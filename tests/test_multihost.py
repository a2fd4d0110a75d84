"""Two jax.distributed processes on 127.0.0.1 with gloo CPU collectives train, checkpoint and resume."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from conftest import ROOT
from vlmjax.train.metrics import read_metrics

pytestmark = pytest.mark.multihost


def _launch(workdir, *overrides, n=2):
    port = portpicker.pick_unused_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "tests/helpers/multihost_worker.py", str(port), str(i), str(n),
                               str(workdir), *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out[-3000:] + err[-5000:]
        outs.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    return sorted(outs, key=lambda r: r["process"])


def test_two_processes_agree_and_resume(tmp_path):
    full = _launch(tmp_path / "full")
    assert [r["process"] for r in full] == [0, 1]
    # Metrics are global (all-reduced over both processes), so both see the same numbers.
    assert full[0]["step"] == full[1]["step"] == 6
    np.testing.assert_allclose(full[0]["train_loss"], full[1]["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(full[0]["eval_loss"], full[1]["eval_loss"], rtol=1e-6)

    # Stop at step 3 and resume: per-step losses equal the uninterrupted two-process run.
    part = tmp_path / "part"
    _launch(part, "stop_after=3")
    _launch(part)
    a = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "full"), "train")}
    b = {r["step"]: r["loss"] for r in read_metrics(str(part), "train")}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)
    # Each process saved its own grain iterator state.
    files = os.listdir(tmp_path / "full" / "checkpoints" / "6" / "data")
    assert any("process_1" in f for f in files), files
