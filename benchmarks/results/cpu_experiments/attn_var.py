import sys, os; sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp, torch
import torch.nn.functional as F
from harness import interleave, load
from einops import rearrange
from vlmjax.models import layers
torch.set_num_threads(2)
B, N, H, Dh = 4, 197, 12, 64
K = int(os.environ.get("KV", H)); G = H // K
N = int(os.environ.get("N", N))
r = np.random.default_rng(0)
q = jnp.asarray(r.standard_normal((B, N, H, Dh)), jnp.float32); k = jnp.asarray(r.standard_normal((B, N, K, Dh)), jnp.float32); v = k - 1
causal = bool(int(os.environ.get("CAUSAL", "0")))
mask = jnp.tril(jnp.ones((N, N), bool))[None].repeat(B, 0) if causal else jnp.ones((B, N, N), bool)
def cur(q, k, v): return layers.dot_product_attention(q, k, v, mask, jnp.float32)
def mha_direct(q, k, v):
    q = q * (Dh ** -0.5)
    lg = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    lg = jnp.where(mask[:, None], lg, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(lg, -1), v)
def gqa_merged(q, k, v):
    """q heads grouped into the row dim: [B, K, G*T, Dh] against k [B, K, S, Dh]."""
    q = rearrange(q * (Dh ** -0.5), "b t (k g) d -> b k (g t) d", k=k.shape[2])
    kk = jnp.swapaxes(k, 1, 2); vv = jnp.swapaxes(v, 1, 2)      # [B, K, S, Dh]
    lg = jnp.einsum("bkmd,bksd->bkms", q, kk, preferred_element_type=jnp.float32)
    lg = rearrange(lg, "b k (g t) s -> b k g t s", g=q.shape[2] // kk.shape[2] if False else H // K)
    lg = jnp.where(mask[:, None, None], lg, jnp.finfo(jnp.float32).min)
    p = rearrange(jax.nn.softmax(lg, -1), "b k g t s -> b k (g t) s")
    o = jnp.einsum("bkms,bksd->bkmd", p, vv)
    return rearrange(o, "b k (g t) d -> b t (k g) d", g=H // K)
def jnn(q, k, v): return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
tq = torch.tensor(np.asarray(q)).transpose(1, 2).contiguous(); tk = torch.tensor(np.asarray(k)).transpose(1, 2).contiguous(); tv = tk - 1
def tsdpa(q, k, v): return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=G > 1)
def jt(f): jf = jax.jit(f); return lambda: jax.block_until_ready(jf(q, k, v))
def jg(f): jf = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))); return lambda: jax.block_until_ready(jf(q, k, v))
def tn():
    with torch.no_grad(): tsdpa(tq, tk, tv)
ta = [t.clone().requires_grad_(True) for t in (tq, tk, tv)]
def tg():
    tsdpa(*ta).pow(2).sum().backward()
    for t in ta: t.grad = None
# check equal
ref = cur(q, k, v)
fns = {"cur": cur, "mha_direct": mha_direct, "gqa_merged": gqa_merged, "jax_nn_xla": jnn}
if G > 1: fns.pop("mha_direct")
for n, f in fns.items(): print(n, "maxdiff", float(jnp.max(jnp.abs(jax.jit(f)(q, k, v) - ref))))
print("load", load(), f"B{B} N{N} H{H} K{K} causal={causal}")
tests = {f"{n}_f": jt(f) for n, f in fns.items()} | {"torch_sdpa_f": tn}
tests |= {f"{n}_b": jg(f) for n, f in fns.items()} | {"torch_sdpa_b": tg}
med, mn = interleave(tests, rounds=9)
for kk, vv in med.items(): print(f"{kk:16s} median {vv*1e3:8.2f} ms  min {mn[kk]*1e3:8.2f} ms")
print("load", load())
