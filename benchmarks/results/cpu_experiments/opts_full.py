"""A/B of XLA:CPU compiler options on the vlmjax ViT-B/16 forward (and train grad), same process, interleaved."""
import sys, os, json; sys.path.insert(0, __import__("os").path.dirname(__file__)); sys.path.insert(0, "/work/wt-cpuspeed")
import numpy as np, jax, jax.numpy as jnp, transformers as tf
from harness import interleave, load
from vlmjax import convert
import patches
what = sys.argv[1]
if len(sys.argv) > 2 and sys.argv[2]: patches.apply(sys.argv[2].split(","))
B = 4
cfg = tf.CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224)
model = convert.from_config(cfg.to_dict()).module
x = jnp.asarray(np.random.default_rng(0).standard_normal((B, 224, 224, 3)), jnp.float32)
params = jax.jit(lambda r: model.init(r, x))(jax.random.PRNGKey(0))["params"]
params = jax.tree.map(lambda p: getattr(p, "value", p), params, is_leaf=lambda p: hasattr(p, "value"))
if what == "fwd":
    f = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]["pooler_output"])
else:
    f = jax.jit(jax.grad(lambda p, x: jnp.mean(model.apply({"params": p}, x)[0]["pooler_output"] ** 2)))
LT = "LIBRARY_FUSION_TYPE_"
variants = {
    "default": {},
    "eigen_dot(no ynn)": {"xla_cpu_experimental_ynn_fusion_type": LT + "INVALID"},
    "ynn_dot+eltwise+reduce": {"xla_cpu_experimental_ynn_fusion_type": ",".join(LT + t for t in ("DOT", "ELTWISE", "REDUCE"))},
    "fast_math": {"xla_cpu_enable_fast_math": True},
    "vec512": {"xla_cpu_prefer_vector_width": 512},
    "no_multi_thread_eigen": {"xla_cpu_multi_thread_eigen": False},
}
sel = os.environ.get("VARIANTS")
if sel: variants = {k: v for k, v in variants.items() if k in sel.split(",")}
fns = {}
for name, o in variants.items():
    try:
        c = f.lower(params, x).compile(compiler_options=o)
        fns[name] = (lambda c: lambda: jax.block_until_ready(c(params, x)))(c)
    except Exception as e:
        print("FAILED", name, str(e)[:200])
print("load", load(), "patches", sys.argv[2:] )
med, mn = interleave(fns, rounds=int(os.environ.get("ROUNDS", 5)), warm=1)
base = med["default"]
for k in med: print(f"{what} {k:26s} median {med[k]*1e3:8.1f} ms  min {mn[k]*1e3:8.1f} ms  default/this {base/med[k]:.2f}")
print("load", load())
