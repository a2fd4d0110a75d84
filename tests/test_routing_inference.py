"""Routed decoders at inference and from a pretrained start (issue 12): padding is never chosen, the
causal running budget is the same in one piece, in chunks, token by token and in the FLOPs count,
decoding skips routed blocks no row chose, and the warm start makes step 0 the dense model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import flops
from vlmjax.models import decoder as D
from vlmjax.models import routed_decoder as RD
from vlmjax.models import routing as R

CFG = D.DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
KINDS = [("mod", {}), ("mod", dict(mod_causal="predictor")), ("dtf", {}), ("tdtf", dict(beta="scheduled"))]
WARM = dict(gate_forward="one", capacity_warmup=0.5, causal_bias_init=6.0, prior_loss="relative")


def _model(kind, **kw):
    return RD.RoutedDecoder(CFG, routing=R.RoutingConfig(kind=kind, **kw))


def _tokens(b=2, t=24, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def _init(model, toks, seed=1, router_scale=1.0, bias=None):
    v = nn.meta.unbox(model.init(jax.random.key(seed), toks))

    def edit(path, x):
        name = jax.tree_util.keystr(path)
        if "causal" in name and "kernel" in name or "predictor_out" in name and "kernel" in name:
            return x * router_scale
        if bias is not None and "causal" in name and "'bias'" in name:
            return jnp.full_like(x, bias)
        return x
    return {**v, "params": jax.tree_util.tree_map_with_path(edit, v["params"])}


def _chosen(inter, layer, kind):
    rec = inter["intermediates"][f"router_{layer}"][0]
    return np.asarray(rec["selected"] if kind == "mod" else rec["selected_frac"]).astype(bool)


# ------------------------------------------------------------------------------------------------
# The running budget
# ------------------------------------------------------------------------------------------------

def _budget_reference(wants, positions, c, count0):
    out = np.zeros_like(wants)
    counts = np.array(count0)
    for r in range(wants.shape[0]):
        n = count0[r]
        for t in range(wants.shape[1]):
            b = max(1, int(np.floor(np.float32(c) * np.float32(positions[r, t] + 1))))
            if wants[r, t] and n < b:
                out[r, t] = True
                n += 1
        counts[r] = n
    return out, counts


@pytest.mark.parametrize("c", [0.1, 0.25, 0.3, 0.5, 0.625, 1.0])
def test_causal_budget_matches_the_loop_and_never_exceeds_the_static_cap(c):
    rng = np.random.default_rng(int(c * 100))
    wants = rng.random((4, 37)) < np.array([[0.2], [0.6], [0.95], [1.0]])
    positions = np.broadcast_to(np.arange(37), (4, 37))
    got, count = R.causal_budget(jnp.asarray(wants), jnp.asarray(positions), c)
    ref, ref_count = _budget_reference(wants, positions, c, np.zeros(4, int))
    np.testing.assert_array_equal(np.asarray(got), ref)
    np.testing.assert_array_equal(np.asarray(count), ref_count)
    assert np.all(ref.sum(1) <= R.capacity_tokens(c, 37))
    assert ref[3].sum() == R.capacity_tokens(c, 37)  # a router that wants everything fills the cap
    # In chunks, carrying the count: the same choice.
    first, n = R.causal_budget(jnp.asarray(wants[:, :10]), jnp.asarray(positions[:, :10]), c)
    rest, _ = R.causal_budget(jnp.asarray(wants[:, 10:]), jnp.asarray(positions[:, 10:]), c, n)
    np.testing.assert_array_equal(np.concatenate([first, rest], 1), ref)


def test_auto_causal_capacity_and_config_values():
    assert R.RoutingConfig(capacity=0.5).causal_fraction == 0.625
    assert R.RoutingConfig(capacity=0.95).causal_fraction == 1.0
    assert R.RoutingConfig(capacity=0.5, causal_capacity=0.25).causal_fraction == 0.25
    for value in ("half", 0.0, 1.5, True):
        with pytest.raises(ValueError, match="causal_capacity"):
            R.RoutingConfig(causal_capacity=value).validate(4)
    cd = R.default_config()
    cd.causal_capacity = 0.3  # the ConfigDict field takes a number or "auto"
    assert R.RoutingConfig.from_config(cd).causal_fraction == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------
# Bug 1: padding never chosen
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", KINDS)
def test_padding_is_never_chosen_and_does_not_change_real_tokens(kind, kw):
    model = _model(kind, capacity=0.5, **kw)
    toks = _tokens(t=16)
    v = _init(model, toks, router_scale=30.0, bias=3.0)
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [7]]), jnp.int32)  # row 1: 9 padding
    junk = jnp.where(mask > 0, toks, (toks * 7 + 3) % CFG.vocab_size)  # other padding ids
    for mode in ("topk", "causal"):
        outs = []
        for ids in (toks, junk):
            (lg, aux), inter = model.apply(v, ids, attention_mask=mask, mode=mode, mutable=["intermediates"])
            outs.append(np.asarray(lg))
            for layer in (1, 3):
                chosen = _chosen(inter, layer, kind)
                assert not chosen[1, 7:].any(), (mode, layer)         # padding never chosen
                assert chosen[1, :7].sum() >= 1
        # Real tokens' logits do not depend on what sits in the padding.
        np.testing.assert_allclose(outs[0][1, :7], outs[1][1, :7], rtol=1e-5, atol=1e-5)
    # Decoding a left-padded prompt: the padding slots are never chosen either.
    cache = D.init_cache(model, 2, 16)
    left = jnp.asarray(np.arange(16)[None, :] >= np.array([[0], [9]]), jnp.int32)
    pos = jnp.maximum(jnp.cumsum(left, 1) - 1, 0)
    _, st = model.apply({**v, "cache": cache}, toks, positions=pos, attention_mask=left, decode=True,
                        mutable=["cache", "intermediates"])
    for layer in (1, 3):
        assert not _chosen(st, layer, kind)[1, :9].any()


def test_selected_frac_counts_real_tokens_only():
    model = _model("dtf", capacity=0.5)
    toks = _tokens(b=1, t=16)
    v = _init(model, toks)
    mask = jnp.asarray(np.arange(16)[None, :] < 8, jnp.int32)
    _, aux = model.apply(v, toks, attention_mask=mask, mode="topk")
    # k = floor(0.5 * 16) = 8 slots, 8 real tokens: every real token is chosen, no padding.
    assert float(aux["router/1/selected_frac"]) == 1.0


# ------------------------------------------------------------------------------------------------
# Bug 2: decode == causal evaluation == FLOPs count, at every causal_capacity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", KINDS[1:])
@pytest.mark.parametrize("causal_capacity", [0.25, "auto", 1.0])
def test_decode_causal_eval_and_flops_agree(kind, kw, causal_capacity):
    t = 12
    # causal_bias_init: the routers want most tokens, so the budget binds.
    model = _model(kind, capacity=0.5, causal_capacity=causal_capacity, causal_bias_init=1.5, **kw)
    rc = model.routing
    toks = _tokens(t=t, seed=5)
    v = _init(model, toks, seed=2, router_scale=10.0)
    (whole, aux), inter = model.apply(v, toks, mode="causal", mutable=["intermediates"])
    cache = D.init_cache(model, 2, t)
    outs, chunks = [], []
    for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 9), (9, 10), (10, 12)]:  # prefill, steps, chunks
        (lg, _), st = model.apply({**v, "cache": cache}, toks[:, lo:hi], decode=True,
                                  mutable=["cache", "intermediates"])
        cache = st["cache"]
        outs.append(np.asarray(lg))
        chunks.append(st)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(whole), rtol=3e-5, atol=3e-5)
    k = flops.capacity_tokens(rc.causal_fraction, t)
    block_tokens = flops.routed_layer_forward_flops(CFG, rc, kind, t, mode="inference")["block"]
    assert block_tokens == flops.decoder_layer_forward_flops(CFG, k)
    for layer in (1, 3):
        chosen = _chosen(inter, layer, kind)
        decoded = np.concatenate([_chosen(s, layer, kind) for s in chunks], 1)
        np.testing.assert_array_equal(decoded, chosen)
        assert np.all(chosen.sum(1) <= k)             # the static cap the FLOPs count uses
        if causal_capacity != 1.0:
            assert np.any(chosen.sum(1) == k), "the budget should bind in this test"
        assert float(aux[f"router/{layer}/causal_overflow"]) >= 0.0


def test_decode_skips_a_routed_block_no_row_chose():
    """lax.cond skips the block: with routers that choose nothing the decode step equals the causal
    forward (which gathers nothing useful) and the cache marks the routed layers' slots masked."""
    model = _model("dtf")
    toks = _tokens(t=8)
    v = _init(model, toks, bias=-50.0)
    whole, _ = model.apply(v, toks, mode="causal")
    cache = D.init_cache(model, 2, 8)
    outs = []
    for i in range(8):
        (lg, _), st = model.apply({**v, "cache": cache}, toks[:, i:i + 1], decode=True, mutable=["cache"])
        cache = st["cache"]
        outs.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(whole), rtol=3e-5, atol=3e-5)
    attn = cache["layers_1"]["self_attn"]
    assert int(attn["cache_index"]) == 8 and not np.asarray(attn["cached_valid"]).any()
    np.testing.assert_array_equal(np.asarray(attn["cached_positions"]), np.broadcast_to(np.arange(8), (2, 8)))
    assert np.asarray(cache["layers_0"]["self_attn"]["cached_valid"]).all()  # dense layers write


