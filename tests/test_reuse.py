"""ReuseViT (token reuse for video ViTs): masks, exactness limits, hard == soft, loss, gradients."""

import dataclasses
import json
import os

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from vlmjax.data import video
from vlmjax.models import reuse, vit

B, F, S, P = 2, 5, 32, 8  # batch, frames, image size, patch size -> 16 patches
BUCKETS = (0.5, 1.0)  # fewer nn.switch branches to compile than the default


def _vit(variant="clip", **kw):
    base = dict(variant=variant, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                patch_size=P, image_size=S)
    if variant == "siglip":
        base["hidden_act"] = "gelu_pytorch_tanh"
    base.update(kw)
    return vit.ViTConfig(**base)


def _grouping(order=(0, 4, 2, 1, 3)):
    g = video.frame_grouping(len(order), order)
    return reuse.Grouping.from_arrays(g["process_order"], g["ref_mask"], g["ref_type"])


def _clip(seed=0, static=True):
    dc = video.default_config()
    dc.image_size, dc.patch_size, dc.num_frames = S, P, F
    if not static:
        dc.background = "pan"
    clips = [video.render_clip(dc, seed + i) for i in range(B)]
    frames = jnp.asarray(np.stack([c["frames"] for c in clips]))
    cmap = jnp.asarray(np.stack([c["change_energy"] for c in clips]))
    return (frames - 0.5) / 0.25, cmap


_PARAMS = {}


def _init(model, frames, cmap, grouping, seed=0, perturb=True):
    """Initialised (and perturbed) params, shared by the tests whose models have the same params.

    The params depend on the ViT and on the reuse options that create weights, not on the capacity
    buckets, the policy or the clip: initialising once per distinct tree (on a two-frame I, P group,
    jitted) saves most of this file's compile time.
    """
    del grouping, cmap
    rc = dataclasses.replace(model.reuse_config, capacity_buckets=(1.0,), policy="mlp", execution="packed",
                             chunk_tokens=16)
    key = (model.config, rc, model.num_slots, seed, perturb)
    if key not in _PARAMS:
        _PARAMS[key] = _fresh_init(model.clone(reuse_config=rc), frames.shape, seed, perturb)
    return _PARAMS[key]


