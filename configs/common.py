"""Pieces every experiment file in ``configs/`` shares (big_vision ``configs/common.py``).

An experiment file holds its values written out; only what is truly common lives here: choosing a
variant with a did-you-mean hint, and the trainer block (the ``vlmjax.train`` schema with the
experiment's values applied). Config files import this as ``from configs import common``; the
runner (``python -m vlmjax.main``) puts the directory above ``configs/`` on ``sys.path``.
"""

from __future__ import annotations

import difflib
import os

import ml_collections

from vlmjax.train import config as train_config


def variant(arg: str | None, variants: tuple[str, ...], file: str) -> str:
    """The variant named by ``--config=configs/FILE.py:ARG`` ('' = 'default'); a typo fails with a hint."""
    name = arg or "default"
    if name not in variants:
        close = difflib.get_close_matches(name, variants, n=1)
        raise ValueError(f"configs/{os.path.basename(file)}:{name} is not a variant; choose one of "
                         f"{list(variants)}" + (f" (did you mean {close[0]!r}?)" if close else "."))
    return name


def trainer(task: str, **values) -> ml_collections.ConfigDict:
    """The trainer's part of an experiment: ``vlmjax.train.config.base_config()`` (every field with its
    documented default) with ``task`` and the experiment's ``values`` (fields of that block) set."""
    c = train_config.base_config()
    c.task = task
    for key, value in values.items():
        if key not in c:
            raise KeyError(f"{key!r} is not a trainer field; have {sorted(c)}.")
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    return c


def route_pretrained(c: ml_collections.ConfigDict, variant: str) -> None:
    """The ``:pretrained`` / ``:pretrained_lora`` recipe of the routed configs (mod, dtf, tdtf).

    Route a pretrained Llama/Qwen decoder (--config.init_from) without breaking it (docs/routing.md,
    "Routing a pretrained decoder"): step 0 is the dense model (the gate is 1 in the forward pass,
    straight-through to the router; the capacity anneals from 1.0 to gamma over the first 30% of
    steps; the causal routers start by choosing every token), L_prior / L_tpn are scale-free, and the
    routers (params under routers_*, at 20x the lr) are clipped apart from the LM's gradient.
    ``pretrained_lora`` adds LoRA r=16, alpha=32, dropout 0.05 on the attention and MLP projections of
    a frozen base (0.5B+ models on one accelerator); the routers train fully.
    """
    c.routing.update(dict(gate_forward="one", capacity_warmup=0.3, causal_bias_init=3.0, prior_loss="relative"))
    c.optim.update(dict(clip_groups=(r"(^|/)routers_",), lr_groups=((r"(^|/)routers_", 20.0),)))
    if variant == "pretrained_lora":
        c.model.update(dict(lora_rank=16, lora_alpha=32.0, lora_dropout=0.05))
        c.optim.update(dict(trainable=(r"lora_", r"(^|/)routers_"), lr=1e-4))
