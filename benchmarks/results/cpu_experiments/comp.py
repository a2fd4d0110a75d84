"""Component timings, vlmjax-style JAX vs torch, interleaved (ViT-B/16, batch 4, fp32)."""
import sys, os, functools
sys.path.insert(0, __import__("os").path.dirname(__file__))
from harness import interleave, load
import numpy as np, jax, jax.numpy as jnp, torch
import torch.nn.functional as F
from vlmjax.models import layers
torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
B, N, D, H, Dh, FF = 4, 197, 768, 12, 64, 3072
r = np.random.default_rng(0)
X = r.standard_normal((B, N, D)).astype(np.float32)
Wq = (r.standard_normal((D, H, Dh)) * 0.02).astype(np.float32)
W1 = (r.standard_normal((D, FF)) * 0.02).astype(np.float32); W2 = (r.standard_normal((FF, D)) * 0.02).astype(np.float32)
Q = r.standard_normal((B, N, H, Dh)).astype(np.float32)
x = jnp.asarray(X); q = jnp.asarray(Q); k = q + 1; v = q - 1
tx = torch.tensor(X); tq = torch.tensor(Q).transpose(1, 2).contiguous(); tk = tq + 1; tv = tq - 1
tests = {}
def jt(f, *a):
    jf = jax.jit(f); return lambda: jax.block_until_ready(jf(*a))
def jg(f, *a):  # fwd+bwd wrt all args
    jf = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(a))))); return lambda: jax.block_until_ready(jf(*a))
def tg(f, *a):
    a = [t.clone().requires_grad_(True) for t in a]
    def run():
        f(*a).pow(2).sum().backward()
        for t in a: t.grad = None
    return run
def tn(f, *a):
    def run():
        with torch.no_grad(): f(*a)
    return run
# attention core
einsum_attn = lambda q, k, v: layers.bidirectional_attention(q, k, v, jnp.float32)
def bhnd_attn(q, k, v):  # heads-major layout, plain softmax
    q = jnp.swapaxes(q, 1, 2) * (Dh ** -0.5); k = jnp.swapaxes(k, 1, 2); v = jnp.swapaxes(v, 1, 2)
    p = jax.nn.softmax(jnp.einsum("bhtd,bhsd->bhts", q, k), axis=-1)
    return jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", p, v), 1, 2)
def nnattn(q, k, v): return jax.nn.dot_product_attention(q, k, v, implementation="xla")
tsdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
def teager(q, k, v): return torch.softmax((q * Dh ** -0.5) @ k.transpose(-1, -2), -1) @ v
# LN
ln_j = lambda x: layers.LayerNorm().apply({"params": {"scale": jnp.ones(D), "bias": jnp.zeros(D)}}, x)
tln = torch.nn.LayerNorm(D)
# MLP quick_gelu
w1, w2 = jnp.asarray(W1), jnp.asarray(W2)
def mlp_j(x, w1, w2): return layers.quick_gelu(x @ w1) @ w2
t1, t2 = torch.tensor(W1.T.copy()), torch.tensor(W2.T.copy())
def mlp_t(x, a, b): h = F.linear(x, a); return F.linear(h * torch.sigmoid(1.702 * h), b)
def gelu_j(x, w1, w2): return jax.nn.gelu(x @ w1, approximate=False) @ w2
def mlp_gt(x, a, b): return F.linear(F.gelu(F.linear(x, a)), b)
# qkv
wq = jnp.asarray(Wq); wq3 = jnp.stack([wq, wq, wq], 1)
def qkv3(x, w): return tuple(jnp.einsum("bnd,dhk->bnhk", x, w) for _ in range(3))
def qkv_sum(x, w): return sum(jnp.einsum("bnd,dhk->bnhk", x, w + i) for i in range(3))
def qkv_fused(x, w3): y = jnp.einsum("bnd,dshk->bnshk", x, w3); return y[:, :, 0] + y[:, :, 1] + y[:, :, 2]
tw = torch.tensor(Wq.reshape(D, D).T.copy())
def tqkv(x, w): return sum(F.linear(x, w + i) for i in range(3))
which = sys.argv[1:] or ["attn", "ln", "mlp", "qkv"]
print("load", load(), "torch threads", torch.get_num_threads(), "XLA_FLAGS", os.environ.get("XLA_FLAGS"))
if "attn" in which:
    tests.update({"attn_einsum_f": jt(einsum_attn, q, k, v), "attn_bhnd_f": jt(bhnd_attn, q, k, v), "attn_jaxnn_f": jt(nnattn, q, k, v),
                  "attn_t_sdpa_f": tn(tsdpa, tq, tk, tv), "attn_t_eager_f": tn(teager, tq, tk, tv),
                  "attn_einsum_b": jg(einsum_attn, q, k, v), "attn_bhnd_b": jg(bhnd_attn, q, k, v), "attn_jaxnn_b": jg(nnattn, q, k, v),
                  "attn_t_sdpa_b": tg(tsdpa, tq, tk, tv), "attn_t_eager_b": tg(teager, tq, tk, tv)})
if "ln" in which:
    tests.update({"ln_j_f": jt(ln_j, x), "ln_t_f": tn(tln, tx), "ln_j_b": jg(ln_j, x), "ln_t_b": tg(tln, tx)})
if "mlp" in which:
    tests.update({"mlp_j_f": jt(mlp_j, x, w1, w2), "mlp_t_f": tn(mlp_t, tx, t1, t2), "mlp_j_b": jg(mlp_j, x, w1, w2), "mlp_t_b": tg(mlp_t, tx, t1, t2),
                  "mlp_erf_j_f": jt(gelu_j, x, w1, w2), "mlp_erf_t_f": tn(mlp_gt, tx, t1, t2)})
if "qkv" in which:
    tests.update({"qkv_3_f": jt(qkv_sum, x, wq), "qkv_fused_f": jt(qkv_fused, x, wq3), "qkv_t_f": tn(tqkv, tx, tw),
                  "qkv_3_b": jg(qkv_sum, x, wq), "qkv_fused_b": jg(qkv_fused, x, wq3), "qkv_t_b": tg(tqkv, tx, tw)})
med, mn = interleave(tests, rounds=9)
for kk, vv in med.items(): print(f"{kk:16s} median {vv*1e3:8.2f} ms  min {mn[kk]*1e3:8.2f} ms")
print("load", load())
