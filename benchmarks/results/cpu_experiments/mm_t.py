import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp, torch
from harness import interleave, load
torch.set_num_threads(2)
r = np.random.default_rng(0)
M, D, F = 788, 768, 3072
x = r.standard_normal((M, D), dtype=np.float32); w = r.standard_normal((D, F), dtype=np.float32); g = r.standard_normal((M, F), dtype=np.float32)
jx, jw, jg_ = map(jnp.asarray, (x, w, g)); tx, tw, tg_ = map(torch.tensor, (x, w, g))
dg = jax.lax.dot_general
cases = {
 "NN  x@w     ": (jax.jit(lambda a, b: a @ b), (jx, jw), lambda: tx @ tw),
 "NT  g@w^T   ": (jax.jit(lambda a, b: dg(a, b, (((1,), (1,)), ((), ())))), (jg_, jw), lambda: tg_ @ tw.T),
 "TN  x^T@g   ": (jax.jit(lambda a, b: dg(a, b, (((0,), (0,)), ((), ())))), (jx, jg_), lambda: tx.T @ tg_),
 "TN via .T@  ": (jax.jit(lambda a, b: jnp.transpose(a) @ b), (jx, jg_), None),
}
fns = {}
for k, (f, a, t) in cases.items():
    fns["jax " + k] = (lambda f, a: lambda: f(*a).block_until_ready())(f, a)
    if t: fns["torch " + k] = t
    print(k, [l.strip()[:100] for l in f.lower(*a).compile().as_text().splitlines() if "ROOT" in l][-1])
print("load", load())
med, mn = interleave(fns, rounds=9)
for k in med: print(f"{k:20s} median {med[k]*1e3:7.2f} ms  min {mn[k]*1e3:7.2f} ms  {2*M*D*F/mn[k]/1e9:.0f} GF/s at min")
print("load", load())
