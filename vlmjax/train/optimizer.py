"""Optimizer from config: AdamW, warmup + cosine, clipping, per-group learning rates, frozen groups.

Groups are chosen by regular expressions on the parameter path ``"layers_0/attn/q_proj/kernel"``
(big_vision ``optax.py``; deepmind/gemma ``peft``), so freezing a backbone or giving the projector a
10x learning rate is a config line, never a code edit. Non-finite steps are skipped by
``skip_nonfinite`` (gradients, the update itself and the new optimizer state are all checked), whose
state keeps the counters the trainer logs.

``frozen`` freezes the params its regexes match; ``trainable`` (if set) freezes all the others, so
"train only the LoRA adapters" is ``trainable=("lora_",)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlmjax import tree

FROZEN = "frozen"
DEFAULT = "default"


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="adamw",            # adamw | sgd
        lr=3e-4,                 # peak learning rate
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,        # decoupled; applied to >= 2-D weights only (not norms, biases)
        schedule="cosine",       # cosine | linear | constant (all after linear warmup)
        warmup_steps=100,
        min_lr_ratio=0.1,        # final lr = min_lr_ratio * lr for cosine/linear
        clip_norm=1.0,           # global-norm clipping of trainable grads; 0 disables
        # Regexes whose params are clipped by their own global norm (clip_norm each), apart from the
        # rest: e.g. (r"^routers_",) so the routers' auxiliary losses cannot shrink the LM's update.
        clip_groups=(),
        grad_accum_steps=1,      # micro-batches per optimizer step (scanned inside the step)
        # Tuples of regexes (re.search on "a/b/kernel" paths). Frozen params get no update and no state.
        frozen=(),
        # The complement: if non-empty, every param matching none of these is frozen, e.g.
        # ("lora_",) trains only LoRA adapters (parameter-efficient fine-tuning, deepmind/gemma peft);
        # ("lora_", "router") adds routers. frozen still applies on top. () = everything trains.
        trainable=(),
        # Tuples of (regex, lr multiplier); the first match wins; unmatched params use multiplier 1.
        lr_groups=(),
        # Non-finite grads: the update is skipped and counted; after this many consecutive skips the
        # trainer stops with an error rather than spin (the last checkpoint is still clean).
        max_consecutive_nonfinite=20,
        # At the end of a run: more skipped updates than this fraction of the steps run, or a last
        # step that was skipped, fails the run (non-zero exit) instead of reporting it as done.
        max_nonfinite_fraction=0.05,
    ))


def _compile(patterns, field):
    return tree.compile_regexes(patterns, f"config.optim.{field}")


def param_labels(params, optim_cfg) -> Any:
    """Tree of group labels ('frozen', 'default', 'group_i') with the structure of ``params``."""
    frozen = _compile(optim_cfg.frozen, "frozen")
    trainable = _compile(optim_cfg.get("trainable", ()) or (), "trainable")
    groups = []
    for i, item in enumerate(optim_cfg.lr_groups):
        if len(item) != 2:
            raise ValueError(f"config.optim.lr_groups[{i}]={item!r}: each entry is (regex, lr_multiplier).")
        groups.append((_compile([item[0]], "lr_groups")[0], float(item[1])))

    def label(name, _):
        if any(r.search(name) for r in frozen):
            return FROZEN
        if trainable and not any(r.search(name) for r in trainable):
            return FROZEN
        for i, (r, _) in enumerate(groups):
            if r.search(name):
                return f"group_{i}"
        return DEFAULT

    labels = tree.map_with_names(label, params)
    # A frozen pattern that matches nothing is almost always a typo; say so instead of training all.
    paths = list(tree.flat_with_paths(params))
    for field, patterns in (("frozen", frozen), ("trainable", trainable)):
        for r in patterns:
            if not any(r.search(n) for n in paths):
                raise ValueError(f"config.optim.{field}: {r.pattern!r} matches no parameter. Paths look like "
                                 f"{paths[0]!r}" + (" (LoRA adapters exist only with config.model.lora_rank > 0)"
                                                    if "lora" in r.pattern else "") + ".")
    return labels


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    warmup = min(warmup, max(total_steps - 1, 0))
    end = lr * float(optim_cfg.min_lr_ratio)
    if optim_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
    if optim_cfg.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)),
             optax.linear_schedule(lr, end, max(total_steps - warmup, 1))], [warmup])
    if optim_cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r} is not one of 'cosine', 'linear', 'constant'.")


def _decay_mask(params):
    # Decoupled weight decay on matrices only: decaying RMSNorm scales or biases pulls them to zero.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _base(optim_cfg, lr) -> optax.GradientTransformation:
    if optim_cfg.name == "adamw":
        return optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=_decay_mask)
    if optim_cfg.name == "sgd":
        return optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay, _decay_mask),
                           optax.sgd(lr, momentum=optim_cfg.b1))
    raise ValueError(f"config.optim.name={optim_cfg.name!r} is not one of 'adamw', 'sgd'.")


def make_optimizer(optim_cfg, params, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (tx, schedule). ``params`` may be abstract (ShapeDtypeStructs); only paths are used."""
    schedule = make_schedule(optim_cfg, total_steps)
    labels = param_labels(params, optim_cfg)
    names = sorted(set(jax.tree.leaves(labels)))
    transforms = {}
    for name in names:
        if name == FROZEN:
            transforms[name] = optax.set_to_zero()
        elif name == DEFAULT:
            transforms[name] = _base(optim_cfg, schedule)
        else:
            mult = float(optim_cfg.lr_groups[int(name.split("_")[1])][1])
            transforms[name] = _base(optim_cfg, lambda s, m=mult: m * schedule(s))
    # Frozen grads are zeroed before clipping so they don't count in the global norm.
    zero_frozen = optax.multi_transform(
        {n: (optax.set_to_zero() if n == FROZEN else optax.identity()) for n in names}, labels)
    chain = [zero_frozen]
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        chain.append(_clip(optim_cfg, params))
    chain.append(optax.multi_transform(transforms, labels))
    tx = optax.chain(*chain)
    return skip_nonfinite(tx), schedule


