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
