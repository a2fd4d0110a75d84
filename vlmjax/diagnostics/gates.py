"""Gate statistics: how open the gates that let vision into a language model are, per layer and over
training.

Gates are found by NAME in a params tree (``vlmjax.tree`` paths, 'a/b/c'), so any model that names
them in the usual way is covered without code:

  tanh     Flamingo's gated cross-attention (Alayrac et al. 2022, eq. 1): ``y = x + tanh(alpha) * f(x)``,
           alpha initialised at 0; leaves named ``alpha``, ``alpha_*`` / ``*_alpha`` (``alpha_attn``,
           ``alpha_ffn``, ``alpha_xattn``), or open_flamingo's ``attn_gate`` / ``ff_gate``;
  sigmoid  a scalar vision gate ``sigmoid(logit)`` (the fusion seed's ``vision_gate_logit``, init
           1.5): leaves named ``*gate_logit``.

A task can give its own patterns (``VQAProbe.gate_patterns``). The reported value is the gate
itself (tanh(alpha) or sigmoid(logit)), elementwise; a leaf of a scanned stack (a ``layers/``
component, leading [L] axis) is reported per layer as ``path[i]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vlmjax import tree as tree_lib

TANH, SIGMOID = "tanh", "sigmoid"
KINDS = (TANH, SIGMOID)
# (regex on the full '/'-joined param path, kind). The first pattern that matches decides.
GATE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|/)[A-Za-z0-9_]*gate_logit$", SIGMOID),
    (r"(^|/)(alpha|alpha_[A-Za-z0-9_]+|[A-Za-z0-9_]+_alpha|attn_gate|ff_gate|ffw_gate|ffn_gate)$", TANH),
)


def gate_kind(path: str, patterns: Sequence[tuple[str, str]] = GATE_PATTERNS) -> str | None:
    """'tanh' | 'sigmoid' for a gate param path, else None."""
    for pattern, kind in patterns:
        if kind not in KINDS:
            raise ValueError(f"gate pattern {pattern!r}: kind {kind!r} is not one of {KINDS}.")
        if re.search(pattern, path):
            return kind
    return None


def find_gates(params: Mapping[str, Any] | None,
               patterns: Sequence[tuple[str, str]] = GATE_PATTERNS) -> dict[str, str]:
    """{param path: kind} of every gate leaf of a params tree (nested dicts of arrays or
    ShapeDtypeStructs); {} when there is none."""
    return {p: k for p in tree_lib.flatten(dict(params or {})) if (k := gate_kind(p, patterns))}


def gate_values(raw: np.ndarray, kind: str) -> np.ndarray:
    """The gate from its parameter: tanh(alpha) or sigmoid(logit), float64, same shape."""
    x = np.asarray(raw, np.float64)
    if kind == TANH:
        return np.tanh(x)
    if kind == SIGMOID:
        return 1.0 / (1.0 + np.exp(-x))
    raise ValueError(f"gate kind {kind!r} is not one of {KINDS}.")


def _per_layer(path: str, values: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A scanned stack ('.../layers/...' with a leading [L] axis) split into 'path[i]' entries."""
    if tree_lib.SCAN_KEY in path.split("/") and values.ndim >= 1 and values.shape[0] > 1:
        return [(f"{path}[{i}]", values[i]) for i in range(values.shape[0])]
    return [(path, values)]


def gate_stats(params: Mapping[str, Any] | None,
               patterns: Sequence[tuple[str, str]] = GATE_PATTERNS) -> dict[str, dict[str, Any]]:
    """Statistics of every gate in a params tree, per layer.

    Args:
      params: nested dict of arrays (numpy or jax; the gates are read to the host).
      patterns: (regex, kind) pairs (``GATE_PATTERNS``).

    Returns:
      {gate path: {'kind': 'tanh' | 'sigmoid', 'mean', 'min', 'max' (of the gate values over the
      leaf's elements), 'size': element count}}, in path order.
    """
    flat = tree_lib.flatten(dict(params or {}))
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(flat):
        kind = gate_kind(path, patterns)
        if kind is None:
            continue
        for name, v in _per_layer(path, gate_values(np.asarray(flat[path]), kind)):
            out[name] = {"kind": kind, "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
                         "size": int(v.size)}
    return out


def summarize(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind over all its gates: {'tanh': {'mean' (of the gates' means), 'min', 'max', 'gates'}, ...}
    for the kinds present."""
    out = {}
    for kind in KINDS:
        rows = [s for s in stats.values() if s["kind"] == kind]
        if rows:
            out[kind] = {"mean": float(np.mean([s["mean"] for s in rows])), "min": min(s["min"] for s in rows),
                         "max": max(s["max"] for s in rows), "gates": len(rows)}
    return out


def trajectory(points: Iterable[tuple[int, Mapping[str, Any]]],
               patterns: Sequence[tuple[str, str]] = GATE_PATTERNS) -> dict[str, list[list[float]]]:
    """Gate statistics over training from params saved at several steps.

    points: (step, params tree holding at least the gate leaves) pairs, e.g. one per checkpoint.
    Returns {gate path: [[step, mean, min, max], ...] in step order}."""
    out: dict[str, list[list[float]]] = {}
    for step, params in sorted(points, key=lambda p: p[0]):
        for name, s in gate_stats(params, patterns).items():
            out.setdefault(name, []).append([int(step), s["mean"], s["min"], s["max"]])
    return out


def metric_trajectory(records: Iterable[Mapping[str, Any]], pattern: str = r"gate") -> dict[str, list[list[float]]]:
    """Gate values a run logged during training (``metrics.jsonl`` train records whose key matches
    ``pattern``, e.g. 'fusion/gate_attn_0'), as ``trajectory`` rows [step, value, value, value]."""
    out: dict[str, list[list[float]]] = {}
    rx = re.compile(pattern, re.IGNORECASE)
    for rec in records:
        step = rec.get("step")
        for key, v in rec.items():
            if key in ("step", "kind") or not rx.search(key) or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if math.isfinite(float(v)) and step is not None:
                out.setdefault(key, []).append([int(step), float(v), float(v), float(v)])
    return {k: sorted(v) for k, v in sorted(out.items())}


__all__ = ["GATE_PATTERNS", "KINDS", "SIGMOID", "TANH", "find_gates", "gate_kind", "gate_stats", "gate_values",
           "metric_trajectory", "summarize", "trajectory"]
