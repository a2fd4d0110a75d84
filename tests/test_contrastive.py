"""Contrastive losses, Matryoshka losses and retrieval metrics (vlmjax/models/contrastive.py) against
NumPy references written here in float64; the global-batch check runs on 8 fake CPU devices."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_module

from vlmjax.models import clip_loss, embedding_bytes, mrl_embeddings, mrl_loss, retrieval_metrics, siglip_loss


def unit(seed, shape):
    x = np.random.default_rng(seed).standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_clip(img, txt, s):
    logits = math.exp(min(s, math.log(100.0))) * img @ txt.T
    n = len(img)
    i2t = -np.mean(np_log_softmax(logits, 1)[np.arange(n), np.arange(n)])
    t2i = -np.mean(np_log_softmax(logits, 0)[np.arange(n), np.arange(n)])
    return (i2t + t2i) / 2


def np_siglip(img, txt, s, b):
    logits = math.exp(s) * img @ txt.T + b
    z = 2 * np.eye(len(img)) - 1
    return -np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / len(img)


IMG, TXT = unit(0, (6, 8)), unit(1, (6, 8))
IMG32, TXT32 = jnp.asarray(IMG, jnp.float32), jnp.asarray(TXT, jnp.float32)


@pytest.mark.parametrize("s", [math.log(1 / 0.07), 6.0])  # 6.0 > log(100): clamped to 100
def test_clip_loss_matches_numpy(s):
    loss, m = jax.jit(clip_loss)(IMG32, TXT32, jnp.float32(s))
    np.testing.assert_allclose(loss, np_clip(IMG, TXT, s), rtol=1e-5)
    scale = min(math.exp(s), 100.0)
    np.testing.assert_allclose(m["logit_scale"], scale, rtol=1e-5)
    np.testing.assert_allclose(m["temperature"], 1 / scale, rtol=1e-5)
    sim = IMG @ TXT.T
    np.testing.assert_allclose(m["i2t_acc"], np.mean(sim.argmax(1) == np.arange(6)))
    np.testing.assert_allclose(m["t2i_acc"], np.mean(sim.argmax(0) == np.arange(6)))
    g = jax.jit(jax.grad(lambda t: clip_loss(IMG32, TXT32, t)[0]))(jnp.float32(s))
    assert (float(g) == 0.0) == (s > math.log(100.0)), "the clamp stops the gradient only past log(100)"


def test_clip_accuracy_on_aligned_pairs():
    loss, m = jax.jit(clip_loss)(IMG32, IMG32, jnp.float32(math.log(100.0)))
    assert float(m["i2t_acc"]) == 1.0 and float(m["t2i_acc"]) == 1.0
    assert float(loss) < np_clip(IMG, TXT, math.log(100.0))


def test_siglip_loss_matches_numpy():
    s, b = math.log(10.0), -10.0
    loss, m = jax.jit(siglip_loss)(IMG32, TXT32, jnp.float32(s), jnp.float32(b))
    np.testing.assert_allclose(loss, np_siglip(IMG, TXT, s, b), rtol=1e-5)
    np.testing.assert_allclose(m["logit_scale"], 10.0, rtol=1e-6)
    np.testing.assert_allclose(m["logit_bias"], -10.0)
    # A second point (positive bias, larger t) so the reference is not dominated by the negatives.
    np.testing.assert_allclose(jax.jit(siglip_loss)(IMG32, TXT32, jnp.float32(3.0), jnp.float32(2.0))[0],
                               np_siglip(IMG, TXT, 3.0, 2.0), rtol=1e-5)
    with pytest.raises(ValueError, match="paired"):
        siglip_loss(IMG32, TXT32[:5], 0.0, 0.0)


def test_losses_use_the_global_batch_on_8_devices():
    p = run_module(["tests/helpers/contrastive_sharding_check.py"],
                   env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    for kind in ("clip", "siglip"):
        r = res[kind]
        assert r["input_shard_shape"] == [2, 12], r  # 16 examples over 8 devices
        np.testing.assert_allclose(r["sharded_loss"], r["single_loss"], rtol=1e-5)
        for k, diff in r["grad_max_abs_diff"].items():
            assert diff <= 1e-5 * max(1.0, r["grad_max_abs"][k]), (kind, k, diff)
        # A loss over each device's local batch (2 negatives) is a different number: the equality
        # above would fail for a loss that did not see the whole batch.
        assert abs(r["local_mean_loss"] - r["single_loss"]) > 0.5, r
    assert res["siglip"]["grad_max_abs"]["logit_bias"] > 0


# ---- Matryoshka -------------------------------------------------------------------------------------

DIMS = (8, 4, 2)
Z_IMG, Z_TXT = jnp.asarray(unit(2, (6, 8)), jnp.float32), jnp.asarray(unit(3, (6, 8)), jnp.float32)
EMB_IMG, EMB_TXT = mrl_embeddings(Z_IMG, DIMS), mrl_embeddings(Z_TXT, DIMS)
CLIP = jax.jit(functools.partial(clip_loss, logit_scale=jnp.float32(2.0)))


def test_mrl_loss_is_the_weighted_sum_of_per_dim_losses():
    per_dim = {m: float(CLIP(EMB_IMG[m], EMB_TXT[m])[0]) for m in DIMS}
    assert len(set(np.round(list(per_dim.values()), 5))) == 3  # distinct, so a wrong dim would show
    loss, metrics = mrl_loss(EMB_IMG, EMB_TXT, CLIP)
    np.testing.assert_allclose(loss, sum(per_dim.values()), rtol=1e-6)
    for m in DIMS:
        np.testing.assert_allclose(metrics[f"loss_at_{m}"], per_dim[m], rtol=1e-6)
        assert f"i2t_acc_at_{m}" in metrics
    weights = {8: 1.0, 4: 0.5, 2: 0.25}
    expected = sum(weights[m] * per_dim[m] for m in DIMS)
    np.testing.assert_allclose(mrl_loss(EMB_IMG, EMB_TXT, CLIP, weights)[0], expected, rtol=1e-6)
    np.testing.assert_allclose(mrl_loss(EMB_IMG, EMB_TXT, CLIP, [1.0, 0.5, 0.25])[0], expected, rtol=1e-6)
    # Dict order does not matter (jit sorts dict keys): sequence weights go with the dims largest first.
    rev = lambda d: {m: d[m] for m in sorted(d)}
    np.testing.assert_allclose(mrl_loss(rev(EMB_IMG), EMB_TXT, CLIP, [1.0, 0.5, 0.25])[0], expected, rtol=1e-6)
    sig = lambda i, t: siglip_loss(i, t, jnp.float32(1.0), jnp.float32(-1.0))
    np.testing.assert_allclose(mrl_loss(EMB_IMG, EMB_TXT, sig)[0],
                               sum(float(sig(EMB_IMG[m], EMB_TXT[m])[0]) for m in DIMS), rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        mrl_loss(EMB_IMG, EMB_TXT, CLIP, [1.0, 2.0])


def test_mrl_sampled_single_dim():
    weights = (1.0, 0.5, 0.25)
    calls = []

    def counted(img, txt):  # records (at run time) which dims' losses actually execute
        jax.debug.callback(lambda: calls.append(img.shape[-1]))
        return CLIP(img, txt)

    step = jax.jit(lambda rng: mrl_loss(EMB_IMG, EMB_TXT, counted, weights, sample_single=True, rng=rng))
    assert "cond" in str(jax.make_jaxpr(lambda r: mrl_loss(EMB_IMG, EMB_TXT, CLIP, sample_single=True,
                                                           rng=r))(jax.random.key(0)))
    direct = {m: float(CLIP(EMB_IMG[m], EMB_TXT[m])[0]) for m in DIMS}
    seen = set()
    for seed in range(12):
        calls.clear()
        loss, metrics = step(jax.random.key(seed))
        jax.effects_barrier()
        m = int(metrics["mrl_dim"])
        assert calls == [m], f"only the drawn dim's loss runs, got {calls} for dim {m}"
        w = weights[DIMS.index(m)]
        np.testing.assert_allclose(metrics["loss_sampled"], direct[m], rtol=1e-6)
        np.testing.assert_allclose(loss, w * direct[m], rtol=1e-6)
        assert not any(k.startswith("loss_at_") or "_at_" in k for k in metrics), sorted(metrics)
        assert {"loss", "mrl_dim", "loss_sampled", "i2t_acc_sampled"} <= set(metrics)
        # Deterministic given the rng.
        loss2, metrics2 = step(jax.random.key(seed))
        assert int(metrics2["mrl_dim"]) == m and float(loss2) == float(loss)
        seen.add(m)
    assert seen == set(DIMS), seen
    # Gradients flow through the chosen branch only: the drawn dim's prefix coordinates.
    g = jax.grad(lambda e: mrl_loss({m: e[:, :m] for m in DIMS}, EMB_TXT, CLIP, sample_single=True,
                                    rng=jax.random.key(0))[0])(EMB_IMG[8])
    m0 = int(step(jax.random.key(0))[1]["mrl_dim"])
    assert float(jnp.abs(g[:, :m0]).max()) > 0 and float(jnp.abs(g[:, m0:]).max()) == 0.0
    with pytest.raises(ValueError, match="rng"):
        mrl_loss(EMB_IMG, EMB_TXT, CLIP, sample_single=True)


# ---- retrieval metrics -------------------------------------------------------------------------

def test_retrieval_metrics_hand_made():
    sim = np.array([[0.9, 0.1, 0.2, 0.3],    # image 0: its text best              -> rank 0
                    [0.8, 0.5, 0.1, 0.0],    # image 1: one text above             -> rank 1
                    [0.1, 0.2, 0.3, 0.3],    # image 2: a tie with text 3 counts against -> rank 1
                    [0.7, 0.6, 0.65, 0.2]])  # image 3: three above                -> rank 3
    r = retrieval_metrics(sim, ks=(1, 2, 3, 5))
    # text -> image ranks (columns): 0, 1 (0.6), 1 (0.65), 2 (0.3, 0.3 tie).
    assert r == {"i2t_R@1": 0.25, "t2i_R@1": 0.25, "i2t_R@2": 0.75, "t2i_R@2": 0.75,
                 "i2t_R@3": 0.75, "t2i_R@3": 1.0, "i2t_R@5": 1.0, "t2i_R@5": 1.0}
    # Several captions per image: text j describes image gt[j].
    sim2 = np.array([[0.9, 0.2, 0.95, 0.1],   # image 0 (texts 0, 1): text 2 scores above its best -> rank 1
                     [0.3, 0.4, 0.5, 0.6]])   # image 1 (texts 2, 3): best 0.6 above all others  -> rank 0
    r2 = retrieval_metrics(sim2, ks=(1, 2), gt=np.array([0, 0, 1, 1]))
    # text -> image: t0 0.9 > 0.3 (0), t1 0.2 < 0.4 (1), t2 0.5 < 0.95 (1), t3 0.6 > 0.1 (0).
    assert r2 == {"i2t_R@1": 0.5, "t2i_R@1": 0.5, "i2t_R@2": 1.0, "t2i_R@2": 1.0}
    with pytest.raises(ValueError, match="gt"):
        retrieval_metrics(sim2)
    with pytest.raises(ValueError, match="every image"):
        retrieval_metrics(sim2, gt=np.array([0, 0, 0, 0]))


def test_embedding_bytes():
    assert embedding_bytes(512, np.float32) == 2048
    assert embedding_bytes(64, "bfloat16") == 128
    assert embedding_bytes(256, jnp.float16) == 512
    assert embedding_bytes(128, np.int8) == 128
