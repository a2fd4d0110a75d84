r"""The accelerator suite: every speed target of the earlier issues, side by side in one run.

  python benchmarks/suite.py --device=gpu                  # full shapes (ViT-B/16 at 224, batch 256, bf16, ...)
  python benchmarks/suite.py --device=tpu
  python benchmarks/suite.py --device=cpu                  # --size=small: ~15-25 min on 2 cores
  python benchmarks/suite.py --device=cpu --only=lora,ckpt # some parts only

``--device`` must be ``jax.default_backend()`` (the run stops with one error line otherwise), so a
GPU table is never written by a process that silently fell back to the CPU. ``--size`` is ``small``
on CPU and ``full`` on GPU/TPU unless given; ``--dtype`` is float32 for small and bfloat16 for full.

Parts (``--only`` takes these names; each runs in its own try/except, so a failing part gives a row
with its error and the rest still run), and the targets (from the docstrings / reports of the
benchmarks each part calls):

  vit_b16    ViT-B/16 (CLIP vision shape, 224 px) forward images/s: vlmjax vs HF transformers
             CLIPVisionModel (attn_implementation 'sdpa') eager and torch.compile, interleaved rounds
             (``benchmarks/backbones.py``: ``measure``). Targets: >= 1.15x HF sdpa, >= 0.95x
             torch.compile. Also the train step (fwd + bwd + AdamW) MFU: target >= 32%.
  vit_l14    ViT-L/14 train-step MFU (vlmjax only): target >= 35%.
             MFU = analytic FLOPs (3 x ``vlmjax.flops.vit_forward_flops``) / step time / device peak
             (``benchmarks.common.PEAK_TFLOPS``, or --peak_tflops). Without a known peak (CPU) the
             row reports the achieved TFLOP/s and ``met`` is None.
  lora       Qwen2.5-0.5B-shaped decoder (``backbones._cases()``; small: cut to 6 layers) LoRA train
             tokens/s: vlmjax's real ``Trainer`` step (``optim.trainable`` = the adapters, r=16,
             alpha=32, on q/k/v/o/gate/up/down, frozen base) vs HF ``Qwen2ForCausalLM`` + peft
             ``LoraConfig`` (same rank, alpha, targets, batch, sequence, dropout 0, AdamW on the
             adapters only), same process, interleaved rounds. Target: >= 1.8x HF+peft. A third
             variant, a jitted step that differentiates the adapters only (the base passed as a
             constant), shows what the trainer's step costs over the minimum.
  routing    MoD (capacity 12.5%, every other layer) and DTF (gamma 0.5) train step vs the dense
             decoder of the same shape, round-robin rounds (``benchmarks/routing_flops.py``:
             ``bench_shape``): XLA FLOPs ratio and time ratio; ``flops_to_time`` = (1 - time ratio) /
             (1 - FLOPs ratio), the share of the saved FLOPs that became saved time. Target: MoD
             train step <= 0.62x dense (H100); DTF has no time target (its FLOPs ratio is shown).
  reuse      token-reuse ViT-B/16 clip encoder (``benchmarks/reuse_speed.py``: ``run``), hard path at
             each reuse rate vs the original model: time ratio <= (1 - rho) + 0.10, rho = the overall
             reuse (layer x token computations skipped over the clip, I frame and layer 0 included;
             the per-layer rate is in the details).
  data_wait  the real loaders feeding the real train step (``benchmarks.common.loader_vs_synthetic``,
             as input_pipeline.py / alignment_step.py / foveated_step.py): data_wait_frac, the share
             of the loop spent in ``next`` + host-to-device. Target (alignment_step / foveated_step):
             synthetic / real step rate >= 0.9 (the loader keeps the step fed).
  ckpt       async checkpointing (``vlmjax.train.checkpoint.Checkpointer``, as the trainer calls it)
             of a real lm ``TrainState``: how long ``save`` blocks the loop with async_save=True vs the
             whole write with async_save=False. Target: blocks for less than the sync save (no numeric
             target was set in the issues; the ratio is in the details).

On a TPU the HF torch sides are not run (torch has no TPU backend here; their rows say so). On a GPU
the process sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 (unless set) so that torch has room beside jax.

Targets were set for accelerators (H100 / TPU). On CPU the ratio targets are still checked (same run,
same machine, so the ratio is meaningful) but are indicative only; MFU targets are None there.

Rows: part, name, value, unit, target (text), met (True / False / None), note, details (JSON only).
Outputs: the table printed at the end (machine line first), ``<out>.json`` (``common.write_json``:
carries ``machine``, with load average) and ``<out>.md``; default ``<out>`` =
benchmarks/results/suite_<device>.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
import types
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# On a GPU, torch (the HF sides) shares the device with jax, which by default takes 75% of its
# memory at start: leave torch 40% (set the variable to override).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402

from benchmarks import common  # noqa: E402

PARTS = ("vit_b16", "vit_l14", "lora", "routing", "reuse", "data_wait", "ckpt")
DEVICES = ("cpu", "gpu", "tpu")
COLUMNS = ["part", "name", "value", "unit", "target", "met", "note"]
LORA_RANK, LORA_ALPHA = 16, 32.0

# Per size: the shapes and repetitions of every part.
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(
        vit_b16=dict(batch=4, steps=3, torch_compile=True),
        vit_l14=dict(batch=2, steps=2),
        lora=dict(model="qwen25_05b_6l", batch=2, seq_len=128, steps=3),
        routing=dict(shape="cpu12", batch=4, iters=5, overhead_iters=3),
        reuse=dict(rates="0.5,0.85", batch=1, iters=5),
        data_wait=dict(loaders=(("lm", None, 32, 5), ("pixmo_alignment", None, 32, 5), ("foveated", "deep", 16, 10))),
        ckpt=dict(model=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=64),
                  batch=8, seq_len=128, saves=3, steps_between=2),
    ),
    "full": dict(
        vit_b16=dict(batch=256, steps=10, torch_compile=True),
        vit_l14=dict(batch=128, steps=10),
        lora=dict(model="qwen25_05b", batch=8, seq_len=1024, steps=10),
        routing=dict(shape="qwen25_05b", batch=4, iters=10, overhead_iters=10),
        reuse=dict(rates="0.5,0.7,0.85,0.95", batch=8, iters=10),
        data_wait=dict(loaders=(("lm", None, None, 20), ("pixmo_alignment", None, None, 20),
                                ("foveated", "deep", None, 20))),
        ckpt=dict(model=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                             attention_bias=True, tie_word_embeddings=True),
                  batch=8, seq_len=512, saves=3, steps_between=5),
    ),
}


# ------------------------------------------------------------------------------------------------
# Arguments, rows, output
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", required=True, choices=DEVICES,
                   help="The backend this run is for; must be jax.default_backend().")
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="small (CPU default): shrunk shapes and steps; full (GPU/TPU default): the real shapes.")
    p.add_argument("--only", default="", help=f"Comma-separated parts among {list(PARTS)} (default: all).")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="Compute dtype (default float32 for small, bfloat16 for full).")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="Device peak TFLOP/s for MFU (default: benchmarks.common's datasheet table; none on CPU).")
    p.add_argument("--out", default="", help="Output prefix (default benchmarks/results/suite_<device>).")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in PARTS]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {list(PARTS)}.")
    args.only = only or list(PARTS)
    args.size = args.size or ("small" if args.device == "cpu" else "full")
    args.dtype = args.dtype or ("float32" if args.size == "small" else "bfloat16")
    if not args.out:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"suite_{args.device}")
    return args


def device_error(device: str) -> str | None:
    """The one error line when ``--device`` is not the backend jax runs on, else None."""
    backend = jax.default_backend()
    if device == backend:
        return None
    return (f"error: --device={device} but jax.default_backend() is {backend!r} "
            f"(devices: {[d.device_kind for d in jax.devices()]}); run with --device={backend}, or fix the "
            f"jax install / JAX_PLATFORMS so that {device} is the default backend.")


def make_row(part: str, name: str, value: float | None, unit: str, target: str, met: bool | None,
             note: str = "", /, **details) -> dict[str, Any]:
    """One row; ``details`` (any keys, also the column names) go to the JSON only."""
    return {"part": part, "name": name, "value": value, "unit": unit, "target": target,
            "met": None if met is None else bool(met), "note": note, "details": details}


def error_row(part: str, e: BaseException) -> dict[str, Any]:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return make_row(part, part, None, "-", "-", None, f"ERROR {msg[:160]}", error=msg,
                    traceback=traceback.format_exc())


def run_parts(args, parts: dict[str, Callable] | None = None,
              after_part: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Runs the parts of ``args.only`` in order (``parts``: name -> fn(args, size) -> rows; default
    ``PART_FNS``), each in a try/except; every row gets the part's wall time (``details.part_s``).
    ``after_part(rows so far)`` runs after each part (the CLI writes its outputs there, so a run cut
    short by a time limit keeps the parts it finished)."""
    parts = PART_FNS if parts is None else parts
    rows: list[dict[str, Any]] = []
    for name in args.only:
        t0 = time.perf_counter()
        print(f"\n=== {name} ({args.size}, {args.dtype}) ===", flush=True)
        try:
            got = list(parts[name](args, SIZES[args.size][name]))
        except Exception as e:  # noqa: BLE001 - one failing part must not kill the suite
            traceback.print_exc()
            got = [error_row(name, e)]
        dt = time.perf_counter() - t0
        for r in got:
            r["details"].setdefault("part_s", round(dt, 1))
        rows += got
        print(f"=== {name}: {len(got)} row(s) in {dt:.0f}s; load avg {common.machine_info()['load_avg']}",
              flush=True)
        for r in got:
            print("   ", {k: r[k] for k in COLUMNS}, flush=True)
        if after_part is not None:
            after_part(rows)
    return rows