def test_generation_with_skipped_blocks_matches_the_causal_forward():
    from vlmjax.models import generate as G
    model = _model("dtf", causal_capacity=0.5)
    toks = _tokens(b=1, t=6)
    v = _init(model, toks, seed=4, router_scale=30.0)
    out = G.generate(model, v["params"], toks, max_new_tokens=8, rng=jax.random.key(0),
                     model_state={"router_state": v["router_state"]})
    logits, _ = model.apply(v, out, mode="causal")
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0, 5:-1], -1)), np.asarray(out[0, 6:]))


# ------------------------------------------------------------------------------------------------
# Issue item 4: pretrained start
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", [("mod", dict(mod_causal="predictor")), ("dtf", {}),
                                     ("tdtf", dict(beta="scheduled"))])
def test_warm_start_is_the_dense_model_at_step_0_and_routes_after_warmup(kind, kw):
    model = _model(kind, capacity=0.25, **WARM, **kw)
    toks = _tokens(t=16)
    v = _init(model, toks)
    dense = D.Decoder(CFG)
    dense_params = {k: p for k, p in v["params"].items() if not k.startswith("routers_")}
    ref = np.asarray(dense.apply({"params": dense_params}, toks)[0])
    for mode in ("topk", "causal"):
        (lg, aux), _ = model.apply(v, toks, mode=mode, progress=0.0, mutable=["router_state"])
        np.testing.assert_allclose(np.asarray(lg), ref, rtol=2e-5, atol=2e-5)
        assert float(aux["router/1/selected_frac"]) == 1.0
    # Half-way through the warm-up the capacity is between; after it, floor(0.25 T) tokens.
    _, aux = model.apply(v, toks, mode="topk", progress=0.25)
    assert 0.25 < float(aux["router/1/selected_frac"]) < 1.0
    _, aux = model.apply(v, toks, mode="topk", progress=0.6)
    assert float(aux["router/1/selected_frac"]) == 0.25


