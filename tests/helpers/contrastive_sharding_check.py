"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by tests/test_contrastive.py).

CLIP and SigLIP losses of a tiny two-tower model (linear towers + L2 norm) on a batch of 16: on one
device vs jitted with the batch sharded over an 8-device 'data' mesh axis (2 examples per device),
loss and gradients of every param. Also the loss a device would get from its local batch only
(shard_map), which must differ: it shows the comparison can tell a local-negatives loss apart.
Prints ``RESULT {json}``.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vlmjax.models.contrastive import clip_loss, siglip_loss  # noqa: E402
from vlmjax.models.two_tower import l2_normalize  # noqa: E402

B, F, E = 16, 12, 8


def loss(params, x_img, x_txt, kind):
    img = l2_normalize(x_img @ params["w_img"])
    txt = l2_normalize(x_txt @ params["w_txt"])
    if kind == "clip":
        return clip_loss(img, txt, params["logit_scale"])[0]
    return siglip_loss(img, txt, params["logit_scale"], params["logit_bias"])[0]


def main():
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    params = {"w_img": rng.standard_normal((F, E)).astype(np.float32),
              "w_txt": rng.standard_normal((F, E)).astype(np.float32),
              "logit_scale": np.float32(np.log(10.0)), "logit_bias": np.float32(-2.0)}
    x_img = rng.standard_normal((B, F)).astype(np.float32)
    x_txt = (x_img + 0.5 * rng.standard_normal((B, F))).astype(np.float32)  # correlated pairs

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))
    one = jax.devices()[0]
    results = {}
    for kind in ("clip", "siglip"):
        fn = jax.value_and_grad(lambda p, a, b: loss(p, a, b, kind))
        single = jax.jit(fn)(*jax.device_put((params, x_img, x_txt), one))
        xs_img, xs_txt = jax.device_put(x_img, batch), jax.device_put(x_txt, batch)
        sharded = jax.jit(fn, in_shardings=(rep, batch, batch), out_shardings=rep)(
            jax.device_put(params, rep), xs_img, xs_txt)
        # What each device would compute from its own 2 examples (negatives from the local batch only).
        local = jax.jit(jax.shard_map(lambda p, a, b: loss(p, a, b, kind)[None], mesh=mesh,
                                      in_specs=(P(), P("data"), P("data")), out_specs=P("data")))(
            jax.device_put(params, rep), xs_img, xs_txt)
        results[kind] = {
            "single_loss": float(single[0]), "sharded_loss": float(sharded[0]),
            "local_mean_loss": float(jnp.mean(local)),
            "grad_max_abs_diff": {k: float(np.max(np.abs(np.asarray(single[1][k]) - np.asarray(sharded[1][k]))))
                                  for k in params},
            "grad_max_abs": {k: float(np.max(np.abs(np.asarray(single[1][k])))) for k in params},
            "input_shard_shape": list(xs_img.addressable_shards[0].data.shape),
        }
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
