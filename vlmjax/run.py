"""The runner: builds an experiment's task and hands it to the one trainer, stage by stage.

An experiment whose task needs an earlier run declares it in ``config.stages`` (a ConfigDict of
name -> complete sub-experiment config; ``configs/reuse.py`` trains its ViT as stage 'backbone').
The runner trains each stage the task asks for (``Task.needed_stages``) in ``WORKDIR/<name>``, then
the experiment itself in ``WORKDIR/<config.task>``; without stages the experiment runs in WORKDIR.
A finished stage is skipped (its ``summary.json`` says it reached ``total_steps``); an interrupted one
resumes like any run. Tasks get the finished stages' workdirs (``task.stage_dirs``) and never call
the trainer themselves.

This module sits above ``vlmjax.tasks`` and ``vlmjax.train`` (docs/architecture.md): it is the only
place that imports both.
"""

from __future__ import annotations

from typing import Any

import jax
from etils import epath

from vlmjax import sharding, tasks
from vlmjax.train import config as config_lib
from vlmjax.train import metrics as metrics_lib
from vlmjax.train import trainer


def stage_plan(config, workdir) -> tuple[list[tuple[str, Any, epath.Path]], epath.Path]:
    """([(stage name, stage config, stage workdir), ...] in run order, the experiment's own workdir)."""
    workdir = metrics_lib.as_path(workdir)
    if "stages" not in config:
        return [], workdir
    declared = list(config.stages)
    needed = tasks.task_class(config.task).needed_stages(config)
    unknown = [n for n in needed if n not in declared]
    if unknown:
        raise ValueError(f"config.task={config.task!r} needs stage(s) {unknown} that config.stages "
                         f"does not declare (have {declared}).")
    if config.task in declared:
        raise ValueError(f"config.stages may not have a stage named after the task ({config.task!r}): "
                         f"WORKDIR/{config.task} is the experiment's own workdir.")
    return [(n, config.stages[n], workdir / n) for n in needed], workdir / config.task


def run(config, workdir) -> dict[str, Any]:
    """Runs the experiment ``config`` in ``workdir`` (stages first); returns its trainer summary."""
    config_lib.validate(config)
    plan, own_dir = stage_plan(config, workdir)
    is_main = jax.process_index() == 0
    stage_dirs: dict[str, str] = {}
    for i, (name, sub, sub_dir) in enumerate(plan):
        if is_main:
            print(f"=== stage {i + 1}/{len(plan) + 1}: {name!r} ({sub.task}, {sub.total_steps} steps) in "
                  f"{sub_dir}", flush=True)
        summary = run(sub, sub_dir)
        if not summary.get("finished"):
            raise SystemExit(f"Stage {name!r} stopped at step {summary['step']} of {sub.total_steps}; run the "
                             "same command again to resume it.")
        stage_dirs[name] = str(sub_dir)
    if plan and is_main:
        print(f"=== stage {len(plan) + 1}/{len(plan) + 1}: {config.task!r} ({config.total_steps} steps) in "
              f"{own_dir}", flush=True)
    done = trainer.finished_summary(config, own_dir)
    if done is not None:  # checked before building the task (its data, tokenizer) for nothing
        return done
    # Batch vs mesh is checked before the task reads and tokenizes its data, so the error is instant.
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate_for_mesh(config, sharding.data_parallel_size(mesh), jax.process_count())
    task = tasks.build(config, str(own_dir), stage_dirs)
    return trainer.run(config, own_dir, task)
