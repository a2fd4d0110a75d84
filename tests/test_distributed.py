"""config.distributed.initialize='auto': JAX's own cluster detection decides (vlmjax/distributed.py).

Each case runs in fresh interpreters, so no jax.distributed state leaks into the test process."""

import json
import os
import subprocess
import sys
import time

import portpicker
import pytest

from conftest import ROOT

# One process: maybe_initialize(config.distributed) with the given fields; prints "RESULT {json}".
_WORKER = """
import json, sys, time
import ml_collections
from vlmjax import distributed
cfg = ml_collections.ConfigDict(dict(initialize="auto", coordinator_address="", num_processes=0,
                                     process_id=-1))
cfg.update(json.loads(sys.argv[1]))
t = time.perf_counter()
ok = distributed.maybe_initialize(cfg)
dt = time.perf_counter() - t
import jax
import numpy as np
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(np.int32(jax.process_index())) if ok else [0]
print("RESULT " + json.dumps({"initialized": ok, "seconds": dt, "process": jax.process_index(),
                              "count": jax.process_count(), "gathered": [int(i) for i in ids]}),
      flush=True)
if ok:
    jax.distributed.shutdown()
"""

# Variables that would make JAX detect a cluster on a developer machine or a CI runner.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS",
                "KUBERNETES_SERVICE_HOST", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in _CLUSTER_ENV}
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _start(fields, env):
    return subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(fields)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(procs, timeout=120):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out[-3000:] + err[-5000:]
        outs.append((json.loads(out.split("RESULT ", 1)[1].splitlines()[0]), err))
    return outs


def test_auto_without_cluster_is_one_process_quickly():
    t = time.perf_counter()
    [(r, err)] = _results([_start({}, _env())])
    assert r == {**r, "initialized": False, "process": 0, "count": 1}
    assert r["seconds"] < 2.0, r  # no metadata-server probe off a TPU VM
    lines = [line for line in err.splitlines() if "no multi-process cluster detected" in line]
    assert len(lines) == 1 and "running as one process" in lines[0], err[-2000:]
    assert time.perf_counter() - t < 60


def test_no_never_initializes_and_yes_surfaces_the_error():
    [(r, err)] = _results([_start({"initialize": "no"}, _env())])
    assert r["initialized"] is False and r["count"] == 1 and "cluster detected" not in err
    p = _start({"initialize": "yes"}, _env())
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "coordinator_address should be defined" in err, err[-2000:]


@pytest.mark.multihost
def test_auto_forms_one_job_from_the_slurm_environment():
    """Two local processes with the variables srun gives two tasks of one job step: JAX's SLURM
    detection (jax/_src/clusters/slurm_cluster.py) supplies coordinator, count and id; the port
    (otherwise derived from SLURM_JOB_ID) comes from JAX_COORDINATOR_PORT, so it is a free one."""
    port = portpicker.pick_unused_port()
    common = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NODELIST="127.0.0.1",
                  SLURM_NTASKS="2", SLURM_STEP_NUM_NODES="1", SLURM_JOB_NUM_NODES="1",
                  JAX_COORDINATOR_PORT=str(port))
    procs = [_start({}, _env(**common, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))) for i in range(2)]
    results = sorted((r for r, _ in _results(procs)), key=lambda r: r["process"])
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["initialized"] is True and r["count"] == 2 and r["gathered"] == [0, 1], r
