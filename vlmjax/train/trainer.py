"""The one trainer core shared by every task.

Abstract init -> shardings from logical-axis rules -> params created already sharded
(big_vision ``train.py``, flax ``examples/lm1b``); one jitted step with explicit in/out shardings and
donated state, the step folded into the RNG (big_vision ``update_fn``, MaxText ``train_utils``);
orbax checkpoints of state + grain iterator + config with automatic resume (MaxText
``checkpointing.py``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from vlmjax import sharding as shd
from vlmjax import tasks as tasks_lib
from vlmjax.train import checkpoint as ckpt_lib
from vlmjax.train import config as config_lib
from vlmjax.train import metrics as metrics_lib
from vlmjax.train import optimizer as opt_lib
from vlmjax.train.state import TrainState


# ------------------------------------------------------------------------------------------------
# State creation
# ------------------------------------------------------------------------------------------------

class Trainer:
    """Builds the sharded state and the jitted steps for a task on a mesh.

    Importable on its own (tests, benchmarks) without the loop in ``run``.
    """

    def __init__(self, config, task: tasks_lib.Task, mesh):
        self.config = config
        self.task = task
        self.mesh = mesh
        self.rules = shd.rules_from_config(config)
        self.accum = int(config.optim.grad_accum_steps)

        rng = jax.random.PRNGKey(config.seed)
        # Abstract, boxed variables: shapes and logical axis names, no memory. Init runs outside the
        # mesh context: its output shardings come from out_shardings, and flax's DenseGeneral would
        # otherwise constrain its kernel before reshaping it to the logical rank.
        boxed = jax.eval_shape(task.init_variables, rng)
        var_shardings = shd.logical_to_shardings(boxed, mesh, self.rules)
        abstract_vars = nn.meta.unbox(boxed)
        self.tx, self.schedule = opt_lib.make_optimizer(
            config.optim, abstract_vars["params"], config.total_steps)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_vars["params"])
        repl = shd.replicated(mesh)
        opt_shardings = _opt_state_shardings(abstract_opt, abstract_vars["params"],
                                             var_shardings["params"], repl)
        self.state_shardings = TrainState(
            step=repl,
            params=var_shardings["params"],
            opt_state=opt_shardings,
            model_state={c: var_shardings[c] for c in task.state_collections},
            rng=repl,
        )
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self._init_state, rng), self.state_shardings)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, None),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.state_shardings.params, self.state_shardings.model_state, None),
            out_shardings=repl,
        )

    def _ctx(self):
        """Mesh + logical rules in scope while tracing, so ``nn.with_logical_constraint`` binds.

        The abstract mesh (unlike ``jax.set_mesh``) may be entered inside a jitted function, so the
        steps carry their own context and callers need none.
        """
        return _Stack(jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh),
                      nn.logical_axis_rules(self.rules))

    # -- pure functions (traced once) ------------------------------------------------------------
    def _init_state(self, rng) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = nn.meta.unbox(self.task.init_variables(init_rng))
        params = variables["params"]
        model_state = {c: variables[c] for c in self.task.state_collections}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          model_state=model_state, rng=state_rng)

    def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(self.task.loss_fn, has_aux=True)

        with self._ctx():
            if self.accum == 1:
                (loss, aux), grads = grad_fn(state.params, state.model_state, batch, rng, state.step)
                metrics, model_state = aux["metrics"], aux["model_state"]
            else:
                # Micro-batch i takes rows i, i+A, i+2A, ...: every device keeps an equal share of
                # each micro-batch (a contiguous split would leave most devices idle).
                def split(x):
                    x = x.reshape((x.shape[0] // self.accum, self.accum) + x.shape[1:]).swapaxes(0, 1)
                    return jax.lax.with_sharding_constraint(
                        x, NamedSharding(self.mesh, P(None, shd.BATCH_AXES)))
                micro = jax.tree.map(split, batch)

                def body(carry, xs):
                    g_acc, ms, i = carry
                    mb = xs
                    (l, a), g = grad_fn(state.params, ms, mb, jax.random.fold_in(rng, i), state.step)
                    g_acc = jax.tree.map(lambda acc, gi: acc + gi.astype(jnp.float32), g_acc, g)
                    return (g_acc, a["model_state"], i + 1), (l, a["metrics"])

                zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
                (grads, model_state, _), (losses, ms_metrics) = jax.lax.scan(
                    body, (zeros, state.model_state, 0), micro)
                grads = jax.tree.map(lambda g: g / self.accum, grads)
                loss = losses.mean()
                metrics = jax.tree.map(jnp.mean, ms_metrics)

        model_state = jax.lax.stop_gradient(model_state)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        consecutive, total = opt_lib.nonfinite_counts(opt_state)
        out = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "nonfinite_consecutive": consecutive,
            "nonfinite_total": total,
            **{k: v for k, v in metrics.items() if k != "loss"},
        }
        # A skipped update must not advance model_state either (it was computed from bad values).
        finite = consecutive == 0
        model_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), model_state,
                                   state.model_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, out

    def _eval_step(self, params, model_state, batch):
        with self._ctx():
            return self.task.eval_fn(params, model_state, batch)

    # -- helpers ---------------------------------------------------------------------------------
    def init(self) -> TrainState:
        return self._init(jax.random.PRNGKey(self.config.seed))

    def put(self, batch):
        return shd.put_batch(batch, self.mesh)

    def evaluate(self, state: TrainState, batches) -> dict[str, float]:
        sums: dict[str, float] = {}
        for b in batches:
            out = jax.device_get(self.eval_step(state.params, state.model_state, self.put(b)))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return self.task.finalize_eval(sums)


def _opt_state_shardings(abstract_opt, abstract_params, param_shardings, replicated):
    """Optimizer moments follow their parameter's sharding; counters and scalars are replicated.

    An optimizer-state leaf belongs to the parameter whose dict path is the longest suffix of the
    leaf's dict path (optax nests params-shaped trees under chain / multi_transform / masked
    states) and whose shape matches. Path matching, unlike ``optax.tree_map_params``, copes with
    the ``MaskedNode`` holes that frozen groups leave in masked states.
    """
    def dict_path(path):
        return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))

    flat_p = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_s = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    by_path = {dict_path(k): (v.shape, s) for (k, v), s in zip(flat_p, flat_s)}

    def pick(path, leaf):
        keys = dict_path(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


class _Stack:
    """Enters several context managers (abstract mesh and flax rules) as one."""

    def __init__(self, *cms):
        self.cms = cms

    def __enter__(self):
        for cm in self.cms:
            cm.__enter__()
        return self

    def __exit__(self, *exc):
        for cm in reversed(self.cms):
            cm.__exit__(*exc)
        return False


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def _override(params, loaded):
    """``params`` with the leaves present in the (possibly partial) nested dict ``loaded`` replaced."""
    if not isinstance(loaded, dict):
        return loaded
    out = dict(params)
    for k, v in loaded.items():
        if k not in params:
            raise ValueError(f"Pretrained param {k!r} does not exist in the model (have {sorted(params)}).")
        out[k] = _override(params[k], v)
    return out


def _config_dict(config) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


class _Preempted:
    """SIGTERM (TPU maintenance, SLURM preemption): finish the step, checkpoint, exit cleanly."""

    def __init__(self):
        self.flag = False
        try:
            self._prev = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._prev = None

    def _handler(self, *_):
        self.flag = True

    def restore(self):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def run(config, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint. Returns a summary."""
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0

    task = tasks_lib.build(config, workdir)
    mesh = shd.make_mesh(config.mesh)
    config_lib.validate_for_mesh(config, shd.data_parallel_size(mesh), jax.process_count())
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        print(f"vlmjax: task={config.task} devices={jax.device_count()} processes={jax.process_count()} "
              f"mesh={dict(mesh.shape)} workdir={workdir}", flush=True)

    trainer = Trainer(config, task, mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
    ds = task.train_dataset(global_batch_size=config.batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(ds)
    eval_batches = task.eval_batches(global_batch_size=config.batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpts,
                                 every=config.ckpt_every or config.total_steps,
                                 async_save=config.async_ckpt)
    restored = ckpt.restore_latest(trainer.abstract_state, data_iter)
    if restored is not None:
        state, start = restored
        if is_main:
            print(f"Resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
    else:
        state, start = trainer.init(), 0
        loaded = task.pretrained_params(trainer.abstract_state.params, trainer.state_shardings.params)
        if loaded is not None:
            state = state.replace(params=_override(state.params, loaded))
            if is_main:
                n = len(jax.tree.leaves(loaded))
                print(f"Initialised {n} of {len(jax.tree.leaves(state.params))} param arrays from "
                      "pretrained checkpoints", flush=True)
    if is_main:
        print(f"params: {n_params:,} ({n_params / 1e6:.2f}M)", flush=True)

    writer = metrics_lib.MetricWriter(workdir, config)
    cfg_dict = _config_dict(config)
    units_per_step = task.units_per_step(config.batch_size)
    summary: dict[str, Any] = {"params": n_params}

    def do_eval(step):
        t0 = time.perf_counter()
        res = trainer.evaluate(state, eval_batches)
        res["eval_time_s"] = time.perf_counter() - t0
        writer.write(step, res, kind="eval")
        return res

    if start == 0 and config.eval_at_start:
        summary["eval_start"] = do_eval(0)

    preempt = _Preempted()
    stop_at = config.total_steps
    if config.stop_after:
        stop_at = min(stop_at, config.stop_after)
    t_run = time.perf_counter()
    t_last, wait_s, steps_since = time.perf_counter(), 0.0, 0
    step = start
    last_train: dict[str, Any] = {}
    try:
        while step < stop_at:
            t0 = time.perf_counter()
            batch = trainer.put(next(data_iter))
            wait_s += time.perf_counter() - t0
            state, m = trainer.train_step(state, batch)
            step += 1
            steps_since += 1

            if step % config.log_every == 0 or step == stop_at:
                m = jax.device_get(m)  # blocks: the interval's time now covers its device work
                now = time.perf_counter()
                dt = (now - t_last) / steps_since
                loss = float(m["loss"])
                rec = {
                    "loss": loss,
                    "lr": float(trainer.schedule(step - 1)),
                    "grad_norm": float(m["grad_norm"]),
                    f"{task.units}_per_s": units_per_step / dt,
                    "step_time_s": dt,
                    "data_wait_frac": wait_s / max(now - t_last, 1e-9),
                    "nonfinite_skipped": int(m["nonfinite_total"]),
                    **{k: float(v) for k, v in m.items()
                       if k not in ("loss", "grad_norm", "nonfinite_total", "nonfinite_consecutive")},
                }
                eta = (config.total_steps - step) * dt
                line = (f"step {step}/{config.total_steps} loss {loss:.4f} lr {rec['lr']:.2e} "
                        f"gnorm {rec['grad_norm']:.3f} {units_per_step / dt:,.0f} {task.units}/s "
                        f"step {dt * 1e3:.1f}ms data-wait {100 * rec['data_wait_frac']:.1f}% "
                        f"ETA {metrics_lib.format_eta(eta)}")
                extra = task.log_summary(rec)
                line += f" | {extra}" if extra else ""
                writer.write(step, rec, line=line)
                last_train = rec
                t_last, wait_s, steps_since = time.perf_counter(), 0.0, 0
                if int(m["nonfinite_consecutive"]) >= config.optim.max_consecutive_nonfinite:
                    raise FloatingPointError(
                        f"Non-finite loss or gradients for {int(m['nonfinite_consecutive'])} consecutive "
                        f"steps up to step {step} (loss={loss}). Those updates were skipped, so the "
                        f"parameters and the checkpoints in {ckpt.directory} are clean. Lower "
                        f"config.optim.lr, raise config.optim.warmup_steps, or check the data.")

            if config.eval_every and step % config.eval_every == 0 and step != stop_at:
                do_eval(step)
            ckpt.save(step, state, data_iter, cfg_dict)
            if preempt.flag:
                if is_main:
                    print(f"SIGTERM received: checkpointing at step {step} and exiting.", flush=True)
                break
    finally:
        preempt.restore()

    if step not in ckpt.all_steps():
        ckpt.save(step, state, data_iter, cfg_dict, force=True)
    ckpt.close()
    if step >= config.total_steps or step == stop_at:
        summary["eval_end"] = do_eval(step)
    summary.update(task.on_end(state, mesh) if step >= config.total_steps else {})
    summary.update(step=step, wall_time_s=time.perf_counter() - t_run, last_train=last_train)
    if is_main:
        start_loss = summary.get("eval_start", {}).get("loss")
        end_loss = summary.get("eval_end", {}).get("loss")
        print(f"done: step {step}, wall {summary['wall_time_s']:.1f}s"
              + (f", eval loss {start_loss:.4f} -> {end_loss:.4f}" if start_loss is not None and end_loss is not None
                 else (f", eval loss {end_loss:.4f}" if end_loss is not None else "")), flush=True)
    writer.write(step, {"wall_time_s": summary["wall_time_s"]}, kind="summary",
                 line=f"summary: {json.dumps({k: v for k, v in summary.items() if k != 'last_train'}, default=str)}")
    writer.close()
    return summary