def _fmt_met(met) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def display(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the tables: met as yes / NO / -, values to 4 significant digits."""
    return [{**{k: r.get(k) for k in COLUMNS}, "met": _fmt_met(r.get("met"))} for r in rows]


def write_outputs(rows: list[dict[str, Any]], args, seconds: float, info: dict[str, Any] | None = None) -> None:
    """Prints the table (machine line first), writes ``<out>.json`` (with ``machine``) and ``<out>.md``."""
    info = info or common.device_info()
    machine = common.machine_info()
    head = (f"suite on {info['device_count']}x {info['platform']} ({info['device_kind']}), size {args.size}, "
            f"{args.dtype}, parts {','.join(args.only)}, {seconds:.0f}s")
    met = [r["met"] for r in rows]
    summary = (f"targets met {met.count(True)}, missed {met.count(False)}, not applicable / not measured "
               f"{met.count(None)}")
    print()
    print(common.machine_line(machine))
    print(head)
    common.print_table(display(rows), COLUMNS, machine=False)
    print(summary)
    common.write_json(args.out + ".json", {
        "device": info, "machine": machine, "args": vars(args), "seconds": seconds, "summary": summary,
        "rows": rows, "sizes": SIZES[args.size]})
    cmd = " ".join(sys.argv[1:]) if os.path.basename(sys.argv[0]) == "suite.py" else f"--device={args.device}"
    md = [common.machine_line(machine), "",
          f"# Accelerator suite: {info['platform']} ({info['device_kind']}), size {args.size}, {args.dtype}", "",
          f"Command: `python benchmarks/suite.py {cmd}`; {seconds:.0f}s wall.", "",
          common.md_table(display(rows), COLUMNS), "", summary + ".", "",
          "met: yes / NO against the target; '-' where the target does not apply here (MFU without a "
          "known device peak) or the part could not run. Targets were set for accelerators (H100 / TPU); "
          "on CPU the ratio targets are indicative. Per-row details (every timing, FLOPs, shapes, load "
          "average before/after) are in the JSON next to this file; benchmarks/suite.py's docstring says "
          "how each row is measured."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}.md")


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

def _have(*modules: str) -> list[str]:
    """The modules among ``modules`` that are NOT importable."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _backbone_opts(args, models, batch, steps, torch_, torch_compile) -> types.SimpleNamespace:
    """The options benchmarks/backbones.py reads from its FLAGS."""
    return types.SimpleNamespace(models=list(models), batch=batch, seq_len=256, steps=steps, dtype=args.dtype,
                                 train=True, torch=torch_, torch_compile=torch_compile,
                                 peak_tflops=args.peak_tflops, interleave=True, torch_threads=0)


def _mfu_row(part: str, name: str, row: dict[str, Any], target: float, batch: int, args) -> dict[str, Any]:
    peak = common.device_peak_tflops(args.dtype, args.peak_tflops)
    mfu = row.get("train_MFU")
    details = {k: row.get(k) for k in ("train_ms", "train_min_ms", "train_TFLOPs", "fwd_GFLOP", "train_samples_ms",
                                       "load_before", "load_after")}
    details.update(batch=batch, dtype=args.dtype, peak_tflops=peak)
    if mfu is None:
        return make_row(part, name, row.get("train_TFLOPs"), "TFLOP/s", f"MFU >= {target:.0%}", None,
                        "no device peak known: achieved TFLOP/s (MFU n/a; pass --peak_tflops)", **details)
    return make_row(part, name, 100.0 * mfu, "% MFU", f">= {target:.0%}", mfu >= target,
                    f"{row['train_TFLOPs']:.4g} TFLOP/s of {peak:g}", **details)


def _hf_attn_impl() -> str:
    """The attention implementation HF transformers picks for a CLIPVisionModel built from a config,
    as backbones.torch_fns builds it (a 1-layer model: the choice does not depend on the size)."""
    import transformers as tf  # pylint: disable=g-import-not-at-top
    cfg = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              patch_size=16, image_size=32)
    return tf.CLIPVisionModel(cfg).config._attn_implementation  # pylint: disable=protected-access


