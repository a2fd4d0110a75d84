import sys, os
sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp, torch
import torch.nn.functional as F
from harness import interleave, load
from einops import rearrange
from vlmjax.models import attention
torch.set_num_threads(2)
B, N, H, Dh = 4, int(os.environ.get("N", 197)), int(os.environ.get("H", 12)), 64
K = int(os.environ.get("KV", H)); G = H // K
causal = bool(int(os.environ.get("CAUSAL", "0")))
r = np.random.default_rng(0)
q = jnp.asarray(r.standard_normal((B, N, H, Dh)), jnp.float32); k = jnp.asarray(r.standard_normal((B, N, K, Dh)), jnp.float32); v = k - 1
mask = jnp.tril(jnp.ones((N, N), bool))[None].repeat(B, 0) if causal else None
def cur(q, k, v): return attention._einsum(q, k, v, mask, jnp.float32)
NEG = jnp.finfo(jnp.float32).min
def _logits(q, k, mask, g):
    lg = jnp.einsum("bkmd,bskd->bkms", q, k)
    if mask is not None:
        lg = rearrange(lg, "b k (g t) s -> b k g t s", g=g)
        lg = jnp.where(mask[:, None, None], lg, NEG)
        lg = rearrange(lg, "b k g t s -> b k (g t) s")
    return lg
import functools
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def core(q, k, v, mask, g):
    return _cf(q, k, v, mask, g)[0]
def _cf(q, k, v, mask, g):
    lg = _logits(q, k, mask, g)
    e = jnp.exp(lg - jnp.max(lg, -1, keepdims=True))
    rl = 1.0 / jnp.sum(e, -1, keepdims=True)
    o = jnp.einsum("bkms,bskd->bkmd", e, v) * rl
    return o, (q, k, v, mask, e, rl, o)
def _cb(g, res, do):
    q, k, v, mask, e, rl, o = res
    dor = do * rl
    dv = jnp.einsum("bkms,bkmd->bskd", e, dor)
    dp = jnp.einsum("bkmd,bskd->bkms", dor, v)
    delta = jnp.sum(do * o, -1, keepdims=True) * rl
    ds = e * (dp - delta)
    dq = jnp.einsum("bkms,bskd->bkmd", ds, k)
    dk = jnp.einsum("bkms,bkmd->bskd", ds, q)
    return dq, dk, dv, None
core.defvjp(lambda q, k, v, mask, g: _cf(q, k, v, mask, g), _cb)
def new(q, k, v):
    q = rearrange(q * Dh ** -0.5, "b t (k g) d -> b k (g t) d", k=K)
    return rearrange(core(q, k, v, mask, G), "b k (g t) d -> b t (k g) d", g=G)
def late_auto(q, k, v):
    q = rearrange(q * Dh ** -0.5, "b t (k g) d -> b k (g t) d", k=K)
    lg = _logits(q, k, mask, G)
    e = jnp.exp(lg - jax.lax.stop_gradient(jnp.max(lg, -1, keepdims=True)))
    o = jnp.einsum("bkms,bskd->bkmd", e, v) / jnp.sum(e, -1, keepdims=True)
    return rearrange(o, "b k (g t) d -> b t (k g) d", g=G)
tq = torch.tensor(np.asarray(q)).transpose(1, 2).contiguous(); tk = torch.tensor(np.asarray(k)).transpose(1, 2).contiguous(); tv = tk - 1
def tn():
    with torch.no_grad(): F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=G > 1)
ta = [t.clone().requires_grad_(True) for t in (tq, tk, tv)]
def tg():
    F.scaled_dot_product_attention(*ta, is_causal=causal, enable_gqa=G > 1).pow(2).sum().backward()
    for t in ta: t.grad = None
fns = {"cur": cur, "new": new, "late_auto": late_auto}
ref = cur(q, k, v)
gref = jax.grad(lambda *a: jnp.sum(cur(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
for n, f in fns.items():
    gg = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
    print(n, "maxdiff", float(jnp.max(jnp.abs(jax.jit(f)(q, k, v) - ref))), "grad", max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(gg, gref)))
def jt(f): jf = jax.jit(f); return lambda: jax.block_until_ready(jf(q, k, v))
def jg(f): jf = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))); return lambda: jax.block_until_ready(jf(q, k, v))
tests = {f"{n}_f": jt(f) for n, f in fns.items()} | {"torch_f": tn}
tests |= {f"{n}_b": jg(f) for n, f in fns.items()} | {"torch_b": tg}
print("load", load(), B, N, H, K, causal)
med, mn = interleave(tests, rounds=9)
for kk, vv in med.items(): print(f"{kk:12s} median {vv*1e3:8.2f} ms  min {mn[kk]*1e3:8.2f} ms")
print("load", load())
