"""The runner: builds an experiment's task and hands it to the one trainer, stage by stage.

An experiment whose task needs an earlier run declares it in ``config.stages`` (a ConfigDict of
name -> complete sub-experiment config; ``configs/reuse.py`` trains its ViT as stage 'backbone').
The runner trains each stage the task asks for (``Task.needed_stages``) in ``WORKDIR/<name>``, then
the experiment itself in ``WORKDIR/<config.task>``; without stages the experiment runs in WORKDIR.
A finished stage is skipped (its ``summary.json`` says it reached ``total_steps``); an interrupted one
resumes like any run. Tasks get the finished stages' workdirs (``task.stage_dirs``) and never call
the trainer themselves.

This module sits above ``vlmjax.tasks`` and ``vlmjax.train`` (docs/architecture.md): it is the only
place that imports both. It also runs the VQA diagnostics of a finished run (``diagnose``: after
training with ``config.diagnose_at_end``, or ``python -m vlmjax.diagnose``; docs/diagnostics.md).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from etils import epath

from vlmjax import diagnostics, errors, sharding, tasks
from vlmjax import tree as tree_lib
from vlmjax.train import checkpoint as checkpoint_lib
from vlmjax.train import config as config_lib
from vlmjax.train import metrics as metrics_lib
from vlmjax.train import trainer

DIAGNOSTICS = "diagnostics"  # WORKDIR/diagnostics: the report of config.diagnose_at_end


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
    """Runs the experiment ``config`` in ``workdir`` (stages first); returns its trainer summary.
    With ``config.diagnose_at_end``, a finished run's diagnostics go to ``WORKDIR/diagnostics``
    (once: a rerun of a finished, diagnosed run does nothing)."""
    config_lib.validate(config)
    diagnose_at_end = bool(config.get("diagnose_at_end", False))
    if diagnose_at_end and not tasks.task_class(config.task).has_vqa_probe():
        raise errors.UserError(f"config.diagnose_at_end=True, but config.task={config.task!r} has no VQA "
                               "diagnostics (Task.vqa_probe); set config.diagnose_at_end=False.")
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
        # The stage's own workdir (a stage with stages of its own trains in sub_dir/<its task>).
        stage_dirs[name] = str(stage_plan(sub, sub_dir)[1])
    if plan and is_main:
        print(f"=== stage {len(plan) + 1}/{len(plan) + 1}: {config.task!r} ({config.total_steps} steps) in "
              f"{own_dir}", flush=True)
    out_dir = metrics_lib.as_path(workdir) / DIAGNOSTICS
    done = trainer.finished_summary(config, own_dir)
    if done is not None:  # checked before building the task (its data, tokenizer) for nothing
        if diagnose_at_end and not (out_dir / diagnostics.report.JSON_NAME).exists():
            diagnose(config, own_dir, tasks.build(config, str(own_dir), stage_dirs), out_dir)
        return done
    # Batch vs mesh is checked before the task reads and tokenizes its data, so the error is instant.
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate_for_mesh(config, sharding.data_parallel_size(mesh), jax.process_count())
    task = tasks.build(config, str(own_dir), stage_dirs)
    summary = trainer.run(config, own_dir, task)
    if diagnose_at_end and summary.get("finished"):
        diagnose(config, own_dir, task, out_dir)
    return summary


# ------------------------------------------------------------------------------------------------
# Diagnostics of a finished run (docs/diagnostics.md)
# ------------------------------------------------------------------------------------------------

def saved_run(workdir) -> tuple[Any, epath.Path, dict[str, str]]:
    """(config, the experiment's own workdir, {stage: workdir}) of the finished run in ``workdir``:
    the experiment's own folder (``config.json``) or, for an experiment with stages, the folder above
    it (``WORKDIR/<config.task>``). A missing or unfinished run is a one-line error saying what to run."""
    top = metrics_lib.as_path(workdir)
    own = top
    if not (top / "config.json").exists():
        found = [d for d in (sorted(top.iterdir()) if top.is_dir() else []) if (d / "config.json").exists()
                 and metrics_lib.read_json(d / "config.json").get("task") == d.name]
        if len(found) != 1:
            what = "no vlmjax run" if not found else f"{len(found)} runs ({', '.join(d.name for d in found)})"
            raise errors.UserError(
                f"--workdir={os.fspath(workdir)}: {what} (no config.json there, nor in a WORKDIR/<task> folder). "
                "Train one first, e.g. python -m vlmjax.main --config=configs/trm_vlm_qa.py:smoke "
                f"--workdir={os.fspath(workdir)}, or point --workdir at the run's folder.")
        own = found[0]
    config = config_lib.from_json(metrics_lib.read_json(own / "config.json"))
    staged = "stages" in config and bool(config.stages) and own.name == config.task
    summary = own / trainer.SUMMARY
    if not summary.exists() or not metrics_lib.read_json(summary).get("finished"):
        steps = checkpoint_lib.checkpoint_steps(own)
        where = f"checkpoint step {steps[-1]} of {config.total_steps}" if steps else "no checkpoint yet"
        raise errors.UserError(
            f"the run in {os.fspath(own)} is not finished ({where}): finish it first by rerunning the "
            "python -m vlmjax.main command that started it (same --config, "
            f"--workdir={os.fspath(own.parent if staged else own)}), then diagnose it.")
    stage_dirs: dict[str, str] = {}
    if staged:
        for name in tasks.task_class(config.task).needed_stages(config):
            if (own.parent / name).exists():
                stage_dirs[name] = os.fspath(own.parent / name)
    return config, own, stage_dirs


def diagnose(config, own_dir, task, out_dir=None, *, split: str = "val") -> dict[str, Any]:
    """Runs the VQA diagnostics of the finished run in ``own_dir`` (its task ``task``): the latest
    checkpoint's params through the task's jitted eval with real, shuffled and blank images, the bias
    baselines, feature diversity and gates (per checkpoint step, or as logged in metrics.jsonl).
    Prints the table; writes ``diagnostics.json`` and PNGs to ``out_dir`` (None: nothing written).
    ``split``: 'val' (the task's eval batches; the only split the Task contract gives)."""
    if split not in ("val", "eval"):
        raise errors.UserError(f"--split={split!r}: the diagnostics run on the task's held-out eval batches; "
                               "use --split=val.")
    t0 = time.perf_counter()
    probe = task.vqa_probe()
    own_dir = metrics_lib.as_path(own_dir)
    mesh = sharding.make_mesh(config.mesh)
    tr = trainer.Trainer(config, task, mesh)
    abstract = {"params": tr.abstract_state.params}
    if jax.tree.leaves(tr.abstract_state.model_state):
        abstract["model_state"] = tr.abstract_state.model_state
    state, step = checkpoint_lib.read_state(own_dir, abstract)
    params, model_state = state["params"], state.get("model_state", tr.abstract_state.model_state)
    batches = task.eval_batches(global_batch_size=config.batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count())
    gate_paths = diagnostics.gates.find_gates(params, probe.gate_patterns)
    trajectory, source = {}, ""
    if gate_paths:
        train_records = metrics_lib.read_metrics(own_dir, "train") if (own_dir / "metrics.jsonl").exists() else []
        trajectory = diagnostics.gates.metric_trajectory(train_records)
        source = "metrics.jsonl"
        if not trajectory:  # the gate params of every kept checkpoint, read alone
            flat = {p: a for p, a in tree_lib.flatten(abstract["params"]).items() if p in gate_paths}
            gate_tree = {"params": tree_lib.unflatten(flat)}
            points = [(s, checkpoint_lib.read_state(own_dir, gate_tree, step=s)[0]["params"])
                      for s in checkpoint_lib.checkpoint_steps(own_dir)]
            trajectory = diagnostics.gates.trajectory(points, probe.gate_patterns)
            source = "checkpoints"
    features = None
    if probe.image_features is not None:
        feature_step = tr.jit_eval(probe.image_features)

        def pooled(batch):  # this process's rows of the replicated (global) output
            n = len(batch[probe.mask_key])
            return jax.device_get(feature_step(params, model_state, tr.put(batch)))[jax.process_index() * n:][:n]
        features = pooled
    report = diagnostics.diagnose(
        probe, batches, lambda bs: tr.eval_outputs(params, model_state, bs), features=features,
        params=jax.device_get(tree_lib.unflatten({k: v for k, v in tree_lib.flatten(params).items()
                                                  if k in gate_paths})),
        trajectory=trajectory, trajectory_source=source,
        meta={"workdir": os.fspath(own_dir), "task": config.task, "step": int(step), "split": split})
    if jax.process_index() == 0:
        print(diagnostics.report.format_table(report), flush=True)
        if out_dir is not None:
            written = diagnostics.report.write(report, out_dir)
            print(f"diagnostics: {written['json']}" + (f", {', '.join(written['plots'])}" if written["plots"] else "")
                  + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
    return report


def diagnose_workdir(workdir, out_dir=None, *, split: str = "val") -> dict[str, Any]:
    """``python -m vlmjax.diagnose``: the diagnostics of the finished run in ``workdir`` (``saved_run``),
    written to ``out_dir`` (None: ``WORKDIR/diagnostics``)."""
    config, own, stage_dirs = saved_run(workdir)
    task = tasks.build(config, os.fspath(own), stage_dirs)
    out = metrics_lib.as_path(workdir) / DIAGNOSTICS if out_dir is None else out_dir
    return diagnose(config, own, task, out, split=split)