def part_vit_b16(args, sz) -> list[dict[str, Any]]:
    from benchmarks import backbones  # pylint: disable=g-import-not-at-top
    missing = _have("torch", "transformers")
    if "transformers" in missing:
        raise RuntimeError("transformers is not installed: backbones.py builds the models from HF configs")
    torch_ok = not missing and args.device != "tpu"  # HF torch would run on the TPU host's CPU
    compile_ok = torch_ok and sz["torch_compile"]
    rows, threads = backbones.measure(_backbone_opts(args, ["vit_b16"], sz["batch"], sz["steps"], torch_ok,
                                                     compile_ok))
    by = {r["impl"]: r for r in rows}
    jx = by["vlmjax"]
    out = []
    common_d = dict(batch=sz["batch"], dtype=args.dtype, rounds=sz["steps"], torch_threads=threads,
                    hf_attn_implementation=_hf_attn_impl() if torch_ok else None,
                    vlmjax_fwd_ms=jx["fwd_ms"], vlmjax_fwd_samples_ms=jx["fwd_samples_ms"],
                    load_before=jx["load_before"], load_after=jx["load_after"])
    for impl, label, target in (("hf_torch", "HF sdpa (eager)", 1.15), ("hf_torch_compile", "torch.compile", 0.95)):
        name = f"ViT-B/16 fwd vs {label}"
        if impl not in by:
            why = ("no torch on TPU: compare on a GPU" if args.device == "tpu" else
                   "torch not installed" if missing else "torch.compile not run")
            out.append(make_row("vit_b16", name, None, "x", f">= {target}x", None, why, **common_d))
            continue
        r = by[impl]
        speedup = r["fwd_ms"] / jx["fwd_ms"]
        out.append(make_row(
            "vit_b16", name, speedup, "x", f">= {target}x", speedup >= target,
            f"{jx['fwd_images_per_s']:.4g} vs {r['fwd_images_per_s']:.4g} img/s",
            **common_d, other_fwd_ms=r["fwd_ms"], other_fwd_samples_ms=r["fwd_samples_ms"],
            vlmjax_img_s=jx["fwd_images_per_s"], other_img_s=r["fwd_images_per_s"],
            vlmjax_train_speedup=r.get("vlmjax_train_speedup")))
    mfu = _mfu_row("vit_b16", "ViT-B/16 train MFU", jx, 0.32, sz["batch"], args)
    if "hf_torch" in by and by["hf_torch"].get("train_ms"):
        mfu["details"]["hf_torch_train_ms"] = by["hf_torch"]["train_ms"]
        mfu["details"]["vlmjax_train_speedup_vs_hf"] = by["hf_torch"]["train_ms"] / jx["train_ms"]
        mfu["note"] += f"; train step {mfu['details']['vlmjax_train_speedup_vs_hf']:.3g}x HF eager"
    out.append(mfu)
    return out


