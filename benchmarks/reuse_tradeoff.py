r"""The token-reuse trade-off: how much of a video ViT's compute can be skipped at what fidelity.

  pip install -e ".[bench]"
  python benchmarks/reuse_tradeoff.py                       # 2-core CPU: see the README for times
  python benchmarks/reuse_tradeoff.py --config=configs/reuse.py:vitb16 --out=benchmarks/results/reuse_tradeoff_gpu

The paper's accuracy-vs-speedup figure (Deja Vu, PVLDB 2025: 2.64x within 2% error) on procedural
video. One backbone (``configs/reuse.py:deep``: a 12-layer ViT-B/16-layout ViT, trained from scratch
by the experiment's 'backbone' stage on static-camera clips) and, for every reuse target in
--targets, the reuse modules trained by the real trainer (``vlmjax.run.run``) with
``--config.reuse_loss.target_reuse_rate=T`` against it. Every point is evaluated on held-out
static-camera clips and on panning clips (the same clips with ``background='pan'``: nearly every
patch changes), with the hard path as deployed (``execution='packed'``: each clip runs exactly the
tokens its decisions recompute):

- decided / executed / compute reuse: tokens decided "reuse" and tokens actually restored (per reuse
  layer, frames with references), and the clip's (frame, layer, token) computations skipped, I frames,
  layer 0, CLS and chunk padding counted as computed (``tasks.reuse`` metrics);
- FLOPs ratio vs the original model: analytic (``ReuseTask.flops_ratio``, the measured token counts
  per layer) and XLA (``cost_analysis`` of the hard path compiled with ``execution='bucket'`` at one
  static capacity equal to the measured mean recompute count: a static-shape program XLA can count);
- wall-time ratio of the jitted packed hard path vs ``original_clip`` on this device (median of
  --iters calls on one eval batch);
- pooled cosine to the original model (mean over frames and clips, and the mean per-clip minimum);
- accuracy: the ridge probe on clip embeddings (fit on the original model's train embeddings) and the
  backbone's own classification head on every frame, original vs reuse.
The training-free ``topk_similarity`` policy (reuse the most similar fraction of tokens per frame) at
--topk rates is the baseline beside it.

Runs are resumable: finished trainer runs are reused (``WORKDIR/t<target>``), finished rows are kept
in ``<out>.json`` (--force reruns them). Outputs: ``<out>.md``, ``<out>.json``, ``<out>.png``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from vlmjax import run as runner  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax.models import reuse as R  # noqa: E402
from vlmjax.tasks import reuse as reuse_task  # noqa: E402
from vlmjax.tasks import video_cls  # noqa: E402
from vlmjax.train import checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/reuse.py:deep", help="Reuse experiment FILE[:variant].")
    p.add_argument("--workdir", default="/tmp/vlmjax_reuse_tradeoff", help="Runs go to WORKDIR/<name>.")
    p.add_argument("--targets", default="0.3,0.5,0.7,0.85,0.95", help="rloss target reuse rates to train.")
    p.add_argument("--topk", default="0.5,0.7,0.85,0.95", help="topk_similarity fractions ('' = none).")
    p.add_argument("--steps", type=int, default=0, help="Reuse training steps per target (0 = the config's).")
    p.add_argument("--backbone_steps", type=int, default=0, help="Backbone stage steps (0 = the config's).")
    p.add_argument("--eval_batches", type=int, default=0, help="Eval batches per split (0 = the config's).")
    p.add_argument("--probe_train", type=int, default=-1, help="Probe training clips (-1 = the config's).")
    p.add_argument("--iters", type=int, default=5, help="Timed calls per wall-time measurement.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra config overrides for every run, e.g. --set=reuse.chunk_tokens=32.")
    p.add_argument("--suffix", default="", help="Appended to every point's name and run dir (rows of other "
                   "--set overrides beside the defaults in one table, e.g. --suffix=-r16).")
    p.add_argument("--out", default="", help="Output prefix (default benchmarks/results/reuse_tradeoff_<backend>).")
    p.add_argument("--force", action="store_true", help="Re-evaluate rows already in <out>.json.")
    return p.parse_args(argv)


def _load(spec: str):
    path, _, variant = spec.partition(":")
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    module_spec = importlib.util.spec_from_file_location("_reuse_tradeoff_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def _set(config, key: str, value: str) -> None:
    """--set=a.b=VALUE: VALUE parsed as a Python literal when it is one (else a string)."""
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    try:
        node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        node[leaf] = value


def make_config(args, target: float | None, topk: float | None):
    config = _load(args.config)
    if args.steps:
        config.total_steps = args.steps
    if args.eval_batches:
        config.eval.max_batches = args.eval_batches
    if args.probe_train >= 0:
        config.probe.num_train = args.probe_train
    if args.backbone_steps and "stages" in config:
        config.stages.backbone.total_steps = args.backbone_steps
    for item in args.set:
        key, _, value = item.partition("=")
        _set(config, key, value)
    if target is not None:
        config.reuse_loss.target_reuse_rate = target
    if topk is not None:
        config.reuse.policy = "topk_similarity"
        config.reuse.topk_reuse_fraction = topk
        config.total_steps = 0  # nothing to train: the policy is fixed
    return config


def train_backbone(config, workdir: str) -> str:
    """The experiment's 'backbone' stage, once for every point of the sweep."""
    bdir = os.path.join(workdir, "backbone")
    summary = runner.run(config.stages.backbone, bdir)
    if not summary.get("finished"):
        raise SystemExit(f"the backbone stage in {bdir} did not finish; rerun to resume it.")
    return str(runner.stage_plan(config.stages.backbone, bdir)[1])  # its own workdir


