"""Pieces every task family shares: the trainer's ``Task`` contract and pretrained loading."""

from __future__ import annotations

import json
from typing import Any

from etils import epath

from vlmjax import tree
from vlmjax.train.task import Task


class DataTask(Task):
    """A task whose data object (``self.data``, built in ``__init__``: ``vlmjax.data`` builders return
    objects with these two methods) gives the batches; ``config.eval.max_batches`` caps evaluation
    (0 = the whole eval split)."""

    data: Any

    def train_dataset(self, *, global_batch_size, seed, process_index, process_count):
        return self.data.train_dataset(global_batch_size=global_batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count)

    def eval_batches(self, *, global_batch_size, process_index, process_count):
        return self.data.eval_batches(global_batch_size=global_batch_size, process_index=process_index,
                                      process_count=process_count, max_batches=self.config.eval.max_batches)


def is_hf_dir(path: str) -> bool:
    """True for a Hugging Face checkpoint directory: an ``init_from`` that may also name a vlmjax
    workdir, which holds a config.json too, but one with the run's ``task`` (and ``checkpoints/``
    once it has trained)."""
    path = epath.Path(path)
    if not (path / "config.json").exists() or (path / "checkpoints").exists():
        return False
    try:
        return "task" not in json.loads((path / "config.json").read_text())
    except ValueError:  # not JSON: let the HF loader say what is wrong with it
        return True


def fit_saved(saved, abstract, shardings=None, *, where: str, hint: str) -> Any:
    """A saved params (sub)tree fitted to this model's: every leaf of ``abstract`` (ShapeDtypeStructs),
    cast to its dtype and placed with ``shardings`` (same structure, or None).

    A missing leaf or another shape raises one ValueError: "<where> does not fit this model (<first
    mismatch>); <hint>" (for stages: give the stage the same sections, or delete its workdir).
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    want, have = tree.flatten(abstract), tree.flatten(saved)
    bad = [f"{k}: {tuple(have[k].shape) if k in have else 'missing'} vs {tuple(want[k].shape)}"
           for k in want if k not in have or tuple(have[k].shape) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"{where} does not fit this model ({bad[0]}); {hint}")
    params = tree.unflatten({k: jnp.asarray(have[k], want[k].dtype) for k in want})
    if shardings is not None:
        flat = tree.flatten(shardings)
        params = tree.unflatten({k: jax.device_put(v, flat[k]) for k, v in tree.flatten(params).items()})
    return params


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
    Returns a partial params tree with each tensor placed with its sharding; the trainer builds the
    state around it (``Trainer.init(pretrained)``: these arrays as they are, only the params they
    lack initialised). Shape or name mismatches raise the converter's one clear error.
    """
    from vlmjax import convert  # pylint: disable=g-import-not-at-top  (transformers-free until used)

    patterns = tree.compile_regexes(skip, "load_pretrained(skip)")
    out: dict[str, Any] = {}
    for path, hf_dir in entries:
        prefix = "/".join(p for p in path.split("/") if p)
        abstract = tree.filter_paths(tree.subtree(abstract_params, path, "init_from"), patterns, prefix)
        sharding = None if shardings is None else tree.filter_paths(
            tree.subtree(shardings, path, "init_from"), patterns, prefix)
        loaded = convert.load_params(hf_dir, convert.build(hf_dir), abstract, shardings=sharding)
        tree.set_subtree(out, path, loaded)
    return out


__all__ = ["DataTask", "Task", "fit_saved", "is_hf_dir", "load_pretrained"]