def part_vit_l14(args, sz) -> list[dict[str, Any]]:
    from benchmarks import backbones  # pylint: disable=g-import-not-at-top
    rows, _ = backbones.measure(_backbone_opts(args, ["vit_l14"], sz["batch"], sz["steps"], False, False))
    return [_mfu_row("vit_l14", "ViT-L/14 train MFU", rows[0], 0.35, sz["batch"], args)]


# ---- LoRA -------------------------------------------------------------------------------------

def _lm_config(model_fields: dict[str, Any], batch: int, seq_len: int, dtype: str):
    """configs/lm.py (default) with byte tokens, the given decoder fields, batch and sequence."""
    from configs import lm as lm_config  # pylint: disable=g-import-not-at-top
    c = lm_config.get_config()
    c.data.tokenizer = "bytes"
    c.data.seq_len = seq_len
    c.batch_size = batch
    c.model.update(model_fields)
    c.model.dtype = dtype
    c.total_steps = 1000
    return c


def _lora_trainer(hf_cfg, batch: int, seq_len: int, dtype: str):
    """vlmjax's real Trainer on a LoRA decoder of ``hf_cfg``'s shape (random base, frozen by
    ``optim.trainable``), its state and one on-device batch of random tokens."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vlmjax import convert, tasks  # pylint: disable=g-import-not-at-top
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    dec = convert.from_config(hf_cfg.to_dict()).module.config
    fields = {f.name: getattr(dec, f.name) for f in dataclasses.fields(dec)}
    c = _lm_config({}, batch, seq_len, dtype)
    c.model.update({k: v for k, v in fields.items() if k in c.model and k not in ("dtype", "param_dtype")})
    c.optim.update(dict(trainable=(lora_lib.LORA_REGEX,), lr=1e-4, warmup_steps=0))
    # LMTask refuses LoRA without a pretrained base (init_from); a random base times the same, so the
    # task is built dense and its model swapped for the LoRA one before the Trainer sees it.
    task = tasks.build(c, None)
    lora = dict(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0)
    task.model_config = dataclasses.replace(task.model_config, **lora)
    task.model = task.build_model(task.model_config)
    c.model.update(lora)
    tr = Trainer(c, task, shd.make_mesh(c.mesh))
    state = tr.init()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, hf_cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    b = tr.put({"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32)})
    return task, tr, state, b


def _vlmjax_lora_fns(hf_cfg, batch, seq_len, dtype) -> tuple[dict[str, Callable], dict[str, Any]]:
    """{'vlmjax_trainer': the Trainer's step, 'vlmjax_adapter_grads': adapters-only jitted step}."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from vlmjax import tree as tree_lib  # pylint: disable=g-import-not-at-top
    task, tr, state, b = _lora_trainer(hf_cfg, batch, seq_len, dtype)
    compiled = tr.train_step.lower(state, b).compile()
    flat = tree_lib.flatten(state.params)
    is_lora = lambda k: k.endswith(("lora_a", "lora_b"))
    n_lora = sum(int(np.prod(v.shape)) for k, v in flat.items() if is_lora(k))
    n_all = sum(int(np.prod(v.shape)) for v in flat.values())
    info = {"trainer_xla_GFLOP": (common.compiled_flops(compiled) or 0) / 1e9 or None,
            "lora_params": n_lora, "total_params": n_all, "lora_targets": list(task.model_config.lora.targets)}
    box = [state]

    def trainer_step():
        box[0], m = compiled(box[0], b)
        jax.block_until_ready(m["loss"])

    # The minimum: gradients of the adapters only (the base a non-differentiated argument), AdamW.
    adapters = {k: jnp.array(v) for k, v in flat.items() if is_lora(k)}
    base = {k: jnp.array(v) for k, v in flat.items() if not is_lora(k)}
    tx = optax.adamw(1e-4)
    model_state = jax.tree.map(jnp.array, state.model_state)

    def loss(ad, base, batch):
        params = tree_lib.unflatten({**base, **ad})
        return task.loss_fn(params, model_state, batch, None, 0)[0]

    def step(ad, opt, base, batch):
        value, g = jax.value_and_grad(loss)(ad, base, batch)
        u, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, u), opt, value

    lean = jax.jit(step, donate_argnums=(0, 1)).lower(adapters, tx.init(adapters), base, b).compile()
    info["adapter_grads_xla_GFLOP"] = (common.compiled_flops(lean) or 0) / 1e9 or None
    lbox = [adapters, tx.init(adapters)]

    def lean_step():
        lbox[0], lbox[1], value = lean(lbox[0], lbox[1], base, b)
        jax.block_until_ready(value)

    return {"vlmjax_trainer": trainer_step, "vlmjax_adapter_grads": lean_step}, info


