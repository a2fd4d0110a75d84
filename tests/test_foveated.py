"""The two-pass foveated model (vlmjax.models.foveated) and its task (configs/foveated.py).

The asymmetric mask makes the patch stream query-independent (so caching is valid); the cached deep
query equals the uncached masked computation; the queries shift between the passes and pass 2 is
causal; the FiLM head is the identity at zero modulation; the smoke experiment trains, logs the fine /
coarse ratio and draws the attention picture."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from vlmjax import run as runner
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import foveated as fov
from vlmjax.models import vit as vit_lib
from vlmjax.train.metrics import read_metrics

B, T, S, P = 2, 4, 32, 8  # clips, frames, image side, patch


def _vit(variant="dinov2", **kw):
    base = dict(variant=variant, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                patch_size=P, image_size=S, hidden_act="gelu")
    if variant in ("dinov2", "dinov3"):
        base["num_register_tokens"] = 2
    base.update(kw)
    return vit_lib.ViTConfig(**base)


DEC = decoder_lib.DecoderConfig(vocab_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)


def _inputs(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (B, T, S, S, 3)), jax.random.normal(k2, (B, T, S // 8, S // 8, 4))


@pytest.fixture(scope="module", params=[("shallow", True), ("deep", False)], ids=["shallow", "deep"])
def model_and_vars(request):
    """Both query mechanisms; the shallow one with the read-out's position (``read_position``) and a
    non-zero FiLM layer, as configs/foveated.py runs it, the deep one with neither."""
    mode, where = request.param
    model = fov.FoveatedModel(_vit(), DEC, fov.FoveatedConfig(query_mode=mode, film_channels=(8, 16),
                                                              read_position=where, film_init=0.05 * where))
    frames, latents = _inputs()
    return model, nn.meta.unbox(model.init(jax.random.key(1), frames, latents))


@pytest.fixture(scope="module", params=["dinov2", "dinov3"])
def encoder_and_vars(request):
    """DINOv2 (learned positions) and DINOv3 (RoPE on the patches; the query token gets none)."""
    enc = fov.FoveatedEncoder(_vit(request.param))
    frames = jax.random.normal(jax.random.key(2), (3, S, S, 3))
    return enc, nn.meta.unbox(enc.init(jax.random.key(3), frames)), frames


def test_asymmetric_mask_patches_ignore_the_query(encoder_and_vars):
    """With the query token in every block, the other tokens' outputs equal the plain ViT's, for any query."""
    enc, variables, frames = encoder_and_vars
    plain, _ = enc.apply(variables, frames)
    for seed in (0, 1):
        u = 10.0 * jax.random.normal(jax.random.key(seed), (3, 32))
        _, tokens = enc.apply(variables, frames, u, method=enc.deep_query_uncached)
        for key in ("last_hidden_state", "patch_tokens", "cls_token"):
            np.testing.assert_allclose(tokens[key], plain[key], atol=2e-6, err_msg=key)


def test_deep_query_with_cached_kv_equals_uncached(encoder_and_vars):
    enc, variables, frames = encoder_and_vars
    cache = enc.apply(variables, frames, method=enc.patch_cache)
    np.testing.assert_allclose(cache["outputs"]["last_hidden_state"],
                               enc.apply(variables, frames)[0]["last_hidden_state"], atol=1e-6)
    for seed in (0, 1):
        u = jax.random.normal(jax.random.key(seed), (3, 32))
        z_cached, probs = enc.apply(variables, u, cache, method=enc.deep_query)
        z_ref, _ = enc.apply(variables, frames, u, method=enc.deep_query_uncached)
        np.testing.assert_allclose(z_cached, z_ref, atol=2e-6)
        assert probs.shape == (3, 4, 1 + 2 + (S // P) ** 2)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    # Different queries read different features from the same cache (random ones: a constant vector
    # is in every LayerNorm's null space).
    z_a, _ = enc.apply(variables, jax.random.normal(jax.random.key(5), (3, 32)), cache, method=enc.deep_query)
    z_b, _ = enc.apply(variables, jax.random.normal(jax.random.key(6), (3, 32)), cache, method=enc.deep_query)
    assert float(jnp.abs(z_a - z_b).max()) > 1e-3


def test_deep_query_rejects_scanned_layers():
    enc = fov.FoveatedEncoder(_vit(scan_layers=True))
    frames = jnp.zeros((1, S, S, 3))
    variables = enc.init(jax.random.key(0), frames)
    with pytest.raises(ValueError, match="scan_layers=False"):
        enc.apply(variables, frames, method=enc.patch_cache)


def test_shift_queries():
    q_init = jnp.arange(3.0)
    predicted = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    shifted = fov.shift_queries(q_init, predicted)
    np.testing.assert_array_equal(shifted[:, 0], jnp.broadcast_to(q_init, (2, 3)))
    np.testing.assert_array_equal(shifted[:, 1:], predicted[:, :-1])


def test_model_outputs_and_pass_two_uses_the_shifted_predicted_queries(model_and_vars):
    model, variables = model_and_vars
    frames, latents = _inputs()
    out = model.apply(variables, frames, latents)
    assert out["pred_fine"].shape == out["pred_coarse"].shape == (B, T - 1, S // 8, S // 8, 4)
    n_patches = (S // P) ** 2
    for key in ("attn_coarse", "attn_fine"):
        assert out[key].shape == (B, T, n_patches)
        np.testing.assert_allclose(out[key].sum(-1), 1.0, rtol=1e-5)
    params = variables["params"]
    np.testing.assert_allclose(out["queries"][:, 0], jnp.broadcast_to(params["query_init"], (B, 32)), rtol=1e-6)
    # At init (zero query head) pass 2 reads frames 1.. with the static query: fine = coarse there.
    np.testing.assert_allclose(out["queries"][:, 1:], jnp.broadcast_to(params["query_static"], (B, T - 1, 32)),
                               rtol=1e-6)
    # A trained head makes the queries of frames 1.. differ from the static one and between clips.
    params = dict(params, query_head=dict(params["query_head"], kernel=0.3 * jax.random.normal(
        jax.random.key(7), params["query_head"]["kernel"].shape)))
    variables = {"params": params}
    out = model.apply(variables, frames, latents)
    assert float(jnp.abs(out["queries"][:, 1:] - params["query_static"]).max()) > 1e-3
    assert float(jnp.abs(out["queries"][0, 1:] - out["queries"][1, 1:]).max()) > 1e-4
    # Control: pass 2 with the static query is pass 1 exactly (ratio 1 by construction).
    static = model.apply(variables, frames, latents, fine_queries="static")
    np.testing.assert_allclose(static["pred_fine"], static["pred_coarse"], atol=1e-6)
    shuffled = model.apply(variables, frames, latents, fine_queries="shuffled")
    np.testing.assert_allclose(shuffled["queries"][:, 1:], jnp.roll(out["queries"][:, 1:], 1, axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="fine_queries"):
        model.apply(variables, frames, latents, fine_queries="oracle")


def test_predictions_are_causal_in_the_frames(model_and_vars):
    """Prediction t (of latent t+1) reads frames <= t in both passes: the fine query of frame t was chosen
    from the coarse pass up to t-1. Changing the last frame changes no earlier prediction."""
    model, variables = model_and_vars
    frames, latents = _inputs()
    out = model.apply(variables, frames, latents)
    frames2 = frames.at[:, -1].set(jax.random.normal(jax.random.key(9), frames[:, -1].shape))
    out2 = model.apply(variables, frames2, latents)
    for key in ("pred_fine", "pred_coarse"):
        np.testing.assert_allclose(out2[key][:, : T - 2], out[key][:, : T - 2], atol=1e-6, err_msg=key)
    # ...while the last frame's fine features do change (it is read).
    assert float(jnp.abs(out2["attn_fine"][:, -1] - out["attn_fine"][:, -1]).max()) > 0


def test_read_position_centroids_and_motion_input():
    """Each head's centroid is its attention-weighted patch centre (patch units from the grid centre);
    the LLM input of frame t adds where the read looked and how far that moved since frame t-1."""
    model = fov.FoveatedModel(_vit(), DEC, fov.FoveatedConfig(film_channels=(8, 16), read_position=True,
                                                              read_motion=True))
    side = S // P  # 4 x 4 patches: centres at -1.5 .. 1.5
    attn = jnp.zeros((2, 4, side * side))
    attn = attn.at[0, :, 0].set(1.0)  # every head on patch (row 0, col 0)
    attn = attn.at[1, 0, side * 2 + 3].set(1.0).at[1, 1:, :].set(1.0 / (side * side))  # (2, 3); uniform
    frames, latents = _inputs()
    variables = nn.meta.unbox(model.init(jax.random.key(1), frames, latents))
    c = model.apply(variables, attn, method=model.centroids)
    np.testing.assert_allclose(c[0], jnp.tile(jnp.array([-1.5, -1.5]), 4), atol=1e-6)
    np.testing.assert_allclose(c[1], jnp.array([1.5, 0.5, 0, 0, 0, 0, 0, 0]), atol=1e-6)
    # think(): where_proj gets [centroid_t, centroid_t - centroid_{t-1}] (0 motion at frame 0), and
    # motion_proj the features' change z_t - z_{t-1}.
    feats = jax.random.normal(jax.random.key(4), (B * T, 32))
    where = jax.random.normal(jax.random.key(5), (B * T, 8))
    def inputs_of(mdl, feats, where):
        x = mdl.feature_norm(mdl.feature_proj(feats))
        moved = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, 1:] - a[:, :-1]], 1)
        w, f = where.reshape(B, T, 8), feats.reshape(B, T, 32)
        return (x.reshape(B, T, -1) + mdl.where_proj(jnp.concatenate([w, moved(w)], -1))
                + mdl.motion_proj(moved(f)))
    z = jnp.concatenate([feats, where], -1)
    want = model.apply(variables, z, method=lambda m, z: m.llm.backbone(inputs_of(m, z[:, :32], z[:, 32:]))[0])
    got = model.apply(variables, z, B, method=model.think)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_key_position_makes_places_addressable_and_query_head_init():
    """key_position: the shallow cross-attention's keys get a learned per-token, per-head offset
    (key_pos [N, H, Dh], N = prefix + patches); a query equal to one patch's offset (and nothing else
    in the keys) attends there most. query_head_init > 0: pass 2's queries differ from the static one
    from step 0."""
    xattn = fov.QueryCrossAttention(32, 4, key_position=1.0, num_tokens=1 + 16)
    tokens = jax.random.normal(jax.random.key(0), (2, 17, 32))
    variables = nn.meta.unbox(xattn.init(jax.random.key(1), tokens, method=xattn.keys_values))
    pos = variables["params"]["key_pos"]
    assert pos.shape == (17, 4, 8)
    k, v = xattn.apply(variables, tokens, method=xattn.keys_values)
    plain = fov.QueryCrossAttention(32, 4)
    k0, v0 = plain.apply(variables, tokens, method=plain.keys_values)  # the same q/k/v kernels, no offset
    np.testing.assert_allclose(k, k0 + pos, atol=1e-5)
    np.testing.assert_allclose(v, v0, atol=1e-6)
    # Only the offsets in the keys (zero k_proj): a query along patch 5's offset attends to it most.
    zero_k = dict(variables["params"], k_proj=jax.tree.map(jnp.zeros_like, variables["params"]["k_proj"]))
    k, v = xattn.apply({"params": zero_k}, tokens, method=xattn.keys_values)
    q = 4.0 * pos[5] / jnp.linalg.norm(pos[5], axis=-1, keepdims=True)  # [H, Dh]
    _, probs = fov._query_attention(jnp.broadcast_to(q, (2, 1, 4, 8)), k, v, jnp.float32)
    assert (np.asarray(probs).argmax(-1) == 5).all()
    with pytest.raises(ValueError, match="17 tokens"):
        xattn.apply(variables, tokens[:, :9], method=xattn.keys_values)
    with pytest.raises(ValueError, match="key_position"):
        fov.FoveatedConfig(query_mode="deep", key_position=1.0).validate()
    # The full model with both: the param exists, and the queries move away from the static one at init.
    model = fov.FoveatedModel(_vit(), DEC, fov.FoveatedConfig(film_channels=(8, 16), key_position=1.0,
                                                              query_head_init=0.05))
    frames, latents = _inputs()
    mv = nn.meta.unbox(model.init(jax.random.key(1), frames, latents))
    n_tokens = 1 + 2 + (S // P) ** 2  # CLS, 2 registers, patches
    assert mv["params"]["query_xattn"]["key_pos"].shape == (n_tokens, 4, 8)
    out = model.apply(mv, frames, latents)
    assert float(jnp.abs(out["queries"][:, 1:] - mv["params"]["query_static"]).max()) > 1e-2


def test_read_map_pools_the_patch_grid_into_both_passes():
    """read_map=g: the patch tokens average-pooled to a g x g grid (row-major like the patches), and the
    LLM input of each frame adds map_proj([map_t, map_t - map_{t-1}]), the same map in both passes."""
    model = fov.FoveatedModel(_vit(), DEC, fov.FoveatedConfig(film_channels=(8, 16), read_map=2))
    frames, latents = _inputs()
    variables = nn.meta.unbox(model.init(jax.random.key(1), frames, latents))
    side = S // P  # 4 x 4 patches -> 2 x 2 cells of 2 x 2 patches
    tokens = jax.random.normal(jax.random.key(3), (B * T, 3 + side * side, 32))  # CLS + 2 registers first
    got = model.apply(variables, tokens, method=model.coarse_map)
    grid = np.asarray(tokens[:, 3:]).reshape(B * T, side, side, 32)
    want = np.stack([grid[:, 0:2, 0:2].mean((1, 2)), grid[:, 0:2, 2:4].mean((1, 2)),
                     grid[:, 2:4, 0:2].mean((1, 2)), grid[:, 2:4, 2:4].mean((1, 2))], 1).reshape(B * T, -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    z = jax.random.normal(jax.random.key(4), (B * T, 32))
    def with_map(mdl, z, m):
        x = mdl.feature_norm(mdl.feature_proj(z)).reshape(B, T, -1)
        mm = m.reshape(B, T, -1)
        moved = jnp.concatenate([jnp.zeros_like(mm[:, :1]), mm[:, 1:] - mm[:, :-1]], 1)
        return mdl.llm.backbone(x + mdl.map_proj(jnp.concatenate([mm, moved], -1)))[0]
    np.testing.assert_allclose(model.apply(variables, z, B, got, method=model.think),
                               model.apply(variables, z, got, method=with_map), atol=1e-5)
    out = model.apply(variables, frames, latents)
    assert out["pred_fine"].shape == (B, T - 1, S // 8, S // 8, 4)
    static = model.apply(variables, frames, latents, fine_queries="static")
    np.testing.assert_allclose(static["pred_fine"], static["pred_coarse"], atol=1e-6)
    with pytest.raises(ValueError, match="read_map=3 must divide"):
        bad = fov.FoveatedModel(_vit(), DEC, fov.FoveatedConfig(film_channels=(8, 16), read_map=3))
        bad.init(jax.random.key(1), frames, latents)


def test_read_change_maps_where_the_frame_changed_and_stays_causal():
    """read_change=g: per region of a g x g grid the RMS pixel change since the previous frame (0 at
    frame 0), the same in both passes, through change_proj into the LLM input; with film_spatial too,
    predictions still read frames <= t only, and pass 2 with the static query equals pass 1."""
    cfg = fov.FoveatedConfig(film_channels=(8, 16), read_change=2, film_spatial=2, film_init=0.05)
    model = fov.FoveatedModel(_vit(), DEC, cfg, latent_grid=(S // 8, S // 8))
    frames, latents = _inputs()
    variables = nn.meta.unbox(model.init(jax.random.key(1), frames, latents))
    got = np.asarray(model.apply(variables, frames, method=model.change_map)).reshape(B, T, 2, 2)
    f = np.asarray(frames, np.float64)
    half = S // 2
    for t in range(T):
        for gy in range(2):
            for gx in range(2):
                cell = (slice(gy * half, (gy + 1) * half), slice(gx * half, (gx + 1) * half))
                d = (f[:, t] - f[:, t - 1])[:, cell[0], cell[1]] if t else np.zeros_like(f[:, 0, :half, :half])
                np.testing.assert_allclose(got[:, t, gy, gx], np.sqrt((d ** 2).mean((1, 2, 3))), rtol=1e-5)
    z = jax.random.normal(jax.random.key(4), (B * T, 32))
    change = jnp.asarray(got.reshape(B * T, 4), jnp.float32)
    def with_change(mdl, z, c):
        x = mdl.feature_norm(mdl.feature_proj(z)) + mdl.change_proj(c)
        return mdl.llm.backbone(x.reshape(B, T, -1))[0]
    np.testing.assert_allclose(model.apply(variables, z, B, None, change, method=model.think),
                               model.apply(variables, z, change, method=with_change), atol=1e-5)
    out = model.apply(variables, frames, latents)
    frames2 = frames.at[:, -1].set(jax.random.normal(jax.random.key(9), frames[:, -1].shape))
    out2 = model.apply(variables, frames2, latents)
    for key in ("pred_fine", "pred_coarse"):
        np.testing.assert_allclose(out2[key][:, : T - 2], out[key][:, : T - 2], atol=1e-6, err_msg=key)
    static = model.apply(variables, frames, latents, fine_queries="static")
    np.testing.assert_allclose(static["pred_fine"], static["pred_coarse"], atol=1e-6)
    with pytest.raises(ValueError, match="read_change=3 x change_acuity=1 must divide"):
        bad = fov.FoveatedModel(_vit(), DEC, fov.FoveatedConfig(film_channels=(8, 16), read_change=3))
        bad.init(jax.random.key(1), frames, latents)


def test_change_acuity_hides_a_fine_checkerboard_and_sees_a_move():
    """change_acuity=p: the map differences p x p-averaged frames, so a 2 x 2-pixel checkerboard
    changing its phase (a heading mark turning) leaves it at 0 while the same square moving shows."""
    def frames_of(*squares):  # squares: (y, x, phase) per frame, a 16 x 16 checkered square
        out = np.zeros((1, len(squares), S, S, 3), np.float32)
        yy, xx = np.mgrid[:16, :16]
        for t, (y, x, phase) in enumerate(squares):
            dark = (((yy + phase) // 2) + ((xx + phase) // 2)) % 2
            out[0, t, y:y + 16, x:x + 16] = np.where(dark, 1.0, 0.3)[..., None]
        return jnp.asarray(out)
    latents = jnp.zeros((1, 3, S // 8, S // 8, 4), jnp.float32)
    for p, flicker_seen in ((1, True), (4, False)):
        cfg = fov.FoveatedConfig(film_channels=(8, 16), read_change=2, change_acuity=p)
        model = fov.FoveatedModel(_vit(), DEC, cfg)
        frames = frames_of((0, 0, 0), (0, 0, 1), (0, 4, 1))  # flicker in place, then a 4-pixel move
        variables = nn.meta.unbox(model.init(jax.random.key(1), frames, latents))
        got = np.asarray(model.apply(variables, frames, method=model.change_map)).reshape(3, 4)
        assert (got[1].max() > 0.1) == flicker_seen, (p, got[1])
        assert got[2].max() > 0.1, (p, got[2])
    with pytest.raises(ValueError, match="change_acuity=0 must be an int >= 1"):
        fov.FoveatedConfig(change_acuity=0).validate()


@pytest.mark.parametrize("mode", ["shallow", "deep"])
def test_query_where_points_pass_two_at_a_place(mode):
    """query_where: where_head (zero-initialised: pass 2 reads as without it) maps h°_t to a bias over
    the patches for pass 2's attention, shifted like the queries (frame 0 and pass 1 get none); a
    large bias on one patch puts pass 2's attention there; the static control drops it."""
    cfg = fov.FoveatedConfig(query_mode=mode, film_channels=(8, 16), query_where=True)
    model = fov.FoveatedModel(_vit(), DEC, cfg)
    frames, latents = _inputs()
    variables = nn.meta.unbox(model.init(jax.random.key(1), frames, latents))
    plain = fov.FoveatedModel(_vit(), DEC, fov.FoveatedConfig(query_mode=mode, film_channels=(8, 16)))
    params = variables["params"]
    without = {k: v for k, v in params.items() if k != "where_head"}
    out = model.apply(variables, frames, latents)
    np.testing.assert_allclose(out["attn_fine"], plain.apply({"params": without}, frames, latents)["attn_fine"],
                               atol=1e-6)
    n = (S // P) ** 2
    bias = jnp.zeros((n,)).at[5].set(30.0)
    pointed = dict(params, where_head=dict(params["where_head"], bias=bias))
    out = model.apply({"params": pointed}, frames, latents)
    assert (np.asarray(out["attn_fine"][:, 1:]).argmax(-1) == 5).all()
    assert float(out["attn_fine"][:, 1:, 5].min()) > 0.9
    assert float(out["attn_fine"][:, 0, 5].max()) < 0.5 and float(out["attn_coarse"][:, :, 5].max()) < 0.5
    static = model.apply({"params": pointed}, frames, latents, fine_queries="static")
    np.testing.assert_allclose(static["pred_fine"], static["pred_coarse"], atol=1e-6)
    frames2 = frames.at[:, -1].set(jax.random.normal(jax.random.key(9), frames[:, -1].shape))
    out2 = model.apply({"params": pointed}, frames2, latents)
    np.testing.assert_allclose(out2["pred_fine"][:, : T - 2], out["pred_fine"][:, : T - 2], atol=1e-6)


def test_film_spatial_modulates_each_place():
    """film_spatial=R: gamma/beta(x, y, c) = global(c) + sum_r where_r(x, y) what_r(c), both affine in
    h; with where at zero it is the per-channel FiLM; the head needs the latent grid."""
    head = fov.FiLMHead((8, 16), 4, residual=False, film_init=0.05, spatial=2, grid=(4, 4))
    h = jax.random.normal(jax.random.key(0), (3, 32))
    prev = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
    variables = nn.meta.unbox(head.init(jax.random.key(2), h, prev))
    p = variables["params"]
    assert p["film_where"]["kernel"].shape == (32, 2, 4, 4) and p["film_what"]["kernel"].shape == (32, 2, 2, 16)
    gamma, beta = head.apply(variables, h, method=head.modulation)
    assert gamma.shape == beta.shape == (3, 4, 4, 16)
    glob = h @ p["film"]["kernel"].reshape(32, -1) + p["film"]["bias"].reshape(-1)
    where = jnp.einsum("bd,drxy->brxy", h, p["film_where"]["kernel"]) + p["film_where"]["bias"]
    what = jnp.einsum("bd,drgf->brgf", h, p["film_what"]["kernel"]) + p["film_what"]["bias"]
    want = glob.reshape(3, 2, 1, 1, 16) + jnp.einsum("brxy,brgf->bgxyf", where, what)
    np.testing.assert_allclose(gamma, want[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(beta, want[:, 1], rtol=1e-5, atol=1e-6)
    assert float(jnp.std(gamma, axis=(1, 2)).max()) > 1e-3  # it varies over the places
    flat = dict(p, film_where=jax.tree.map(jnp.zeros_like, p["film_where"]))
    g0, _ = head.apply({"params": flat}, h, method=head.modulation)
    np.testing.assert_allclose(g0, jnp.broadcast_to(glob.reshape(3, 2, 1, 1, 16)[:, 0], g0.shape), atol=1e-6)
    with pytest.raises(ValueError, match="latent grid"):
        fov.FiLMHead((8, 16), 4, spatial=1).init(jax.random.key(2), h, prev)


def test_film_head_identity_at_zero_modulation():
    head = fov.FiLMHead((8, 16), 4, residual=False)
    h = jax.random.normal(jax.random.key(0), (3, 32))
    prev = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
    variables = nn.meta.unbox(head.init(jax.random.key(2), h, prev))
    # Fresh (zero) FiLM layer: the output ignores h and equals decode(features(prev)).
    unmodulated = head.apply(variables, head.apply(variables, prev, method=head.features), prev,
                             method=head.decode)
    out = head.apply(variables, h, prev)
    assert out.shape == (3, 4, 4, 4)
    np.testing.assert_allclose(out, unmodulated, atol=1e-6)
    np.testing.assert_allclose(head.apply(variables, 5 * h, prev), out, atol=1e-6)
    # A non-zero FiLM layer makes h matter.
    params = jax.tree.map(lambda x: x, variables["params"])
    params["film"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3), params["film"]["kernel"].shape)
    assert float(jnp.abs(head.apply({"params": params}, h, prev) - out).max()) > 1e-4
    # residual=True starts as the copy-last-latent baseline.
    res = fov.FiLMHead((8, 16), 4, residual=True)
    np.testing.assert_allclose(res.apply(nn.meta.unbox(res.init(jax.random.key(2), h, prev)), h, prev), prev, atol=1e-6)


def test_bad_config_values_fail_with_the_field():
    with pytest.raises(ValueError, match="query_mode"):
        fov.FoveatedConfig(query_mode="deeep").validate()
    with pytest.raises(ValueError, match="film_channels"):
        fov.FoveatedConfig(film_channels=()).validate()


# ---- the task -------------------------------------------------------------------------------------


# The deep-query run is slow-marked (~15 s on 2 cores): the deep path's equivalences and causality are
# tested above without training.
@pytest.fixture(scope="module", params=["smoke", pytest.param("deep", marks=pytest.mark.slow)])
def smoke_run(request, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp(f"fov_{request.param}"))
    over = {"foveated.query_mode": "deep"} if request.param == "deep" else {}
    summary = runner.run(load_config("foveated", "smoke", log_every=1, **over), workdir)
    return workdir, summary


def test_smoke_trains_logs_the_ratio_and_draws_attention(smoke_run):
    workdir, s = smoke_run
    assert s["finished"] and s["step"] == 4
    end = s["eval_end"]
    for key in ("loss_fine", "loss_coarse", "ratio", "ratio_static", "ratio_shuffled", "loss_copy_last",
                "motion_attention_coarse", "motion_attention_fine", "motion_share_uniform", "state_use_coarse",
                "state_use_fine"):
        assert key in end and np.isfinite(end[key]), key
    np.testing.assert_allclose(end["ratio_static"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(end["ratio"], end["loss_fine"] / end["loss_coarse"], rtol=1e-6)
    train = read_metrics(workdir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"loss_fine", "loss_coarse", "ratio", "data_wait_frac"} <= set(r)
        np.testing.assert_allclose(r["loss"], r["loss_fine"] + r["loss_coarse"], rtol=1e-5)  # lambda_coarse 1
    png = os.path.join(workdir, "attention.png")
    assert os.path.getsize(png) > 0
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(png) as im:
        # 2 clips x 3 rows (frames, coarse, fine) of 4 frames of 32 px, scaled 8x.
        assert im.size == (4 * 32 * 8, 2 * 3 * 32 * 8)
    # The targets were cached once under the workdir.
    assert os.path.isdir(os.path.join(workdir, "latent_cache"))
    json.dumps(end)  # the summary is plain JSON


def test_look_loss_rewards_attention_on_the_changed_patches():
    """``FoveatedTask.look_loss``: -log(pass-2 attention mass on the changed patches) over frames 1..
    that changed; frame 0 (all True by convention) and frames without change do not count."""
    from vlmjax.tasks.foveated import FoveatedTask  # pylint: disable=g-import-not-at-top
    changed = np.zeros((2, 3, 4), bool)
    changed[:, 0] = True               # frame 0: ignored
    changed[0, 1, :2] = True           # clip 0: frame 1 changed at patches 0, 1; frame 2 unchanged
    changed[1, 1, 3] = changed[1, 2, 0] = True
    uniform = np.full((2, 3, 4), 0.25, np.float32)
    on = np.zeros((2, 3, 4), np.float32)
    on[0, :, 1] = 1.0                  # clip 0 looks at patch 1 (changed in frame 1)
    on[1, :, 0] = 1.0                  # clip 1 at patch 0: right in frame 2, wrong in frame 1
    got = np.asarray(FoveatedTask.look_loss(jnp.asarray(uniform), jnp.asarray(changed)))
    np.testing.assert_allclose(got, [-np.log(0.5), -np.log(0.25)], rtol=1e-6)
    got = np.asarray(FoveatedTask.look_loss(jnp.asarray(on), jnp.asarray(changed)))
    np.testing.assert_allclose(got, [0.0, -np.log(1e-6) / 2], rtol=1e-5)


def test_lambda_look_adds_the_look_loss_to_training(tmp_path):
    """config.foveated.lambda_look > 0: the training loss is fine + lambda_coarse * coarse +
    lambda_look * look_loss, logged as loss_look; a negative weight is refused naming the field."""
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    config = load_config("foveated", "smoke", **{"foveated.lambda_look": 0.5})
    task = tasks.build(config, str(tmp_path / "a"))
    params = nn.meta.unbox(task.init_variables(jax.random.key(0)))["params"]
    batch = next(iter(task.eval_batches(global_batch_size=4, process_index=0, process_count=1)))
    batch = jax.tree.map(jnp.asarray, batch)
    loss, aux = task.loss_fn(params, {}, batch, None, 0)
    m = aux["metrics"]
    out = task._forward(params, batch)
    look = jnp.mean(task.look_loss(out["attn_fine"], batch["changed_patches"]))
    np.testing.assert_allclose(m["loss_look"], look, rtol=1e-5)
    np.testing.assert_allclose(loss, m["loss_fine"] + m["loss_coarse"] + 0.5 * m["loss_look"], rtol=1e-5)
    with pytest.raises(ValueError, match="lambda_look"):
        tasks.build(load_config("foveated", "smoke", **{"foveated.lambda_look": -1.0}), str(tmp_path / "b"))


def test_warmup_stage_loads_every_param_and_refuses_another_model(smoke_run, tmp_path):
    """``config.stages.warmup`` (configs/foveated.py default/deep): the next stage starts from every
    param of the warm-up run; a model of other shapes gets one line naming the stage."""
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    from vlmjax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
    workdir, _ = smoke_run
    saved, _ = checkpoint_lib.load_params(workdir)
    deep = {"foveated.query_mode": "deep"} if "fov_deep" in workdir else {}
    config = load_config("foveated", "smoke", **deep)
    task = tasks.build(config, str(tmp_path / "a"), {"warmup": workdir})
    abstract = nn.meta.unbox(task.init_variables(jax.random.key(0)))["params"]
    loaded = task.pretrained_params(abstract, None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, saved)
    other = load_config("foveated", "smoke", **deep, **{"decoder.hidden_size": 48, "decoder.intermediate_size": 96})
    task = tasks.build(other, str(tmp_path / "b"), {"warmup": workdir})
    abstract = nn.meta.unbox(task.init_variables(jax.random.key(0)))["params"]
    with pytest.raises(ValueError, match="warm-up stage .* does not fit"):
        task.pretrained_params(abstract, None)
