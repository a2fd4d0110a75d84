r"""Backbone throughput and train-step MFU: vlmjax (JAX/Flax) vs HF transformers (PyTorch), same run.

  python benchmarks/backbones.py --models=vit_b16,dinov2_b14,qwen25_05b --batch=4 --seq_len=128   # CPU
  python benchmarks/backbones.py --batch=256 --seq_len=1024 --dtype=bfloat16                       # GPU

Models have random weights in the real shapes (ViT-B/16 and ViT-L/14 as CLIP vision towers,
DINOv2-B/14, a Qwen2.5-0.5B-shaped decoder); each side is built from the same HF config.
Forward: images/s or tokens/s. Train step: forward + backward + AdamW on a simple loss (mean square
of the pooled output for vision, next-token cross-entropy for the decoder). MFU uses analytic FLOPs
(vlmjax.flops; ViT-B/16 at 224 = 35.1 GFLOP forward), never XLA's cost analysis.

Timing (--interleave, the default): both implementations of a model are built, then timed in
rounds, one call of each per round (forward rounds, then train-step rounds), and the median over
rounds is reported (the minimum too). On a shared CPU a busy phase then hits both sides alike; the
speed-up columns are ratios of those medians. torch gets as many intra-op threads as XLA:CPU uses
(the CPUs this process may run on) unless --torch_threads says otherwise; both counts, the CPU model
and the load average are in the printed header and in the JSON (``machine``).
--nointerleave times one implementation at a time and frees it before the next (for models whose
two copies do not fit in memory together).

``qwen25_05b_6l`` is the Qwen2.5-0.5B shape (widths, heads, the 151936 vocabulary) cut to 6 layers,
for a decoder train step that fits a small CPU box twice.
"""

from __future__ import annotations

import functools
import gc
import os
import statistics
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
flags.DEFINE_list("models", ["vit_b16", "vit_l14", "dinov2_b14", "qwen25_05b"],
                  "Which backbones (also: qwen25_05b_6l).")
flags.DEFINE_integer("batch", 8, "Images (or sequences) per step.")
flags.DEFINE_integer("seq_len", 256, "Decoder sequence length.")
flags.DEFINE_integer("steps", 3, "Timed rounds (after two warm-up calls); the median is reported.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype on both sides.")
flags.DEFINE_bool("train", True, "Also time a train step (JAX and torch eager).")
flags.DEFINE_bool("torch", True, "Time the HF PyTorch model (eager).")
flags.DEFINE_bool("torch_compile", False, "Also time torch.compile of the HF model.")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (default: datasheet table).")
flags.DEFINE_string("out", "benchmarks/results/backbones.json", "JSON output path.")
flags.DEFINE_bool("interleave", True, "Time vlmjax and torch in alternating rounds (both in memory).")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads; 0 = as many as XLA:CPU uses.")


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
        "qwen25_05b_6l": (tf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=6, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True, max_position_embeddings=32768),
                          tf.Qwen2ForCausalLM),
    }


