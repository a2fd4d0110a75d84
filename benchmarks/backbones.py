r"""Backbone throughput and train-step MFU: vlmjax (JAX/Flax) vs HF transformers (PyTorch), same run.

  python benchmarks/backbones.py --models=vit_b16,dinov2_b14,qwen25_05b --batch=4 --seq_len=128   # CPU
  python benchmarks/backbones.py --batch=256 --seq_len=1024 --dtype=bfloat16                       # GPU

Models have random weights in the real shapes (ViT-B/16 and ViT-L/14 as CLIP vision towers,
DINOv2-B/14, a Qwen2.5-0.5B-shaped decoder); each side is built from the same HF config.
Forward: images/s or tokens/s. Train step: forward + backward + AdamW on a simple loss (mean square
of the pooled output for vision, next-token cross-entropy for the decoder). MFU uses analytic FLOPs
(vlmjax.flops; ViT-B/16 at 224 = 35.1 GFLOP forward), never XLA's cost analysis.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from vlmjax import convert  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["vit_b16", "vit_l14", "dinov2_b14", "qwen25_05b"], "Which backbones.")
flags.DEFINE_integer("batch", 8, "Images (or sequences) per step.")
flags.DEFINE_integer("seq_len", 256, "Decoder sequence length.")
flags.DEFINE_integer("steps", 3, "Timed iterations (after warm-up).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype on both sides.")
flags.DEFINE_bool("train", True, "Also time a train step (JAX and torch eager).")
flags.DEFINE_bool("torch", True, "Time the HF PyTorch model (eager).")
flags.DEFINE_bool("torch_compile", False, "Also time torch.compile of the HF model.")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (default: datasheet table).")
flags.DEFINE_string("out", "benchmarks/results/backbones.json", "JSON output path.")


def _cases():
    import transformers as tf  # pylint: disable=g-import-not-at-top
    return {
        "vit_b16": (tf.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, patch_size=16, image_size=224), tf.CLIPVisionModel),
        "vit_l14": (tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, patch_size=14, image_size=224), tf.CLIPVisionModel),
        "dinov2_b14": (tf.Dinov2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, patch_size=14, image_size=224), tf.Dinov2Model),
        "qwen25_05b": (tf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                      tie_word_embeddings=True, max_position_embeddings=32768), tf.Qwen2ForCausalLM),
    }


def _time(fn, steps):
    fn()  # warm-up / compile
    fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def _fwd_flops(name, hf_cfg):
    if name.startswith("qwen"):
        spec = convert.from_config(hf_cfg.to_dict())
        return FLAGS.batch * flops_lib.decoder_forward_flops(spec.module.config, FLAGS.seq_len)
    return FLAGS.batch * flops_lib.vit_forward_flops(
        hidden_size=hf_cfg.hidden_size, intermediate_size=hf_cfg.intermediate_size,
        num_layers=hf_cfg.num_hidden_layers, patch_size=hf_cfg.patch_size,
        image_hw=(hf_cfg.image_size, hf_cfg.image_size))


def bench_jax(name, hf_cfg):
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    spec = convert.from_config(hf_cfg.to_dict(), dtype=dtype)
    model = spec.module
    rng = np.random.default_rng(0)
    text = name.startswith("qwen")
    if text:
        x = jnp.asarray(rng.integers(0, hf_cfg.vocab_size, (FLAGS.batch, FLAGS.seq_len + 1)), jnp.int32)
        inputs = (x[:, :-1],)
    else:
        s = hf_cfg.image_size
        inputs = (jnp.asarray(rng.normal(size=(FLAGS.batch, s, s, 3)), jnp.float32),)
    params = jax.jit(lambda r: model.init(r, *inputs))(jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda p: getattr(p, "value", p), params, is_leaf=lambda p: hasattr(p, "value"))
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a)[0])
    fwd_s = _time(lambda: jax.block_until_ready(fwd(params, *inputs)), FLAGS.steps)
    row = {"fwd_ms": fwd_s * 1e3}
    if FLAGS.train:
        tx = optax.adamw(1e-4)
        opt = tx.init(params)

        def loss_fn(p):
            out = model.apply({"params": p}, *inputs)[0]
            if text:
                return optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), x[:, 1:]).mean()
            return jnp.mean(out["pooler_output"].astype(jnp.float32) ** 2)

        @functools.partial(jax.jit, donate_argnums=(0, 1))  # in-place update: no second copy of params/moments
        def step(p, o):
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        state = [params, opt]

        def run():
            state[0], state[1], loss = step(*state)
            jax.block_until_ready(loss)
        row["train_ms"] = _time(run, FLAGS.steps) * 1e3
    return row


def bench_torch(name, hf_cfg, model_cls, compiled):
    import torch  # pylint: disable=g-import-not-at-top
    dtype = torch.bfloat16 if FLAGS.dtype == "bfloat16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = model_cls(hf_cfg).to(dev, dtype).eval()
    text = name.startswith("qwen")
    if text:
        x = torch.randint(0, hf_cfg.vocab_size, (FLAGS.batch, FLAGS.seq_len + 1), device=dev)
        kw = {"input_ids": x[:, :-1]}
    else:
        s = hf_cfg.image_size
        kw = {"pixel_values": torch.randn(FLAGS.batch, 3, s, s, device=dev, dtype=dtype)}
    fn = torch.compile(model) if compiled else model
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            fn(**kw)
        sync()
    row = {"fwd_ms": _time(fwd, FLAGS.steps) * 1e3}
    if FLAGS.train and not compiled:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out = model(**kw)
            if text:
                loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
            else:
                loss = out.pooler_output.float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
        row["train_ms"] = _time(step, FLAGS.steps) * 1e3
    return row


def main(argv):
    del argv
    cases = _cases()
    peak = common.device_peak_tflops(FLAGS.dtype, FLAGS.peak_tflops)
    rows = []
    for name in FLAGS.models:
        hf_cfg, model_cls = cases[name]
        fl = _fwd_flops(name, hf_cfg)
        unit = "tokens" if name.startswith("qwen") else "images"
        per_step = FLAGS.batch * (FLAGS.seq_len if unit == "tokens" else 1)
        impls = [("vlmjax", lambda: bench_jax(name, hf_cfg))]
        if FLAGS.torch:
            impls.append(("hf_torch", lambda: bench_torch(name, hf_cfg, model_cls, False)))
        if FLAGS.torch_compile:
            impls.append(("hf_torch_compile", lambda: bench_torch(name, hf_cfg, model_cls, True)))
        for impl, fn in impls:
            r = fn()
            gc.collect()  # release one model's params and optimizer state before the next
            jax.clear_caches()
            row = {"model": name, "impl": impl, "fwd_ms": r["fwd_ms"],
                   f"fwd_{unit}_per_s": per_step / (r["fwd_ms"] / 1e3), "fwd_GFLOP": fl / 1e9,
                   "fwd_TFLOPs": fl / (r["fwd_ms"] / 1e3) / 1e12, "train_ms": r.get("train_ms")}
            if r.get("train_ms"):
                row["train_MFU"] = None if peak is None else 3 * fl / (r["train_ms"] / 1e3) / (peak * 1e12)
                row["train_TFLOPs"] = 3 * fl / (r["train_ms"] / 1e3) / 1e12
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    for name in FLAGS.models:  # speed-up of vlmjax over each torch variant, forward and train
        base = next(r for r in rows if r["model"] == name and r["impl"] == "vlmjax")
        for r in rows:
            if r["model"] == name:
                r["vlmjax_fwd_speedup"] = r["fwd_ms"] / base["fwd_ms"]
                if r.get("train_ms") and base.get("train_ms"):
                    r["vlmjax_train_speedup"] = r["train_ms"] / base["train_ms"]
    info = common.device_info()
    print(f"\nbackbones on {info['device_count']}x {info['platform']} ({info['device_kind']}), batch "
          f"{FLAGS.batch}, decoder seq {FLAGS.seq_len}, {FLAGS.dtype}")
    common.print_table(rows, ["model", "impl", "fwd_ms", "fwd_images_per_s", "fwd_tokens_per_s", "fwd_TFLOPs",
                              "train_ms", "train_TFLOPs", "train_MFU", "vlmjax_fwd_speedup",
                              "vlmjax_train_speedup"])
    common.write_json(FLAGS.out, {"device": info, "flags": {k: FLAGS[k].value for k in (
        "models", "batch", "seq_len", "steps", "dtype", "train", "torch", "torch_compile")}, "rows": rows})


if __name__ == "__main__":
    app.run(main)