def _clip(optim_cfg, params) -> optax.GradientTransformation:
    """Global-norm clipping, one norm per ``clip_groups`` regex (first match wins) and one for the rest."""
    clip = optax.clip_by_global_norm(float(optim_cfg.clip_norm))
    patterns = _compile(optim_cfg.get("clip_groups", ()) or (), "clip_groups")
    if not patterns:
        return clip

    def label(name, _):
        return next((f"clip_{i}" for i, r in enumerate(patterns) if r.search(name)), "clip_rest")

    labels = tree.map_with_names(label, params)
    used = set(jax.tree.leaves(labels))
    for i, r in enumerate(patterns):
        if f"clip_{i}" not in used:
            raise ValueError(f"config.optim.clip_groups: {r.pattern!r} matches no parameter.")
    return optax.multi_transform({n: clip for n in used}, labels)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner``, but a step whose gradients, resulting update or new optimizer state hold a NaN/Inf
    changes nothing (zero update, the old optimizer state kept) and is counted.

    ``optax.apply_if_finite`` checks the gradients only, so a non-finite update made from finite
    gradients (a corrupted or overflowed moment estimate, e.g. ``nu`` = Inf after a bad restore) is
    applied and poisons the parameters. Never gives up (the trainer stops the run with a message
    after ``max_consecutive_nonfinite``). Same state type as ``apply_if_finite``
    (``optax.ApplyIfFiniteState``), so checkpoints written with either restore into the other.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(grads, state, params=None, **extra_args):
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        ok = tree.all_finite(grads) & tree.all_finite(updates) & tree.all_finite(inner_state)
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner_state, state.inner_state)
        one = jnp.ones([], jnp.int32)
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(ok, 0, state.notfinite_count + one),
            last_finite=ok,
            total_notfinite=state.total_notfinite + jnp.where(ok, 0, one),
            inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
    """(consecutive, total) non-finite steps skipped, from ``skip_nonfinite``'s state."""
    return opt_state.notfinite_count, opt_state.total_notfinite


def trainable_mask(params, optim_cfg):
    labels = param_labels(params, optim_cfg)
    return jax.tree.map(lambda l: l != FROZEN, labels)
