"""Optimizer from config: schedules, frozen and per-group learning rates, decay mask, non-finite skip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.train import optimizer


def _params():
    return {"embed": {"embedding": jnp.ones((8, 4))},
            "layers_0": {"attn": {"q_proj": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}},
                         "mlp": {"up_proj": {"kernel": jnp.ones((4, 4))}},
                         "input_layernorm": {"scale": jnp.ones((4,))}}}


def _cfg(**kw):
    c = optimizer.default_config()
    c.update({**dict(warmup_steps=0, schedule="constant", lr=0.1, clip_norm=0.0, weight_decay=0.0), **kw})
    return c


def _update(cfg, grads=None, steps=1):
    params = _params()
    tx, _ = optimizer.make_optimizer(cfg, params, 100)
    state = tx.init(params)
    grads = grads or jax.tree.map(jnp.ones_like, params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
    return updates, state


def test_frozen_params_get_no_update_and_groups_scale_lr():
    u, _ = _update(_cfg(frozen=("^embed/",), lr_groups=(("attn/", 0.1),)))
    assert float(jnp.abs(u["embed"]["embedding"]).max()) == 0.0
    mlp = float(jnp.abs(u["layers_0"]["mlp"]["up_proj"]["kernel"]).max())
    attn = float(jnp.abs(u["layers_0"]["attn"]["q_proj"]["kernel"]).max())
    assert mlp == pytest.approx(0.1, rel=1e-3)   # Adam's first step moves each weight by ~lr
    assert attn == pytest.approx(0.01, rel=1e-3)


def test_frozen_grads_do_not_count_in_clipping():
    grads = jax.tree.map(jnp.zeros_like, _params())
    grads["embed"]["embedding"] = jnp.full((8, 4), 1e6)
    grads["layers_0"]["mlp"]["up_proj"]["kernel"] = jnp.ones((4, 4))
    u, _ = _update(_cfg(frozen=("^embed/",), clip_norm=1.0, name="sgd", b1=0.0), grads)
    # Only the mlp grad (norm 4) is clipped to norm 1: each entry 0.25, times lr 0.1, negated.
    np.testing.assert_allclose(u["layers_0"]["mlp"]["up_proj"]["kernel"], -0.025, rtol=1e-5)


def test_clip_groups_have_their_own_norm():
    grads = jax.tree.map(jnp.zeros_like, _params())
    grads["embed"]["embedding"] = jnp.full((8, 4), 1e6)   # a huge auxiliary-loss gradient
    grads["layers_0"]["mlp"]["up_proj"]["kernel"] = jnp.full((4, 4), 0.1)  # norm 0.4 < 1
    sgd = dict(clip_norm=1.0, name="sgd", b1=0.0)
    u, _ = _update(_cfg(clip_groups=("^embed/",), **sgd), grads)
    # The mlp grad is under its own limit: untouched (lr 0.1 * 0.1); the embed group is clipped to 1.
    np.testing.assert_allclose(u["layers_0"]["mlp"]["up_proj"]["kernel"], -0.01, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(u["embed"]["embedding"]), 0.1, rtol=1e-5)
    u, _ = _update(_cfg(**sgd), grads)  # one shared norm: the embed grad shrinks the mlp update to ~0
    assert float(jnp.abs(u["layers_0"]["mlp"]["up_proj"]["kernel"]).max()) < 1e-7
    with pytest.raises(ValueError, match="clip_groups"):
        _update(_cfg(clip_groups=("^nothing/",), **sgd), grads)


def test_weight_decay_only_on_matrices():
    zero = jax.tree.map(jnp.zeros_like, _params())
    u, _ = _update(_cfg(weight_decay=0.5), zero)
    assert float(jnp.abs(u["layers_0"]["mlp"]["up_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(u["layers_0"]["input_layernorm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(u["layers_0"]["attn"]["q_proj"]["bias"]).max()) == 0.0


def test_nonfinite_update_is_skipped_and_counted():
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), _params())
    u, state = _update(_cfg(), bad, steps=3)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
    consecutive, total = optimizer.nonfinite_counts(state)
    assert int(consecutive) == 3 and int(total) == 3


def test_schedules():
    c = optimizer.default_config()
    c.update(dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine"))
    s = optimizer.make_schedule(c, 100)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
    assert float(s(100)) == pytest.approx(0.1, rel=1e-4)
    assert float(s(55)) == pytest.approx(0.55, rel=1e-2)   # cosine midpoint between 1 and 0.1
    c.schedule = "linear"
    assert float(optimizer.make_schedule(c, 100)(55)) == pytest.approx(0.55, rel=1e-2)
    c.schedule = "nope"
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optimizer.make_schedule(c, 100)


def test_bad_regex_and_unmatched_frozen_are_errors():
    with pytest.raises(ValueError, match="matches no parameter"):
        _update(_cfg(frozen=("^vision/",)))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        _update(_cfg(frozen=("([",)))


def test_nonfinite_update_from_a_corrupted_optimizer_state_is_skipped():
    # Finite gradients, but a NaN first moment (a corrupted or overflowed optimizer state): the
    # update itself is NaN. optax.apply_if_finite checks only the gradients and would apply it.
    params = _params()
    tx, _ = optimizer.make_optimizer(_cfg(), params, 100)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, tx.init(params), params)
    poison = lambda path, x: (jnp.full_like(x, jnp.nan) if "mu" in jax.tree_util.keystr(path)
                              and jnp.issubdtype(x.dtype, jnp.floating) else x)
    state = jax.tree_util.tree_map_with_path(poison, state)
    updates, new_state = tx.update(grads, state, params)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(updates))
    assert [int(x) for x in optimizer.nonfinite_counts(new_state)] == [1, 1]
    # The old inner state is kept (not replaced by whatever the bad step computed).
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b, equal_nan=True)),
                        new_state.inner_state, state.inner_state)
    assert all(jax.tree.leaves(same))
    # The state type is optax's, so checkpoints written with apply_if_finite restore into it.
    import optax  # pylint: disable=g-import-not-at-top
    assert isinstance(new_state, optax.ApplyIfFiniteState)