def _time_rounds(fns: dict, steps: int) -> dict:
    """Times ``fns`` (name -> blocking callable) in ``steps`` rounds, one call of each per round, the
    order rotating each round, after two warm-up calls each. Returns name -> list of seconds."""
    names = list(fns)
    for n in names:
        fns[n]()  # compile
        fns[n]()
    times = {n: [] for n in names}
    for r in range(steps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def _opts(o):
    """The options a function reads: ``o`` (any object with the flags' attribute names, e.g. a
    ``types.SimpleNamespace`` from benchmarks/suite.py), or this script's parsed FLAGS."""
    return FLAGS if o is None else o


def _fwd_flops(name, hf_cfg, o=None):
    o = _opts(o)
    if name.startswith("qwen"):
        spec = convert.from_config(hf_cfg.to_dict())
        return o.batch * flops_lib.decoder_forward_flops(spec.module.config, o.seq_len)
    return o.batch * flops_lib.vit_forward_flops(
        hidden_size=hf_cfg.hidden_size, intermediate_size=hf_cfg.intermediate_size,
        num_layers=hf_cfg.num_hidden_layers, patch_size=hf_cfg.patch_size,
        image_hw=(hf_cfg.image_size, hf_cfg.image_size))


def jax_fns(name, hf_cfg, o=None):
    """{'fwd': callable[, 'train': callable]} for the vlmjax model (each call blocks until done)."""
    o = _opts(o)
    dtype = jnp.bfloat16 if o.dtype == "bfloat16" else jnp.float32
    spec = convert.from_config(hf_cfg.to_dict(), dtype=dtype)
    model = spec.module
    rng = np.random.default_rng(0)
    text = name.startswith("qwen")
    if text:
        x = jnp.asarray(rng.integers(0, hf_cfg.vocab_size, (o.batch, o.seq_len + 1)), jnp.int32)
        inputs = (x[:, :-1],)
    else:
        s = hf_cfg.image_size
        inputs = (jnp.asarray(rng.normal(size=(o.batch, s, s, 3)), jnp.float32),)
    params = jax.jit(lambda r: model.init(r, *inputs))(jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda p: getattr(p, "value", p), params, is_leaf=lambda p: hasattr(p, "value"))
    fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a)[0])
    state = [params]
    fns = {"fwd": lambda: jax.block_until_ready(fwd(state[0], *inputs))}
    if o.train:
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

        state.append(opt)

        def run():
            state[0], state[1], loss = step(*state)
            jax.block_until_ready(loss)
        fns["train"] = run
    return fns


def torch_fns(name, hf_cfg, model_cls, compiled, o=None):
    """{'fwd': callable[, 'train': callable]} for the HF torch model (eager, or torch.compile)."""
    import torch  # pylint: disable=g-import-not-at-top
    o = _opts(o)
    dtype = torch.bfloat16 if o.dtype == "bfloat16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = model_cls(hf_cfg).to(dev, dtype).eval()
    text = name.startswith("qwen")
    if text:
        x = torch.randint(0, hf_cfg.vocab_size, (o.batch, o.seq_len + 1), device=dev)
        kw = {"input_ids": x[:, :-1]}
    else:
        s = hf_cfg.image_size
        kw = {"pixel_values": torch.randn(o.batch, 3, s, s, device=dev, dtype=dtype)}
    fn = torch.compile(model) if compiled else model
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fwd():
        model.eval()
        with torch.no_grad():
            fn(**kw)
        sync()
    fns = {"fwd": fwd}
    if o.train and not compiled:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model.train()
            out = model(**kw)
            if text:
                loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
            else:
                loss = out.pooler_output.float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
        fns["train"] = step
    return fns


def _torch_threads(o=None) -> int:
    import torch  # pylint: disable=g-import-not-at-top
    n = _opts(o).torch_threads or len(os.sched_getaffinity(0))  # XLA:CPU's pool: the usable CPUs
    torch.set_num_threads(n)
    return torch.get_num_threads()


def bench_model(name, hf_cfg, model_cls, o=None) -> dict[str, dict[str, list[float]]]:
    """impl -> {'fwd': [s, ...], 'train': [s, ...]} for vlmjax and the torch variants asked for."""
    o = _opts(o)
    builders = {"vlmjax": lambda: jax_fns(name, hf_cfg, o)}
    if o.torch:
        builders["hf_torch"] = lambda: torch_fns(name, hf_cfg, model_cls, False, o)
    if o.torch_compile:
        builders["hf_torch_compile"] = lambda: torch_fns(name, hf_cfg, model_cls, True, o)
    out = {}
    if o.interleave:
        fns = {impl: b() for impl, b in builders.items()}
        for phase in ("fwd", "train"):
            phase_fns = {impl: f[phase] for impl, f in fns.items() if phase in f}
            if not phase_fns:
                continue
            for impl, ts in _time_rounds(phase_fns, o.steps).items():
                out.setdefault(impl, {})[phase] = ts
        del fns
    else:
        for impl, b in builders.items():
            f = b()
            out[impl] = {phase: _time_rounds({phase: f[phase]}, o.steps)[phase] for phase in f}
            del f
            gc.collect()  # release one model's params and optimizer state before the next
            jax.clear_caches()
    gc.collect()
    jax.clear_caches()
    return out