def _fresh_init(model, frames_shape, seed, perturb):
    """Params of the right tree and shapes, drawn with NumPy.

    The tests compare paths of the same model with the same params, so any finite params do; compiling
    ``model.init`` costs ~5 s per tree on 2 CPU cores (XLA compiles a PRNG kernel per param), NumPy
    draws them in milliseconds. Weights are N(0, 0.1), norm scales 1, biases 0;
    restoration outputs and decision layers get N(0, 0.05) (``perturb``: reuse visibly acts) or zeros
    (restoration is the identity on the cached states).
    """
    b, _, h, w, c = frames_shape
    frames = jax.ShapeDtypeStruct((b, 2, h, w, c), jnp.float32)
    cmap = jax.ShapeDtypeStruct((b, 2, (h // P) * (w // P)), jnp.float32)
    shapes = jax.eval_shape(lambda key, frames, cmap: model.init(key, frames, _grouping((0, 1)), cmap,
                                                                 method=model.encode_clip,
                                                                 rng=jax.random.PRNGKey(1)),
                            jax.random.PRNGKey(seed), frames, cmap)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            return jnp.ones(x.shape, x.dtype)
        if name.endswith("bias"):
            return jnp.zeros(x.shape, x.dtype)
        if name.startswith("reuse_") and ("fc2" in name or "decision" in name):
            std = 0.05 if perturb else 0.0
        else:
            std = 0.1  # larger than the HF init (0.02), so frames and tokens differ clearly
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)
    return {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


def _encode(model, params, frames, cmap, grouping, mode="soft", keep_hidden=(), forced=None, rng=None):
    @jax.jit
    def run(params, frames, cmap, forced, rng):
        (out, stats), cache = model.apply(params, frames, grouping, cmap, method=model.encode_clip, mode=mode,
                                          keep_hidden=keep_hidden, forced=forced, rng=rng,
                                          mutable=[reuse.REUSE_CACHE])
        stats = {k: v for k, v in stats.items() if k != "has_ref"}
        return out, stats, cache[reuse.REUSE_CACHE]
    out, stats, cache = run(params, frames, cmap, forced, rng)
    stats["has_ref"] = np.array([bool(r) for r in grouping.refs])
    return out, stats, cache


def _forced(grouping, nr, value_fn, layers):
    return {f: {l: value_fn(f, l) for l in layers} for f in range(grouping.num_frames) if grouping.refs[f]}


def test_shapes_cache_and_grouping():
    cfg = _vit()
    model = reuse.build(cfg, reuse.ReuseConfig(capacity_buckets=BUCKETS), num_slots=F)
    frames, cmap = _clip()
    g = _grouping()
    params = _init(model, frames, cmap, g)
    out, stats, cache = _encode(model, params, frames, cmap, g, keep_hidden=(1, 2), mode="soft",
                                rng=jax.random.PRNGKey(0))
    n = (S // P) ** 2 + 1
    assert out["pooled"].shape == (B, F, 32)
    assert out["last_hidden_state"].shape == (B, F, n, 32)
    assert out["hidden"][2].shape == (B, F, n, 32)
    assert sorted(cache) == ["reuse_1", "reuse_2"]  # layer 0 never reuses
    # Only the reusable (patch) tokens are cached: CLS can never be a reference.
    assert cache["reuse_1"]["x"].shape == (B, F, n - 1, 32)
    assert set(cache["reuse_1"]) == {"x", "h", "k", "v", "filled"}
    assert bool(cache["reuse_1"]["filled"].all())
    assert stats["gate"][1].shape == (B, F, n - 1)
    np.testing.assert_array_equal(stats["has_ref"], [bool(r) for r in g.refs])
    # I frames (no references) have gate 0 everywhere; soft gates lie in [0, 1].
    assert float(stats["gate"][1][:, 0].max()) == 0.0
    assert 0.0 <= float(stats["gate"][1].min()) and float(stats["gate"][1].max()) <= 1.0
    with pytest.raises(ValueError, match="layer 0 never reuses"):
        reuse.ReuseConfig(reuse_layers=(0, 1)).validate(3)
    with pytest.raises(ValueError, match="did you mean 'similarity'"):
        reuse.ReuseConfig.from_config({"similarty": "x"})


def test_grouping_rejects_future_references():
    mask = np.zeros((3, 3), bool)
    mask[0, 1] = True  # frame 0 (processed first) would reference frame 1
    with pytest.raises(ValueError, match="not processed before"):
        reuse.Grouping.from_arrays([0, 1, 2], mask, np.eye(3))


def test_references_only_allowed_written_frames():
    """Restored states come from an allowed reference, never an unallowed or unwritten slot."""
    cfg = _vit()
    rc = reuse.ReuseConfig(restoration="passthrough")
    model = reuse.build(cfg, rc, num_slots=3)
    frames, _ = _clip()
    a, b = frames[:, 0], frames[:, 2]
    # Slot 1 holds exactly the current frame (similarity 1) but only slot 0 is allowed.
    g = reuse.Grouping(order=(0, 1, 2), refs=((), (), (0,)), ref_type=((1, 0, 0), (1, 0, 0), (0, 1, 0)))
    clip = jnp.stack([a, b, b], 1)
    params = _init(model, clip, None, g, perturb=False)
    forced = {2: {1: jnp.ones((B, 16), bool), 2: jnp.ones((B, 16), bool)}}
    out, _, cache = _encode(model, params, clip, None, g, keep_hidden=(1, 2), forced=forced)
    # All-reuse with passthrough: frame 2's patch states are frame 0's, not frame 1's.
    np.testing.assert_allclose(out["hidden"][2][:, 2, 1:], out["hidden"][2][:, 0, 1:], atol=1e-6)
    assert not np.allclose(out["hidden"][2][:, 2, 1:], out["hidden"][2][:, 1, 1:], atol=1e-3)
    # Streaming out of order: frame 2 first, referencing an unwritten slot -> it recomputes.
    v = {"params": params["params"]}
    (o, st), _ = model.apply(v, b, 2, (0,), (0.0, 1.0, 0.0), method=model.encode_frame, keep_hidden=(2,),
                             mutable=[reuse.REUSE_CACHE], forced={1: jnp.ones((B, 16), bool),
                                                                  2: jnp.ones((B, 16), bool)})
    ref, _ = model.apply(v, b, method=model.original_frame)
    np.testing.assert_allclose(o["last_hidden_state"], ref["last_hidden_state"], atol=1e-5)
    assert float(st[1]["gate"].max()) == 0.0


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_all_recompute_is_the_original_model(mode):
    cfg = _vit()
    model = reuse.build(cfg, reuse.ReuseConfig(capacity_buckets=BUCKETS), num_slots=F)
    frames, cmap = _clip()
    g = _grouping()
    params = _init(model, frames, cmap, g)
    forced = _forced(g, 16, lambda f, l: jnp.zeros((B, 16), bool), (1, 2))
    out, stats, _ = _encode(model, params, frames, cmap, g, mode=mode, keep_hidden=(1, 2), forced=forced)
    orig = model.apply(params, frames, keep_hidden=(1, 2), method=model.original_clip)
    np.testing.assert_allclose(out["pooled"], orig["pooled"], atol=2e-5)
    np.testing.assert_allclose(out["last_hidden_state"], orig["last_hidden_state"], atol=2e-5)
    np.testing.assert_allclose(out["hidden"][1], orig["hidden"][1], atol=2e-5)
    assert float(stats["reused"][1].max()) == 0.0
    # ... and the original model is vit.VisionTransformer itself.
    ref, _ = vit.VisionTransformer(cfg).apply(params, frames[:, 3])
    np.testing.assert_allclose(orig["pooled"][:, 3], ref["pooler_output"], atol=1e-6)


def test_all_reuse_passthrough_reproduces_cached_states():
    cfg = _vit()
    # capacity 1/16: the hard path recomputes at least one token per layer (its smallest bucket).
    model = reuse.build(cfg, reuse.ReuseConfig(restoration="passthrough", capacity_buckets=(0.0625, 1.0),
                                               execution="bucket"), num_slots=2)
    frames, _ = _clip()
    g = reuse.Grouping(order=(0, 1), refs=((), (0,)), ref_type=((1, 0, 0), (0, 1, 0)))
    clip = frames[:, :2]
    params = _init(model, clip, None, g)
    forced = {1: {1: jnp.ones((B, 16), bool), 2: jnp.ones((B, 16), bool)}}
    for mode in ("soft", "hard"):
        out, stats, cache = _encode(model, params, clip, None, g, mode=mode, keep_hidden=(0, 1, 2), forced=forced)
        reused = np.asarray(stats["gate"][1][:, 1]) > 0.5  # [B, Nr]: hard recomputes one token
        assert reused.sum() == (2 * 16 if mode == "soft" else 2 * 15)
        for l in (1, 2):
            for t in ("h", "k", "v"):
                c = cache[f"reuse_{l}"][t]
                np.testing.assert_allclose(np.asarray(c[:, 1])[reused], np.asarray(c[:, 0])[reused], atol=1e-6)
        if mode == "soft":
            np.testing.assert_allclose(out["hidden"][2][:, 1, 1:], out["hidden"][2][:, 0, 1:], atol=1e-6)
        # Layer 0 ran on frame 1 (it never reuses), and CLS is recomputed.
        assert not np.allclose(out["hidden"][0][:, 1], out["hidden"][0][:, 0], atol=1e-3)
        assert not np.allclose(out["hidden"][2][:, 1, 0], out["hidden"][2][:, 0, 0], atol=1e-4)


# The compile time grows with frames x reuse layers x buckets (every frame is unrolled, every bucket is
# an nn.switch branch), so the variants run on a 3-frame group (I, P, B: order (0, 2, 1)) and only the
# default buckets on the 5-frame codec order.
_BUCKET = {"execution": "bucket"}


@pytest.mark.parametrize("variant,kw,order", [
    ("clip", {}, (0, 4, 2, 1, 3)),  # the default: packed execution
    ("clip", {"chunk_tokens": 5, "restore_q": True}, (0, 2, 1)),  # chunks that split examples
    ("clip", {"execution": "bucket"}, (0, 4, 2, 1, 3)),  # the default buckets
    ("clip", {"similarity": "low_rank", "similarity_rank": 8, "restore_q": True, "capacity_buckets": BUCKETS,
              **_BUCKET}, (0, 2, 1)),
    pytest.param("clip", {"similarity": "headwise", "skip_cls": False, "capacity_buckets": BUCKETS, **_BUCKET},
                 (0, 2, 1), marks=pytest.mark.slow),  # the suite's time budget; run with -m slow
    ("clip", {"similarity": "headwise", "skip_cls": False, "chunk_tokens": 7}, (0, 2, 1)),
    ("clip", {"capacity_buckets": (1.0,), **_BUCKET}, (0, 2, 1)),
    pytest.param("clip", {"restoration": "shared_mlp", "capacity_buckets": (0.5,), **_BUCKET}, (0, 2, 1),
                 marks=pytest.mark.slow),
    ("clip", {"restoration": "shared_mlp"}, (0, 2, 1)),
    ("siglip", {"capacity_buckets": BUCKETS, **_BUCKET}, (0, 2, 1)),
    ("dinov2", {"reuse_layers": (2,)}, (0, 2, 1)),
])
def test_hard_path_equals_soft_path_under_forced_decisions(variant, kw, order):
    extra = {"num_register_tokens": 2} if variant == "dinov2" else {}
    cfg = _vit(variant, **extra)
    rc = reuse.ReuseConfig(**kw)
    model = reuse.build(cfg, rc, num_slots=F)
    frames, cmap = _clip(static=False)
    frames, cmap = frames[:, :len(order)], cmap[:, :len(order)]
    g = _grouping(order)
    params = _init(model, frames, cmap, g)
    nr = 16 + (cfg.num_prefix_tokens if not rc.skip_cls else 0)
    keys = jax.random.split(jax.random.PRNGKey(3), 64)
    forced = _forced(g, nr, lambda f, l: jax.random.bernoulli(keys[f * 8 + l], 0.6, (B, nr)),
                     rc.layers(3))
    hard, h_st, h_cache = _encode(model, params, frames, cmap, g, mode="hard", keep_hidden=(1, 2), forced=forced)
    # The hard path recomputes every token decided "recompute" (bucket: plus padding up to its bucket;
    # packed: exactly those).
    eff = {f: {l: h_st["gate"][l][:, f] > 0.5 for l in rc.layers(3)} for f in forced}
    for f in forced:
        for l in rc.layers(3):
            assert not bool(jnp.any(eff[f][l] & ~forced[f][l]))
            if rc.execution == "packed":
                np.testing.assert_array_equal(eff[f][l], forced[f][l])
    soft, s_st, s_cache = _encode(model, params, frames, cmap, g, mode="soft", keep_hidden=(1, 2), forced=eff)
    np.testing.assert_allclose(hard["pooled"], soft["pooled"], atol=3e-5)
    np.testing.assert_allclose(hard["last_hidden_state"], soft["last_hidden_state"], atol=3e-5)
    for l in rc.layers(3):
        np.testing.assert_allclose(h_st["reused"][l], s_st["reused"][l], atol=1e-6)
        assert float(h_st["overflow"][l].max()) == 0.0
        for t in h_cache[f"reuse_{l}"]:
            np.testing.assert_allclose(h_cache[f"reuse_{l}"][t], s_cache[f"reuse_{l}"][t], atol=3e-5)
    # Reuse with restoration really differs from the original model.
    if min(rc.capacity_buckets) < 1:
        orig = model.apply(params, frames, method=model.original_clip)
        assert not np.allclose(hard["last_hidden_state"], orig["last_hidden_state"], atol=1e-3)


def test_hard_path_argmax_and_overflow():
    cfg = _vit()
    frames, cmap = _clip(static=False)
    g = _grouping()
    model = reuse.build(cfg, reuse.ReuseConfig(capacity_buckets=BUCKETS), num_slots=F)
    params = _init(model, frames, cmap, g)
    _, s_st, _ = _encode(model, params, frames, cmap, g, mode="soft")  # rng None: hard argmax
    # Buckets at exactly the recompute counts the argmax decided (the batch's max per frame and layer,
    # at least one token): the hard path then runs those decisions as they are, padding only the
    # examples of the batch that recompute fewer tokens than the batch's max.
    ref_frames = [f for f in range(F) if g.refs[f]]
    need = {l: np.maximum((np.asarray(s_st["gate"][l]) < 0.5).sum(-1).max(0), 1) for l in (1, 2)}  # [F]
    counts = sorted({int(need[l][f]) for l in need for f in ref_frames})
    assert len(counts) >= 2 and counts[0] < 16, counts  # several switch branches, and real reuse
    rc = reuse.ReuseConfig(capacity_buckets=tuple((k - 0.5) / 16 for k in counts), execution="bucket")
    _, h_st, _ = _encode(reuse.build(cfg, rc, num_slots=F), params, frames, cmap, g, mode="hard")
    for l in (1, 2):
        s_reuse, h_reuse = np.asarray(s_st["gate"][l]) > 0.5, np.asarray(h_st["gate"][l]) > 0.5
        assert not np.any(h_reuse & ~s_reuse)  # the hard path reuses a subset of what the argmax decided
        np.testing.assert_array_equal(h_reuse.sum(-1)[:, ref_frames],
                                      np.broadcast_to(16 - need[l][ref_frames], (B, len(ref_frames))))
        assert float(h_st["overflow"][l].max()) == 0.0
    # A single small capacity: tokens beyond it are reused anyway and counted as overflow.
    small = reuse.build(cfg, reuse.ReuseConfig(capacity_buckets=(0.25,), execution="bucket"), num_slots=F)
    forced = _forced(g, 16, lambda f, l: jnp.zeros((B, 16), bool), (1, 2))
    _, st, _ = _encode(small, params, frames, cmap, g, mode="hard", forced=forced)
    assert abs(float(st["overflow"][1][:, 1].mean()) - 0.75) < 1e-6
    assert abs(float(st["reused"][1][:, 1].mean()) - 0.75) < 1e-6


def test_topk_similarity_policy_reuses_the_most_similar_fraction():
    cfg = _vit()
    frames, cmap = _clip(static=False)
    g = _grouping()
    rc = reuse.ReuseConfig(policy="topk_similarity", topk_reuse_fraction=0.75, capacity_buckets=(0.25,),
                           execution="bucket")
    model = reuse.build(cfg, rc, num_slots=F)
    params = _init(model, frames, cmap, g)
    _, st, _ = _encode(model, params, frames, cmap, g, mode="hard")
    rates = reuse.reuse_rates(st, jnp.ones((B,)))
    np.testing.assert_allclose(rates["hard"], [0.75, 0.75], atol=1e-6)
    sim, gate = st["sim"][1][:, 1], st["gate"][1][:, 1]
    # Every reused token is at least as similar as every recomputed one.
    for b in range(B):
        assert float(sim[b][gate[b] > 0.5].min()) >= float(sim[b][gate[b] < 0.5].max())


def test_gumbel_gate():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 7, 2)), jnp.float32)
    soft = reuse.gumbel_gate(logits, 0.5, jax.random.PRNGKey(0), hard=False)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    assert 0 < float(soft.min()) < float(soft.max()) < 1
    # Same noise by hand.
    g = jax.random.gumbel(jax.random.PRNGKey(0), logits.shape)
    logp = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(soft, jax.nn.softmax((logp + g) / 0.5, -1), atol=1e-6)
    hard = reuse.gumbel_gate(logits, 0.5, jax.random.PRNGKey(0), hard=True)
    np.testing.assert_allclose(hard, jax.nn.one_hot(jnp.argmax(soft, -1), 2), atol=1e-6)
    # Straight-through: the gradient is the soft one.
    f = lambda l, h: (reuse.gumbel_gate(l, 0.5, jax.random.PRNGKey(0), hard=h)[..., 0] * jnp.arange(7.0)).sum()
    np.testing.assert_allclose(jax.grad(f)(logits, True), jax.grad(f)(logits, False), atol=1e-6)
    ev = reuse.gumbel_gate(logits, 0.5, None, hard=False)
    np.testing.assert_array_equal(ev, jax.nn.one_hot(jnp.argmax(logits, -1), 2))
    rc = reuse.ReuseConfig(tau=1.0, tau_end=0.1)
    np.testing.assert_allclose(reuse.scheduled_tau(rc, 0.5), 0.55, atol=1e-6)


def test_reuse_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pooled, pooled_o = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6))
    hid = [rng.normal(size=(3, 4, 5, 6)) for _ in range(2)]
    hid_o = [rng.normal(size=(3, 4, 5, 6)) for _ in range(2)]
    patch, patch_o = hid[1][:, :, 1:], hid_o[1][:, :, 1:]
    rates = np.array([0.2, 0.99, 0.3])
    mask = np.array([1.0, 1.0, 0.0])
    cfg = reuse.loss_config()
    cfg.patch_mse_scaler = 0.1
    loss, terms = reuse.reuse_loss(*map(jnp.asarray, (pooled, pooled_o)), [jnp.asarray(h) for h in hid],
                                   [jnp.asarray(h) for h in hid_o], jnp.asarray(patch), jnp.asarray(patch_o),
                                   jnp.asarray(rates), jnp.asarray(mask), cfg)

    def cos(a, b):
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    sloss = (1 - cos(pooled, pooled_o).min(-1))[:2].mean()
    hl = [(1 - cos(h, o).mean(-1).min(-1))[:2].mean() for h, o in zip(hid, hid_o)]
    rloss = max(0.0, 0.5 - np.minimum(rates, 0.95).mean())
    mse = ((patch - patch_o) ** 2).mean((1, 2, 3))[:2].mean()
    want = sloss + 0.0 * hl[0] + 1.5 * hl[1] + 0.35 * rloss + 0.1 * mse
    np.testing.assert_allclose(float(terms["sloss"]), sloss, rtol=1e-5)
    np.testing.assert_allclose(float(terms["hloss_1"]), hl[1], rtol=1e-5)
    np.testing.assert_allclose(float(terms["rloss"]), rloss, rtol=1e-5)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def _backbone_stage_dir(config, path):
    """A stand-in for the finished 'backbone' stage's workdir: its config.json names the ViT."""
    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)  # what makes it a vlmjax workdir
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model": config.stages.backbone.model.to_dict()}, f)
    return str(path)


