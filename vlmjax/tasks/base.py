"""What an experiment family hands the one trainer core.

A task never copies the trainer (DESIGN.md). It supplies data, a model's variables, a
``loss_fn(params, model_state, batch, rng, step) -> (loss, aux)``, evaluators and an end-of-run hook.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def load_pretrained(entries, abstract_params, shardings, skip=()) -> dict[str, Any]:
    """Loads HF checkpoint directories into subtrees of the param tree (any backbone family).

    entries: ``[(subtree_path, hf_dir), ...]``; ``subtree_path`` is 'a/b' inside params ('' = the
      whole tree), e.g. ``[("vision", "/ckpt/siglip-so400m"), ("decoder", "/ckpt/Qwen2.5-0.5B")]``.
      The module at that path must be the one ``vlmjax.convert.build(hf_dir)`` builds (same config),
      apart from the params ``skip`` removes.
    skip: regexes (``re.search``) on full param paths 'decoder/layers_0/self_attn/q_proj/lora_a' (the
      ``config.optim.frozen`` style). Matching params are not looked for in the checkpoint and keep their
      init: params the pretrained model does not have, e.g. LoRA adapters (``("lora_",)``) or routers.
      Any other param without a checkpoint tensor is still the converter's error.
    Returns a partial params tree with each tensor placed with its sharding; the trainer overrides
    the random init with it. Shape or name mismatches raise the converter's one clear error.
    """
    from vlmjax import convert  # pylint: disable=g-import-not-at-top  (transformers-free until used)

    from vlmjax.train.optimizer import compile_regexes  # pylint: disable=g-import-not-at-top
    patterns = compile_regexes(skip, "load_pretrained(skip)")

    def sub(tree, path):
        for k in [p for p in path.split("/") if p]:
            if k not in tree:
                raise ValueError(f"init_from path {path!r}: no {k!r} in params (have {sorted(tree)}).")
            tree = tree[k]
        return tree

    def drop_skipped(tree, prefix):
        """``tree`` without the leaves whose full path matches ``skip`` (emptied dicts removed too)."""
        if tree is None or not patterns:
            return tree
        out = {}
        for k, v in tree.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                kept = drop_skipped(v, name)
                if kept:
                    out[k] = kept
            elif not any(r.search(name) for r in patterns):
                out[k] = v
        return out

    out: dict[str, Any] = {}
    for path, hf_dir in entries:
        prefix = "/".join(p for p in path.split("/") if p)
        abstract = drop_skipped(sub(abstract_params, path), prefix)
        sharding = drop_skipped(sub(shardings, path) if shardings is not None else None, prefix)
        loaded = convert.load_params(hf_dir, convert.build(hf_dir), abstract, shardings=sharding)
        keys = [p for p in path.split("/") if p]
        if not keys:
            out.update(loaded)
            continue
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = loaded
    return out


class Task(abc.ABC):
    """Base class of the per-family task objects (``vlmjax/tasks/<family>.py``).

    Attributes:
      state_collections: names of non-trainable Linen collections carried in
        ``TrainState.model_state`` and checkpointed (e.g. ``("router_state",)``).
      units: what throughput is counted in ("tokens", "examples").
    """

    state_collections: tuple[str, ...] = ()
    units: str = "examples"

    def __init__(self, config, workdir: str | None):
        self.config = config
        self.workdir = workdir

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
        """Per-batch SUMS (e.g. summed NLL and token count), so batches combine exactly."""

    @abc.abstractmethod
    def finalize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """Turns summed eval statistics into reported metrics (loss, perplexity, ...)."""

    def pretrained_params(self, abstract_params, shardings) -> dict[str, Any] | None:
        """Weights from checkpoints the config names (``init_from``), placed with ``shardings``.

        A partial tree replaces only the leaves it has (e.g. a pretrained decoder inside a VLM).
        Called once on a fresh run, never on resume. None: keep the random init.
        """
        del abstract_params, shardings
        return None

    def log_summary(self, metrics: dict[str, float]) -> str:
        """Extra text for the training log line from this interval's metrics (e.g. router stats)."""
        del metrics
        return ""

    def units_per_step(self, global_batch_size: int) -> int:
        return global_batch_size

    def on_end(self, state, mesh) -> dict[str, Any]:
        """Hook after the last step (e.g. print a sample). Returns extra summary fields."""
        return {}
