"""Multi-process start-up (TPU VM pods, multi-node GPU, CPU tests with gloo)."""

from __future__ import annotations

import sys

import jax

# What jax.distributed.initialize() raises (jax 0.10) when neither an argument, JAX_COORDINATOR_ADDRESS
# nor a detected cluster gives it a coordinator: the "no cluster here" case of initialize='auto'.
_NO_CLUSTER = "coordinator_address should be defined"


def maybe_initialize(dist_cfg) -> bool:
    """Calls ``jax.distributed.initialize`` as ``config.distributed`` says; returns whether it did.

    dist_cfg: ``config.distributed`` with ``initialize`` ('auto' | 'yes' | 'no'),
    ``coordinator_address`` ('host:port', '' = unset), ``num_processes`` (0 = unset) and
    ``process_id`` (-1 = unset).

    - 'auto' (default) with nothing set: ``jax.distributed.initialize()`` without arguments, so
      JAX's own cluster detection decides: Cloud TPU VM pods and multislice (GCE metadata, queried
      only on a TPU VM), GKE TPU, SLURM, Open MPI, Kubernetes, or ``JAX_COORDINATOR_ADDRESS``
      (``JAX_COORDINATOR_PORT`` picks the port of a detected cluster). When it detects none (a
      laptop, a one-host GPU box), the run continues as one process and one line on stderr says so.
    - 'auto' or 'yes' with any of coordinator_address / num_processes / process_id set: those are
      passed through and JAX detects the rest; every error surfaces.
    - 'yes': always initialises; an undetected cluster is an error (the pod launcher passes it, so a
      worker never trains alone by mistake).
    - 'no': never initialises (one process).

    On CPU the gloo collectives are selected so cross-process all-reduces work (the two-process
    loopback tests); the setting does nothing on TPU/GPU.
    """
    mode = dist_cfg.initialize
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize={mode!r} is not one of 'auto', 'yes', 'no'.")
    if mode == "no":
        return False
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = int(dist_cfg.num_processes)
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = int(dist_cfg.process_id)
    # Only affects the CPU backend (harmless on TPU/GPU), where the default has no cross-process
    # collectives at all.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "yes" or kwargs:
        jax.distributed.initialize(**kwargs)
        return True
    try:
        jax.distributed.initialize()
    except ValueError as e:
        if _NO_CLUSTER not in str(e):
            raise  # a cluster was found but is misconfigured (e.g. JAX_COORDINATOR_ADDRESS alone)
        print("vlmjax: no multi-process cluster detected (TPU pod, SLURM, Open MPI, Kubernetes, "
              "JAX_COORDINATOR_ADDRESS): running as one process.", file=sys.stderr, flush=True)
        return False
    return True