def test_only_reuse_modules_get_gradients(tmp_path):
    from vlmjax.tasks import reuse as reuse_task
    config = load_config("reuse", "smoke")
    task = reuse_task.ReuseTask(config, str(tmp_path), {"backbone": _backbone_stage_dir(config, tmp_path / "bb")})
    params = jax.jit(task.init_variables)(jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                          is_leaf=lambda x: hasattr(x, "value"))
    batch = next(iter(task.train_dataset(global_batch_size=2, seed=0, process_index=0, process_count=1)))
    batch = jax.tree.map(jnp.asarray, batch)
    grads, aux = jax.jit(jax.grad(task.loss_fn, has_aux=True))(params, {}, batch, jax.random.PRNGKey(0),
                                                                jnp.int32(1))
    norms = {k: float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(v))) for k, v in grads.items()}
    reuse_keys = [k for k in norms if k.startswith("reuse_")]
    assert reuse_keys == ["reuse_1", "reuse_2"]
    for k in reuse_keys:
        assert norms[k] > 0, k
        dec = sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(grads[k]["decision"]))
        res = sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(grads[k]["restore_h"]))
        assert dec > 0 and res > 0, (k, dec, res)
    for k, v in norms.items():
        if not k.startswith("reuse_"):
            assert v == 0.0, k
    m = aux["metrics"]
    for key in ("sloss", "hloss_0", "hloss_1", "rloss", "pooled_cos", "patch_cos", "reuse_rate",
                "reuse/1", "reuse_gate/2", "reuse_executed/1", "compute_reuse_rate", "tau"):
        assert key in m, key
    assert np.isfinite(float(m["loss"]))


