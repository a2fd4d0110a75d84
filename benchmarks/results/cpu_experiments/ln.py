import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp, torch
from harness import interleave, load
torch.set_num_threads(2)
x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 197, 768)) + 3, jnp.float32); s = jnp.ones(768) * 1.1; b = jnp.zeros(768) + 0.1
def cur(x, s, b):
    mean = jnp.mean(x, -1, keepdims=True); var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * s + b
def onepass(x, s, b):
    mean = jnp.mean(x, -1, keepdims=True); var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * s + b
def centred(x, s, b):  # centre once, reuse
    xc = x - jnp.mean(x, -1, keepdims=True)
    return xc * (jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + 1e-5) * 1.0) * s + b
tln = torch.nn.LayerNorm(768); tx = torch.tensor(np.asarray(x))
print({f.__name__: float(jnp.max(jnp.abs(f(x, s, b) - cur(x, s, b)))) for f in (onepass, centred)})
fns = {}
for f in (cur, onepass, centred):
    jf = jax.jit(f); gf = jax.jit(jax.grad(lambda x, s, b: jnp.sum(f(x, s, b) * x), argnums=(0, 1, 2)))
    fns[f.__name__ + "_f"] = (lambda jf: lambda: jf(x, s, b).block_until_ready())(jf)
    fns[f.__name__ + "_b"] = (lambda gf: lambda: jax.block_until_ready(gf(x, s, b)))(gf)
def tn():
    with torch.no_grad(): tln(tx)
txg = tx.clone().requires_grad_(True)
def tg():
    (tln(txg) * txg).sum().backward(); txg.grad = None; tln.zero_grad(set_to_none=True)
fns["torch_f"] = tn; fns["torch_b"] = tg
print("load", load())
med, mn = interleave(fns, rounds=15)
for k in med: print(f"{k:12s} median {med[k]*1e3:6.2f} ms  min {mn[k]*1e3:6.2f} ms")
