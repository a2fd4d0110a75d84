"""Perceiver resampler, attention pooling, token pooling, projection and Matryoshka heads
(vlmjax/models/resampler.py), checked against NumPy references written here."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import (AttentionPool, MatryoshkaHead, PerceiverResampler, ProjectionHead, mrl_embeddings,
                           pool_tokens)
from vlmjax import sharding as shd
from vlmjax.tree import path_str


def randn(seed, shape):
    """Test data from NumPy (an eager jax.random call compiles a threefry kernel per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def KEY(seed):  # noqa: N802
    """Init keys: the rbg PRNG compiles in a third of threefry's time on XLA:CPU (2-core box)."""
    return jax.random.key(seed, impl="rbg")


def shapes(variables):
    return {path_str(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(nn.unbox(variables))[0]}


def np_params(variables):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])


# ---- NumPy references (float64) -------------------------------------------------------------------

def np_layernorm(x, p, eps):
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt((xc**2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def np_mha(xq, xkv, p, valid=None):
    """xq [T, D], xkv [S, D], valid [S] bool; p: {q,k,v}_proj/kernel [D, H, Dh] (+bias), out_proj."""
    def proj(name, x):
        y = np.einsum("sd,dhk->shk", x, p[name]["kernel"])
        return y + p[name]["bias"] if "bias" in p[name] else y
    q, k, v = proj("q_proj", xq), proj("k_proj", xkv), proj("v_proj", xkv)
    dh = q.shape[-1]
    out = np.zeros_like(q)
    for h in range(q.shape[1]):  # one head at a time, written out
        scores = q[:, h] @ k[:, h].T / np.sqrt(dh)  # [T, S]
        if valid is not None:
            scores = np.where(valid[None, :], scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        out[:, h] = w @ v[:, h]
    y = np.einsum("thk,hkd->td", out, p["out_proj"]["kernel"])
    return y + p["out_proj"]["bias"] if "bias" in p["out_proj"] else y


def np_gelu_erf(x):
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_resampler(x, valid, p, num_layers):
    """One example: x [N, Dv], valid [N] bool -> [L, D] (Flamingo A.1.1, as documented)."""
    if "input_proj" in p:
        x = x @ p["input_proj"]["kernel"]
    lat = p["latents"]
    for i in range(num_layers):
        lp = p[f"layers_{i}"]
        xm = np_layernorm(x, lp["norm_media"], 1e-5)
        xl = np_layernorm(lat, lp["norm_latents"], 1e-5)
        kv = np.concatenate([xm, xl], 0)
        kv_valid = np.concatenate([valid, np.ones(len(lat), bool)])
        lat = lat + np_mha(xl, kv, lp["attn"], kv_valid)
        f = lp["ffn"]
        h = np_gelu_erf(np_layernorm(lat, f["norm"], 1e-5) @ f["fc1"]["kernel"])
        lat = lat + h @ f["fc2"]["kernel"]
    return np_layernorm(lat, p["norm"], 1e-5)


# ---- fixtures -------------------------------------------------------------------------------------

B, N, DV, D, L = 2, 6, 12, 16, 4
VALID = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)


ONES = np.ones_like(VALID)  # "no padding" as an array: same jit signature as VALID (None would recompile)


class Jitted:
    """A module whose ``apply`` is jitted (eager Linen applies dispatch op by op: slow on 2 cores)."""

    def __init__(self, module):
        self.module = module
        self.apply = jax.jit(module.apply)

    def clone(self, **kw):
        return Jitted(self.module.clone(**kw))


@pytest.fixture(scope="module")
def resampler():
    """(jitted module, boxed variables, unboxed variables, x [B, N, Dv])."""
    m = PerceiverResampler(num_latents=L, num_layers=1, num_heads=2, dim=D, ffn_mult=2)
    x = randn(1, (B, N, DV))
    boxed = jax.jit(m.init)(KEY(0), x, jnp.asarray(VALID))
    return Jitted(m), boxed, nn.unbox(boxed), x


def resampler_grads(module, params, x, valid):
    """d/dparams of a fixed random projection of the output."""
    w = randn(5, (x.shape[0], module.num_latents, module.dim))
    return jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x, valid) * w)))(params)


@pytest.fixture(scope="module")
def grads(resampler):
    m, _, variables, x = resampler
    return resampler_grads(m.module, variables["params"], x, jnp.asarray(VALID))