def test_config_errors(tmp_path):
    from vlmjax.tasks import reuse as reuse_task
    config = load_config("reuse", "clip_b16")
    with pytest.raises(ValueError, match="init_from"):
        reuse_task.ReuseTask(config, str(tmp_path))
    config = load_config("reuse", "smoke", **{"data.patch_size": 4})
    with pytest.raises(ValueError, match="patch_size"):
        reuse_task.ReuseTask(config, str(tmp_path), {"backbone": _backbone_stage_dir(config, tmp_path / "bb")})
    with pytest.raises(ValueError, match="not a variant"):
        load_config("reuse", "clip_b32")
    with pytest.raises(FileNotFoundError, match="neither"):
        config = load_config("reuse", "smoke", init_from=str(tmp_path))
        reuse_task.ReuseTask(config, str(tmp_path))


def test_dataclass_roundtrip():
    rc = reuse.ReuseConfig.from_config(reuse.default_config())
    assert dataclasses.asdict(rc)["capacity_buckets"] == (0.125, 0.25, 0.5, 0.75, 1.0)


def _static_and_busy():
    """A batch of two clips: [static background, panning background] (frames, cmap)."""
    static, cs = _clip(static=True)
    busy, cb = _clip(seed=7, static=False)
    return jnp.stack([static[0], busy[0]]), jnp.stack([cs[0], cb[0]])


