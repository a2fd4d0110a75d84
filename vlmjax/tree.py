"""Param-tree helpers shared by the optimizer, the trainer, the converters and the tasks.

Every place in vlmjax that names a parameter uses one spelling: the '/'-joined path of dict keys,
``'layers_0/self_attn/q_proj/kernel'`` (what flax's ``traverse_util.flatten_dict(sep='/')`` gives and
what the ``config.optim.{frozen,trainable,lr_groups}`` regexes match). Built on
``flax.traverse_util`` and ``jax.tree_util`` key paths; nothing here imports the rest of vlmjax.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

SEP = "/"


def key_name(key) -> str:
    """One jax key-path entry (``DictKey``, ``GetAttrKey``, ``SequenceKey``, ...) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """'layers_0/self_attn/q_proj/kernel' from a jax key path (``tree_flatten_with_path``)."""
    return SEP.join(key_name(k) for k in path)


def dict_path(path) -> tuple[str, ...]:
    """Only the dict keys of a jax key path: the param path inside optax states (which nest params-
    shaped trees under named tuples and lists)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> ``{'a/b/c': leaf}`` (empty sub-dicts are dropped)."""
    return traverse_util.flatten_dict(tree, sep=SEP) if tree else {}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a/b/c': leaf}`` -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP) if flat else {}


