"""Shared test helpers. Everything runs on the CPU; nothing is downloaded."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# With libtpu installed (the .[tpu] extra: TPU programs compile on this CPU host), every jax process
# takes libtpu's single-process lock; the suite's subprocesses (and parallel runs) must not fail on it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# One persistent XLA compilation cache for the whole session (this process and the `python -m`
# subprocesses it starts): the end-to-end tests build new Trainers, resume runs and start second
# processes that compile the very same programs again, and on 2 CPU cores compiling is most of the
# suite's time. Set before jax is imported; an explicit JAX_COMPILATION_CACHE_DIR wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit  # pylint: disable=g-import-not-at-top
    import shutil  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlmjax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# The suite's models are tiny, so XLA's time goes into compiling, not running: skip the expensive
# LLVM passes (jax_disable_most_optimizations: backend optimization level 0; the HLO passes, hence
# what a program computes, are unchanged). Measured on 2 CPU cores: a routed smoke run 46 s -> 22 s,
# the eager init of a routed decoder 32 s -> 11 s. Inherited by the suite's subprocesses; set
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the optimised CPU code instead.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def load_config(name: str, variant: str | None = None, **overrides):
    """configs/<name>.py:<variant>, with dotted overrides ("optim.lr": 1e-3) applied, then locked."""
    import importlib  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, ROOT)
    try:
        module = importlib.import_module(f"configs.{name}")
    finally:
        sys.path.pop(0)
    c = module.get_config(variant)
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    c.lock()
    return c


def smoke_config(**overrides):
    """configs/lm.py:smoke with dotted overrides."""
    return load_config("lm", "smoke", **overrides)


def run_module(args, env_extra=None, timeout=600):
    """Runs ``python -m ...`` from the repo root in a fresh interpreter; returns CompletedProcess."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def rel_err(a, b) -> float:
    """max|a - b| / max|b| in float64: the parity measure every HF comparison reports."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def save_and_resume(ds, directory, n_before: int, n_after: int):
    """Consumes ``n_before`` batches of ``ds``, saves the grain iterator with orbax (as the trainer
    does), consumes ``n_after``; restores a fresh iterator and returns (expected, got) batches."""
    import grain  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    it = iter(ds)
    for _ in range(n_before):
        next(it)
    mngr = ocp.CheckpointManager(directory, item_names=("data",),
                                 item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(n_before, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(n_after)]
    resumed = iter(ds)
    mngr.restore(n_before, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    got = [next(resumed) for _ in range(n_after)]
    for i in (it, resumed):
        if hasattr(i, "close"):
            i.close()
    mngr.close()
    return expected, got


def assert_iterator_resumes(ds, steps: int, ckpt_dir, more: int = 3):
    """A grain iterator of ``ds`` saved after ``steps`` batches resumes with the same next batches."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    expected, got = save_and_resume(ds, ckpt_dir, steps, more)
    for e, g in zip(expected, got):
        for key in e:
            np.testing.assert_array_equal(e[key], g[key])


@pytest.fixture
def root():
    return ROOT
