r"""Compile time of the train step and of the init, looped vs scanned layers (``model.scan_layers``).

  python benchmarks/compile_time.py                                   # CPU, both models, both layouts
  python benchmarks/compile_time.py --models=qwen25_05b --remat=full
  python benchmarks/compile_time.py --topology=v5e:2x2                # compile for a TPU slice (libtpu)

Models have the real shapes (random weights are never materialised: everything is abstract, only
compiled): a Qwen2.5-0.5B-shaped decoder (24 layers, next-token loss over a [B, T] batch) and a
ViT-L/14 image tower at 224 px (24 layers, CLIP layout, mean-square loss on the pooled output). The
train step is ``value_and_grad`` + AdamW, jitted with donated state, as the trainer's. Columns:
trace (Python tracing + lowering to StableHLO), compile (XLA), both in seconds; the init is the
jitted random init of the params (what a run compiles before its first step). Compile time grows
with depth for the looped layout and stays nearly flat for the scanned one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from vlmjax import sharding as shd  # noqa: E402
from vlmjax.models import decoder as decoder_lib  # noqa: E402
from vlmjax.models import vit as vit_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["qwen25_05b", "vit_l14"], "Which models.")
flags.DEFINE_list("layouts", ["loop", "scan"], "Layer layouts to compare.")
flags.DEFINE_integer("batch", 8, "Sequences / images per step.")
flags.DEFINE_integer("seq_len", 512, "Decoder sequence length.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_string("remat", "none", "Remat policy (layers.REMAT_POLICIES).")
flags.DEFINE_string("attention_impl", "auto", "Attention backend.")
flags.DEFINE_string("topology", "", "Compile for this TPU topology (e.g. v5e:2x2; needs libtpu) "
                    "instead of the local devices; the batch is sharded over all its chips.")
flags.DEFINE_string("out", "", "JSON output (default benchmarks/results/compile_time_<platform>.json).")


def _model(name: str, scan: bool):
    common_kw = dict(dtype=FLAGS.dtype, remat=FLAGS.remat, attention_impl=FLAGS.attention_impl, scan_layers=scan)
    if name == "qwen25_05b":
        cfg = decoder_lib.DecoderConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                        attention_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
                                        tie_word_embeddings=True, **common_kw)
        model = decoder_lib.Decoder(cfg)
        batch = jax.ShapeDtypeStruct((FLAGS.batch, FLAGS.seq_len), jnp.int32)

        def loss(params, tokens):
            logits, _ = model.apply({"params": params}, tokens)
            labels = jnp.roll(tokens, -1, axis=1)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], labels[:, :-1]).mean()

        return model, batch, loss, cfg.num_hidden_layers
    if name == "vit_l14":
        cfg = vit_lib.ViTConfig(variant="clip", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, patch_size=14, image_size=224, **common_kw)
        model = vit_lib.VisionTransformer(cfg)
        batch = jax.ShapeDtypeStruct((FLAGS.batch, 224, 224, 3), jnp.float32)

        def loss(params, images):
            out, _ = model.apply({"params": params}, images)
            return jnp.mean(out["pooler_output"].astype(jnp.float32) ** 2)

        return model, batch, loss, cfg.num_hidden_layers
    raise app.UsageError(f"--models: unknown {name!r}; use qwen25_05b, vit_l14.")


def _mesh():
    if not FLAGS.topology:
        devices = np.asarray(jax.devices()[:1])
    else:
        from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
        devices = np.asarray(topologies.get_topology_desc(platform="tpu", topology_name=FLAGS.topology).devices)
    return jax.sharding.Mesh(devices.reshape(-1, 1, 1), shd.MESH_AXES)


def _timed(jitted, *args) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, compiled


def measure(name: str, layout: str, mesh) -> dict:
    model, batch, loss, depth = _model(name, layout == "scan")
    rules = shd.DEFAULT_RULES

    @contextlib.contextmanager
    def ctx():  # the mesh + logical rules the trainer traces under
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            yield
    example = jnp.zeros(batch.shape, batch.dtype)
    with ctx():
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example))
    param_sh = shd.logical_to_shardings(boxed, mesh, rules)["params"]
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed)["params"], param_sh)
    tx = optax.adamw(1e-4)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))
    batch = jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=batch_sh)

    def init(rng):
        with ctx():
            params = nn.meta.unbox(model.init(rng, example))["params"]
        return params, tx.init(params)

    def step(params, opt_state, batch):
        with ctx():
            value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_abstract = jax.eval_shape(tx.init, abstract)
    init_trace, init_compile, _ = _timed(jax.jit(init, out_shardings=(param_sh, None)), jax.random.key(0))
    step_trace, step_compile, compiled = _timed(jax.jit(step, donate_argnums=(0, 1)), abstract, opt_abstract, batch)
    mem = compiled.memory_analysis()
    row = dict(model=name, layout=layout, layers=depth, init_trace_s=init_trace, init_compile_s=init_compile,
               step_trace_s=step_trace, step_compile_s=step_compile,
               step_total_s=step_trace + step_compile,
               temp_gib=(mem.temp_size_in_bytes / 2**30) if mem is not None else None)
    print(f"  {name} {layout}: step trace {step_trace:.1f}s compile {step_compile:.1f}s; "
          f"init trace {init_trace:.1f}s compile {init_compile:.1f}s", flush=True)
    return row


def main(argv):
    del argv
    mesh = _mesh()
    platform = mesh.devices.flat[0].platform
    rows = []
    for name in FLAGS.models:
        for layout in FLAGS.layouts:
            rows.append(measure(name, layout, mesh))
    by = {(r["model"], r["layout"]): r for r in rows}
    for r in rows:
        loop = by.get((r["model"], "loop"))
        r["step_speedup_vs_loop"] = (loop["step_total_s"] / r["step_total_s"]) if loop else None
    columns = ["model", "layout", "layers", "step_trace_s", "step_compile_s", "step_total_s",
               "step_speedup_vs_loop", "init_trace_s", "init_compile_s", "temp_gib"]
    machine = common.machine_info()
    print(f"\nCompile time, batch {FLAGS.batch}, seq_len {FLAGS.seq_len}, {FLAGS.dtype}, remat={FLAGS.remat}, "
          f"compiled for {FLAGS.topology or platform} ({mesh.devices.size} device(s))")
    common.print_table(rows, columns)
    out = FLAGS.out or f"benchmarks/results/compile_time_{'tpu' if FLAGS.topology else platform}.json"
    common.write_json(out, dict(flags=dict(batch=FLAGS.batch, seq_len=FLAGS.seq_len, dtype=FLAGS.dtype,
                                           remat=FLAGS.remat, attention_impl=FLAGS.attention_impl,
                                           topology=FLAGS.topology),
                                machine=machine, rows=rows))
    md = [f"# Compile time: looped vs scanned layers ({FLAGS.topology or platform})", "",
          f"`python benchmarks/compile_time.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
          common.machine_line(machine), "",
          f"Batch {FLAGS.batch}, seq_len {FLAGS.seq_len}, {FLAGS.dtype}, remat={FLAGS.remat}; seconds.", "",
          common.md_table(rows, columns)]
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    app.run(main)