def flat_with_paths(tree) -> dict[str, Any]:
    """Any pytree -> ``{path_str: leaf}`` (also for dataclasses and lists, unlike ``flatten``)."""
    return {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def map_with_names(fn: Callable[[str, Any], Any], tree):
    """``jax.tree.map`` whose function also gets each leaf's path string."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def subtree(tree: Mapping[str, Any], path: str, what: str = "params") -> Any:
    """``tree['a']['b']`` for ``path='a/b'`` ('' = the whole tree); a clear error names what exists.

    what: how the error names ``path`` (e.g. "init_from" -> "init_from path 'a/b': no 'b' ...")."""
    for k in [p for p in path.split(SEP) if p]:
        if not isinstance(tree, Mapping) or k not in tree:
            have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ValueError(f"{what} path {path!r}: no {k!r} in params (have {have}).")
        tree = tree[k]
    return tree


def filter_paths(tree: Mapping[str, Any] | None, patterns: Iterable[re.Pattern], prefix: str = ""):
    """``tree`` without the leaves whose full path (``prefix/...``) matches any of ``patterns``."""
    patterns = list(patterns)
    if tree is None or not patterns:
        return tree
    flat = flatten(tree)
    full = (lambda k: f"{prefix}{SEP}{k}") if prefix else (lambda k: k)
    return unflatten({k: v for k, v in flat.items() if not any(r.search(full(k)) for r in patterns)})


def merge(base: Mapping[str, Any], update: Mapping[str, Any], what: str = "params") -> dict[str, Any]:
    """``base`` with the leaves present in the (possibly partial) nested ``update`` replaced.

    Every path of ``update`` must exist in ``base``: a pretrained tensor without a home is an error.
    """
    flat = flatten(base)
    new = flatten(update)
    unknown = sorted(set(new) - set(flat))
    if unknown:
        raise ValueError(f"{len(unknown)} {what} array(s) do not exist in the model, e.g. {unknown[:3]}.")
    flat.update(new)
    return unflatten(flat)


def set_subtree(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Puts ``value`` at ``path`` ('a/b') in the nested dict ``tree`` (in place; '' merges the top)."""
    keys = [p for p in path.split(SEP) if p]
    if not keys:
        tree.update(value)
        return tree
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return tree


def compile_regexes(patterns, where: str) -> list[re.Pattern]:
    """Compiles a tuple of regexes; ``where`` names the setting in errors ("config.optim.frozen")."""
    if isinstance(patterns, str):
        raise TypeError(f"{where}={patterns!r} must be a tuple of regexes, e.g. ({patterns!r},).")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{where}: {p!r} is not a valid regular expression ({e}).") from e
    return out


# Scanned layers (``model.scan_layers``): ``layers/<rest>`` leaves carry a leading [L] axis where the
# looped layout has ``layers_{i}/<rest>``. The HF converters read and write the looped layout; these
# two functions convert (host numpy or jax arrays, or ShapeDtypeStructs for abstract trees).
SCAN_KEY = "layers"


def is_stacked(tree: Mapping[str, Any] | None, key: str = SCAN_KEY) -> bool:
    """True when ``tree`` has a top-level ``key`` subtree (the scanned layout)."""
    return isinstance(tree, Mapping) and isinstance(tree.get(key), Mapping)


def unstack_layers(tree: Mapping[str, Any], key: str = SCAN_KEY) -> dict[str, Any]:
    """``{key: {...[L, ...]}}`` -> ``{f"{key}_{i}": {...[...]}}`` for i < L; other entries unchanged.
    ShapeDtypeStruct leaves become ShapeDtypeStructs without the leading axis (no sharding)."""
    if not is_stacked(tree, key):
        return dict(tree)
    out = {k: v for k, v in tree.items() if k != key}
    flat = flatten(tree[key])
    n = {int(leaf.shape[0]) for leaf in flat.values()}
    if len(n) != 1:
        raise ValueError(f"Stacked '{key}' params disagree on the number of layers: {sorted(n)}.")
    (n,) = n

    def take(leaf, i):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
        return leaf[i]

    for i in range(n):
        out[f"{key}_{i}"] = unflatten({p: take(leaf, i) for p, leaf in flat.items()})
    return out


def stack_layers(tree: Mapping[str, Any], stack: Callable[[list[Any]], Any], key: str = SCAN_KEY
                 ) -> dict[str, Any]:
    """Inverse of ``unstack_layers``: ``{key}_0 .. {key}_{L-1}`` -> ``{key: ...[L, ...]}`` with
    ``stack`` (``np.stack`` on host arrays, ``jnp.stack`` on device). Every layer must have the
    same paths."""
    pat = re.compile(re.escape(key) + r"_(\d+)$")
    idx = sorted(int(m.group(1)) for k in tree if (m := pat.match(k)))
    if not idx:
        return dict(tree)
    if idx != list(range(len(idx))):
        raise ValueError(f"Layers to stack are not {key}_0..{key}_{len(idx) - 1}: {idx[:8]}...")
    layers = [flatten(tree[f"{key}_{i}"]) for i in idx]
    if any(set(l) != set(layers[0]) for l in layers):
        raise ValueError(f"The {key}_i subtrees have different params; they cannot be stacked.")
    out = {k: v for k, v in tree.items() if not pat.match(k)}
    out[key] = unflatten({p: stack([l[p] for l in layers]) for p in layers[0]})
    return out


# Scanned routed decoders stack one *period* of layers: ``groups/layers_{j}/...`` [G, ...] holds layer
# g * every + j (and ``groups/routers_{j}`` its router). These two map that layout to and from the
# looped one (``layers_{i}``, ``routers_{i}``).
GROUP_KEY = "groups"
_INDEXED = re.compile(r"^(.+)_(\d+)$")


def ungroup_layers(tree: Mapping[str, Any], key: str = GROUP_KEY) -> dict[str, Any]:
    """``{key: {name_j: [G, ...]}}`` -> ``{name_{g * every + j}: [...]}`` with every = the number of
    ``layers_j`` entries of a group; other top-level entries unchanged."""
    if not is_stacked(tree, key):
        return dict(tree)
    every = sum(1 for k in tree[key] if _INDEXED.match(k) and _INDEXED.match(k).group(1) == SCAN_KEY)
    if not every:
        raise ValueError(f"'{key}' holds no {SCAN_KEY}_j entries: {sorted(tree[key])[:8]}.")
    out = {k: v for k, v in tree.items() if k != key}
    for g_name, group in unstack_layers(tree, key).items():
        if g_name in out:
            continue
        g = int(g_name.rpartition("_")[2])
        for child, value in group.items():
            m = _INDEXED.match(child)
            if not m:
                raise ValueError(f"'{key}/{child}' is not a name_j entry; cannot ungroup.")
            out[f"{m.group(1)}_{g * every + int(m.group(2))}"] = value
    return out


def group_layers(tree: Mapping[str, Any], every: int, stack: Callable[[list[Any]], Any],
                 names: Iterable[str] = (SCAN_KEY, "routers"), key: str = GROUP_KEY) -> dict[str, Any]:
    """Inverse of ``ungroup_layers``: top-level ``{name}_{i}`` (name in ``names``) -> ``key/{name}_{i %
    every}`` of group i // every, stacked with ``stack``."""
    names = set(names)
    out, groups = {}, {}
    for k, v in tree.items():
        m = _INDEXED.match(k)
        if m and m.group(1) in names:
            i = int(m.group(2))
            groups.setdefault(f"{key}_{i // every}", {})[f"{m.group(1)}_{i % every}"] = v
        else:
            out[k] = v
    if not groups:
        return out
    return {**out, **stack_layers(groups, stack, key)}


def num_params(tree) -> int:
    """Total element count of the array leaves (abstract or concrete)."""
    total = 0
    for x in jax.tree.leaves(tree):
        n = 1
        for d in x.shape:
            n *= int(d)
        total += n
    return total


def all_finite(tree) -> jax.Array:
    """Scalar bool: every float leaf of ``tree`` is free of NaN/Inf (integer leaves are ignored)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