def evaluate(config, run_dir: str, params, split_label: str, iters: int) -> dict[str, Any]:
    """Metrics of the trained reuse model ``params`` on one clip family (see the module docstring)."""
    task = tasks.build(config, run_dir)
    batches = task.eval_batches(global_batch_size=config.batch_size, process_index=0, process_count=1)
    eval_fn = jax.jit(task.eval_fn)
    sums: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(eval_fn(params, {}, batch))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    m = task.finalize_eval(sums)
    layers = task.reuse_config.layers(task.vit_config.num_hidden_layers)
    n_tokens = task.data.num_patches + task.vit_config.num_prefix_tokens
    row = {"clips": split_label, "decided": m.get("reuse_rate"), "executed": m.get("reuse_rate_executed"),
           "compute_reuse": m.get("compute_reuse_rate"), "analytic_ratio": m["flops_ratio"],
           "pooled_cos": m.get("pooled_cos"), "pooled_cos_min": m.get("pooled_cos_min"),
           "patch_cos": m.get("patch_cos")}
    # XLA FLOPs: the hard path at one static capacity = the mean recompute count over the reuse layers.
    recompute = float(np.mean([m.get(f"computed/{l}", 1.0) * n_tokens - task.model_fixed for l in layers]))
    nr = n_tokens - task.model_fixed
    batch = batches[0]
    frames = video_cls.normalize(jnp.asarray(batch["frames"]), task.mean, task.std)
    cmap = jnp.asarray(batch["change_energy"], jnp.float32)
    grouping = task.groupings["eval"]

    def hard(model):
        def f(params, frames, cmap):
            (out, _), _ = model.apply({"params": params}, frames, grouping, cmap, mode="hard",
                                      method=model.encode_clip, mutable=[R.REUSE_CACHE])
            return out["pooled"]
        return jax.jit(f)
    orig = jax.jit(lambda params, frames: task.model.apply({"params": params}, frames,
                                                           method=task.model.original_clip)["pooled"])
    cap = max(1, min(nr, int(round(recompute))))
    static = task.model.clone(reuse_config=dataclasses.replace(task.reuse_config, execution="bucket",
                                                               capacity_buckets=(cap / nr,)))
    b = frames.shape[0]
    # Each program compiled once: its executable gives the XLA FLOPs and is the one timed.
    orig = orig.lower(params, frames).compile()
    static_exe = hard(static).lower(params, frames, cmap).compile()
    flops_orig = common.compiled_flops(orig)
    flops_static = common.compiled_flops(static_exe)
    row["xla_ratio"] = (flops_static / flops_orig) if flops_orig and flops_static else None
    row["xla_capacity"] = cap
    # Wall time: the packed hard path (what runs) vs the original model, same batch.
    packed = hard(task.model).lower(params, frames, cmap).compile()

    def median_time(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    t_orig = median_time(orig, params, frames)
    t_packed = median_time(packed, params, frames, cmap)
    # The static-capacity program of the XLA column (same FLOPs, no loop: what a fused gather
    # kernel could run; its outputs are not the packed path's, tokens beyond the capacity are reused).
    t_static = median_time(static_exe, params, frames, cmap)
    row.update(ms_original=1e3 * t_orig / b, ms_reuse=1e3 * t_packed / b, time_ratio=t_packed / t_orig,
               time_ratio_static=t_static / t_orig)
    # Accuracy: ridge probe on clip embeddings and the backbone's head on every frame.
    if int(config.probe.num_train):
        probe = reuse_task.linear_probe(task, params, config.probe)
        row.update(probe_acc_original=probe["acc_original"], probe_acc_reuse=probe["acc_reuse"],
                   head_acc_original=probe.get("head_acc_original"), head_acc_reuse=probe.get("head_acc_reuse"))
    return row


def plot(rows, path: str) -> str | None:
    try:
        import matplotlib  # pylint: disable=g-import-not-at-top
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    # One line per (policy, --suffix): rows of other overrides (another backbone run) are other series.
    variants = sorted({r["name"].partition("-")[2] for r in rows})
    colours = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"] * 4)
    series = [(p, v, next(colours)) for v in variants for p in ("mlp", "topk_similarity")]
    for clips, marker in (("static", "o"), ("pan", "s")):
        for policy, variant, colour in series:
            pts = sorted((r for r in rows if r["clips"] == clips and r["policy"] == policy
                          and r["name"].partition("-")[2] == variant), key=lambda r: r["analytic_ratio"])
            if not pts:
                continue
            speed = [1.0 / r["analytic_ratio"] for r in pts]
            label = f"{policy}{' -' + variant if variant else ''}, {clips} clips"
            acc = [100 * (r.get("head_acc_reuse") or r.get("probe_acc_reuse") or 0) for r in pts]
            axes[0].plot(speed, acc, marker=marker, color=colour, label=label,
                         linestyle="-" if clips == "static" else "--")
            axes[1].plot([r["compute_reuse"] for r in pts], [r["pooled_cos"] for r in pts], marker=marker,
                         color=colour, label=label, linestyle="-" if clips == "static" else "--")
    base = [r for r in rows if r.get("head_acc_original") is not None]
    if base:
        acc0 = 100 * base[0]["head_acc_original"]
        axes[0].axhline(acc0, color="grey", linewidth=0.8)
        axes[0].axhline(acc0 - 2, color="grey", linewidth=0.8, linestyle=":")
    axes[0].set_xlabel("encoder speed-up (1 / analytic FLOPs ratio)")
    axes[0].set_ylabel("frame accuracy of the backbone's head (%)")
    axes[0].set_title("accuracy vs speed-up (grey: original, dotted: -2 pts)")
    axes[1].set_xlabel("compute reuse (layer x token computations skipped)")
    axes[1].set_ylabel("pooled cosine to the original")
    axes[1].axhline(0.98, color="grey", linewidth=0.8, linestyle=":")
    axes[1].set_title("fidelity vs compute skipped")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = ["name", "policy", "target", "clips", "decided", "executed", "compute_reuse", "analytic_ratio",
           "xla_ratio", "time_ratio", "time_ratio_static", "pooled_cos", "pooled_cos_min", "probe_acc_original", "probe_acc_reuse",
           "head_acc_original", "head_acc_reuse", "train_s", "machine", "overrides"]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"reuse_tradeoff_{jax.default_backend()}")
    rows: list[dict[str, Any]] = []
    if os.path.exists(out + ".json") and not args.force:
        rows = json.load(open(out + ".json")).get("rows", [])
    done = {(r["name"], r["clips"]) for r in rows}
    t_start = time.perf_counter()
    base = make_config(args, None, None)
    backbone = train_backbone(base, args.workdir)
    points = [(f"t{t}{args.suffix}", float(t), None) for t in args.targets.split(",") if t]
    points += [(f"topk{k}{args.suffix}", None, float(k)) for k in args.topk.split(",") if k]
    for name, target, topk in points:
        if all((name, c) in done for c in ("static", "pan")):
            print(f"=== {name}: in {out}.json already", flush=True)
            continue
        config = make_config(args, target, topk)
        config.init_from = backbone
        top = os.path.join(args.workdir, name)
        run_dir = str(runner.stage_plan(config, top)[1])  # WORKDIR/<name>/reuse: the run's own workdir
        t0 = time.perf_counter()
        if topk is None:
            print(f"=== {name}: training the reuse modules (target {target}) in {run_dir}", flush=True)
            summary = runner.run(config, top)
            if not summary.get("finished"):
                raise SystemExit(f"{run_dir} did not finish; rerun to resume it.")
            params, _ = checkpoint.load_params(run_dir)
        else:
            task = tasks.build(config, run_dir)
            params = jax.jit(task.init_variables)(jax.random.PRNGKey(0))["params"]
            loaded, _ = checkpoint.load_params(backbone, "vit")
            params = {**params, **{k: v for k, v in loaded.items() if k in params}}
        params = jax.tree.map(jnp.asarray, params)
        train_s = time.perf_counter() - t0
        for clips in ("static", "pan"):
            cfg = copy.deepcopy(config)
            if clips == "pan":
                cfg.data.background = "pan"
            row = {"name": name, "policy": "mlp" if topk is None else "topk_similarity",
                   "target": target if topk is None else topk, "train_s": train_s,
                   "overrides": " ".join(args.set), "machine": common.machine_info().get("cpu_model")
                   if jax.default_backend() == "cpu" else str(jax.devices()[0].device_kind)}
            row.update(evaluate(cfg, run_dir, params, clips, args.iters))
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["name"], r["clips"]) != (name, clips)] + [row]
            common.write_json(out + ".json", {"command": "python benchmarks/reuse_tradeoff.py " + " ".join(
                argv if argv is not None else sys.argv[1:]), "config": args.config, "rows": rows})
    rows.sort(key=lambda r: (r["clips"] != "static", r["policy"], r["target"]))
    common.print_table(rows, COLUMNS)
    md = [f"# Token reuse trade-off ({args.config}, {jax.default_backend()})", "",
          f"Command: `python benchmarks/reuse_tradeoff.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
          "", common.md_table(rows, COLUMNS), "",
          f"Total {time.perf_counter() - t_start:.0f} s this invocation (finished runs are reused)."]
    common.write_report(out, md, plot, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