def test_straight_through_gate_is_one_forward_and_trains_the_gate():
    g = jnp.asarray([0.2, 0.7])
    np.testing.assert_array_equal(np.asarray(R.straight_through_one(g)), [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda g: jnp.sum(R.straight_through_one(g) * 3.0))(g)),
                                  [3.0, 3.0])
    model = _model("dtf", gate_forward="one")
    toks = _tokens()
    v = _init(model, toks)

    def loss(params):
        (lg, _), _ = model.apply({**v, "params": params}, toks, progress=1.0, mutable=["router_state"])
        return jnp.mean(lg ** 2)
    grads = jax.jit(jax.grad(loss))(v["params"])["routers_1"]
    assert abs(float(grads["beta_ce_raw"])) > 0 and abs(float(grads["o_ce_raw"])) > 0


def test_relative_prior_loss_is_scale_free():
    toks = _tokens()
    out = {}
    for loss_kind in ("mse", "relative"):
        model = _model("dtf", prior_loss=loss_kind)
        v = _init(model, toks)
        for scale in (1.0, 100.0):  # the update scale of a pretrained model vs a fresh one
            layer = v["params"]["layers_0"]
            layer = {**layer, "self_attn": {**layer["self_attn"], "o_proj": jax.tree.map(
                lambda x: x * scale, layer["self_attn"]["o_proj"])},
                "mlp": {**layer["mlp"], "down_proj": jax.tree.map(lambda x: x * scale, layer["mlp"]["down_proj"])}}
            _, aux = model.apply({**v, "params": {**v["params"], "layers_0": layer}}, toks, mode="topk")
            out[loss_kind, scale] = float(aux["loss/prior"])
    assert out["mse", 100.0] > 1000 * out["mse", 1.0]
    # relative: the fraction of the decision layer's update the (near-zero) PriorFFN misses, ~1.
    for scale in (1.0, 100.0):
        assert 0.5 < out["relative", scale] < 2.0, out