def test_resampler_shapes_and_param_tree(resampler):
    m, boxed, variables, x = resampler
    assert m.apply(variables, x, VALID).shape == (B, L, D)
    s = shapes(boxed)
    assert s["params/input_proj/kernel"] == (DV, D)
    assert s["params/latents"] == (L, D)
    assert s["params/layers_0/attn/q_proj/kernel"] == (D, 2, D // 2)
    assert s["params/layers_0/attn/out_proj/kernel"] == (2, D // 2, D)
    assert s["params/layers_0/ffn/fc1/kernel"] == (D, 2 * D)
    assert not any(k.startswith("params/layers_1") for k in s)
    assert {"params/layers_0/norm_media/scale", "params/layers_0/norm_latents/scale", "params/norm/scale"} <= set(s)
    # Every param carries logical axis names (one per array axis).
    leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert all(isinstance(a, nn.Partitioned) and len(a.names) == a.value.ndim for a in leaves)
    # ... and the project's default rules map them to valid mesh specs (no mesh axis twice).
    specs = {path_str(k): nn.logical_to_mesh_axes(v.names, shd.DEFAULT_RULES)
             for k, v in jax.tree_util.tree_flatten_with_path(
                 boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))[0]}
    for name, spec in specs.items():
        used = [a for a in spec if a is not None]
        assert len(used) == len(set(used)), (name, spec)
    assert tuple(specs["params/layers_0/attn/q_proj/kernel"]) == ("fsdp", "tensor", None)
    assert tuple(specs["params/layers_0/ffn/fc2/kernel"]) == ("tensor", "fsdp")
    # Dv == D: no input projection; head_dim given explicitly; 3 layers (shapes only: eval_shape
    # compiles nothing).
    same = PerceiverResampler(num_latents=3, num_layers=3, num_heads=4, head_dim=8)
    v2 = jax.eval_shape(same.init, KEY(0), jnp.ones((1, 5, D)))
    assert "params/input_proj/kernel" not in shapes(v2)
    assert shapes(v2)["params/layers_2/attn/k_proj/kernel"] == (D, 4, 8)
    assert shapes(v2)["params/layers_2/attn/out_proj/kernel"] == (4, 8, D)
    assert not any(k.startswith("params/layers_3") for k in shapes(v2))
    assert jax.eval_shape(same.apply, v2, jnp.ones((1, 5, D))).shape == (1, 3, D)


def test_resampler_matches_numpy_reference(resampler):
    m, _, variables, x = resampler
    out = np.asarray(m.apply(variables, x, VALID))
    p = np_params(variables)
    for b in range(B):
        ref = np_resampler(np.asarray(x[b], np.float64), VALID[b], p, num_layers=1)
        np.testing.assert_allclose(out[b], ref, atol=2e-4, rtol=2e-4)


def test_resampler_masked_tokens_change_nothing(resampler):
    m, _, variables, x = resampler
    out = m.apply(variables, x, VALID)
    # Overwrite the padded tokens of example 0 with junk: same output.
    junk = x.at[0, 4:].set(1e3 * randn(7, (2, DV)))
    np.testing.assert_allclose(m.apply(variables, junk, VALID), out, atol=1e-5)
    # Padded == absent: example 0 with its 4 real tokens only.
    short = m.apply(variables, x[:1, :4], None)
    np.testing.assert_allclose(short[0], out[0], atol=1e-5)
    # The same junk on unmasked tokens does change it (the check above can fail).
    assert not np.allclose(m.apply(variables, junk, ONES)[0], out[0], atol=1e-3)


def test_resampler_depends_on_latents_and_inputs_and_grads_reach_latents(resampler, grads):
    m, _, variables, x = resampler
    out = m.apply(variables, x, VALID)
    params = variables["params"]
    changed = {"params": {**params, "latents": params["latents"] + 0.5 * randn(3, (L, D))}}
    assert not np.allclose(m.apply(changed, x, VALID), out, atol=1e-3)
    x2 = x.at[1, 0].add(1.0)  # a valid token of example 1
    out2 = m.apply(variables, x2, VALID)
    assert not np.allclose(out2[1], out[1], atol=1e-4) and np.allclose(out2[0], out[0])
    assert float(jnp.abs(grads["latents"]).min()) > 0, "every latent coordinate gets a gradient"
    assert float(jnp.abs(grads["input_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["layers_0"]["attn"]["q_proj"]["kernel"]).max()) > 0


def test_resampler_remat_and_backends_agree(resampler, grads):
    m, _, variables, x = resampler
    # remat="full": the same params and forward; its backward traces (eval_shape: compiling a second
    # backward would double this file's time on 2 cores; nn.remat's numerics are jax's).
    remat = m.clone(remat="full")
    np.testing.assert_allclose(remat.apply(variables, x, VALID), m.apply(variables, x, VALID), atol=1e-6)
    w = randn(5, (B, L, D))
    g = jax.eval_shape(jax.grad(lambda p: jnp.sum(remat.module.apply({"params": p}, x, None) * w)),
                       variables["params"])
    assert jax.tree.map(jnp.shape, g) == jax.tree.map(jnp.shape, grads)
    # The einsum backend (CPU auto) computes the same forward.
    np.testing.assert_allclose(m.clone(attention_impl="einsum").apply(variables, x, VALID),
                               m.apply(variables, x, VALID), atol=1e-5)
    with pytest.raises(ValueError, match="remat"):
        m.module.clone(remat="sometimes").apply(variables, x)


# ---- attention pooling ----------------------------------------------------------------------------

def np_attention_pool(x, valid, p):
    """One example, one probe: x [N, D] -> [D] (big_vision MAPHead with separate projections)."""
    y = np_mha(p["probe"], x, p["attention"], valid)  # [1, D]
    h = np_gelu_tanh(np_layernorm(y, p["layernorm"], 1e-6) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
    return (y + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"])[0]


def test_attention_pool_matches_numpy_masks_is_permutation_invariant_and_takes_probes():
    pool = AttentionPool(num_heads=2, mlp_dim=8, initializer_range=0.5)
    x = randn(0, (2, 5, 4))
    valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    variables = jax.jit(pool.init)(KEY(1), x, valid)
    pool = Jitted(pool)
    # Non-zero biases so the reference checks them too.
    p = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * (1 + np.arange(a.size).reshape(a.shape) % 3) if "bias" in path_str(path) else a,
        nn.unbox(variables)["params"])
    out = np.asarray(pool.apply({"params": p}, x, valid))
    assert out.shape == (2, 4)
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    for b in range(2):
        np.testing.assert_allclose(out[b], np_attention_pool(np.asarray(x[b], np.float64), np.asarray(valid[b]), pn),
                                   atol=1e-5, rtol=1e-5)
    # Permuting the tokens (and their mask) changes nothing; junk in masked tokens changes nothing.
    perm = jnp.asarray([3, 0, 4, 2, 1])
    np.testing.assert_allclose(pool.apply({"params": p}, x[:, perm], valid[:, perm]), out, atol=1e-5)
    junk = x.at[0, 3:].set(100.0)
    np.testing.assert_allclose(pool.apply({"params": p}, junk, valid), out, atol=1e-5)
    # Unmasking those tokens does change the output (the checks above can fail).
    assert not np.allclose(pool.apply({"params": p}, x, jnp.ones_like(valid))[0], out[0], atol=1e-3)

    # P = 3 probes, the first one the probe above, the rest of the weights shared: [B, 3, D], row 0
    # the single-probe output, each probe pooled on its own.
    multi = AttentionPool(num_heads=2, mlp_dim=8, num_probes=3)
    assert shapes(jax.eval_shape(multi.init, KEY(1), x, valid))["params/probe"] == (3, 4)
    p3 = {**p, "probe": jnp.concatenate([p["probe"], randn(9, (2, 4))])}
    y = jax.jit(multi.apply)({"params": p3}, x, valid)
    assert y.shape == (2, 3, 4)
    np.testing.assert_allclose(y[:, 0], out, atol=1e-5)
    assert not np.allclose(y[:, 1], y[:, 2], atol=1e-3)




# ---- token pooling and projection heads ----------------------------------------------------------

def test_pool_tokens():
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    valid = jnp.asarray([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(pool_tokens(x, valid, "cls"), x[:, 0])
    np.testing.assert_allclose(pool_tokens(x, valid, "mean"), [[1.0, 2.0], [8.0, 9.0]])
    np.testing.assert_allclose(pool_tokens(x, None, "mean"), [[2.0, 3.0], [8.0, 9.0]])
    with pytest.raises(ValueError, match="pool mode"):
        pool_tokens(x, valid, "max")


def test_projection_head():
    x = randn(0, (3, 8))
    lin = ProjectionHead(features=5, num_layers=1, use_bias=False)
    v = jax.jit(lin.init)(KEY(1), x)
    assert shapes(v) == {"params/proj/kernel": (8, 5)}
    np.testing.assert_allclose(jax.jit(lin.apply)(v, x), x @ nn.unbox(v)["params"]["proj"]["kernel"], atol=1e-6)
    mlp = ProjectionHead(features=5, num_layers=2, hidden_dim=6)
    v = jax.jit(mlp.init)(KEY(1), x)
    assert shapes(v) == {"params/fc1/kernel": (8, 6), "params/fc1/bias": (6,), "params/fc2/kernel": (6, 5),
                         "params/fc2/bias": (5,)}
    p = nn.unbox(v)["params"]
    h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
    ref = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(jax.jit(mlp.apply)(v, x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="num_layers"):
        jax.eval_shape(ProjectionHead(features=5, num_layers=3).init, KEY(1), x)


# ---- Matryoshka heads ------------------------------------------------------------------------------

DIMS = (16, 8, 4)


def test_mrl_tied_prefixes_are_normalised_slices():
    z = randn(0, (3, 16))
    embs = mrl_embeddings(z, DIMS)
    assert list(embs) == list(DIMS)
    for m in DIMS:
        ref = np.asarray(z[:, :m]) / np.linalg.norm(np.asarray(z[:, :m]), axis=-1, keepdims=True)
        np.testing.assert_allclose(embs[m], ref, atol=1e-6)
    head = MatryoshkaHead(dims=DIMS, tied=True)
    v = head.init(KEY(0), z)
    assert not jax.tree.leaves(v)
    out = head.apply(v, z)
    for m in DIMS:
        np.testing.assert_array_equal(out[m], embs[m])
    with pytest.raises(ValueError, match="largest"):
        mrl_embeddings(z, (8, 4))
    with pytest.raises(ValueError, match="distinct"):
        mrl_embeddings(z, (16, 8, 8))


def test_mrl_untied_has_one_head_per_dim():
    z = randn(0, (3, 16))
    head = MatryoshkaHead(dims=DIMS, tied=False)
    v = jax.jit(head.init)(KEY(1), z)
    assert shapes(v) == {f"params/head_{m}": (m, m) for m in DIMS}
    out = jax.jit(head.apply)(v, z)
    tied = mrl_embeddings(z, DIMS)
    for m in DIMS:  # identity init: equals the tied head
        np.testing.assert_allclose(out[m], tied[m], atol=1e-6)
    # Each dim has its own map: changing head_8 changes only the 8-dim embedding, to normalise(z[:, :8] W).
    p = dict(nn.unbox(v)["params"])
    w8 = randn(2, (8, 8))
    p["head_8"] = w8
    out2 = jax.jit(head.apply)({"params": p}, z)
    ref = np.asarray(z[:, :8] @ w8)
    np.testing.assert_allclose(out2[8], ref / np.linalg.norm(ref, axis=-1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(out2[16], out[16])
    np.testing.assert_array_equal(out2[4], out[4])
    g = jax.jit(jax.grad(lambda p: sum(jnp.sum(e[:, 0]) for e in head.apply({"params": p}, z).values())))(p)
    assert all(float(jnp.abs(g[f"head_{m}"]).max()) > 0 for m in DIMS)


def test_perceiver_layer_without_latent_keys_attends_to_the_media_only():
    """attend_latents=False: x + attn(q=LN(latents), kv=LN(media)) + ffn, the same params as the Flamingo
    layer (whose keys also hold the latents, so its output differs); masking works on media keys alone."""
    from vlmjax.models.layers import LayerNorm  # pylint: disable=g-import-not-at-top
    from vlmjax.models.resampler import CrossAttention, PerceiverFeedForward, PerceiverLayer  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    lat = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    media = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    layer = PerceiverLayer(num_heads=2, head_dim=4, attend_latents=False)
    p = layer.init(jax.random.key(0), lat, media, None)["params"]
    got = layer.apply({"params": p}, lat, media, None)
    kv = LayerNorm().apply({"params": p["norm_media"]}, media)
    q = LayerNorm().apply({"params": p["norm_latents"]}, lat)
    x = lat + CrossAttention(2, 4).apply({"params": p["attn"]}, q, kv, None)
    want = x + PerceiverFeedForward(4).apply({"params": p["ffn"]}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    flamingo = PerceiverLayer(num_heads=2, head_dim=4).apply({"params": p}, lat, media, None)
    assert np.abs(np.asarray(flamingo - got)).max() > 1e-3
    valid = jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.bool_)
    moved = media.at[:, 2].set(100.0).at[1, 1].set(-50.0)
    np.testing.assert_allclose(layer.apply({"params": p}, lat, media, valid),
                               layer.apply({"params": p}, lat, moved, valid), rtol=1e-5, atol=1e-5)
