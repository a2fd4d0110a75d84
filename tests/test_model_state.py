"""Non-trainable model state (a Linen collection, like router moving averages) through the trainer:
updated by every step, never differentiated, threaded through gradient accumulation, checkpointed."""

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from conftest import smoke_config
from vlmjax import sharding as shd
from vlmjax import run as runner
from vlmjax import tasks, train
from vlmjax.tasks.base import Task


class CountingRegressor(nn.Module):
    """y = x @ w; the "stats" collection counts examples seen and sums x (a moving-average stand-in)."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp")), (4, 1))
        seen = self.variable("stats", "seen", jnp.zeros, (), jnp.float32)
        xsum = self.variable("stats", "xsum", jnp.zeros, (4,), jnp.float32)
        if not self.is_initializing():
            seen.value = seen.value + x.shape[0]
            xsum.value = xsum.value + x.sum(0)
        return (x @ w)[:, 0]


class _Source:
    def __init__(self, n=64):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, 4)).astype(np.float32)
        self.y = self.x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class RegressionTask(Task):
    state_collections = ("stats",)

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        self.model = CountingRegressor()
        self.source = _Source()

    def train_dataset(self, *, global_batch_size, seed, process_index, process_count):
        return (grain.MapDataset.source(self.source).shuffle(seed=seed).repeat().to_iter_dataset()
                .batch(global_batch_size // process_count))

    def eval_batches(self, *, global_batch_size, process_index, process_count):
        return [{"x": self.source.x[:8], "y": self.source.y[:8]}]

    def init_variables(self, rng):
        return self.model.init(rng, jnp.zeros((1, 4)))

    def loss_fn(self, params, model_state, batch, rng, step):
        pred, new_state = self.model.apply({"params": params, **model_state}, batch["x"], mutable=["stats"])
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"metrics": {"loss": loss}, "model_state": new_state}

    def eval_fn(self, params, model_state, batch):
        pred = self.model.apply({"params": params, **model_state}, batch["x"], mutable=["stats"])[0]
        return {"se": jnp.sum((pred - batch["y"]) ** 2), "n": jnp.float32(batch["x"].shape[0])}

    def finalize_eval(self, sums):
        return {"loss": sums["se"] / sums["n"]}


tasks.register("test_regression", RegressionTask)


def _cfg(**kw):
    return smoke_config(**{"task": "test_regression", "optim.lr": 0.1, "optim.warmup_steps": 0,
                           "optim.weight_decay": 0.0, "sample.max_new_tokens": 0, **kw})


def test_state_collection_is_updated_not_differentiated_and_accumulated():
    for accum in (1, 4):
        cfg = _cfg(**{"optim.grad_accum_steps": accum})
        task = tasks.build(cfg, None)
        tr = train.Trainer(cfg, task, shd.make_mesh(cfg.mesh))
        state = tr.init()
        batch = tr.put(next(iter(task.train_dataset(global_batch_size=8, seed=0, process_index=0, process_count=1))))
        for _ in range(3):
            state, m = tr.train_step(state, batch)
        # Every micro-batch updated the stats: 3 steps x 8 examples, whatever the accumulation.
        assert float(state.model_state["stats"]["seen"]) == 24.0
        np.testing.assert_allclose(state.model_state["stats"]["xsum"], 3 * np.asarray(batch["x"]).sum(0), rtol=1e-5)
        assert set(state.params) == {"w"}  # the collection is not a parameter: no grads, no optimizer
        assert {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim} == {(4, 1)}  # only w's moments


def test_state_collection_is_checkpointed_and_resumed(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    runner.run(_cfg(), full)
    runner.run(_cfg(stop_after=3), part)
    s = runner.run(_cfg(), part)
    assert s["step"] == 6
    from vlmjax.train.checkpoint import Checkpointer
    states = []
    for wd in (full, part):
        cfg = _cfg()
        task = tasks.build(cfg, None)
        tr = train.Trainer(cfg, task, shd.make_mesh(cfg.mesh))
        ck = Checkpointer(f"{wd}/checkpoints", keep=3, every=3)
        st, step = ck.restore_latest(tr.abstract_state, iter(task.train_dataset(
            global_batch_size=8, seed=0, process_index=0, process_count=1)))
        ck.close()
        assert step == 6
        states.append(st)
    assert float(states[0].model_state["stats"]["seen"]) == 48.0
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
