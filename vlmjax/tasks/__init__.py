"""Experiment families. Each builds a model, a loss and evaluators from the config."""

from __future__ import annotations

import difflib

from vlmjax.tasks.base import Task, load_pretrained


_EXTRA: dict[str, type] = {}


def register(name: str, cls: type) -> None:
    """Adds a task family defined outside vlmjax (a research fork, a test)."""
    _EXTRA[name] = cls


def _registry():
    # Imported lazily so that `import vlmjax.tasks` stays light.
    from vlmjax.tasks import lm, reuse, routed_lm, video_cls  # pylint: disable=g-import-not-at-top

    return {"lm": lm.LMTask, "routed_lm": routed_lm.RoutedLMTask, "video_cls": video_cls.VideoClsTask,
            "reuse": reuse.ReuseTask, **_EXTRA}


def build(config, workdir: str | None) -> Task:
    reg = _registry()
    if config.task not in reg:
        hint = difflib.get_close_matches(config.task, reg, n=1)
        raise ValueError(f"config.task={config.task!r} is not one of {sorted(reg)}"
                         + (f"; did you mean {hint[0]!r}?" if hint else "."))
    return reg[config.task](config, workdir)


__all__ = ["Task", "build", "load_pretrained", "register"]
