"""TRM tiny recursive decoder and the recursive refiner (vlmjax/models/trm.py): tiny configs, CPU, fp32.

The recursion is checked against a hand-written composition of the shared net (``TRMNet`` applied to
the ``recursion/net`` params): recursion count and order, state carry, the last-cycle-only gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax import flops as flops_lib
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import generate as generate_lib
from vlmjax.models import layers
from vlmjax.models import trm

V = 97
DEC = decoder_lib.DecoderConfig(
    vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5, max_position_embeddings=128,
    attention_impl="einsum")
# One-layer net (compile time: the tests run on 2 CPU cores); the net loops over its layers the same
# way for any depth. A = 2 * 2 = 4 applications. Deep supervision on, so one compiled forward serves
# the tests of the logits and of the per-cycle hidden states.
CFG = trm.TRMConfig(decoder=DEC, num_cycles=2, latent_steps=1, deep_supervision=True)


def random_params(module: nn.Module, seed: int = 0, std: float = 0.1):
    """Random fp32 params with the tree of ``module.init`` (shapes from eval_shape: no init compile).
    Matrices and z_init ~ N(0, std^2), norm scales ~ 1 + N(0, 0.1^2)."""
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1.0 + 0.1 * noise)
        return jnp.asarray(std * noise)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def tokens(seed: int, shape) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


@functools.cache
def forward(model: nn.Module):
    """Jitted ``model.apply`` -> (logits, aux)."""
    return jax.jit(lambda params, t: model.apply({"params": params}, t))


def hand_recursion(config: trm.TRMConfig, params, toks, stop_after: int | None = None):
    """TRM written out by hand from the shared net: x = input_norm(embed), y = x, z = z_init;
    per cycle n x ``z = net(x + y + z)`` then ``y = net(y + z)``; logits = unembed(norm(y)).
    ``stop_after``: stop_gradient on (y, z) after that many cycles. Returns (logits, [norm(y_c)])."""
    c = config.decoder
    norm = lambda name, u: layers.RMSNorm(eps=c.rms_norm_eps).apply({"params": params[name]}, u)
    net = functools.partial(trm.TRMNet(c).apply, {"params": params["recursion"]["net"]})
    positions = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
    x = norm("input_norm", jnp.take(params["embed_tokens"]["embedding"], toks, axis=0))
    y, z = x, jnp.broadcast_to(params["z_init"], x.shape)
    per_cycle = []
    for cycle in range(config.num_cycles):
        if cycle == stop_after:
            y, z = jax.lax.stop_gradient((y, z))
        for _ in range(config.latent_steps):
            z = net(x + y + z, positions)
        y = net(y + z, positions)
        per_cycle.append(norm("norm", y))
    logits = jnp.einsum("btd,vd->btv", per_cycle[-1], params["embed_tokens"]["embedding"])
    return logits, jnp.stack(per_cycle)


@functools.cache
def hand(num_cycles: int, latent_steps: int):
    """Jitted ``hand_recursion`` for (T, n) with the DEC net."""
    cfg = dataclasses.replace(CFG, num_cycles=num_cycles, latent_steps=latent_steps)
    return jax.jit(functools.partial(hand_recursion, cfg))


SHAPE = (2, 8)  # every forward of the tiny models uses this shape: one compilation each


@pytest.fixture(scope="module")
def base():
    model = trm.TRMDecoder(CFG)
    return model, random_params(model)


# ----------------------------------------------------------------------------- recursion


def test_recursion_equals_hand_composition_and_counts_applications(base):
    model, params = base
    toks = tokens(0, SHAPE)
    logits, aux = forward(model)(params, toks)
    assert logits.shape == SHAPE + (V,) and logits.dtype == jnp.float32
    assert int(aux["trm/applications"]) == CFG.num_applications == 4
    ref, _ = hand(2, 1)(params, toks)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)
    # Every application has its own KV-cache slot: the cache is stacked on a leading [A] axis.
    cache = decoder_lib.init_cache(model, batch_size=1, max_len=5)
    assert cache["recursion"]["net"]["layers_0"]["self_attn"]["cached_key"].shape == (4, 1, 5, 2, 8)


def test_single_application_is_net_once(base):
    """T = 1, n = 0: one application, logits = unembed(norm(net(x + z0))) (y0 = x)."""
    _, params = base
    toks = tokens(1, SHAPE)
    logits, aux = forward(trm.TRMDecoder(dataclasses.replace(CFG, num_cycles=1, latent_steps=0)))(params, toks)
    assert int(aux["trm/applications"]) == 1
    ref, _ = hand(1, 0)(params, toks)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)


def test_state_carry_z_init_and_cycles_change_outputs(base):
    model, params = base
    toks = tokens(2, SHAPE)
    logits, _ = forward(model)(params, toks)
    moved = {**params, "z_init": params["z_init"] + 0.5}
    logits_z, _ = forward(model)(moved, toks)
    assert not np.allclose(logits, logits_z, atol=1e-3)  # z0 reaches the output through the carry
    # Same params, one more cycle: the carried state is refined once more.
    logits_3, aux_3 = forward(trm.TRMDecoder(dataclasses.replace(CFG, num_cycles=3)))(params, toks)
    assert int(aux_3["trm/applications"]) == 6
    assert not np.allclose(logits, logits_3, atol=1e-3)


def test_deep_supervision_aux(base):
    model, params = base
    toks = tokens(4, SHAPE)
    logits, aux = forward(model)(params, toks)
    hidden = aux["trm/cycle_hidden"]
    assert hidden.shape == (2,) + SHAPE + (32,)  # [T_cycles, B, T, D]
    _, ref_cycles = hand(2, 1)(params, toks)
    np.testing.assert_allclose(hidden, ref_cycles, atol=1e-5, rtol=1e-5)
    per_cycle = model.apply({"params": params}, hidden, method=trm.TRMDecoder.cycle_logits)
    assert per_cycle.shape == (2,) + SHAPE + (V,)
    np.testing.assert_allclose(per_cycle[-1], logits, atol=1e-5)
    assert not np.allclose(per_cycle[0], logits, atol=1e-3)


def _truncation_setup():
    cfg = dataclasses.replace(CFG, deep_supervision=False)
    truncated_model = trm.TRMDecoder(dataclasses.replace(cfg, grad_last_cycle_only=True))
    params = random_params(truncated_model, seed=5)
    toks = tokens(3, (1, 6))
    w = jax.random.normal(jax.random.key(9), (1, 6, V))
    loss = lambda logits: jnp.sum(logits * w)
    model_grad = lambda m: jax.jit(jax.grad(lambda p: loss(m.apply({"params": p}, toks)[0])))
    return cfg, truncated_model, params, toks, loss, model_grad


def test_grad_last_cycle_only_truncates_the_backward_pass():
    """With ``grad_last_cycle_only`` the backward pass has no loop for the first T - 1 cycles
    (forward: 2 scans, backward: 1 = 3 while loops, against 2 with full backprop), and z_init, which
    reaches the loss only through the first cycle's latent updates, gets exactly zero gradient while
    the shared net still gets one (from the last cycle)."""
    cfg, truncated_model, params, _, _, model_grad = _truncation_setup()
    lowered = model_grad(truncated_model).lower(params)
    loops_full = model_grad(trm.TRMDecoder(cfg)).lower(params).as_text().count("stablehlo.while")
    assert (lowered.as_text().count("stablehlo.while"), loops_full) == (3, 2)
    truncated = lowered.compile()(params)
    np.testing.assert_array_equal(truncated["z_init"], 0.0)
    assert np.abs(truncated["recursion"]["net"]["layers_0"]["mlp"]["up_proj"]["kernel"]).max() > 1e-4


@pytest.mark.slow
def test_grad_last_cycle_only_equals_stop_gradient_reference():
    """The truncated gradients equal those of the hand-written recursion with the first T - 1 cycles
    under stop_gradient, and differ from full backpropagation (also checked against the hand-written
    recursion)."""
    cfg, truncated_model, params, toks, loss, model_grad = _truncation_setup()
    truncated = model_grad(truncated_model)(params)
    full = model_grad(trm.TRMDecoder(cfg))(params)
    ref_grad = lambda stop: jax.grad(lambda p: loss(hand_recursion(cfg, p, toks, stop_after=stop)[0]))
    ref_truncated, ref_full = jax.jit(lambda p: (ref_grad(1)(p), ref_grad(None)(p)))(params)
    close = lambda a, b: jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=2e-5, rtol=1e-4), a, b)
    close(truncated, ref_truncated)
    close(full, ref_full)
    assert np.abs(full["z_init"]).max() > 1e-4
    net_t, net_f = (g["recursion"]["net"]["layers_0"]["mlp"]["up_proj"]["kernel"] for g in (truncated, full))
    assert not np.allclose(net_t, net_f, atol=1e-4)


def test_causal_future_tokens_do_not_change_past_logits(base):
    model, params = base
    a = tokens(5, SHAPE)
    b = a.at[:, 5:].set(tokens(6, (2, 3)))
    la, _ = forward(model)(params, a)
    lb, _ = forward(model)(params, b)
    np.testing.assert_allclose(la[:, :5], lb[:, :5], atol=1e-6)
    assert not np.allclose(la[:, 5:], lb[:, 5:], atol=1e-3)


# ----------------------------------------------------------------------------- decoding


def _argmax_rollout(model, params, prompt, steps):
    """Greedy decoding by full recompute (no cache) in a fixed-size buffer (causal: the junk after the
    current token is irrelevant)."""
    p = prompt.shape[1]
    seq = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], steps), prompt.dtype)], 1)
    for i in range(steps):
        logits, _ = forward(model)(params, seq)
        seq = seq.at[:, p + i].set(jnp.argmax(logits[:, p + i - 1], -1).astype(seq.dtype))
    return seq


def test_trm_generate_equals_recompute(base):
    """KV-cache prefill + one-token steps (each application reading its own cache slot) give the
    tokens of greedy decoding by full recompute."""
    model, params = base
    prompt = tokens(8, (2, 4))
    out = generate_lib.generate(model, params, prompt, max_new_tokens=4, rng=jax.random.key(0))
    np.testing.assert_array_equal(out, _argmax_rollout(model, params, prompt, 4))


# ----------------------------------------------------------------------------- refiner

REFINER = trm.RefinerConfig(steps=3, latent_size=8, intermediate_size=16)


@pytest.fixture(scope="module")
def refined():
    """A RefinedDecoder with its refiner as ``init`` makes it over random decoder weights, and the
    plain Decoder with the same decoder weights."""
    plain = decoder_lib.Decoder(DEC)
    model = trm.RefinedDecoder(DEC, refiner=REFINER)
    dec_params = random_params(plain, seed=1)
    refiner = trm.RecursiveRefiner(REFINER, hidden_size=DEC.hidden_size)
    init = nn.unbox(jax.jit(refiner.init)(jax.random.key(1), jnp.zeros((1, 1, DEC.hidden_size))))["params"]
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    assert jax.tree.structure(abstract["trm_refiner"]) == jax.tree.structure(init)
    return plain, model, dec_params, {**dec_params, "trm_refiner": init}


def test_refiner_is_exact_identity_at_init_and_not_after_a_step(refined):
    plain, model, dec_params, params = refined
    toks = tokens(10, SHAPE)
    ref, _ = forward(plain)(dec_params, toks)
    logits, aux = forward(model)(params, toks)
    np.testing.assert_array_equal(logits, ref)  # bit for bit
    assert float(aux["trm_refiner/update_rms"]) == 0.0

    targets = tokens(11, SHAPE)

    def loss(refiner_params):
        lg, _ = model.apply({"params": {**params, "trm_refiner": refiner_params}}, toks)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), targets[..., None], -1))

    grads = jax.jit(jax.grad(loss))(params["trm_refiner"])
    # Only the zero-initialised out_proj gets a gradient at init (everything else is behind it).
    assert np.abs(grads["out_proj"]["kernel"]).max() > 1e-3
    for name in ("in_proj", "gate_proj", "up_proj", "down_proj"):
        np.testing.assert_array_equal(grads[name]["kernel"], 0.0)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params["trm_refiner"], grads)
    logits_1, aux_1 = forward(model)({**params, "trm_refiner": stepped}, toks)
    assert np.abs(logits_1 - ref).max() > 1e-3
    assert float(aux_1["trm_refiner/update_rms"]) > 0


def test_refiner_grad_last_step_only_keeps_the_decoder_gradient():
    h0 = jax.random.normal(jax.random.key(4), (1, 5, DEC.hidden_size))
    full_model = trm.RecursiveRefiner(REFINER, hidden_size=DEC.hidden_size)
    last_model = trm.RecursiveRefiner(dataclasses.replace(REFINER, grad_last_step_only=True),
                                      hidden_size=DEC.hidden_size)
    abstract = nn.unbox(jax.eval_shape(full_model.init, jax.random.key(0), h0))["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), abstract)

    def grads(m):
        return jax.grad(lambda p, h: jnp.sum(m.apply({"params": p}, h)[0] ** 2), argnums=(0, 1))(params, h0)

    (g_full, _), (g_last, dh_last) = jax.jit(lambda: (grads(full_model), grads(last_model)))()
    assert not np.allclose(g_full["in_proj"]["kernel"], g_last["in_proj"]["kernel"], atol=1e-5)
    assert np.abs(dh_last).max() > 0  # h0 (the decoder's output) keeps its gradient path


def test_refined_decoder_generate_equals_recompute(refined):
    _, model, _, params = refined
    # A trained-looking refiner (random out_proj), so the refinement really changes the logits.
    rng = np.random.default_rng(3)
    refiner = jax.tree.map(lambda a: a + jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32),
                           params["trm_refiner"])
    params = {**params, "trm_refiner": refiner}
    prompt = tokens(13, (2, 4))
    out = generate_lib.generate(model, params, prompt, max_new_tokens=4, rng=jax.random.key(0))
    np.testing.assert_array_equal(out, _argmax_rollout(model, params, prompt, 4))


# ----------------------------------------------------------------------------- config, axes, FLOPs


def test_every_param_has_logical_axes():
    for model in (trm.TRMDecoder(CFG), trm.RefinedDecoder(DEC, refiner=REFINER)):
        boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)


def test_config_validation_names_the_field():
    bad = {
        "num_cycles": dict(num_cycles=0),
        "latent_steps": dict(latent_steps=-1),
        "grad_last_cycle_only": dict(grad_last_cycle_only=1),
        "deep_supervision=True with": dict(deep_supervision=True, grad_last_cycle_only=True),
        "scan_layers": dict(decoder=dataclasses.replace(DEC, scan_layers=True)),
    }
    for field, overrides in bad.items():
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(CFG, **overrides).validate()
    for field in ("steps", "latent_size"):
        with pytest.raises(ValueError, match=f"trm_refiner.{field}"):
            dataclasses.replace(REFINER, **{field: 0}).validate()
    model_cd = decoder_lib.default_config()
    model_cd.update(dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2))
    cfg = trm.TRMConfig.from_config(model_cd, trm.default_config(), vocab_size=V)
    assert cfg.decoder.num_hidden_layers == 2 and cfg.num_cycles == 3 and cfg.latent_steps == 6
    with pytest.raises(ValueError, match="did you mean 'num_cycles'"):
        trm.TRMConfig.from_config(model_cd, {"num_cycle": 2}, vocab_size=V)
    assert trm.RefinerConfig.from_config(trm.refiner_default_config()) == trm.RefinerConfig()


def test_flops_formula():
    seq = 32
    one = dataclasses.replace(CFG, num_cycles=1, latent_steps=0)  # as in test_single_application
    plain = dataclasses.replace(CFG, deep_supervision=False)
    # The smallest TRM is the L-layer decoder.
    assert trm.trm_flops_per_token(one, seq) == flops_lib.decoder_forward_flops(DEC, seq) / seq
    net = DEC.num_hidden_layers * flops_lib.decoder_layer_forward_flops(DEC, seq) / seq
    head = 2.0 * DEC.hidden_size * V
    assert trm.trm_flops_per_token(plain, seq) == pytest.approx(4 * net + head)
    assert trm.trm_train_flops_per_token(plain, seq) == pytest.approx(3 * (4 * net + head))
    assert trm.trm_train_flops_per_token(dataclasses.replace(plain, grad_last_cycle_only=True), seq) == \
        pytest.approx(4 * net + 2 * 2 * net + 3 * head)
    assert trm.trm_train_flops_per_token(CFG, seq) == pytest.approx(3 * (4 * net + head) + 3 * head)
    # XLA counts a scan body once: the T = 1, n = 0 model is one application (+ head), elementwise
    # work (norms, RoPE, softmax) making up the difference at these tiny widths.
    m = trm.TRMDecoder(one)
    params = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    cost = forward(m).lower(params, jax.ShapeDtypeStruct(SHAPE, jnp.int32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    analytic = SHAPE[0] * SHAPE[1] * trm.trm_flops_per_token(one, SHAPE[1])
    assert float(cost["flops"]) == pytest.approx(analytic, rel=0.15)
    assert trm.refiner_flops_per_token(REFINER, 32) == 3 * (2 * 32 * 8 + 6 * 8 * 16 + 2 * 8 * 32)
