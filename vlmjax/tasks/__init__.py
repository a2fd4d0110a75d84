"""Experiment families. Each builds a model, a loss and evaluators from the config.

``build`` is the one place a task is made from ``config.task``; the runner (``vlmjax.run``) calls it
and hands the task to the trainer, which never imports this package.
"""

from __future__ import annotations

import difflib

from vlmjax.tasks.base import Task, load_pretrained

_EXTRA: dict[str, type[Task]] = {}


def register(name: str, cls: type[Task]) -> None:
    """Adds a task family defined outside vlmjax (a research fork, a test)."""
    _EXTRA[name] = cls


def _registry() -> dict[str, type[Task]]:
    # Imported lazily so that `import vlmjax.tasks` stays light.
    from vlmjax.tasks import alignment, foveated, fusion_vqa, lm, reuse, routed_lm, scene_parse, video_cls, vlm  # pylint: disable=g-import-not-at-top

    return {"alignment": alignment.AlignmentTask, "foveated": foveated.FoveatedTask, "fusion_vqa": fusion_vqa.FusionVQATask, "lm": lm.LMTask,
            "routed_lm": routed_lm.RoutedLMTask, "scene_parse": scene_parse.SceneParseTask,
            "video_cls": video_cls.VideoClsTask,
            "reuse": reuse.ReuseTask, "vlm": vlm.VLMTask, **_EXTRA}


def task_class(name: str) -> type[Task]:
    """The Task class registered as ``name`` (``config.task``); a typo fails with a hint."""
    reg = _registry()
    if name not in reg:
        hint = difflib.get_close_matches(name, reg, n=1)
        raise ValueError(f"config.task={name!r} is not one of {sorted(reg)}"
                         + (f"; did you mean {hint[0]!r}?" if hint else "."))
    return reg[name]


def build(config, workdir, stage_dirs=None) -> Task:
    """The task of ``config`` writing in ``workdir``; ``stage_dirs``: finished earlier stages' workdirs."""
    return task_class(config.task)(config, workdir, stage_dirs)


__all__ = ["Task", "build", "load_pretrained", "register", "task_class"]
