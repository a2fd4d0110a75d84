"""Trainer core on one device: gradient accumulation, frozen groups, mixed precision, RNG folding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config
from vlmjax import sharding as shd
from vlmjax import tasks
from vlmjax.train import Trainer
from vlmjax.tree import path_str


def _trainer(**overrides):
    cfg = smoke_config(**{"optim.warmup_steps": 0, **overrides})
    task = tasks.build(cfg, None)
    tr = Trainer(cfg, task, shd.make_mesh(cfg.mesh))
    batch = next(iter(task.train_dataset(global_batch_size=cfg.batch_size, seed=0, process_index=0,
                                         process_count=1)))
    return tr, tr.put(batch)


def _flat(tree):
    return {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_grad_accumulation_equals_full_batch():
    tr1, batch = _trainer()
    tr2, _ = _trainer(**{"optim.grad_accum_steps": 4})
    s1, m1 = tr1.train_step(tr1.init(), batch)
    s2, m2 = tr2.train_step(tr2.init(), batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    a, b = _flat(s1.params), _flat(s2.params)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)  # Adam amplifies fp32 summation-order noise


def test_frozen_group_is_untouched_and_others_train():
    tr, batch = _trainer(**{"optim.frozen": ("^embed",)})
    s0 = tr.init()
    before = _flat(s0.params)
    s1, _ = tr.train_step(s0, batch)
    after = _flat(s1.params)
    frozen = [k for k in before if k.startswith("embed")]
    assert frozen
    for k in before:
        same = np.array_equal(before[k], after[k])
        assert same == (k in frozen), k


def test_frozen_params_are_not_differentiated():
    """The step differentiates only the trainable params: freezing every layer's kernels removes
    their weight-gradient matmuls from the compiled step (a LoRA base costs no weight gradients),
    and accumulation agrees with the full batch when some params are frozen."""
    def step_flops(tr, batch):
        cost = tr.train_step.lower(tr.abstract_state, batch).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    full, batch = _trainer()
    frozen, _ = _trainer(**{"optim.frozen": (r"^layers_\d+/(self_attn|mlp)/",)})
    assert frozen._trainable_idx and len(frozen._trainable_idx) < len(full._trainable_idx)
    assert step_flops(frozen, batch) < 0.9 * step_flops(full, batch)
    accum, _ = _trainer(**{"optim.frozen": (r"^layers_\d+/(self_attn|mlp)/",), "optim.grad_accum_steps": 2})
    s1, m1 = frozen.train_step(frozen.init(), batch)
    s2, m2 = accum.train_step(accum.init(), batch)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for k, v in _flat(s1.params).items():
        np.testing.assert_allclose(v, _flat(s2.params)[k], atol=2e-5, err_msg=k)


def test_bf16_compute_keeps_fp32_params_and_trains():
    tr, batch = _trainer(**{"model.dtype": "bfloat16"})
    state = tr.init()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    losses = []
    for _ in range(4):
        state, m = tr.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_step_is_deterministic_and_counts():
    tr, batch = _trainer()
    s_a, m_a = tr.train_step(tr.init(), batch)
    s_b, m_b = tr.train_step(tr.init(), batch)
    assert int(s_a.step) == 1
    np.testing.assert_array_equal(m_a["loss"], m_b["loss"])
    assert int(m_a["nonfinite_total"]) == 0


def test_impossible_batch_for_mesh_is_a_clear_error():
    from vlmjax.train import config as config_lib
    cfg = smoke_config(batch_size=6)
    with pytest.raises(ValueError, match="config.batch_size=6.*data-parallel size 4"):
        config_lib.validate_for_mesh(cfg, dp_size=4, process_count=1)