def _peft_fn(hf_cfg, model_cls, batch, seq_len, dtype) -> tuple[Callable, dict[str, Any]]:
    import peft  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from vlmjax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = model_cls(hf_cfg).to(dev, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                       target_modules=list(lora_lib.LORA_TARGETS), bias="none",
                                                       task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    x = torch.randint(0, hf_cfg.vocab_size, (batch, seq_len + 1), device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        model.train()
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    attn = model.base_model.model.config._attn_implementation  # pylint: disable=protected-access
    return step, {"peft_trainable_params": sum(p.numel() for p in trainable), "peft": peft.__version__,
                  "attn_implementation": attn, "torch_device": dev}


def part_lora(args, sz) -> list[dict[str, Any]]:
    from benchmarks import backbones  # pylint: disable=g-import-not-at-top
    missing = _have("torch", "transformers", "peft")
    if "transformers" in missing:
        raise RuntimeError("transformers is not installed: the Qwen2.5 shape comes from its Qwen2Config")
    hf_cfg, model_cls = backbones._cases()[sz["model"]]  # pylint: disable=protected-access
    batch, seq = sz["batch"], sz["seq_len"]
    fns, info = _vlmjax_lora_fns(hf_cfg, batch, seq, args.dtype)
    if args.device == "tpu":
        missing = ["torch on TPU"]  # HF + peft would run on the TPU host's CPU: no comparison
    if not missing:
        backbones._torch_threads(types.SimpleNamespace(torch_threads=0))  # pylint: disable=protected-access
        fns["hf_peft"], pinfo = _peft_fn(hf_cfg, model_cls, batch, seq, args.dtype)
        info.update(pinfo)
    load_before = common.machine_info()["load_avg"]
    times = backbones._time_rounds(fns, sz["steps"])  # pylint: disable=protected-access
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = batch * seq
    details = dict(model=sz["model"], layers=hf_cfg.num_hidden_layers, batch=batch, seq_len=seq, dtype=args.dtype,
                   rank=LORA_RANK, alpha=LORA_ALPHA, rounds=sz["steps"], load_before=load_before,
                   load_after=common.machine_info()["load_avg"],
                   step_ms={k: v * 1e3 for k, v in med.items()},
                   samples_ms={k: [t * 1e3 for t in v] for k, v in times.items()},
                   tokens_per_s={k: tok / v for k, v in med.items()}, **info)
    rows = []
    for impl, label in (("vlmjax_trainer", "Trainer step"), ("vlmjax_adapter_grads", "adapter-grads-only step")):
        name = f"LoRA {sz['model']} tok/s vs HF+peft ({label})"
        tps = tok / med[impl]
        if "hf_peft" not in med:
            rows.append(make_row("lora", name, tps, "tok/s", ">= 1.8x HF+peft", None,
                                 f"no HF+peft side: {', '.join(missing)} not available", **details))
            continue
        ratio = med["hf_peft"] / med[impl]
        rows.append(make_row("lora", name, ratio, "x", ">= 1.8x", ratio >= 1.8,
                             f"{tps:.4g} vs {tok / med['hf_peft']:.4g} tok/s", **details))
    return rows


# ---- routing ----------------------------------------------------------------------------------

def part_routing(args, sz) -> list[dict[str, Any]]:
    from benchmarks import routing_flops  # pylint: disable=g-import-not-at-top
    rargs = routing_flops.parse_args([
        f"--shapes={sz['shape']}", "--models=dense,mod,dtf", f"--batch={sz['batch']}",
        f"--large_batch={sz['batch']}", f"--iters={sz['iters']}", "--warmup=2", "--no_decode",
        f"--overhead_iters={sz['overhead_iters']}", f"--overhead_iters_large={sz['overhead_iters']}",
        "--time_large", f"--dtype={args.dtype}", "--out=/dev/null"])
    load_before = common.machine_info()["load_avg"]
    rows, over, _ = routing_flops.bench_shape(sz["shape"], rargs)
    load_after = common.machine_info()["load_avg"]
    by = {r["model"]: r for r in rows}
    out = []
    for kind, label, target in (("mod", "MoD 12.5%", 0.62), ("dtf", "DTF gamma 0.5", None)):
        r = by[kind]
        # Analytic FLOPs: XLA's cost_analysis matches them on CPU (within 1%) but on GPU it does not count
        # the cuBLAS / cuDNN custom calls that do the matmuls (an H200 run read 1.4 MFLOP/token for a
        # 0.5B decoder), so its ratio there is meaningless.
        t, f = r.get("train_time_vs_dense"), r.get("train_analytic_vs_dense") or r.get("train_xla_vs_dense")
        conv = None if (t is None or not f or f >= 1) else (1 - t) / (1 - f)
        ov = next((o for o in over if o["model"] == kind), {})
        details = dict(shape=sz["shape"], T=r["T"], batch=r["batch"], capacity=r["capacity"], dtype=args.dtype,
                       train_ms=r.get("train_ms"), dense_train_ms=by["dense"].get("train_ms"),
                       train_flops_vs_dense_xla=r.get("train_xla_vs_dense"),
                       train_flops_vs_dense_analytic=r.get("train_analytic_vs_dense"),
                       fwd_time_vs_dense=r.get("fwd_time_vs_dense"), fwd_flops_vs_dense_xla=r.get("fwd_xla_vs_dense"),
                       flops_to_time=conv, router_overhead=ov, iters=sz["iters"], load_before=load_before,
                       load_after=load_after)
        note = f"analytic FLOPs {f:.3g}x dense" + (f", {conv:.0%} of the saved FLOPs became time" if conv is not None else "")
        out.append(make_row("routing", f"{label} train step vs dense ({sz['shape']})", t, "x dense",
                            f"<= {target}x" if target else "- (FLOPs ratio in note)",
                            None if (target is None or t is None) else t <= target, note, **details))
    return out


# ---- token reuse ------------------------------------------------------------------------------

def part_reuse(args, sz) -> list[dict[str, Any]]:
    from benchmarks import reuse_speed  # pylint: disable=g-import-not-at-top
    rargs = reuse_speed.parse_args([f"--rates={sz['rates']}", "--passthrough_rates=", "--shared_rates=",
                                    f"--batch={sz['batch']}", f"--iters={sz['iters']}", "--warmup=2",
                                    f"--dtype={args.dtype}", "--out=/dev/null"])
    load_before = common.machine_info()["load_avg"]
    rows, meta = reuse_speed.run(rargs)
    load_after = common.machine_info()["load_avg"]
    orig = rows[0]
    out = []
    for r in rows[1:]:
        bound = 1.0 - r["overall_reuse"] + 0.10
        t = r.get("time_ratio")
        details = {k: r.get(k) for k in ("capacity", "layer_reuse", "overall_reuse", "xla_ratio",
                                         "analytic_ratio", "ms", "cos_mean", "cos_min")}
        details.update(reuse_rate=r["target"], original_ms=orig.get("ms"), bound_overall=bound,
                       bound_layer=1.0 - r["layer_reuse"] + 0.10,
                       met_vs_layer_rate=None if t is None else t <= 1.0 - r["layer_reuse"] + 0.10,
                       frames=meta["frames"], batch=meta["batch"], vit=meta["vit"], iters=sz["iters"],
                       load_before=load_before, load_after=load_after)
        vit_name = "ViT-B/16" if meta["vit"]["hidden_size"] == 768 else "small ViT"
        out.append(make_row("reuse", f"reuse {r['target']:g} {vit_name} clip encode vs original", t, "x original",
                            f"<= (1 - {r['overall_reuse']:.3f}) + 0.10 = {bound:.3f}",
                            None if t is None else t <= bound,
                            f"FLOPs {r['xla_ratio'] or r['analytic_ratio']:.3g}x; layer reuse {r['layer_reuse']:.3g}",
                            **details))
    return out


# ---- loaders ----------------------------------------------------------------------------------

def part_data_wait(args, sz) -> list[dict[str, Any]]:
    import importlib  # pylint: disable=g-import-not-at-top
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    out = []
    for name, variant, batch, steps in sz["loaders"]:
        label = f"{name}:{variant}" if variant else name
        t0 = time.perf_counter()
        try:
            c = importlib.import_module(f"configs.{name}").get_config(variant)
            if batch:
                c.batch_size = batch
            with tempfile.TemporaryDirectory() as workdir:
                task = tasks.build(c, workdir)
                tr = Trainer(c, task, shd.make_mesh(c.mesh))
                state = tr.init()
                it = iter(task.train_dataset(global_batch_size=c.batch_size, seed=0, process_index=0,
                                             process_count=1))
                _, r = common.loader_vs_synthetic(tr, state, it, steps)
                del state, it, tr, task
            ratio = r["synthetic_over_real"]
            out.append(make_row("data_wait", f"data_wait_frac {label} loader", r["data_wait_frac"], "frac",
                                "synthetic/real >= 0.9", ratio >= 0.9,
                                f"synthetic/real {ratio:.3f}; step {r['synthetic_step_ms']:.4g} ms",
                                config=label, batch=c.batch_size, steps=steps, seconds=time.perf_counter() - t0,
                                load_avg=common.machine_info()["load_avg"], **r))
        except Exception as e:  # noqa: BLE001 - one loader failing keeps the others
            traceback.print_exc()
            row = error_row("data_wait", e)
            row["name"] = f"data_wait_frac {label} loader"
            out.append(row)
    return out


# ---- async checkpoint -------------------------------------------------------------------------

def part_ckpt(args, sz) -> list[dict[str, Any]]:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    from vlmjax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    c = _lm_config(sz["model"], sz["batch"], sz["seq_len"], args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        task = tasks.build(c, os.path.join(tmp, "wd"))
        tr = Trainer(c, task, shd.make_mesh(c.mesh))
        state = tr.init()
        it = iter(task.train_dataset(global_batch_size=c.batch_size, seed=0, process_index=0, process_count=1))
        batch = tr.put(next(it))
        cfg_dict = json.loads(c.to_json_best_effort())
        state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20

        def train(n: int) -> float:
            nonlocal state
            t0 = time.perf_counter()
            for _ in range(n):
                state, m = tr.train_step(state, batch)
            jax.block_until_ready(m)
            return (time.perf_counter() - t0) / n

        train(2)  # compile
        step_s = train(sz["steps_between"])
        res: dict[str, dict[str, list[float]]] = {}
        step = 0
        for mode in ("sync", "async"):
            ck = ckpt_lib.Checkpointer(os.path.join(tmp, f"ckpt_{mode}"), keep=2, every=1,
                                       async_save=mode == "async")
            r = res[mode] = {"block_s": [], "steps_during_s": [], "wait_after_s": []}
            try:
                for _ in range(sz["saves"]):
                    step += 1
                    train(1)
                    t0 = time.perf_counter()
                    ck.save(step, state, it, cfg_dict)
                    r["block_s"].append(time.perf_counter() - t0)
                    r["steps_during_s"].append(train(sz["steps_between"]))  # the loop goes on meanwhile
                    t0 = time.perf_counter()
                    ck.wait()
                    r["wait_after_s"].append(time.perf_counter() - t0)
            finally:
                ck.close()
        files = sum(f.stat().st_size for f in pathlib.Path(tmp, "ckpt_sync").rglob("*") if f.is_file())
    med = lambda xs: statistics.median(xs[1:] if len(xs) > 1 else xs)  # the first save also creates directories
    block, sync = med(res["async"]["block_s"]), med(res["sync"]["block_s"])
    details = dict(state_MiB=state_mb, on_disk_MiB_2_steps=files / 2**20, model=sz["model"], batch=sz["batch"],
                   seq_len=sz["seq_len"], train_step_ms=step_s * 1e3,
                   async_block_ms=[x * 1e3 for x in res["async"]["block_s"]],
                   sync_save_ms=[x * 1e3 for x in res["sync"]["block_s"]],
                   async_steps_during_write_ms=[x * 1e3 for x in res["async"]["steps_during_s"]],
                   async_wait_after_ms=[x * 1e3 for x in res["async"]["wait_after_s"]],
                   async_over_sync=block / sync, median_over="saves 2..n (the first creates the directories)",
                   params_M=float(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))) / 1e6,
                   load_avg=common.machine_info()["load_avg"])
    return [make_row("ckpt", f"async checkpoint blocking ({state_mb:.0f} MiB state)", block * 1e3, "ms",
                     "< sync save", block < sync,
                     f"sync save {sync * 1e3:.4g} ms ({block / sync:.2g}x); train step {step_s * 1e3:.4g} ms",
                     **details)]


PART_FNS: dict[str, Callable] = {"vit_b16": part_vit_b16, "vit_l14": part_vit_l14, "lora": part_lora,
                                 "routing": part_routing, "reuse": part_reuse, "data_wait": part_data_wait,
                                 "ckpt": part_ckpt}


def main(argv=None) -> int:
    args = parse_args(argv)
    err = device_error(args.device)
    if err:
        print(err, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(common.machine_line(), flush=True)
    run_parts(args, after_part=lambda rows: write_outputs(rows, args, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