def test_packed_execution_follows_each_examples_decisions():
    """Executed reuse == decided reuse per example: a busy clip no longer makes a static one recompute."""
    cfg = _vit()
    frames, cmap = _static_and_busy()
    g = _grouping()
    nr, n = 16, 17
    # Decisions: the static clip reuses 14 of 16 tokens, the busy one 2 (in every reuse layer).
    keep = lambda k, f, l: jnp.arange(nr)[None] < k
    forced = _forced(g, nr, lambda f, l: jnp.concatenate([keep(14, f, l), keep(2, f, l)]), (1, 2))
    out = {}
    for execution in ("packed", "bucket"):
        model = reuse.build(cfg, reuse.ReuseConfig(execution=execution, chunk_tokens=4), num_slots=F)
        params = _init(model, frames, cmap, g)
        _, st, _ = _encode(model, params, frames, cmap, g, mode="hard", forced=forced)
        out[execution] = st
    ref = [f for f in range(F) if g.refs[f]]
    for l in (1, 2):
        executed = np.asarray(out["packed"]["reused"][l])[:, ref]  # [B, F_ref]
        np.testing.assert_allclose(executed, np.array([[14 / 16], [2 / 16]]) * np.ones((1, len(ref))), atol=1e-7)
        # Compute follows: each example runs its own 1 + recompute tokens plus a share of the padding of
        # the last chunk (< chunk_tokens rows for the whole batch).
        computed = np.asarray(out["packed"]["computed"][l])[:, ref]
        own = np.array([[1 + 2], [1 + 14]]) / n
        assert np.all(computed >= own - 1e-6) and np.all(computed - own < 4 / (2 * n)), computed
        # The per-batch bucket (default capacities) holds the busy clip's 14 tokens only at capacity 1:
        # the static clip then recomputes every token too (the problem 'packed' fixes).
        np.testing.assert_allclose(np.asarray(out["bucket"]["reused"][l])[:, ref], 0.0, atol=1e-7)
    # Learned (argmax) decisions: executed == decided exactly, example by example.
    model = reuse.build(cfg, reuse.ReuseConfig(chunk_tokens=4), num_slots=F)
    params = _cmap_policy(_init(model, frames, cmap, g))
    _, st, _ = _encode(model, params, frames, cmap, g, mode="hard")
    for l in (1, 2):
        decided = np.asarray(st["decided"][l]).mean(-1)
        np.testing.assert_array_equal(np.asarray(st["reused"][l]), decided)
        np.testing.assert_array_equal(np.asarray(st["decided"][l]), np.asarray(st["p_reuse"][l]) > 0.5)
        assert 0.2 < decided[0, ref].mean() < 0.9 and decided[1].max() == 0.0


