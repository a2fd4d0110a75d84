"""Token routing (MoD / DTF / TDTF): formulas against NumPy, the route/compute/unroute primitive,
moving-average state across chunks, causal decoding, training of the causal router."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import decoder as D
from vlmjax.models import generate as G
from vlmjax.models import layers
from vlmjax.models import routed_decoder as RD
from vlmjax.models import routing as R

CFG = D.DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(x))


def _ma_reference(values, valid, window, fallback):
    """Loop version: mean of the valid values among the previous `window` positions (i excluded)."""
    b, t = values.shape
    out = np.zeros((b, t))
    for r in range(b):
        for i in range(t):
            w = [values[r, j] for j in range(max(0, i - window), i) if valid[r, j]]
            out[r, i] = np.mean(w) if w else fallback[r, i]
    return out


def _init(model, toks, seed):
    return nn.meta.unbox(model.init(jax.random.key(seed), toks))


def _model(kind, **kw):
    return RD.RoutedDecoder(CFG, routing=R.RoutingConfig(kind=kind, **kw))


def _tokens(b=2, t=24, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


# ------------------------------------------------------------------------------------------------
# Formulas
# ------------------------------------------------------------------------------------------------

def test_mean_sq_is_squared_error_over_d_not_the_l2_norm():
    a, b = np.random.default_rng(0).normal(size=(2, 2, 5, 7))
    got = np.asarray(R.mean_sq(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(got, ((a - b) ** 2).sum(-1) / 7, rtol=1e-6)
    assert not np.allclose(got, np.linalg.norm(a - b, axis=-1), rtol=1e-2)


@pytest.mark.parametrize("gate", ["prob_or", "ce_only"])
def test_surprise_gate_matches_numpy(gate):
    rng = np.random.default_rng(1)
    d_st, d_ch, ma = rng.uniform(0, 2, size=(3, 4, 9))
    p = dict(beta_ce=0.7, beta_cu=1.3, o_ce=1.025, m_cu=1.1)
    got = R.surprise_gate(jnp.asarray(d_st), jnp.asarray(d_ch), jnp.asarray(ma), gate=gate,
                          **{k: jnp.asarray(v) for k, v in p.items()})
    ce = d_st - (d_ch - np.log(p["o_ce"] + 1e-10))   # the log term, not an additive offset
    cu = d_st - p["m_cu"] * ma                       # against the moving average
    s_ce, s_cu = _sigmoid(p["beta_ce"] * ce), _sigmoid(p["beta_cu"] * cu)
    g = s_ce + s_cu - s_ce * s_cu if gate == "prob_or" else s_ce   # probabilistic OR, not a sum
    for name, ref in dict(ce=ce, cu=cu, s_ce=s_ce, s_cu=s_cu, g_cont=g).items():
        np.testing.assert_allclose(np.asarray(got[name]), ref, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("window,t", [(3, 10), (100, 40), (5, 5)])
def test_causal_moving_average_matches_loop_and_chunks(window, t):
    rng = np.random.default_rng(window)
    vals = rng.uniform(0, 1, size=(2, t)).astype(np.float32)
    valid = rng.uniform(size=(2, t)) > 0.2
    empty_v, empty_m = jnp.zeros((2, window)), jnp.zeros((2, window), bool)
    ma, count, _, _ = R.causal_moving_average(jnp.asarray(vals), jnp.asarray(valid), window, empty_v, empty_m)
    ref = _ma_reference(vals, valid, window, np.zeros_like(vals))
    np.testing.assert_allclose(np.asarray(ma), ref, rtol=1e-5, atol=1e-6)
    assert np.asarray(count)[:, 0].max() == 0
    # The same stream in chunks, carrying the last `window` slots: identical averages.
    hv, hm, outs = empty_v, empty_m, []
    cuts = sorted({0, 1, 4, t // 2, t} & set(range(t + 1)))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        m, _, hv, hm = R.causal_moving_average(jnp.asarray(vals[:, lo:hi]), jnp.asarray(valid[:, lo:hi]),
                                               window, hv, hm)
        outs.append(np.asarray(m))
    np.testing.assert_allclose(np.concatenate(outs, 1), ref, rtol=1e-5, atol=1e-6)


def test_dtf_layer_intermediates_match_numpy_reference():
    """Every per-token DTF intermediate of layer pair (0 decision, 1 dynamic) against NumPy."""
    model = RD.RoutedDecoder(dataclasses.replace(CFG, num_hidden_layers=2),
                             routing=R.RoutingConfig(kind="dtf", ma_window=5))
    toks = _tokens()
    v = _init(model, toks, 1)
    # Non-trivial learned scalars, so a wrong parameterisation cannot hide.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 if "raw" in jax.tree_util.keystr(p) else x, v["params"])
    (_, aux), mut = model.apply({**v, "params": params}, toks, mutable=["intermediates"])
    got = {k: np.asarray(x) for k, x in mut["intermediates"]["router_1"][0].items()}

    pos = jnp.broadcast_to(jnp.arange(toks.shape[1])[None], toks.shape)
    h = np.asarray(jnp.take(params["embed_tokens"]["embedding"], toks, axis=0), np.float64)
    block = layers.DecoderBlock(CFG)
    post = np.asarray(block.apply({"params": params["layers_0"]}, jnp.asarray(h, jnp.float32), pos)[0],
                      np.float64)
    head = R.SwiGLUHead(0.125, eps=CFG.rms_norm_eps)
    prior = h + np.asarray(head.apply({"params": params["routers_1"]["prior_ffn"]}, jnp.asarray(h, jnp.float32)))
    d = h.shape[-1]
    d_st = ((post - h) ** 2).sum(-1) / d
    d_ch = ((post - prior) ** 2).sum(-1) / d
    valid = np.ones(d_st.shape, bool)
    ma = _ma_reference(d_st, valid, 5, fallback=d_st)  # no training yet: first token uses its own D_st
    raw = params["routers_1"]
    beta_ce, beta_cu = _softplus(float(raw["beta_ce_raw"])), _softplus(float(raw["beta_cu_raw"]))
    o_ce, m_cu = _softplus(float(raw["o_ce_raw"])), _softplus(float(raw["m_cu_raw"]))
    np.testing.assert_allclose([beta_ce, beta_cu, o_ce, m_cu],
                               [_softplus(0.0), _softplus(-0.3), _softplus(R.softplus_inverse(1.025) + 0.3),
                                _softplus(R.softplus_inverse(1.1) + 0.3)], rtol=1e-6)
    ce = d_st - (d_ch - np.log(o_ce + 1e-10))
    cu = d_st - m_cu * ma
    s_ce, s_cu = _sigmoid(beta_ce * ce), _sigmoid(beta_cu * cu)
    g = s_ce + s_cu - s_ce * s_cu
    ref = dict(d_st=d_st, d_ch=d_ch, ma=ma, ce=ce, cu=cu, s_ce=s_ce, s_cu=s_cu, g_cont=g)
    for name, r in ref.items():
        np.testing.assert_allclose(got[name], r, rtol=2e-4, atol=1e-7, err_msg=name)
    # Top-k at gamma = 0.5 of G, per row (of the model's fp32 G: fp64 may break near-ties otherwise).
    k = toks.shape[1] // 2
    want = np.zeros_like(valid)
    for r, row in enumerate(got["g_cont"]):
        want[r, np.argsort(-row, kind="stable")[:k]] = True
    np.testing.assert_array_equal(got["selected_frac"], want)
    np.testing.assert_allclose(float(aux["router/1/g_cont"]), g.mean(), rtol=1e-4)
    # L_prior = MSE(H_prior, sg(H_post)) of the only decision layer.
    np.testing.assert_allclose(float(aux["loss/prior"]), ((prior - post) ** 2).mean(), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# The primitive
# ------------------------------------------------------------------------------------------------

def test_routed_block_equals_dense_block_on_the_subsequence_with_original_positions():
    cfg = dataclasses.replace(CFG, rope_theta=10000.0, rms_norm_eps=1e-6)
    dense = layers.DecoderBlock(cfg)
    upd_block = layers.DecoderBlock(cfg, return_update=True)
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    pos = jnp.broadcast_to(jnp.arange(16)[None], (2, 16))
    params = nn.meta.unbox(dense.init(jax.random.key(1), x, pos))
    scores = jax.random.normal(jax.random.key(2), (2, 16))
    valid = jnp.ones((2, 16), bool).at[1, :3].set(False)  # left padding in row 1: never chosen
    idx, picked = R.topk_indices(scores, 6, valid)
    assert np.all(np.diff(np.asarray(idx), axis=1) > 0) and np.asarray(picked).all()
    assert not np.isin(np.asarray(idx[1]), [0, 1, 2]).any()

    block = lambda *a: upd_block.apply(params, *a)
    out, _ = R.route_compute_unroute(block, x, pos, valid, idx, picked, jnp.ones((2, 6)))
    for r in range(2):
        sel = np.asarray(idx[r])
        sub, _ = dense.apply(params, x[r:r + 1, sel], pos[r:r + 1, sel])
        np.testing.assert_allclose(np.asarray(out[r, sel]), np.asarray(sub[0]), rtol=1e-5, atol=1e-5)
        rest = np.setdiff1d(np.arange(16), sel)
        np.testing.assert_array_equal(np.asarray(out[r, rest]), np.asarray(x[r, rest]))
    # The decoding form (mask instead of gather) agrees on the chosen tokens.
    chosen = R.indices_to_mask(idx, picked, 16)
    out2, _ = R.masked_compute(block, x, pos, valid, chosen, jnp.ones((2, 16)), False)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-5, atol=1e-5)


def test_first_k_indices_is_causal():
    sel = jnp.asarray([[0, 1, 1, 0, 1, 1, 1, 0]], bool)
    idx, picked = R.first_k_indices(sel, 3)
    np.testing.assert_array_equal(np.asarray(idx[0])[np.asarray(picked[0])], [1, 2, 4])
    idx, picked = R.first_k_indices(jnp.asarray([[0, 1, 0, 0]], bool), 3)
    assert int(picked.sum()) == 1


def test_capacity_and_bad_configs():
    assert R.capacity_tokens(0.125, 128) == 16 and R.capacity_tokens(0.001, 10) == 1
    for kw, msg in [(dict(kind="moe"), "kind"), (dict(capacity=0.0), "capacity"),
                    (dict(kind="dtf", offset=0), "decision layer"), (dict(kind="tdtf"), "scheduled"),
                    (dict(gate="sum"), "gate"), (dict(every=8, offset=7), "routes none")]:
        with pytest.raises(ValueError, match=msg):
            R.RoutingConfig(**kw).validate(4)
    with pytest.raises(ValueError, match="did you mean 'capacity'"):
        R.RoutingConfig.from_config({"capacty": 0.5})


# ------------------------------------------------------------------------------------------------
# Model-level behaviour
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,kw", [("mod", dict(capacity=0.25)), ("mod", dict(mod_causal="predictor")),
                                     ("dtf", {}), ("tdtf", dict(beta="scheduled"))])
def test_gradients_reach_routers_and_router_state_is_not_differentiated(kind, kw):
    model = _model(kind, **kw)
    toks = _tokens()
    v = _init(model, toks, 1)

    def loss(params):
        (logits, aux), st = model.apply({**v, "params": params}, toks, progress=0.5, mutable=["router_state"])
        return jnp.mean(logits ** 2) * 1e-3 + aux["router_loss"], st

    grads, st = jax.grad(loss, has_aux=True)(v["params"])
    g = grads["routers_1"]
    flat = {jax.tree_util.keystr(p): float(jnp.abs(x).sum()) for p, x in jax.tree_util.tree_flatten_with_path(g)[0]}
    assert all(np.isfinite(list(flat.values())))
    assert sum(val > 0 for val in flat.values()) >= len(flat) - 1, flat
    assert float(st["router_state"]["progress"]) == 0.5
    if kind != "mod":
        assert float(st["router_state"]["routers_1"]["d_st_ema_weight"]) > 0


@pytest.mark.parametrize("kind,kw", [("dtf", dict(ma_window=4)), ("tdtf", dict(beta="scheduled", ma_window=4)),
                                     ("mod", dict(capacity=0.5))])
def test_chunked_and_token_by_token_decoding_equal_one_piece(kind, kw):
    """MA values, causal decisions and logits: decode-mode chunks == one causal forward."""
    model = _model(kind, **kw)
    toks = _tokens(t=14)
    v = _init(model, toks, 3)
    # Give routers a non-trivial decision boundary (about half the tokens selected).
    v = {**v, "params": jax.tree_util.tree_map_with_path(
        lambda p, x: x * 30 if "causal" in jax.tree_util.keystr(p) or "router" in jax.tree_util.keystr(p)
        and "kernel" in jax.tree_util.keystr(p) else x, v["params"])}
    (whole, _), inter = model.apply(v, toks, mode="causal", mutable=["intermediates"])
    cache = D.init_cache(model, 2, 14)
    outs, inters = [], []
    for lo, hi in [(0, 5), (5, 6), (6, 7), (7, 11), (11, 14)]:
        (lg, _), st = model.apply({**v, "cache": cache}, toks[:, lo:hi], decode=True,
                                  mutable=["cache", "intermediates"])
        cache = st["cache"]
        outs.append(lg)
        inters.append(st["intermediates"])
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(whole), rtol=2e-5, atol=2e-5)
    key = "selected_frac" if kind != "mod" else "selected"
    for layer in ("router_1", "router_3"):
        sel_whole = np.asarray(inter["intermediates"][layer][0][key])
        sel_chunks = np.concatenate([np.asarray(i[layer][0][key]) for i in inters], 1)
        np.testing.assert_array_equal(sel_chunks, sel_whole)
        assert 0 < sel_whole.mean() < 1, "routers should select some but not all tokens"
        if kind != "mod":
            ma_whole = np.asarray(inter["intermediates"][layer][0]["ma"])
            ma_chunks = np.concatenate([np.asarray(i[layer][0]["ma"]) for i in inters], 1)
            np.testing.assert_allclose(ma_chunks, ma_whole, rtol=1e-5, atol=1e-7)


def test_greedy_generation_follows_the_causal_routers():
    model = _model("dtf")
    toks = _tokens(b=1, t=6)
    v = _init(model, toks, 4)
    out = G.generate(model, v["params"], toks, max_new_tokens=6, rng=jax.random.key(0),
                     model_state={"router_state": v["router_state"]})
    logits, _ = model.apply(v, out, mode="causal")
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0, 5:-1], -1)), np.asarray(out[0, 6:]))


def test_scheduled_beta_is_cosine_from_start_to_end():
    np.testing.assert_allclose(float(R.scheduled_beta(jnp.asarray(0.0), 0.1, 100.0)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(R.scheduled_beta(jnp.asarray(1.0), 0.1, 100.0)), 100.0, rtol=1e-6)
    np.testing.assert_allclose(float(R.scheduled_beta(jnp.asarray(0.5), 0.1, 100.0)), 50.05, rtol=1e-6)


def test_prior_loss_trains_only_the_prior_ffn_and_the_gate_only_its_scalars():
    """L_prior must not move the residual stream (a runaway drift otherwise), and G_cont must not
    reward blocks for inflating D_st: both see stop-gradient inputs."""
    model = _model("dtf")
    toks = _tokens()
    v = _init(model, toks, 5)

    def grads_of(name):
        def f(params):
            _, mut = model.apply({**v, "params": params}, toks, mutable=["intermediates"])
            (_, aux) = _
            if name == "prior":
                return aux["loss/prior"]
            return jnp.sum(mut["intermediates"]["router_1"][0]["g_cont"])
        return jax.grad(f)(v["params"])

    nonzero = lambda tree: any(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(tree))
    g = grads_of("prior")
    assert nonzero(g["routers_1"]["prior_ffn"]) and nonzero(g["routers_3"]["prior_ffn"])
    for k in ("embed_tokens", "layers_0", "layers_1", "layers_2"):
        assert not nonzero(g[k]), k
    g = grads_of("gate")
    assert nonzero({k: g["routers_1"][k] for k in ("beta_ce_raw", "beta_cu_raw", "o_ce_raw", "m_cu_raw")})
    for k in ("embed_tokens", "layers_0"):
        assert not nonzero(g[k]), k
    assert not nonzero(g["routers_1"]["prior_ffn"])
