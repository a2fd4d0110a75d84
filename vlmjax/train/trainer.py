"""The one trainer core shared by every task.

Abstract init -> shardings from logical-axis rules -> params created already sharded
(big_vision ``train.py``, flax ``examples/lm1b``); a start from pretrained weights puts the loaded
arrays in the state as they are and initialises only the params they lack; one jitted step with
explicit in/out shardings and donated state, the step folded into the RNG (big_vision ``update_fn``,
MaxText ``train_utils``);
orbax checkpoints of state + grain iterator + config with automatic resume (MaxText
``checkpointing.py``).
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.extend import core as jex_core
from jax.sharding import NamedSharding, PartitionSpec as P

from vlmjax import sharding as shd
from vlmjax import tree
from vlmjax.train import checkpoint as ckpt_lib
from vlmjax.train import config as config_lib
from vlmjax.train import metrics as metrics_lib
from vlmjax.train import optimizer as opt_lib
from vlmjax.train import workdir_lock
from vlmjax.train.state import TrainState
from vlmjax.train.task import Task


# ------------------------------------------------------------------------------------------------
# State creation
# ------------------------------------------------------------------------------------------------

class Trainer:
    """Builds the sharded state and the jitted steps for a task on a mesh.

    Importable on its own (tests, benchmarks) without the loop in ``run``.
    """

    def __init__(self, config, task: Task, mesh):
        self.config = config
        self.task = task
        self.mesh = mesh
        self.rules = shd.rules_from_config(config)
        self.accum = int(config.optim.grad_accum_steps)

        rng = jax.random.PRNGKey(config.seed)
        # The task's init is traced once, here (flax's Python for a 30-layer decoder takes seconds on
        # a CPU host): its jaxpr gives the abstract, boxed variables (shapes and logical axis names,
        # no memory), and every init after (random, or around pretrained params) replays the jaxpr.
        # Init runs outside the mesh context: its output shardings come from out_shardings, and
        # flax's DenseGeneral would otherwise constrain its kernel before reshaping it to the logical
        # rank.
        init_jaxpr, boxed = jax.make_jaxpr(task.init_variables, return_shape=True)(rng)
        self._init_variables_flat = jex_core.jaxpr_as_fun(init_jaxpr)
        self._init_variables_tree = jax.tree.structure(boxed)
        var_shardings = shd.logical_to_shardings(boxed, mesh, self.rules)
        abstract_vars = nn.meta.unbox(boxed)
        optim_cfg = task.optimizer_config(config.optim)
        self.tx, self.schedule = opt_lib.make_optimizer(optim_cfg, abstract_vars["params"], config.total_steps)
        # Only the trainable params are differentiated: a frozen base (LoRA, a frozen tower) costs its
        # forward and the activation gradients, never its weight gradients (the optimizer would zero
        # them anyway; computing them was ~1/3 of a LoRA step's FLOPs).
        mask = jax.tree.leaves(opt_lib.trainable_mask(abstract_vars["params"], optim_cfg))
        self._trainable_idx = tuple(i for i, m in enumerate(mask) if m)
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
        # Pretrained arrays are donated: the state's params are the loaded buffers, not copies.
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings, donate_argnums=(1, 2))
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self._init_state, rng, None), self.state_shardings)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, None),
            out_shardings=(self.state_shardings, repl),
            donate_argnums=(0,),
        )
        self.eval_step = self.jit_eval(task.eval_fn)

    def _ctx(self):
        """Mesh + logical rules in scope while tracing, so ``nn.with_logical_constraint`` binds.

        The abstract mesh (unlike ``jax.set_mesh``) may be entered inside a jitted function, so the
        steps carry their own context and callers need none.
        """
        return _Stack(jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh),
                      nn.logical_axis_rules(self.rules))

    # -- pure functions (traced once) ------------------------------------------------------------
    def _init_state(self, rng, pretrained=None, pretrained_state=None) -> TrainState:
        """The step-0 state. rng: PRNG key (uint32[2]); pretrained: None, or a partial params tree
        of arrays the state takes as they are (see ``init``).

        The random init of a param ``pretrained`` has is a dead value here: jit's DCE drops it from
        the jaxpr before lowering, so the compiled program neither holds nor runs it (and the params
        it lacks get exactly the values of the random init with the same rng). The optimizer state
        is built from the final params.
        """
        init_rng, state_rng = jax.random.split(rng)
        variables = nn.meta.unbox(jax.tree.unflatten(self._init_variables_tree,
                                                     self._init_variables_flat(init_rng)))
        params = variables["params"]
        if pretrained is not None:
            params = tree.merge(params, pretrained, "pretrained param")
        model_state = {c: variables[c] for c in self.task.state_collections}
        if pretrained_state is not None:
            model_state = tree.merge(model_state, pretrained_state, "pretrained model_state")
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          model_state=model_state, rng=state_rng)

    def _grad_fn(self, params):
        """``(grad_fn, to_tree)``: ``grad_fn(model_state, batch, rng, step) -> ((loss, aux), g)`` with
        ``g`` the gradients of the trainable params only (a list of leaves; all of them when nothing
        is frozen), and ``to_tree(g)`` the params-shaped gradient tree with zeros at frozen leaves."""
        leaves, treedef = jax.tree.flatten(params)
        idx = self._trainable_idx

        def loss_of(trainable, model_state, batch, rng, step):
            full = list(leaves)
            for i, x in zip(idx, trainable):
                full[i] = x
            return self.task.loss_fn(jax.tree.unflatten(treedef, full), model_state, batch, rng, step)

        def grad_fn(model_state, batch, rng, step):
            return jax.value_and_grad(loss_of, has_aux=True)([leaves[i] for i in idx], model_state, batch, rng,
                                                             step)

        def to_tree(g):  # frozen leaves: zeros (the optimizer zeroes their updates anyway)
            full = [jnp.zeros(x.shape, x.dtype) for x in leaves]
            for i, x in zip(idx, g):
                full[i] = x
            return jax.tree.unflatten(treedef, full)

        return grad_fn, to_tree

    def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn, to_tree = self._grad_fn(state.params)

        with self._ctx():
            if self.accum == 1:
                (loss, aux), grads = grad_fn(state.model_state, batch, rng, state.step)
                metrics, model_state = aux["metrics"], aux["model_state"]
            else:
                # Micro-batch a takes rows a, a+A, a+2A, ... (b = row // A): every device keeps an
                # equal share of each micro-batch (a contiguous split would leave most idle).
                def split(x):
                    x = einops.rearrange(x, "(b a) ... -> a b ...", a=self.accum)
                    return jax.lax.with_sharding_constraint(
                        x, NamedSharding(self.mesh, P(None, shd.BATCH_AXES)))
                micro = jax.tree.map(split, batch)

                def body(carry, xs):
                    g_acc, ms, i = carry
                    mb = xs
                    (l, a), g = grad_fn(ms, mb, jax.random.fold_in(rng, i), state.step)
                    g_acc = jax.tree.map(lambda acc, gi: acc + gi.astype(jnp.float32), g_acc, g)
                    return (g_acc, a["model_state"], i + 1), (l, a["metrics"])

                leaves = jax.tree.leaves(state.params)
                zeros = [jnp.zeros(leaves[i].shape, jnp.float32) for i in self._trainable_idx]
                (grads, model_state, _), (losses, ms_metrics) = jax.lax.scan(
                    body, (zeros, state.model_state, 0), micro)
                grads = [g / self.accum for g in grads]
                loss = losses.mean()
                metrics = jax.tree.map(jnp.mean, ms_metrics)

        grads = to_tree(grads)
        model_state = jax.lax.stop_gradient(model_state)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        consecutive, total = opt_lib.nonfinite_counts(opt_state)
        out = {
            "loss": loss,
            "lr": self.schedule(state.step),
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

    def jit_eval(self, fn):
        """``fn(params, model_state, batch)`` jitted as ``eval_step`` is (``eval_step`` is
        ``jit_eval(task.eval_fn)``): the state's shardings in, replicated outputs, traced under the
        mesh's logical rules. For other read-only functions of a model, e.g. the image features of
        ``Task.vqa_probe``."""
        def step(params, model_state, batch):
            with self._ctx():
                return fn(params, model_state, batch)

        return jax.jit(step, in_shardings=(self.state_shardings.params, self.state_shardings.model_state, None),
                       out_shardings=shd.replicated(self.mesh))

    # -- helpers ---------------------------------------------------------------------------------
    def init(self, pretrained=None, pretrained_state=None) -> TrainState:
        """The step-0 state for seed ``config.seed``, created sharded (``state_shardings``).

        pretrained: None (every param randomly initialised), or a partial params tree of arrays,
          e.g. ``task.pretrained_params(abstract_state.params, state_shardings.params)``: those leaves
          become the params as they are, and only the params it lacks (LoRA adapters, routers) are
          initialised, with the values a random init with this seed gives them. Its arrays are
          DONATED (deleted; the state holds their buffers), so copy anything you compare later.
        pretrained_state: None, or a partial tree of the model_state collections
          (``task.pretrained_model_state``, e.g. a quantised 4-bit base in ``{"quant": ...}``), taken
          the same way (donated, checked).
        A pretrained path the model lacks, or an array of the wrong shape or dtype, is a ValueError.
        """
        rng = jax.random.PRNGKey(self.config.seed)
        if pretrained is not None:
            _check_pretrained(pretrained, self.abstract_state.params)
        if pretrained_state is not None:
            _check_pretrained(pretrained_state, self.abstract_state.model_state, "model_state")
        return self._init(rng, pretrained, pretrained_state)

    def put(self, batch):
        return shd.put_batch(batch, self.mesh)

    def evaluate(self, state: TrainState, batches) -> dict[str, Any]:
        """Runs ``task.eval_fn`` on every batch and hands ``task.finalize_eval`` the combined outputs
        (``eval_outputs``)."""
        return self.task.finalize_eval(self.eval_outputs(state.params, state.model_state, batches))

    def eval_outputs(self, params, model_state, batches) -> dict[str, Any]:
        """``task.eval_fn`` of every batch, combined: scalars are summed over batches (sums of losses,
        token counts), arrays with a leading batch axis are concatenated in batch order (per-example
        embeddings for retrieval, which needs every item at once; generated answers). The step's
        outputs are replicated, so every process gets the global arrays."""
        sums: dict[str, float] = {}
        rows: dict[str, list[np.ndarray]] = {}
        for b in batches:
            b = self.put(b)
            with jax.transfer_guard("disallow"):  # a silent host<->device copy in the step is a bug
                out = self.eval_step(params, model_state, b)
            out = jax.device_get(out)
            for k, v in out.items():
                v = np.asarray(v)
                if v.ndim == 0:
                    sums[k] = sums.get(k, 0.0) + float(v)
                else:
                    rows.setdefault(k, []).append(v)
        return {**sums, **{k: np.concatenate(v) for k, v in rows.items()}}


def _check_pretrained(pretrained, abstract_params, what: str = "param") -> None:
    """Raises one ValueError naming every pretrained array with no param, or of another shape or dtype
    than the param it replaces (``abstract_state`` fixes the state's types for the jitted step and
    the checkpoints)."""
    want = tree.flatten(abstract_params)
    bad = []
    for path, x in tree.flatten(pretrained).items():
        if path not in want:
            bad.append(f"{path} (no such {what})")
        elif (tuple(x.shape), jnp.dtype(x.dtype)) != (tuple(want[path].shape), jnp.dtype(want[path].dtype)):
            bad.append(f"{path}: {jnp.dtype(x.dtype).name}{list(x.shape)} vs the model's "
                       f"{jnp.dtype(want[path].dtype).name}{list(want[path].shape)}")
    if bad:
        raise ValueError(f"{len(bad)} pretrained {what} array(s) do not fit the model: {'; '.join(bad[:3])}"
                         + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "") + ".")


def _opt_state_shardings(abstract_opt, abstract_params, param_shardings, replicated):
    """Optimizer moments follow their parameter's sharding; counters and scalars are replicated.

    An optimizer-state leaf belongs to the parameter whose dict path is the longest suffix of the
    leaf's dict path (optax nests params-shaped trees under chain / multi_transform / masked
    states) and whose shape matches. Path matching, unlike ``optax.tree_map_params``, copes with
    the ``MaskedNode`` holes that frozen groups leave in masked states.
    """
    dict_path = tree.dict_path
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

SUMMARY = "summary.json"
# Config fields that say how to run, not what the run is: a finished run is the same run without them.
_NOT_THE_RUN = ("stop_after", "allow_fresh_start", "diagnose_at_end")


class _Preempted:
    """SIGTERM (TPU maintenance, SLURM preemption) or a first Ctrl-C: finish the step, checkpoint, exit
    cleanly. A second Ctrl-C interrupts at once (KeyboardInterrupt; the in-flight save is still
    waited for, so no step is left half-written)."""

    def __init__(self):
        self.why = ""
        self._prev = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._prev[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    @property
    def flag(self) -> bool:
        return bool(self.why)

    def _handler(self, signum, _frame):
        if signum == signal.SIGINT:
            if self.why:  # the second Ctrl-C: stop now
                raise KeyboardInterrupt
            print("\nCtrl-C: finishing this step, saving a checkpoint and exiting (Ctrl-C again to "
                  "abort at once).", flush=True)
        self.why = self.why or ("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C")

    def restore(self):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev = {}


class _StepClock:
    """Step time and ETA from the training steps alone.

    Evaluation and checkpoint time inside a log interval is subtracted (``pause``), and the ETA uses
    the mean step time since warm-up (every interval after the first, which holds the compile), so
    it does not jump after evals and checkpoints.
    """

    def __init__(self):
        self.t_last = time.perf_counter()
        self.wait_s = self.pause_s = 0.0
        self.steps = 0
        self.warm_s, self.warm_steps, self.warmed = 0.0, 0, False

    def interval(self) -> tuple[float, float, float]:
        """Ends a log interval: (seconds per step, data-wait fraction, mean seconds per step since warm-up)."""
        busy = max(time.perf_counter() - self.t_last - self.pause_s, 1e-9)
        dt = busy / max(self.steps, 1)
        if self.warmed:
            self.warm_s += busy
            self.warm_steps += self.steps
        self.warmed = True
        mean = self.warm_s / self.warm_steps if self.warm_steps else dt
        wait = self.wait_s / busy
        self.t_last, self.wait_s, self.pause_s, self.steps = time.perf_counter(), 0.0, 0.0, 0
        return dt, wait, mean


def finished_summary(config, workdir) -> dict[str, Any] | None:
    """The saved summary of a run in ``workdir`` that already reached ``config.total_steps`` (said on
    stdout), else None."""
    workdir = metrics_lib.as_path(workdir)
    path = workdir / SUMMARY
    if not path.exists():
        return None
    done = metrics_lib.read_json(path)
    if int(done.get("step", -1)) < int(config.total_steps):
        return None  # e.g. total_steps was raised to train on
    saved = workdir / "config.json"
    mine = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k not in _NOT_THE_RUN}
    if not saved.exists() or {k: v for k, v in metrics_lib.read_json(saved).items()
                              if k not in _NOT_THE_RUN} != mine:
        return None  # another config: the normal path resumes it or says why it cannot
    if jax.process_index() == 0:
        print(f"Already finished: step {done['step']} of {config.total_steps} in {workdir}"
              f"{_describe_end(done)} (summary: {path}). Nothing to do.", flush=True)
    return done


def _describe_end(summary: dict[str, Any]) -> str:
    start = summary.get("eval_start", {}).get("loss")
    end = summary.get("eval_end", {}).get("loss")
    if start is not None and end is not None:
        return f", eval loss {start:.4f} -> {end:.4f}"
    return f", eval loss {end:.4f}" if end is not None else ""


def _config_changes(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """'a.b: old -> new' for every field that differs between two config dicts (nested)."""
    a, b = tree.flatten(saved), tree.flatten(mine)
    return [f"{k.replace('/', '.')}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k.split("/")[0] not in _NOT_THE_RUN]


def _check_nonfinite_streak(consecutive: int, step: int, limit: int, ckpt_dir: str) -> None:
    if consecutive >= limit:
        raise FloatingPointError(
            f"Non-finite loss, gradients or updates for {consecutive} consecutive steps up to step {step} "
            f"(config.optim.max_consecutive_nonfinite={limit}). Those updates were skipped, so the "
            f"parameters and the checkpoints in {ckpt_dir} are clean. Lower config.optim.lr, raise "
            "config.optim.warmup_steps, or check the data.")


def run(config, workdir, task: Task) -> dict[str, Any]:
    """Trains ``task`` as ``config`` says in ``workdir`` (a local path or ``gs://...``), resuming from
    its latest checkpoint. Returns the run's summary (also in ``workdir/summary.json`` and as the
    ``summary`` record of ``metrics.jsonl``). A run that already finished is not run again: its saved
    summary is returned. Build ``task`` with ``vlmjax.run`` (the trainer never imports tasks).

    Nothing is lost on any exit: the workdir is locked against a second writer
    (``workdir_lock``), ``config.json`` is written only once the checkpoint has been found compatible
    (a rejected run changes nothing on disk), every exit path waits for the in-flight checkpoint,
    and a run that skipped too many non-finite updates fails instead of reporting success.
    """
    config_lib.validate(config)
    workdir = metrics_lib.as_path(workdir)  # local paths made absolute; gs://... kept as given
    is_main = jax.process_index() == 0
    done = finished_summary(config, workdir)
    if done is not None:
        return done

    mesh = shd.make_mesh(config.mesh)
    config_lib.validate_for_mesh(config, shd.data_parallel_size(mesh), jax.process_count())
    lock = workdir_lock.acquire_for_run(workdir)
    try:
        return _run_locked(config, workdir, task, mesh, is_main)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(config, workdir, task: Task, mesh, is_main: bool) -> dict[str, Any]:
    if is_main:
        print(f"vlmjax: task={config.task} devices={jax.device_count()} processes={jax.process_count()} "
              f"mesh={dict(mesh.shape)} workdir={workdir}", flush=True)
    trainer = Trainer(config, task, mesh)
    n_params = tree.num_params(trainer.abstract_state.params)
    ds = task.train_dataset(global_batch_size=config.batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(ds)
    eval_batches = task.eval_batches(global_batch_size=config.batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())

    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_ckpts,
                                 every=config.ckpt_every or config.total_steps,
                                 async_save=config.async_ckpt)
    try:
        restored = ckpt.restore_latest(trainer.abstract_state, data_iter,
                                       allow_fresh=bool(config.allow_fresh_start))
    except BaseException:
        ckpt.close()
        raise
    cfg_dict = json.loads(config.to_json_best_effort())
    config_path = workdir / "config.json"
    if is_main:
        # Only now, with the checkpoint (if any) found compatible, does the run write to the workdir.
        if restored is not None and config_path.exists():
            changes = _config_changes(metrics_lib.read_json(config_path), cfg_dict)
            if changes:
                print(f"Resuming with a changed config ({len(changes)} field(s)): {'; '.join(changes[:10])}"
                      + (" ..." if len(changes) > 10 else ""), flush=True)
        metrics_lib.write_json(config_path, cfg_dict)
    if restored is not None:
        state, start = restored
        if is_main:
            print(f"Resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
    else:
        # Checkpoint weights first, then the state around them: the random init of the params they
        # replace is never compiled nor run (Trainer.init).
        loaded = task.pretrained_params(trainer.abstract_state.params, trainer.state_shardings.params)
        loaded_state = task.pretrained_model_state(trainer.abstract_state.model_state,
                                                   trainer.state_shardings.model_state)
        n_loaded = len(jax.tree.leaves(loaded)) if loaded is not None else 0
        state, start = trainer.init(loaded, loaded_state), 0
        if loaded is not None and is_main:
            print(f"Initialised {n_loaded} of {len(jax.tree.leaves(state.params))} "
                  "param arrays from pretrained checkpoints", flush=True)
    if is_main:
        print(f"params: {n_params:,} ({n_params / 1e6:.2f}M)", flush=True)

    writer = metrics_lib.MetricWriter(workdir, config)
    units_per_step = task.units_per_step(config.batch_size)
    summary: dict[str, Any] = {"params": n_params, "total_steps": int(config.total_steps)}
    clock = _StepClock()
    limit = int(config.optim.max_consecutive_nonfinite)
    skipped_before = int(jax.device_get(opt_lib.nonfinite_counts(state.opt_state)[1]))

    def do_eval(step):
        t0 = time.perf_counter()
        res = trainer.evaluate(state, eval_batches)
        res["eval_time_s"] = time.perf_counter() - t0
        writer.write(step, res, kind="eval")
        clock.pause_s += res["eval_time_s"]
        return res

    preempt = _Preempted()
    stop_at = min(config.total_steps, config.stop_after) if config.stop_after else config.total_steps
    t_run = time.perf_counter()
    step = start
    last_train: dict[str, Any] = {}
    # The previous step's consecutive-skip counter, read one step late so the host never waits for
    # the step it just dispatched (the device keeps one step queued), yet every step is checked.
    pending: tuple[int, jax.Array] | None = None
    try:
        if start == 0 and config.eval_at_start:
            summary["eval_start"] = do_eval(0)
        while step < stop_at:
            t0 = time.perf_counter()
            batch = trainer.put(next(data_iter))
            clock.wait_s += time.perf_counter() - t0
            # A silent host<->device copy inside the step (a Python scalar or numpy array captured
            # where a device array was meant) is an error, not a slow step (big_vision).
            with jax.transfer_guard("disallow"):
                state, m = trainer.train_step(state, batch)
            step += 1
            clock.steps += 1
            if pending is not None:
                _check_nonfinite_streak(int(pending[1]), pending[0], limit, ckpt.directory)
            m["nonfinite_consecutive"].copy_to_host_async()
            pending = (step, m["nonfinite_consecutive"])

            if step % config.log_every == 0 or step == stop_at:
                m = jax.device_get(m)  # blocks: the interval's time now covers its device work
                dt, wait, mean_dt = clock.interval()
                loss = float(m["loss"])
                rec = {
                    "loss": loss,
                    "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]),
                    f"{task.units}_per_s": units_per_step / dt,
                    "step_time_s": dt,
                    "data_wait_frac": wait,
                    "nonfinite_skipped": int(m["nonfinite_total"]),
                    **{k: float(v) for k, v in m.items()
                       if k not in ("loss", "lr", "grad_norm", "nonfinite_total", "nonfinite_consecutive")},
                }
                line = (f"step {step}/{config.total_steps} {task.loss_label} {loss:.4f} lr {rec['lr']:.2e} "
                        f"gnorm {rec['grad_norm']:.3f} {units_per_step / dt:,.0f} {task.units}/s "
                        f"step {dt * 1e3:.1f}ms data-wait {100 * wait:.1f}% "
                        f"ETA {metrics_lib.format_eta((config.total_steps - step) * mean_dt)}")
                if rec["nonfinite_skipped"]:
                    line += f" skipped {rec['nonfinite_skipped']}"
                extra = task.log_summary(rec)
                line += f" | {extra}" if extra else ""
                writer.write(step, rec, line=line)
                last_train = rec

            if config.eval_every and step % config.eval_every == 0 and step != stop_at:
                do_eval(step)
            t0 = time.perf_counter()
            ckpt.save(step, state, data_iter, cfg_dict)
            clock.pause_s += time.perf_counter() - t0
            if preempt.flag:
                if is_main:
                    print(f"{preempt.why}: checkpointing at step {step} and exiting.", flush=True)
                break
        if pending is not None:
            _check_nonfinite_streak(int(pending[1]), pending[0], limit, ckpt.directory)
        if step not in ckpt.all_steps():
            ckpt.save(step, state, data_iter, cfg_dict, force=True)
    except BaseException:
        # An error, a second Ctrl-C, a non-finite stop: the save in flight is finished (or its tmp
        # directory removed at the next start), never abandoned to the interpreter's shutdown, whose
        # orbax thread errors would bury the real error. The caller prints that error last.
        _close_quietly(ckpt, writer)
        raise
    finally:
        preempt.restore()
    ckpt.close()

    consecutive, total = (int(x) for x in jax.device_get(opt_lib.nonfinite_counts(state.opt_state)))
    skipped, ran = total - skipped_before, step - start
    finished = step >= config.total_steps
    if finished or step == stop_at:
        summary["eval_end"] = do_eval(step)
    if finished:
        summary.update(task.on_end(state, mesh))
    summary.update(step=step, finished=finished, wall_time_s=time.perf_counter() - t_run,
                   nonfinite_skipped=total, last_train=last_train)
    if preempt.flag:
        summary["stopped_by"] = preempt.why
    # consecutive > 0: the last update was skipped (also when a rerun resumes such a run at its end).
    bad_end = consecutive > 0 or (ran > 0 and skipped > float(config.optim.max_nonfinite_fraction) * ran)
    if bad_end:
        summary["finished"] = finished = False
    skipped_note = f" ({skipped} of {ran} updates skipped as non-finite)" if skipped else ""
    if is_main and not bad_end:
        if finished:
            print(f"done: step {step}, wall {summary['wall_time_s']:.1f}s{_describe_end(summary)}{skipped_note}",
                  flush=True)
        else:
            why = preempt.why or f"config.stop_after={config.stop_after}"
            how = "" if preempt.why else " without --config.stop_after"
            print(f"stopped early ({why}): step {step} of {config.total_steps}, wall "
                  f"{summary['wall_time_s']:.1f}s{_describe_end(summary)}{skipped_note}. Checkpoint saved; "
                  f"run the same command{how} to continue.", flush=True)
    # The summary (evals at start and end, the sample, ...) goes to metrics.jsonl too, flattened to
    # 'eval_end/loss' style keys; summary.json marks a finished run, so a rerun does not repeat it.
    shown = {k: v for k, v in summary.items() if k != "last_train"}
    writer.write(step, tree.flatten(shown), kind="summary", line=f"summary: {json.dumps(shown, default=str)}")
    writer.close()
    if bad_end:
        why = (f"the last {consecutive} update(s) were skipped" if consecutive
               else f"{skipped} of {ran} updates were skipped (over "
                    f"config.optim.max_nonfinite_fraction={config.optim.max_nonfinite_fraction})")
        raise FloatingPointError(
            f"The run reached step {step} but its training went non-finite: {why}, so the parameters "
            f"are those of the last finite update and the run is not marked finished. Lower "
            f"config.optim.lr or raise config.optim.warmup_steps and start in a fresh --workdir (the "
            f"checkpoints in {ckpt.directory} are clean).")
    if is_main and finished:
        metrics_lib.write_json(workdir / SUMMARY, summary)
    return summary


def _close_quietly(ckpt, writer) -> None:
    """Closes the checkpointer (waiting for its in-flight save) and the metric writer while another
    exception is propagating: their own errors are logged, never raised over the real one."""
    for close in (ckpt.close, writer.close):
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the propagating exception is the one to show
            logging.error("While stopping after an error: %s: %s", type(e).__name__, e)
