r"""VLM train-step speed and memory with a bf16 vs an NF4 (4-bit) decoder base: tokens/s, MFU, parameter
and activation memory.

  python benchmarks/vlm_step.py                                   # Qwen2.5-0.5B shape + ViT-B/16, batch 2
  python benchmarks/vlm_step.py --decoder=small --vision=small --batch_size=16   # CPU-sized sanity run
  python benchmarks/vlm_step.py --batch_size=32 --peak_tflops=989                 # an H100/H200 (bf16 dense)

The real ``vlm`` task of ``configs/trm_vlm_qa.py:perceiver`` (vision tower -> Perceiver, 64 latents -> decoder with
LoRA r=16 on every projection) on the real ``Trainer`` (sharded init, donated jitted step), one batch
of procedural scenes placed on device and reused (the step alone). Per base:

  bf16   decoder params stored in bf16 (frozen), LoRA adapters + vision + connector trained
  nf4    decoder weights quantised to NF4 (``decoder.load_in_4bit``; block 64, double-quantised scales),
         held in the non-trainable ``quant`` collection; the rest as bf16

Columns: decoder_param_MB (the decoder's stored weights: params + quant collection), trainable_M
(params the optimizer updates), state_MB (every param + optimizer state + quant bytes),
temp_MB (XLA's temporary buffers of the compiled step: activations and workspace, from
``compiled.memory_analysis()``), step_ms (median of --steps), tokens_per_s ((prefix + text) tokens),
analytic TFLOP per step (``vlmjax.flops``: 3 x forward for the trained vision tower, 2 x forward for
the frozen decoder, which computes activation gradients but no weight gradients; the Perceiver and
LoRA terms are left out, < 2% here) and MFU (vs
--peak_tflops or the datasheet table; '-' on CPU without it). Weights are random (speed and memory do
not depend on them).
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
from configs import trm_vlm_qa  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax import tree as tree_lib  # noqa: E402

DECODERS = {
    # Qwen2.5-0.5B (config.json): 24 layers, 896 wide, 14 heads / 2 KV heads, q/k/v bias, vocab 151936.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, head_dim=0, attention_bias=True, vocab_size=151936,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=0, vocab_size=4096),
}
VISIONS = {
    "vit_b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    patch_size=16, image_size=224),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  patch_size=32, image_size=96),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("decoder", "qwen2.5-0.5b", list(DECODERS), "Decoder shape.")
flags.DEFINE_enum("vision", "vit_b16", list(VISIONS), "Vision tower shape.")
flags.DEFINE_list("bases", ["bf16", "nf4"], "Decoder bases to compare.")
flags.DEFINE_integer("batch_size", 2, "Global batch.")
flags.DEFINE_integer("steps", 3, "Timed steps (after 1 warm-up step).")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (default: datasheet table).")
flags.DEFINE_string("out", "benchmarks/results/vlm_step.json", "JSON output path.")


def _config(base: str):
    c = trm_vlm_qa.get_config("perceiver")  # the seed's connector: 64 latents over the tower's 196 patches
    c.stages = {}
    c.batch_size = FLAGS.batch_size
    c.vision_encoder.tower.update(VISIONS[FLAGS.vision])
    c.data.update(dict(image_size=VISIONS[FLAGS.vision]["image_size"], num_eval=8, answer_prior_samples=100,
                       num_threads=0, prefetch_batches=0))
    c.decoder.update(DECODERS[FLAGS.decoder])
    c.decoder.update(dict(dtype="bfloat16", param_dtype="bfloat16", load_in_4bit=base == "nf4"))
    c.model.dtype = "bfloat16"
    return c


def _nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench(base: str) -> dict:
    c = _config(base)
    task, _, state, batch, compiled = common.compiled_train_step(c, FLAGS.batch_size)
    mem = compiled.memory_analysis()
    state, m, dt = common.time_compiled_step(compiled, state, batch, FLAGS.steps)
    params = tree_lib.flatten(jax.device_get(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                          state.params)))
    decoder_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for k, v in params.items() if k.startswith("decoder/"))
    decoder_bytes += _nbytes(state.model_state)
    frozen = task.optimizer_config(c.optim).frozen
    trainable = sum(int(np.prod(v.shape)) for k, v in params.items() if not any(re.search(p, k) for p in frozen))
    n = task.model.config.prefix_len
    text_len = int(c.data.max_text_len)
    dcfg, vcfg = task.decoder_config, task.vision_config
    # Trained parts cost forward + backward (3x forward); the frozen decoder base only forward + the
    # activation-gradient half of its backward (2x forward): no weight gradients (LoRA's are ~0.1%).
    vision = flops_lib.vit_forward_flops(
        hidden_size=vcfg.hidden_size, intermediate_size=vcfg.intermediate_size, num_layers=vcfg.num_hidden_layers,
        patch_size=vcfg.patch_size, image_hw=(vcfg.image_size, vcfg.image_size))
    analytic = FLAGS.batch_size * (2 * flops_lib.decoder_forward_flops(dcfg, n + text_len) + 3 * vision)
    peak = common.device_peak_tflops("bfloat16", FLAGS.peak_tflops)
    return {
        "base": base, "decoder_param_MB": decoder_bytes / 2**20, "trainable_M": trainable / 1e6,
        "state_MB": (_nbytes(state.params) + _nbytes(state.opt_state) + _nbytes(state.model_state)) / 2**20,
        "temp_MB": None if mem is None else mem.temp_size_in_bytes / 2**20,
        "step_ms": dt * 1e3, "tokens_per_s": FLAGS.batch_size * (n + text_len) / dt,
        "analytic_TFLOP": analytic / 1e12,
        "MFU": None if peak is None else analytic / dt / (peak * 1e12 * jax.device_count()),
        "loss": float(m["loss"]),
    }


def main(argv):
    del argv
    rows = [bench(b) for b in FLAGS.bases]
    info = common.device_info()
    print(f"\nVLM train step ({FLAGS.decoder} decoder + {FLAGS.vision} tower, Perceiver 64 latents, LoRA r=16) on "
          f"{info['device_count']}x {info['platform']} ({info['device_kind']}), batch {FLAGS.batch_size}, bf16")
    common.print_table(rows, ["base", "decoder_param_MB", "trainable_M", "state_MB", "temp_MB", "step_ms",
                              "tokens_per_s", "analytic_TFLOP", "MFU"])
    common.write_json(FLAGS.out, {"device": info, "machine": common.machine_info(),
                                  "flags": {k: FLAGS[k].value for k in ("decoder", "vision", "bases", "batch_size",
                                                                         "steps", "peak_tflops")},
                                  "rows": rows})


if __name__ == "__main__":
    app.run(main)
