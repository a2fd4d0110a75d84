r"""Alignment train-step speed: pairs/s, FLOPs (analytic and XLA), MFU and the input pipeline ratio.

  python benchmarks/alignment_step.py --towers=small --batch_size=128          # configs' own towers
  python benchmarks/alignment_step.py --towers=vit_b16 --batch_size=8 --steps=3  # ViT-B/16 + CLIP-B text
  python benchmarks/alignment_step.py --batch_size=256 --dtype=bfloat16          # on an accelerator

Both alignment profiles (``pixmo_alignment``: MAP attention pooling; ``perceiver_mrl_alignment``:
Perceiver resampler), built from ``get_config(None)`` with the towers overridden, on the real
``Trainer`` (sharded init, donated jitted step; the compiled executable is called directly so the
step compiles once). Per profile:

  synthetic    one real batch placed on device once and reused: the step alone;
  real loader  each step's batch from ``task.train_dataset`` (procedural scenes rendered and
               tokenized on the fly by grain's threads) and ``trainer.put``; data_wait_frac = share
               of the time spent in ``next(it)`` + ``put`` (the step itself is dispatched async);
  pipeline_ratio = (real-loader steps/s) / (synthetic steps/s); >= 0.9 means the loader keeps up;
  loader_batches_per_s = the loader alone (fresh iterator, no step running), for reference.
Each phase: 2 warm-up steps, then --steps timed steps with one step in flight (batch i is fetched
and put while step i-1 runs, as in the trainer's loop); step time = median interval between
consecutive step completions. The real-loader phase starts
with the loader's prefetch (prefetch_batches + grain read-ahead) already filled while the synthetic
phase ran, so with few steps a loader slower than the step looks better than its steady state;
loader_batches_per_s is the check. On a CPU the loader threads and XLA share the same cores.

FLOPs per train step = 3 x forward (matmuls, multiply-add = 2): vision tower and text tower from
``vlmjax.flops`` (patch embed + ``vit_layer_forward_flops_terms`` per layer; the text tower is the
same pre-norm encoder layer on max_text_len tokens), plus, counted here (flops.py has no helper for
them): the MAP pool (1 probe: q/out on 1 token, k/v on N, attention 1 x N, MLP 4D) or the Perceiver
resampler (per layer: q/out on L latents, k/v on N + L, attention L x (N + L), FFN), the two
projection heads, untied MRL heads if any, and the [B, B] similarity at every MRL dim.
MFU = analytic FLOPs / median step time / (peak x devices); peak from --peak_tflops or the
datasheet table of benchmarks/common.py ('-' on CPU without --peak_tflops).
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax import sharding as shd  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax.train import Trainer  # noqa: E402

TOWERS = {
    "small": None,  # the configs' default towers (64 px, patch 8)
    "vit_b16": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    patch_size=16, image_size=224),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                  max_position_embeddings=77),
        image_size=224, max_text_len=32),  # the scene captions fit in 32 tokens
}
PROFILES = ("pixmo_alignment", "perceiver_mrl_alignment")

FLAGS = flags.FLAGS
flags.DEFINE_list("profiles", list(PROFILES), f"Config profiles among {PROFILES}.")
flags.DEFINE_enum("towers", "vit_b16", list(TOWERS), "Tower sizes: ViT-B/16 + CLIP-B text, or the configs' own.")
flags.DEFINE_integer("batch_size", 8, "Global batch (pairs per step); 256 on an accelerator.")
flags.DEFINE_integer("steps", 5, "Timed steps per phase (after 2 warm-up steps); the median is reported.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (default: datasheet table).")
flags.DEFINE_string("out", "benchmarks/results/alignment_step.json", "JSON output path.")


def make_config(profile: str):
    c = importlib.import_module(f"configs.{profile}").get_config(None)
    t = TOWERS[FLAGS.towers]
    if t is not None:
        c.vision_encoder.tower.update(t["vision"])
        c.text_encoder.tower.update(t["text"])
        c.data.update(dict(image_size=t["image_size"], max_text_len=t["max_text_len"]))
    c.batch_size = FLAGS.batch_size
    c.model.dtype = FLAGS.dtype
    c.update(dict(eval_every=0, ckpt_every=0, eval_at_start=False, total_steps=1000))
    return c


def _encoder_layers(cfg, tokens: int) -> float:
    return cfg.num_hidden_layers * sum(flops_lib.vit_layer_forward_flops_terms(cfg, tokens).values())


def forward_flops(task, batch_size: int) -> dict[str, float]:
    """Forward FLOPs of one step (the whole batch), by part."""
    v, t, h = task.vision_config, task.text_config, task.head_config
    n = (v.image_size // v.patch_size) ** 2 + v.num_prefix_tokens  # tokens the head reads
    e = h.embed_dim
    vision = flops_lib.vit_patch_embed_flops(v, n) + _encoder_layers(v, n)
    text = _encoder_layers(t, int(task.config.data.max_text_len))
    dv = v.hidden_size
    if h.use_perceiver:
        d, lat = h.perceiver_dim or dv, h.perceiver_num_latents
        head = (2.0 * n * dv * d if d != dv else 0.0) + h.perceiver_num_layers * (
            2.0 * lat * d * d * 2 + 2.0 * (n + lat) * d * d * 2 + 2.0 * lat * (n + lat) * d * 2
            + 2.0 * lat * d * h.perceiver_ffn_mult * d * 2)
    elif h.use_attention_pooling:
        d = dv
        head = 2.0 * d * d * 2 + 2.0 * n * d * d * 2 + 2.0 * n * d * 2 + 2.0 * d * 4 * d * 2
    else:
        d, head = dv, 0.0
    proj = lambda din: 2.0 * din * e if h.projection_layers == 1 else 2.0 * din * din + 2.0 * din * e
    projections = proj(d) + proj(t.hidden_size)
    if h.mrl_dims and not h.mrl_tied:
        projections += 2 * sum(2.0 * m * m for m in h.dims)
    sim = sum(2.0 * batch_size * batch_size * m for m in h.dims)
    return {"vision_tower": batch_size * vision, "vision_head": batch_size * head, "text_tower": batch_size * text,
            "projections": batch_size * projections, "similarity": sim}


def _phase(step, box, get_batch, n: int) -> tuple[list[float], list[float]]:
    """n steps with one in flight (batch i is fetched and put while step i-1 runs, as in the trainer's
    loop): the intervals between consecutive step completions and the time spent in get_batch."""
    times, waits, prev = [], [], None
    t_prev = time.perf_counter()
    for _ in range(n):
        t1 = time.perf_counter()
        b = get_batch()
        waits.append(time.perf_counter() - t1)
        box["state"], m = step(box["state"], b)
        if prev is not None:
            jax.block_until_ready(prev)
            times.append(time.perf_counter() - t_prev)
            t_prev = time.perf_counter()
        prev = m
    jax.block_until_ready(prev)
    times.append(time.perf_counter() - t_prev)
    return times, waits


def bench(profile: str) -> dict:
    c = make_config(profile)
    task = tasks.build(c, None)
    tr = Trainer(c, task, shd.make_mesh(c.mesh))
    state = tr.init()
    loader = lambda: iter(task.train_dataset(global_batch_size=c.batch_size, seed=0, process_index=0,
                                             process_count=1))
    it = loader()
    batch = tr.put(next(it))
    t0 = time.perf_counter()
    step = tr.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    xla = common.compiled_flops(step)
    box = {"state": state}
    _phase(step, box, lambda: batch, 2)
    synth_times, _ = _phase(step, box, lambda: batch, FLAGS.steps)
    synth = statistics.median(synth_times)
    real_batch = lambda: tr.put(next(it))
    _phase(step, box, real_batch, 2)
    real_times, wait = _phase(step, box, real_batch, FLAGS.steps)
    real_s = statistics.median(real_times)
    it2 = loader()
    for _ in range(2):
        next(it2)
    loader_times = []
    for _ in range(FLAGS.steps):
        t1 = time.perf_counter()
        next(it2)
        loader_times.append(time.perf_counter() - t1)
    loader_s = statistics.median(loader_times)
    fwd = forward_flops(task, c.batch_size)
    analytic = 3.0 * sum(fwd.values())
    peak = common.device_peak_tflops(FLAGS.dtype, FLAGS.peak_tflops)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(box["state"].params))
    return {
        "profile": profile, "head": task.head_config.head, "towers": FLAGS.towers, "batch": c.batch_size,
        "image_size": task.image_size, "text_len": int(c.data.max_text_len), "params_M": n_params / 1e6,
        "compile_s": compile_s, "step_ms_synthetic": synth * 1e3, "pairs_per_s": c.batch_size / synth,
        "step_ms_real": real_s * 1e3, "pairs_per_s_real": c.batch_size / real_s,
        "pipeline_ratio": synth / real_s, "data_wait_frac": sum(wait) / sum(real_times),
        "loader_batches_per_s": 1.0 / loader_s, "loader_headroom": synth / loader_s,
        "step_times_synthetic_s": synth_times, "step_times_real_s": real_times,
        "forward_GFLOP_by_part": {k: v / 1e9 for k, v in fwd.items()},
        "GFLOP_per_step": analytic / 1e9, "xla_GFLOP": None if xla is None else xla / 1e9,
        "xla_over_analytic": None if xla is None else xla / analytic,
        "TFLOPs": analytic / synth / 1e12,
        "MFU": None if peak is None else analytic / synth / (peak * 1e12 * jax.device_count()),
    }


def main(argv):
    del argv
    rows = [bench(p) for p in FLAGS.profiles]
    info = common.device_info()
    print(f"\nalignment train step on {info['device_count']}x {info['platform']} ({info['device_kind']}), "
          f"towers {FLAGS.towers}, batch {FLAGS.batch_size}, {FLAGS.dtype}, median of {FLAGS.steps} steps")
    common.print_table(rows, ["profile", "towers", "batch", "step_ms_synthetic", "pairs_per_s", "step_ms_real",
                              "pipeline_ratio", "data_wait_frac", "GFLOP_per_step", "xla_over_analytic",
                              "TFLOPs", "MFU"])
    print()
    common.print_table(rows, ["profile", "head", "params_M", "compile_s", "loader_batches_per_s",
                              "loader_headroom", "xla_GFLOP"], machine=False)
    common.write_json(FLAGS.out, {"device": info, "flags": {k: FLAGS[k].value for k in (
        "profiles", "towers", "batch_size", "steps", "dtype", "peak_tflops")}, "rows": rows})


if __name__ == "__main__":
    app.run(main)
