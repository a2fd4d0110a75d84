"""The trainer's part of every experiment config, and start-up validation.

Experiment files in ``configs/`` start from ``base_config()`` and add ``model`` and ``data`` sections
(big_vision ``configs/common.py``). Configs are locked before use, so ``--config.totl_steps=5``
fails with ``vlmjax: error: config.totl_steps: no such field (did you mean 'total_steps'?)``.
"""

from __future__ import annotations

import ml_collections

from vlmjax.train import optimizer


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "lm"                 # which vlmjax.tasks family builds model, loss and evaluators
    c.seed = 0
    # A pretrained checkpoint to start from (a local HF directory of config.json + safetensors); the
    # task decides which part of the model it initialises. '' = random init.
    c.init_from = ""
    c.total_steps = 1000          # optimizer updates; the lr schedule spans exactly these
    c.batch_size = 32             # GLOBAL batch (all processes and devices)
    c.log_every = 50
    c.eval_every = 500            # 0 = only at the start and the end
    c.eval_at_start = True        # validation before the first step (a resumed run skips it)
    c.ckpt_every = 500            # 0 = only at the end
    c.keep_ckpts = 3
    c.async_ckpt = True
    c.stop_after = 0              # >0: stop (as if preempted) after this step, checkpoint saved
    # When every checkpoint in the workdir is unusable (all moved to corrupt_checkpoints/), the run
    # stops and says so; True starts it again from step 0 instead.
    c.allow_fresh_start = False
    # After the run finishes, run the VQA diagnostics (how much the model uses its images; tasks
    # with Task.vqa_probe, e.g. 'vlm'; docs/diagnostics.md) and write WORKDIR/diagnostics/. Like
    # `python -m vlmjax.diagnose --workdir=WORKDIR` afterwards.
    c.diagnose_at_end = False
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
    # Overrides of vlmjax.sharding.DEFAULT_RULES: tuple of (logical_name, mesh axis | tuple | None).
    c.sharding = ml_collections.ConfigDict(dict(rules=()))
    c.optim = optimizer.default_config()
    c.eval = ml_collections.ConfigDict(dict(max_batches=16))
    c.wandb = ml_collections.ConfigDict(dict(mode="disabled", project="vlmjax", name="", run_id=""))
    # jax.distributed: 'auto' initializes when the environment describes a multi-process job
    # (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS); 'yes' always; 'no' never.
    c.distributed = ml_collections.ConfigDict(dict(
        initialize="auto", coordinator_address="", num_processes=0, process_id=-1))
    return c


_POSITIVE = ("total_steps", "batch_size", "log_every", "keep_ckpts")
_NON_NEGATIVE = ("eval_every", "ckpt_every", "stop_after")


def validate(config) -> None:
    """Raises ValueError naming the field and what it accepts."""
    for k in _POSITIVE:
        if int(config[k]) <= 0:
            raise ValueError(f"config.{k}={config[k]} must be a positive integer.")
    for k in _NON_NEGATIVE:
        if int(config[k]) < 0:
            raise ValueError(f"config.{k}={config[k]} must be >= 0 (0 disables).")
    frac = float(config.optim.max_nonfinite_fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"config.optim.max_nonfinite_fraction={frac} must be in [0, 1].")
    if int(config.optim.max_consecutive_nonfinite) < 1:
        raise ValueError(f"config.optim.max_consecutive_nonfinite={config.optim.max_consecutive_nonfinite} "
                         "must be >= 1.")
    if config.optim.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"config.optim.schedule={config.optim.schedule!r} is not one of 'cosine', "
                         "'linear', 'constant'.")
    accum = int(config.optim.grad_accum_steps)
    if accum < 1:
        raise ValueError(f"config.optim.grad_accum_steps={accum} must be >= 1.")
    if config.batch_size % accum:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                         f"config.optim.grad_accum_steps={accum}.")
    if config.distributed.initialize not in ("auto", "yes", "no"):
        raise ValueError(f"config.distributed.initialize={config.distributed.initialize!r} is not one "
                         "of 'auto', 'yes', 'no'.")


def validate_for_mesh(config, dp_size: int, process_count: int) -> None:
    """Batch divisibility against the data-parallel mesh size and process count."""
    accum = int(config.optim.grad_accum_steps)
    micro = config.batch_size // accum
    if micro % dp_size:
        raise ValueError(
            f"config.batch_size={config.batch_size} (per micro-batch {micro} with grad_accum_steps={accum}) "
            f"is not divisible by the data-parallel size {dp_size} (mesh data x fsdp). Use a multiple of "
            f"{dp_size * accum}, or change config.mesh.")
    if config.batch_size % process_count:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{process_count} processes.")


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def from_json(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved ``config.json`` (``config.to_json_best_effort()``) as a locked ConfigDict again;
    JSON lists become tuples, as the config files write them."""
    c = ml_collections.ConfigDict(_tuples(dict(saved)))
    c.lock()
    return c