def _cmap_policy(params, threshold=1e-3):
    """Decision MLPs set by hand to "reuse a patch iff its change energy < threshold" (a codec-like
    policy: a patch of a static clip that did not change is reused, every patch of a panning clip
    recomputes), so the decisions differ token by token and clip by clip."""
    p = jax.tree.map(np.array, nn.meta.unbox(params["params"]))
    for name, mod in p.items():
        if name.startswith("reuse_"):
            d = mod["decision"]
            for leaf in (d["fc1"]["kernel"], d["fc1"]["bias"], d["fc2"]["kernel"]):
                leaf[...] = 0.0
            d["fc1"]["kernel"][2, 0], d["fc1"]["bias"][0] = -1000.0, 1000.0 * threshold  # input 2: cmap
            d["fc2"]["kernel"][0, 0] = 1.0
            d["fc2"]["bias"][...] = (-0.5, 0.0)  # reuse iff gelu(1000 (threshold - cmap)) > 0.5
    return {"params": jax.tree.map(jnp.asarray, p)}


def test_streaming_equals_batched_clip_by_clip():
    cfg = _vit()
    frames, cmap = _static_and_busy()
    g = _grouping((3, 1, 0, 2))
    frames, cmap = frames[:, :4], cmap[:, :4]
    model = reuse.build(cfg, reuse.ReuseConfig(chunk_tokens=4), num_slots=4)
    params = _cmap_policy(_init(model, frames, cmap, g))
    batched, st, _ = _encode(model, params, frames, cmap, g, mode="hard")
    rates = np.stack([np.asarray(st["reused"][l])[:, :3] for l in (1, 2)])  # frames 0-2 have references
    # The static clip reuses its unchanged patches, the panning one nothing.
    assert 0.2 < rates[:, 0].mean() < 0.9 and rates[:, 1].max() == 0.0, rates
    streamer = reuse.StreamingEncoder(model, params["params"], g)
    for b in range(2):
        alone = streamer.encode_clip(frames[b:b + 1], cmap[b:b + 1])
        np.testing.assert_allclose(alone["pooled"][0], batched["pooled"][b], atol=2e-5)
        np.testing.assert_allclose(alone["last_hidden_state"][0], batched["last_hidden_state"][b], atol=2e-5)
    with pytest.raises(ValueError, match="already pushed"):
        streamer.push(frames[:1, 0])
