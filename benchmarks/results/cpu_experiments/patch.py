import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp, torch
from harness import interleave, load
from einops import rearrange
torch.set_num_threads(2)
B, S, p, C, D = 4, 224, 16, 3, 768
r = np.random.default_rng(0)
x = jnp.asarray(r.standard_normal((B, S, S, C)), jnp.float32); w = jnp.asarray(r.standard_normal((p, p, C, D)) * 0.02, jnp.float32)
def mm(x, w):
    g = S // p
    y = rearrange(x, "b (gh ph) (gw pw) c -> b gh gw ph pw c", ph=p, pw=p)
    return jax.lax.dot_general(y, w, (((3, 4, 5), (0, 1, 2)), ((), ())))
def mm2(x, w):  # flatten to a 2-D matmul explicitly
    y = rearrange(x, "b (gh ph) (gw pw) c -> (b gh gw) (ph pw c)", ph=p, pw=p)
    return (y @ w.reshape(-1, D)).reshape(B, S // p, S // p, D)
def mm3(x, w):  # tokens merged into one row dim, kernel kept [p, p, C, D]
    y = rearrange(x, "b (gh ph) (gw pw) c -> (b gh gw) ph pw c", ph=p, pw=p)
    return jax.lax.dot_general(y, w, (((1, 2, 3), (0, 1, 2)), ((), ()))).reshape(B, S // p, S // p, D)
def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
for f in (mm2, mm3, conv): print(f.__name__, float(jnp.max(jnp.abs(jax.jit(f)(x, w) - jax.jit(mm)(x, w)))))
tw = torch.tensor(np.asarray(w).transpose(3, 2, 0, 1).copy()); tx = torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())
conv_t = torch.nn.Conv2d(3, D, p, p, bias=False); conv_t.weight.data = tw
def jt(f): jf = jax.jit(f); return lambda: jax.block_until_ready(jf(x, w))
def jg(f): jf = jax.jit(jax.grad(lambda w, x: jnp.sum(f(x, w) ** 2))); return lambda: jax.block_until_ready(jf(w, x))
def tn():
    with torch.no_grad(): conv_t(tx)
def tg():
    conv_t(tx).pow(2).sum().backward(); conv_t.weight.grad = None
print("load", load())
med, mn = interleave({"mm_f": jt(mm), "mm2_f": jt(mm2), "mm3_f": jt(mm3), "conv_f": jt(conv), "torch_f": tn, "mm_b": jg(mm), "mm2_b": jg(mm2), "mm3_b": jg(mm3), "conv_b": jg(conv), "torch_b": tg}, rounds=11)
for k, v in med.items(): print(f"{k:10s} median {v*1e3:7.2f} ms min {mn[k]*1e3:7.2f}")
print("load", load())

t = jax.jit(jax.grad(lambda w, x: jnp.sum(mm3(x, w) ** 2))).lower(w, x).compile().as_text()
print("mm3 bwd", [l.strip()[:120] for l in t[t.index("ENTRY"):].splitlines() if "fusion(" in l or "dot(" in l])
