"""The ``Task`` contract: what an experiment family hands the one trainer core.

A task never copies the trainer (docs/architecture.md). It supplies data, a model's variables, a
``loss_fn(params, model_state, batch, rng, step) -> (loss, aux)``, evaluators and an end-of-run hook.
The contract lives here, in ``train/``, so the trainer can type its argument without importing
``vlmjax.tasks`` (the families in ``vlmjax/tasks/`` subclass it; the runner builds them).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from vlmjax import errors

if TYPE_CHECKING:
    from vlmjax.diagnostics import VQAProbe


class Task(abc.ABC):
    """Base class of the per-family task objects (``vlmjax/tasks/<family>.py``).

    Attributes:
      state_collections: names of non-trainable Linen collections carried in
        ``TrainState.model_state`` and checkpointed (e.g. ``("router_state",)``).
      units: what throughput is counted in ("tokens", "examples").
    """

    state_collections: tuple[str, ...] = ()
    units: str = "examples"

    # How the training log line labels ``loss``: "loss", or "total" where the loss the optimizer sees
    # adds auxiliary terms to the task's own loss (routed decoders: LM + router losses; the task's
    # ``log_summary`` then shows the LM loss separately).
    loss_label: str = "loss"

    def __init__(self, config, workdir: str | None, stage_dirs: Mapping[str, str] | None = None):
        """config: the experiment's (locked) ConfigDict; workdir: where this run writes (None in
        tests/benchmarks that only build steps); stage_dirs: ``{stage name: workdir}`` of the earlier
        stages of the experiment (``config.stages``), all finished when the task is built."""
        self.config = config
        self.workdir = workdir
        self.stage_dirs = dict(stage_dirs or {})

    @classmethod
    def needed_stages(cls, config) -> tuple[str, ...]:
        """Names of ``config.stages`` this run needs before it starts (the runner trains them first,
        each in ``WORKDIR/<name>``). Default: all of them. A task whose stage only provides what
        ``config.init_from`` could also give (a backbone) returns () when ``init_from`` is set."""
        return tuple(config.stages) if "stages" in config else ()

    # ---- data ---------------------------------------------------------------------------
    @abc.abstractmethod
    def train_dataset(self, *, global_batch_size: int, seed: int, process_index: int,
                      process_count: int):
        """A checkpointable grain IterDataset of per-process numpy batches."""

    @abc.abstractmethod
    def eval_batches(self, *, global_batch_size: int, process_index: int,
                     process_count: int) -> list[dict[str, np.ndarray]]:
        """Finite, deterministic per-process eval batches, the same count on every process."""

    # ---- model --------------------------------------------------------------------------
    @abc.abstractmethod
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        """Linen variables (``params`` plus ``state_collections``), boxed with logical axes."""

    @abc.abstractmethod
    def loss_fn(self, params, model_state, batch, rng, step) -> tuple[jax.Array, dict[str, Any]]:
        """Returns ``(loss, {"metrics": {name: scalar}, "model_state": new_model_state})``.

        ``step`` is the optimizer step being computed (a traced int32 scalar), for schedules inside
        the loss (e.g. DTF's scheduled router temperatures).
        """

    @abc.abstractmethod
    def eval_fn(self, params, model_state, batch) -> dict[str, jax.Array]:
        """Per-batch SUMS as scalars (e.g. summed NLL and token count), so batches combine exactly;
        and/or per-example arrays [B, ...] (e.g. embeddings), which the trainer concatenates over
        batches, for metrics that need every item at once (retrieval)."""

    @abc.abstractmethod
    def finalize_eval(self, sums: dict[str, Any]) -> dict[str, Any]:
        """Turns the combined eval outputs (summed scalars as floats, concatenated per-example numpy
        arrays) into reported metrics (loss, perplexity, R@K, ...)."""

    def pretrained_params(self, abstract_params, shardings) -> dict[str, Any] | None:
        """Weights from checkpoints the config names (``init_from``), placed with ``shardings``.

        A partial tree gives only the leaves it has (e.g. a pretrained decoder inside a VLM): the
        trainer calls this first, on the abstract state, and then initialises only the params it
        lacks (``Trainer.init(pretrained)``), so the random init of the rest is never compiled nor
        run. Called once on a fresh run, never on resume. None: every param is randomly initialised.
        """
        del abstract_params, shardings
        return None

    def pretrained_model_state(self, abstract_model_state, shardings) -> dict[str, Any] | None:
        """Checkpoint-derived values of ``state_collections`` (a partial tree, placed with
        ``shardings``), e.g. a decoder's frozen 4-bit base in ``{"quant": ...}``. Called once on a
        fresh run, right after ``pretrained_params``. None: the collections keep their init."""
        del abstract_model_state, shardings
        return None

    def optimizer_config(self, optim_cfg):
        """The optimizer block the trainer builds from: ``config.optim`` plus what the task's own
        sections imply, as a copy (e.g. ``vision_encoder.freeze`` adds the tower's path regexes to
        ``frozen``). Default: ``config.optim`` unchanged."""
        return optim_cfg

    def log_summary(self, metrics: dict[str, float]) -> str:
        """Extra text for the training log line from this interval's metrics (e.g. router stats)."""
        del metrics
        return ""

    def units_per_step(self, global_batch_size: int) -> int:
        return global_batch_size

    def on_end(self, state, mesh) -> dict[str, Any]:
        """Hook after the last step (e.g. print a sample). Returns extra summary fields."""
        return {}

    # ---- diagnostics (python -m vlmjax.diagnose; config.diagnose_at_end) ------------------------
    def vqa_probe(self) -> VQAProbe:
        """What the VQA diagnostics (``vlmjax.diagnostics``, docs/diagnostics.md) need to measure how
        much the model uses its images: a ``vlmjax.diagnostics.VQAProbe``. The diagnostics run this
        task's own jitted ``eval_fn`` over its eval batches with real, shuffled and blank images; the
        probe turns the combined outputs (what ``finalize_eval`` gets) into per-question correctness
        and names the image field, the blank image, the training questions (bias baselines), and
        optionally a pooled image-feature function and a question-only baseline. Default: the task
        has none (a one-line error)."""
        raise errors.UserError(
            f"config.task={self.config.task!r} ({type(self).__name__}) has no VQA diagnostics: they "
            "measure a model that answers questions about images (e.g. task 'vlm'); a task supports "
            "them by implementing Task.vqa_probe().")

    @classmethod
    def has_vqa_probe(cls) -> bool:
        """Whether the task implements ``vqa_probe`` (checked before training with diagnose_at_end)."""
        return cls.vqa_probe is not Task.vqa_probe
