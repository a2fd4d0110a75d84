"""Multi-process start-up (TPU VM pods, multi-node GPU, CPU tests with gloo)."""

from __future__ import annotations

import os

import jax

# Environment variables that mean "this process is one of several".
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                     "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_says_multiprocess() -> bool:
    if os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") not in ("", "localhost") and \
            "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize(dist_cfg) -> bool:
    """Calls ``jax.distributed.initialize`` when configured or when the environment says so.

    dist_cfg: ``config.distributed`` with ``initialize`` ('auto' | 'yes' | 'no'),
    ``coordinator_address`` ('host:port'), ``num_processes`` and ``process_id`` (0/-1 = let JAX
    detect them: TPU pods and SLURM describe themselves). On CPU the gloo collectives are selected
    so cross-process all-reduces work (the two-process loopback tests).
    Returns whether it initialised.
    """
    mode = dist_cfg.initialize
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize={mode!r} is not one of 'auto', 'yes', 'no'.")
    explicit = bool(dist_cfg.coordinator_address)
    if mode == "no" or (mode == "auto" and not explicit and not _env_says_multiprocess()):
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
    jax.distributed.initialize(**kwargs)
    return True
