import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp
from thunkprof import thunk_profile
from vlmjax.models import vit, layers
import patches
if len(sys.argv) > 2: patches.apply(sys.argv[2].split(","))
B = 4
vc = vit.ViTConfig(variant="clip", hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12, patch_size=16, image_size=224)
layer = vit.EncoderLayer(vc)
x = jnp.asarray(np.random.default_rng(0).standard_normal((B, 197, 768)), jnp.float32)
params = layer.init(jax.random.PRNGKey(0), x)["params"]
params = jax.tree.map(lambda p: getattr(p, "value", p), params, is_leaf=lambda p: hasattr(p, "value"))
if sys.argv[1] == "fwd":
    thunk_profile(jax.jit(lambda p, x: layer.apply({"params": p}, x)[0]), (params, x), top=30)
else:
    thunk_profile(jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x)[0] ** 2), argnums=(0, 1))), (params, x), top=40)
