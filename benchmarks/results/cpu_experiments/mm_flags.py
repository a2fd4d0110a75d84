import sys; sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp, torch
from harness import interleave, load
torch.set_num_threads(2)
r = np.random.default_rng(0)
g = jnp.asarray(r.standard_normal((788, 3072)), jnp.float32)
W = jnp.asarray(r.standard_normal((768, 3072)), jnp.float32)
Wt = jnp.asarray(np.asarray(W).T.copy())
x = jnp.asarray(r.standard_normal((788, 768)), jnp.float32)
nt = jax.jit(lambda g, W: g @ W.T)
nn_ = jax.jit(lambda g, Wt: g @ Wt)
bar = jax.jit(lambda g, W: g @ jax.lax.optimization_barrier(W.T))
fwd = jax.jit(lambda x, W: x @ W)
tn = jax.jit(lambda x, g: x.T @ g)
tg, tW, tx = (torch.tensor(np.asarray(a)) for a in (g, W, x))
fns = {"NT g@W.T": lambda: nt(g, W).block_until_ready(), "NN g@Wt": lambda: nn_(g, Wt).block_until_ready(),
       "barrier": lambda: bar(g, W).block_until_ready(), "fwd x@W": lambda: fwd(x, W).block_until_ready(),
       "TN x.T@g": lambda: tn(x, g).block_until_ready(),
       "torch NT": lambda: tg @ tW.T, "torch fwd": lambda: tx @ tW, "torch TN": lambda: tx.T @ tg}
print(load())
med, mn = interleave(fns, rounds=15)
for k, v in med.items(): print(f"{k:12s} {v*1e3:7.2f} ms  min {mn[k]*1e3:7.2f}")