def measure(o=None) -> tuple[list[dict], int | None]:
    """Rows (one per model and implementation, with the vlmjax speed-ups) and the torch thread count,
    for the options ``o`` (default: this script's FLAGS; benchmarks/suite.py passes its own)."""
    o = _opts(o)
    cases = _cases()
    peak = common.device_peak_tflops(o.dtype, o.peak_tflops)
    rows = []
    torch_threads = _torch_threads(o) if (o.torch or o.torch_compile) else None
    print(common.machine_line(), flush=True)
    for name in o.models:
        hf_cfg, model_cls = cases[name]
        fl = _fwd_flops(name, hf_cfg, o)
        unit = "tokens" if name.startswith("qwen") else "images"
        per_step = o.batch * (o.seq_len if unit == "tokens" else 1)
        load_before = common.machine_info()["load_avg"]
        for impl, r in bench_model(name, hf_cfg, model_cls, o).items():
            fwd_ms = statistics.median(r["fwd"]) * 1e3
            row = {"model": name, "impl": impl, "fwd_ms": fwd_ms, "fwd_min_ms": min(r["fwd"]) * 1e3,
                   f"fwd_{unit}_per_s": per_step / (fwd_ms / 1e3), "fwd_GFLOP": fl / 1e9,
                   "fwd_TFLOPs": fl / (fwd_ms / 1e3) / 1e12, "train_ms": None,
                   "fwd_samples_ms": [t * 1e3 for t in r["fwd"]], "load_before": load_before}
            if r.get("train"):
                row["train_ms"] = statistics.median(r["train"]) * 1e3
                row["train_min_ms"] = min(r["train"]) * 1e3
                row["train_samples_ms"] = [t * 1e3 for t in r["train"]]
                row["train_MFU"] = None if peak is None else 3 * fl / (row["train_ms"] / 1e3) / (peak * 1e12)
                row["train_TFLOPs"] = 3 * fl / (row["train_ms"] / 1e3) / 1e12
            row["load_after"] = common.machine_info()["load_avg"]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                   if not k.endswith("samples_ms")}, flush=True)
    for name in o.models:  # speed-up of vlmjax over each torch variant, forward and train
        base = next(r for r in rows if r["model"] == name and r["impl"] == "vlmjax")
        for r in rows:
            if r["model"] == name:
                r["vlmjax_fwd_speedup"] = r["fwd_ms"] / base["fwd_ms"]
                if r.get("train_ms") and base.get("train_ms"):
                    r["vlmjax_train_speedup"] = r["train_ms"] / base["train_ms"]
    return rows, torch_threads


def main(argv):
    del argv
    rows, torch_threads = measure()
    info = common.device_info()
    print(f"\nbackbones on {info['device_count']}x {info['platform']} ({info['device_kind']}), batch "
          f"{FLAGS.batch}, decoder seq {FLAGS.seq_len}, {FLAGS.dtype}, median of {FLAGS.steps} "
          f"{'interleaved ' if FLAGS.interleave else ''}rounds, torch threads {torch_threads}")
    common.print_table(rows, ["model", "impl", "fwd_ms", "fwd_images_per_s", "fwd_tokens_per_s", "fwd_TFLOPs",
                              "train_ms", "train_TFLOPs", "train_MFU", "vlmjax_fwd_speedup",
                              "vlmjax_train_speedup"])
    common.write_json(FLAGS.out, {"device": info, "flags": {k: FLAGS[k].value for k in (
        "models", "batch", "seq_len", "steps", "dtype", "train", "torch", "torch_compile", "interleave",
        "torch_threads")}, "torch_threads": torch_threads, "rows": rows})


if __name__ == "__main__":
    app.run(main)
