r"""Fusion VQA train step with 2 / 4 / 6 gated cross-attention blocks: throughput and FLOPs, XLA vs
analytic.

  python benchmarks/fusion_step.py                                 # the CPU `default` shapes, batch 64
  python benchmarks/fusion_step.py --layers=2,4,6 --batch_size=16 --steps=5

The real ``fusion_vqa`` task of ``configs/fusion_vqa.py`` (``default``: a 96 px / patch-32 ViT and a
12-layer, 128-wide question encoder trained from scratch, a classification head) on the real
``Trainer`` (sharded init, donated jitted step), one batch of procedural scenes placed on device and
reused (the step alone), for each number of fusion blocks (the seed's ``num_fusion_layers`` ablation).

Columns: params_M, xattn_M (the fusion blocks' params), XLA_GFLOP (``cost_analysis()`` of the compiled
train step), analytic_GFLOP (3 x forward, everything trains: ``vlmjax.flops`` ViT + decoder layers on
the question + the blocks, ``gated_xattn_block_forward_flops``; the answer head and elementwise work
left out), xattn_share (the blocks' part of the analytic count), step_ms (median of --steps),
examples_per_s. Prints a table, writes JSON.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import fusion_vqa  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax import tree as tree_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("layers", ["2", "4", "6"], "Numbers of fusion blocks (must divide the decoder's 12 layers).")
flags.DEFINE_integer("batch_size", 64, "Global batch (the default config's).")
flags.DEFINE_integer("steps", 5, "Timed steps (after 1 warm-up step).")
flags.DEFINE_string("out", "benchmarks/results/fusion_step.json", "JSON output path.")


def _config(num_blocks: int):
    c = fusion_vqa.get_config("default")
    c.batch_size = FLAGS.batch_size
    c.fusion.num_fusion_layers = num_blocks
    c.data.update(dict(num_eval=8, answer_prior_samples=500, num_threads=0, prefetch_batches=0))
    return c


def analytic_forward_flops(task, config) -> dict[str, float]:
    """Per example: the tower, the decoder layers on the question prompt, the fusion blocks."""
    v, d, f = task.vision_config, task.decoder_config, task.fusion_config
    t = int(config.data.max_prompt_len)
    nv = (v.image_size // v.patch_size) ** 2 + 1  # patches + class token
    vision = flops_lib.vit_forward_flops(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                         num_layers=v.num_hidden_layers, patch_size=v.patch_size,
                                         image_hw=(v.image_size, v.image_size))
    decoder = d.num_hidden_layers * flops_lib.decoder_layer_forward_flops(d, t)
    xattn = f.num_fusion_layers * flops_lib.gated_xattn_block_forward_flops(
        hidden_size=d.hidden_size, num_heads=f.xattn_num_heads, head_dim=f.head_dim(d.hidden_size),
        ffn_mult=f.xattn_ffn_mult, text_tokens=t, visual_tokens=nv)
    return {"vision": vision, "decoder": decoder, "xattn": xattn}


def bench(num_blocks: int) -> dict:
    c = _config(num_blocks)
    task, _, state, batch, compiled = common.compiled_train_step(c, FLAGS.batch_size)
    xla = common.compiled_flops(compiled)
    state, m, dt = common.time_compiled_step(compiled, state, batch, FLAGS.steps)
    params = tree_lib.flatten(jax.device_get(state.params))
    n_params = sum(int(np.prod(p.shape)) for p in params.values())
    n_xattn = sum(int(np.prod(p.shape)) for k, p in params.items() if re.search(r"(^|/)xattn_\d+/", k))
    terms = analytic_forward_flops(task, c)
    analytic = 3 * FLAGS.batch_size * sum(terms.values())
    return {"fusion_layers": num_blocks, "params_M": n_params / 1e6, "xattn_M": n_xattn / 1e6,
            "XLA_GFLOP": None if xla is None else xla / 1e9, "analytic_GFLOP": analytic / 1e9,
            "analytic_vs_XLA": None if not xla else analytic / xla,
            "xattn_share": terms["xattn"] / sum(terms.values()),
            "step_ms": dt * 1e3, "examples_per_s": FLAGS.batch_size / dt, "loss": float(m["loss"])}


def main(argv):
    del argv
    rows = [bench(int(n)) for n in FLAGS.layers]
    info = common.device_info()
    print(f"\nFusion VQA train step (configs/fusion_vqa.py default shapes) on {info['device_count']}x "
          f"{info['platform']} ({info['device_kind']}), batch {FLAGS.batch_size}, float32")
    common.print_table(rows, ["fusion_layers", "params_M", "xattn_M", "XLA_GFLOP", "analytic_GFLOP",
                              "analytic_vs_XLA", "xattn_share", "step_ms", "examples_per_s"])
    common.write_json(FLAGS.out, {"device": info, "machine": common.machine_info(),
                                  "flags": {k: FLAGS[k].value for k in ("layers", "batch_size", "steps")},
                                  "rows": rows})


if __name__ == "__main__":
    app.run(main)
