r"""Foveated model: what the patch cache saves in pass 2, and whether the input pipeline keeps the step fed.

  python benchmarks/foveated_step.py                        # configs/foveated.py default shapes
  python benchmarks/foveated_step.py --clips=4 --repeats=3 --steps=5 --rounds=1

1. Encoder cost of pass 2 for B x T frames (deep query, the spec's mechanism): reading every frame
   with a new query from the cached per-layer patch K/V (``FoveatedEncoder.deep_query``: one token per
   layer) vs recomputing the encoder for the query (``deep_query_uncached``: [tokens, query] through
   every layer with the asymmetric mask, what a model without the cache pays per query), beside pass
   1's cache build (``patch_cache``) and the shallow query's read for reference. Columns: XLA GFLOP
   (``cost_analysis()`` of each jitted forward), analytic GFLOP (``vlmjax.flops`` terms: patch
   embedding, q/k/v/out projections, attention, MLP; norms and softmax left out), ms (median of
   --repeats).
2. Input pipeline: the real train step (``Trainer``, default config) fed a synthetic on-device batch
   vs fed by the real loader (procedural clips rendered by grain's reader threads + the latent cache),
   ratio = synthetic step time / real step time (1.0 = the loader costs nothing; the seed's PyTorch
   prototype sat at 2% GPU utilisation because decoding video starved the step), and the share of
   time spent waiting for data.
Prints tables, writes JSON.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import foveated as foveated_config  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax import sharding as shd  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax.models import foveated as fov  # noqa: E402
from vlmjax.train import Trainer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "deep", "configs/foveated.py variant whose shapes are measured.")
flags.DEFINE_integer("clips", 16, "Clips B (x T frames each) in the encoder comparison; the config's batch.")
flags.DEFINE_integer("repeats", 5, "Timed calls per function (after 1 warm-up call).")
flags.DEFINE_integer("steps", 20, "Train steps timed per input mode (after 2 warm-up steps), per round.")
flags.DEFINE_integer("rounds", 5, "Rounds of (synthetic, real loader) steps; the medians are reported.")
flags.DEFINE_string("out", "benchmarks/results/foveated_step.json", "JSON output path.")


def analytic(v, frames: int, n_tokens: int, llm_width: int) -> dict[str, float]:
    """Analytic forward FLOPs of the four functions for ``frames`` frames of ``n_tokens`` tokens."""
    layer = lambda t, s: sum(flops_lib.vit_layer_forward_flops_terms(v, t, s).values())
    embed = flops_lib.vit_patch_embed_flops(v, n_tokens)
    query_in = 2.0 * llm_width * v.hidden_size
    d = v.hidden_size
    return {
        "patch_cache": frames * (embed + v.num_hidden_layers * layer(n_tokens, n_tokens)),
        "deep_read_cached": frames * (query_in + v.num_hidden_layers * layer(1, n_tokens + 1)),
        "deep_recompute": frames * (query_in + embed + v.num_hidden_layers * layer(n_tokens + 1, n_tokens + 1)),
        # q and out projections of the query, its attention over the N tokens (K/V are in the cache).
        "shallow_read_cached": frames * (query_in + 2 * 2.0 * d * d + 2 * 2.0 * n_tokens * d),
    }


def _time(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def encoder_rows(task) -> list[dict]:
    v, d = task.vit_config, task.decoder_config
    t, s = int(task.config.data.num_frames), int(task.config.data.image_size)
    n = FLAGS.clips * t
    frames = jax.random.normal(jax.random.key(0), (n, s, s, 3), jnp.float32)
    queries = jax.random.normal(jax.random.key(1), (n, d.hidden_size), jnp.float32)
    deep = fov.FoveatedModel(v, d, fov.FoveatedConfig(query_mode="deep", latent_channels=task.latent_shape[-1]))
    shallow = fov.FoveatedModel(v, d, fov.FoveatedConfig(query_mode="shallow",
                                                         latent_channels=task.latent_shape[-1]))
    lat = jnp.zeros((1, t, *task.latent_shape), jnp.float32)
    pd = nn.meta.unbox(deep.init(jax.random.key(2), frames[:t][None], lat))
    ps = nn.meta.unbox(shallow.init(jax.random.key(2), frames[:t][None], lat))

    def cache_fn(model):
        return jax.jit(lambda p, f: model.apply(p, f, method=model.frame_cache))

    def read_fn(model):
        return jax.jit(lambda p, q, c: model.apply(p, q, c, method=model.read)[0])

    def recompute(p, f, q):
        def run(m):
            return m.encoder.deep_query_uncached(f, m.query_in(q))[0]
        return deep.apply(p, method=run)

    deep_cache = cache_fn(deep)
    cache_d = deep_cache(pd, frames)
    shallow_cache = cache_fn(shallow)
    cache_s = shallow_cache(ps, frames)
    jobs = {
        "patch_cache": (deep_cache, (pd, frames)),
        "deep_read_cached": (read_fn(deep), (pd, queries, cache_d)),
        "deep_recompute": (jax.jit(recompute), (pd, frames, queries)),
        "shallow_read_cached": (read_fn(shallow), (ps, queries, cache_s)),
    }
    n_tokens = v.num_prefix_tokens + (s // v.patch_size) ** 2
    ana = analytic(v, n, n_tokens, d.hidden_size)
    rows = []
    for name, (fn, args) in jobs.items():
        xla = common.compiled_flops(fn.lower(*args).compile())
        rows.append({"function": name, "frames": n, "XLA_GFLOP": None if xla is None else xla / 1e9,
                     "analytic_GFLOP": ana[name] / 1e9,
                     "analytic_vs_XLA": None if not xla else ana[name] / xla, "ms": _time(fn, *args) * 1e3})
    by = {r["function"]: r for r in rows}
    for r in rows:
        r["vs_recompute_flops"] = (by["deep_recompute"]["XLA_GFLOP"] / r["XLA_GFLOP"]) if r["XLA_GFLOP"] else None
        r["vs_recompute_time"] = by["deep_recompute"]["ms"] / r["ms"]
    return rows


def pipeline_row(config, workdir) -> dict:
    task = tasks.build(config, workdir)
    tr = Trainer(config, task, shd.make_mesh(config.mesh))
    state = tr.init()
    it = iter(task.train_dataset(global_batch_size=config.batch_size, seed=0, process_index=0, process_count=1))
    _, r = common.loader_vs_synthetic(tr, state, it, FLAGS.steps, FLAGS.rounds)
    return {"variant": FLAGS.variant, "batch": config.batch_size, **r}


def main(argv):
    del argv
    config = foveated_config.get_config(FLAGS.variant)
    with tempfile.TemporaryDirectory() as workdir:
        task = tasks.build(config, workdir)
        rows = encoder_rows(task)
        pipe = pipeline_row(config, workdir)
    info = common.device_info()
    v = task.vit_config
    print(f"\nFoveated pass-2 encoder cost, {rows[0]['frames']} frames ({FLAGS.clips} clips x "
          f"{config.data.num_frames}), ViT {v.hidden_size} wide x {v.num_hidden_layers} layers, "
          f"{config.data.image_size} px / patch {v.patch_size}, on {info['device_count']}x {info['platform']} "
          f"({info['device_kind']}), float32")
    common.print_table(rows, ["function", "XLA_GFLOP", "analytic_GFLOP", "analytic_vs_XLA", "ms",
                              "vs_recompute_flops", "vs_recompute_time"])
    print(f"\nInput pipeline (configs/foveated.py:{FLAGS.variant}, batch {config.batch_size}): real loader vs "
          "synthetic batch (target synthetic_over_real >= 0.9)")
    common.print_table([pipe], ["variant", "batch", "synthetic_step_ms", "real_loader_step_ms",
                                "synthetic_over_real", "data_wait_frac"], machine=False)
    common.write_json(FLAGS.out, {"device": info, "machine": common.machine_info(),
                                  "flags": {k: FLAGS[k].value
                                            for k in ("variant", "clips", "repeats", "steps", "rounds")},
                                  "encoder": rows, "pipeline": pipe})


if __name__ == "__main__":
    app.run(main)
