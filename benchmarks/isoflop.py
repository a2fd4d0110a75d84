r"""IsoFLOP comparison: dense vs MoD vs DTF (optionally TDTF) trained for the SAME training FLOPs.

  python benchmarks/isoflop.py                                   # CPU default (<= 15 min on 2 cores)
  python benchmarks/isoflop.py --models=dense,mod,dtf,tdtf --budget_tflop=2000 --hidden=512 --layers=8

Each model is trained from scratch on the embedded corpus by the real trainer
(``vlmjax.run.run(config, workdir)``), from ``configs/lm.py`` (dense), ``configs/mod.py``,
``configs/dtf.py`` and ``configs/tdtf.py`` loaded from their files, with the model size, sequence
length, batch and schedule overridden by the flags below (the same for every model).

FLOP matching (Raposo et al. 2024, Sec. 4: isoFLOP comparison): the analytic train FLOPs per step
``F_m`` of each model come from ``vlmjax.flops`` (``decoder_train_flops`` for dense,
``routed_decoder_train_flops`` for the routed ones: 3x the training "topk" forward, router heads,
PriorFFN / transition nets and LM head included), and model m trains ``total_steps = floor(B / F_m)``
steps for the budget ``B`` (--budget_tflop). So every model spends the same training FLOPs (up to one
step), and the cheaper routed models take more steps and see more tokens; dense gets the fewest.
Each run has its own learning-rate schedule over its own steps (warm-up = --warmup_frac of them).

Reported per model: steps, tokens, training FLOPs spent, wall time, and the validation loss at the
end in both selection modes: ``loss`` with the causal routers (a valid autoregressive score) and
``loss_topk`` with top-k over the whole sequence (sees future tokens; what training optimises); the
dense model has one loss. With --evals > 1 the runs also evaluate at equal fractions of their budget,
and the plot shows validation loss against training FLOPs spent.

Outputs: ``<out>.md`` (table), ``<out>.json``, ``<out>.png`` (when matplotlib is importable).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax import run as runner  # noqa: E402
from vlmjax.data import tokenizers as tokenizers_lib  # noqa: E402
from vlmjax.models import routing as R  # noqa: E402
from vlmjax.train import metrics as metrics_lib  # noqa: E402

MODELS = ("dense", "mod", "dtf", "tdtf")
CONFIG_FILES = {"dense": "lm.py", "mod": "mod.py", "dtf": "dtf.py", "tdtf": "tdtf.py"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="dense,mod,dtf", help=f"Comma-separated among {MODELS}.")
    p.add_argument("--budget_tflop", type=float, default=16.0,
                   help="Training FLOPs per model, in TFLOP (analytic; 1 TFLOP = 1e12).")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv_heads", type=int, default=1)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size (config.data.bpe_vocab_size).")
    p.add_argument("--seq", type=int, default=128, help="config.data.seq_len.")
    p.add_argument("--batch", type=int, default=16, help="config.batch_size.")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup_frac", type=float, default=0.1, help="Warm-up steps as a fraction of each run.")
    p.add_argument("--mod_capacity", type=float, default=0.125)
    p.add_argument("--dtf_capacity", type=float, default=0.5)
    p.add_argument("--tdtf_capacity", type=float, default=0.5)
    p.add_argument("--evals", type=int, default=3,
                   help="Evaluations during each run (at equal fractions of its budget), plus start and end.")
    p.add_argument("--eval_batches", type=int, default=8, help="config.eval.max_batches.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--configs_dir", default=os.path.join(ROOT, "configs"))
    p.add_argument("--workdir", default="",
                   help="Root of the run directories (default: a new temporary directory). Each model "
                        "trains in <workdir>/<model>, which must not hold a checkpoint already.")
    p.add_argument("--keep_workdirs", action="store_true", help="Keep a temporary --workdir.")
    p.add_argument("--out", default="benchmarks/results/isoflop_cpu",
                   help="Output prefix: writes <out>.json, <out>.md and <out>.png.")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {list(MODELS)}.")
    if args.budget_tflop <= 0 or args.evals < 0:
        p.error("--budget_tflop must be > 0 and --evals >= 0.")
    return args


def load_config(kind: str, configs_dir: str):
    """``get_config()`` of ``configs/<file>.py`` loaded from its path (as ``--config=configs/x.py``)."""
    path = os.path.join(configs_dir, CONFIG_FILES[kind])
    spec = importlib.util.spec_from_file_location(f"_isoflop_config_{kind}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"Cannot load the {kind} config from {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def make_config(kind: str, args):
    """The experiment config of ``kind`` with the shared overrides (total_steps is set later)."""
    c = load_config(kind, args.configs_dir)
    c.model.update(dict(hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype))
    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = args.vocab
    c.data.seq_len = args.seq
    c.batch_size = args.batch
    c.optim.lr = args.lr
    c.eval.max_batches = args.eval_batches
    c.eval_at_start = True
    c.ckpt_every = 0          # only at the end
    c.sample.prompt = ""      # no sampling at the end
    c.wandb.mode = "disabled"
    if kind != "dense":
        c.routing.capacity = {"mod": args.mod_capacity, "dtf": args.dtf_capacity,
                              "tdtf": args.tdtf_capacity}[kind]
    return c


def train_flops_per_step(kind: str, config, model_config) -> float:
    if kind == "dense":
        return flops_lib.decoder_train_flops(model_config, config.batch_size, config.data.seq_len)
    rc = R.RoutingConfig.from_config(config.routing)
    return flops_lib.routed_decoder_train_flops(model_config, rc, config.batch_size, config.data.seq_len)


def prepare_tokenizer(args, root: str):
    """Trains the BPE once (in ``root/tokenizer``) and returns (its directory, DecoderConfig).

    Every run gets a copy of the cached tokenizer, so all models see the same token ids and the
    BPE is not retrained per model. The DecoderConfig (with the tokenizer's vocabulary) is the one
    the trainer will build; the FLOPs per step are computed from it.
    """
    tok_dir = os.path.join(root, "tokenizer")
    task = tasks.build(make_config("dense", args), tok_dir)
    return tok_dir, task.model_config


def run_model(kind: str, args, root: str, tok_dir: str, model_config, budget: float) -> dict[str, Any]:
    c = make_config(kind, args)
    per_step = train_flops_per_step(kind, c, model_config)
    steps = max(1, math.floor(budget / per_step))
    c.total_steps = steps
    c.optim.warmup_steps = max(1, int(args.warmup_frac * steps))
    c.eval_every = max(1, steps // (args.evals + 1)) if args.evals else 0
    c.log_every = max(1, steps // 10)
    workdir = os.path.join(root, kind)
    if os.path.exists(os.path.join(workdir, "checkpoints")):
        raise FileExistsError(f"{workdir} already holds checkpoints: the trainer would resume. Pick a new "
                              "--workdir.")
    os.makedirs(workdir, exist_ok=True)
    for name in (tokenizers_lib.TOKENIZER_FILE, tokenizers_lib.TOKENIZER_META_FILE):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(workdir, name))
    print(f"\n=== {kind}: {per_step / 1e9:.3f} GFLOP/step (analytic) x {steps} steps = "
          f"{steps * per_step / 1e12:.1f} TFLOP (budget {budget / 1e12:.1f}) ===", flush=True)
    t0 = time.perf_counter()
    summary = runner.run(c, workdir)
    total_s = time.perf_counter() - t0
    end = summary.get("eval_end", {})
    evals = metrics_lib.read_metrics(workdir, "eval")
    curve = [{"step": e["step"], "train_TFLOP": e["step"] * per_step / 1e12, "loss": e.get("loss"),
              "loss_topk": e.get("loss_topk")} for e in evals]
    return {
        "model": kind,
        "capacity": None if kind == "dense" else c.routing.capacity,
        "GFLOP_per_step": per_step / 1e9,
        "steps": steps,
        "tokens": steps * c.batch_size * c.data.seq_len,
        "train_TFLOP": steps * per_step / 1e12,
        "val_loss": end.get("loss"),
        "val_loss_topk": end.get("loss_topk"),
        "val_ppl": end.get("perplexity"),
        "val_ppl_topk": end.get("perplexity_topk"),
        "sel_frac_causal": end.get("selected_frac"),
        "sel_frac_topk": end.get("selected_frac_topk"),
        "train_wall_s": summary.get("wall_time_s"),
        "total_wall_s": total_s,
        "params_M": summary.get("params", 0) / 1e6,
        "workdir": workdir,
        "curve": curve,
    }


COLS = ["model", "capacity", "GFLOP_per_step", "steps", "tokens", "train_TFLOP", "val_loss", "val_loss_topk",
        "val_ppl", "val_ppl_topk", "sel_frac_causal", "sel_frac_topk", "train_wall_s", "total_wall_s"]


def plot(rows, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(rows):
        color = f"C{i}"
        pts = [p for p in r["curve"] if p["loss"] is not None and p["step"] > 0]
        label = r["model"] if r["capacity"] is None else f"{r['model']} ({r['capacity']})"
        ax.plot([p["train_TFLOP"] for p in pts], [p["loss"] for p in pts], "o-", color=color,
                label=label + ("" if r["model"] == "dense" else ", causal"))
        topk = [p for p in pts if p["loss_topk"] is not None]
        if topk:
            ax.plot([p["train_TFLOP"] for p in topk], [p["loss_topk"] for p in topk], "s--", color=color,
                    alpha=0.7, label=label + ", top-k")
    ax.set_xlabel("training FLOPs spent (TFLOP, analytic)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("isoFLOP: validation loss vs training FLOPs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    info = common.device_info()
    root = args.workdir or tempfile.mkdtemp(prefix="vlmjax_isoflop_")
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    tok_dir, model_config = prepare_tokenizer(args, root)
    budget = args.budget_tflop * 1e12
    rows = []
    try:
        for kind in args.models:
            rows.append(run_model(kind, args, root, tok_dir, model_config, budget))
    finally:
        if not args.workdir and not args.keep_workdirs:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - t0

    dense = next((r for r in rows if r["model"] == "dense"), None)
    notes = [
        f"Model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} "
        f"heads / {args.kv_heads} kv, head_dim {args.head_dim}, vocab {model_config.vocab_size} (BPE on the "
        f"embedded corpus), seq {args.seq}, batch {args.batch}, {args.dtype}, lr {args.lr}, warm-up "
        f"{args.warmup_frac:.0%} of each run.",
        f"Budget {args.budget_tflop:g} TFLOP of analytic training FLOPs per model (vlmjax.flops: 3x the "
        "training forward); steps = floor(budget / FLOPs per step).",
        "val_loss: causal-router selection (valid autoregressive score); val_loss_topk: top-k over the "
        "whole sequence (uses future tokens). Dense has one loss.",
        "Routed layers: every=2, offset=1 (layers 1, 3, ...); MoD capacity %g, DTF gamma %g%s." % (
            args.mod_capacity, args.dtf_capacity,
            f", TDTF capacity {args.tdtf_capacity:g}" if "tdtf" in args.models else ""),
        "train_wall_s: the trainer's loop (first-step compile and evaluations included); total_wall_s: "
        "the whole run() call (data, init, checkpoint).",
        "Plot: the end points are the isoFLOP comparison; intermediate evaluations are mid-schedule (each "
        "run's learning-rate schedule spans its own steps), so they are not what a run stopped at that "
        "budget would reach.",
    ]
    if dense is not None:
        for r in rows:
            if r is not dense and r["val_loss"] is not None and dense["val_loss"] is not None:
                notes.append(f"{r['model']}: val loss {r['val_loss']:.4f} (causal), {r['val_loss_topk']:.4f} "
                             f"(top-k) vs dense {dense['val_loss']:.4f} at {r['steps'] / dense['steps']:.2f}x "
                             f"the dense steps.")
    print(f"\nisoFLOP comparison on {info['platform']} ({info['device_kind']}), total {total:.0f}s:")
    common.print_table(rows, COLS)
    for n in notes:
        print(n)
    common.write_json(args.out + ".json", {"device": info, "args": vars(args), "rows": rows, "notes": notes,
                                           "seconds": total})
    md = [f"# IsoFLOP comparison ({info['platform']}, {info['device_kind']})", "",
          f"Command: `python benchmarks/isoflop.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
          common.md_table(rows, COLS), "", "## Notes", ""] + [f"- {n}" for n in notes] + [
          "", f"Total wall time {total:.0f}s."]
    common.write_report(args.out, md, plot, rows)


if __name__ == "__main__":
    main()
