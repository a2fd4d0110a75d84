"""How much a VQA model uses its images: the numbers of ``docs/diagnostics.md``, in plain numpy.

Every function here takes host arrays or lists and returns floats / dicts; nothing runs a model.
``vlmjax.diagnostics.vqa`` runs the model (through the task's own evaluation) and calls these.

Accuracies are fractions in [0, 1]; a "by type" dict is ``{'overall': acc, <question type>: acc, ...}``
with the types in the order given (types without rows are left out; overall is NaN with no rows).
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Normalize = Callable[[str], str]


def plain_normalize(text: str) -> str:
    """Lowercase, whitespace collapsed: the answer normal form when a task gives none."""
    return " ".join(str(text).lower().split())


# ---------------------------------------------------------------------------------------------
# Accuracy per question type, and what the image changes.
# ---------------------------------------------------------------------------------------------


def _types_in_order(qtypes: Sequence[str], types: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(str(t) for t in qtypes))
    if types is None:
        return present
    ordered = [str(t) for t in types if str(t) in present]
    return ordered + [t for t in present if t not in ordered]  # types the caller did not list last


def accuracy_by_type(correct: Sequence[bool], qtypes: Sequence[str],
                     types: Sequence[str] | None = None) -> dict[str, float]:
    """Mean correctness overall and per question type.

    Args:
      correct: bool [N], one per question.
      qtypes: str [N], each question's type.
      types: the order of the per-type entries (default: order of first appearance).

    Returns:
      {'overall': mean of correct (NaN when N == 0), <type>: mean over that type's rows, ...}.
    """
    correct = np.asarray(correct, bool).reshape(-1)
    qtypes = [str(t) for t in qtypes]
    if len(qtypes) != len(correct):
        raise ValueError(f"accuracy_by_type: {len(correct)} correctness values but {len(qtypes)} types.")
    out = {"overall": float(correct.mean()) if len(correct) else math.nan}
    qt = np.asarray(qtypes, dtype=object)
    for t in _types_in_order(qtypes, types):
        out[t] = float(correct[qt == t].mean())
    return out


def counts_by_type(qtypes: Sequence[str], types: Sequence[str] | None = None) -> dict[str, int]:
    """{'overall': N, <type>: number of rows of that type, ...} for qtypes: str [N]."""
    qtypes = [str(t) for t in qtypes]
    c = collections.Counter(qtypes)
    return {"overall": len(qtypes), **{t: c[t] for t in _types_in_order(qtypes, types)}}


def vision_drop(real: Mapping[str, float], other: Mapping[str, float]) -> dict[str, float]:
    """Accuracy with the real images minus accuracy with other images (shuffled / blank), per key
    the two have: > 0 when the model needs its own image, 0 when it ignores the image."""
    return {k: float(real[k]) - float(other[k]) for k in real if k in other}


def answer_changed(a: Sequence[str], b: Sequence[str], normalize: Normalize = plain_normalize) -> float:
    """Fraction of questions whose (normalised) answer differs between two image modes.

    a, b: str [N], the answers to the same N questions (NaN when N == 0). 0 for a model that ignores
    the image, whatever its accuracy."""
    if len(a) != len(b):
        raise ValueError(f"answer_changed: {len(a)} vs {len(b)} answers.")
    if not len(a):
        return math.nan
    return float(np.mean([normalize(x) != normalize(y) for x, y in zip(a, b)]))


# ---------------------------------------------------------------------------------------------
# Dataset bias: answering without looking (most frequent training answer per type / prefix).
# ---------------------------------------------------------------------------------------------


def most_frequent(answers: Sequence[str], normalize: Normalize = plain_normalize) -> str:
    """The most frequent normalised answer; ties go to the alphabetically first (deterministic)."""
    counts = collections.Counter(normalize(a) for a in answers)
    if not counts:
        raise ValueError("most_frequent: no answers.")
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def question_prefix(question: str, n_words: int = 3, normalize: Normalize = plain_normalize) -> str:
    """The first ``n_words`` words of the normalised question: 'What colour is the cube?' ->
    'what colour is'."""
    return " ".join(normalize(question).split()[:n_words])


def answer_priors(train: Sequence[Mapping[str, str]], normalize: Normalize = plain_normalize,
                  n_words: int = 3) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """The two bias predictors learned from the TRAINING questions.

    Args:
      train: [M] dicts with 'qtype', 'question', 'answer'.

    Returns:
      (type prior {qtype: most frequent answer}, prefix prior {(qtype, first n_words words): most
      frequent answer}).
    """
    by_type: dict[str, list[str]] = {}
    by_prefix: dict[tuple[str, str], list[str]] = {}
    for ex in train:
        t = str(ex["qtype"])
        by_type.setdefault(t, []).append(ex["answer"])
        by_prefix.setdefault((t, question_prefix(ex["question"], n_words, normalize)), []).append(ex["answer"])
    return ({t: most_frequent(a, normalize) for t, a in by_type.items()},
            {k: most_frequent(a, normalize) for k, a in by_prefix.items()})


def bias_predictions(rows: Mapping[str, Sequence[str]], type_prior: Mapping[str, str],
                     prefix_prior: Mapping[tuple[str, str], str], normalize: Normalize = plain_normalize,
                     n_words: int = 3) -> tuple[list[str], list[str]]:
    """The answers of the two bias predictors to the questions of ``rows`` (columns 'qtype' [N] and
    'question' [N]): (type prior's [N], prefix prior's [N]). A type never seen in training gets ''
    (counted wrong); a prefix never seen falls back to its type's answer."""
    by_type, by_prefix = [], []
    for t, q in zip(rows["qtype"], rows["question"]):
        t = str(t)
        typed = type_prior.get(t, "")
        by_type.append(typed)
        by_prefix.append(prefix_prior.get((t, question_prefix(q, n_words, normalize)), typed))
    return by_type, by_prefix


def bias_baselines(train: Sequence[Mapping[str, str]], rows: Mapping[str, Sequence[str]],
                   normalize: Normalize = plain_normalize, types: Sequence[str] | None = None,
                   n_words: int = 3) -> dict[str, Any]:
    """Accuracy of answering without the image, from training answer statistics alone.

    Args:
      train: [M] training questions, dicts with 'qtype', 'question', 'answer'.
      rows: the evaluated questions, columns 'qtype', 'question', 'answer' (each [N]).
      normalize: the answer normal form exact match uses.
      types: order of the per-type entries.
      n_words: prefix length in words.

    Returns:
      {'type_prior': accuracy by type of the most frequent training answer of each question type,
       'prefix_prior': the same per (type, first n_words words) with the type's answer for unseen
       prefixes, 'train_questions': M, 'prefixes': number of (type, prefix) keys seen in training}.
    """
    type_prior, prefix_prior = answer_priors(train, normalize, n_words)
    by_type, by_prefix = bias_predictions(rows, type_prior, prefix_prior, normalize, n_words)
    answers = [normalize(a) for a in rows["answer"]]
    qtypes = list(rows["qtype"])
    return {
        "type_prior": accuracy_by_type([normalize(p) == a for p, a in zip(by_type, answers)], qtypes, types),
        "prefix_prior": accuracy_by_type([normalize(p) == a for p, a in zip(by_prefix, answers)], qtypes, types),
        "train_questions": len(train),
        "prefixes": len(prefix_prior),
    }


# ---------------------------------------------------------------------------------------------
# Visual features and images.
# ---------------------------------------------------------------------------------------------


def feature_diversity(features: np.ndarray, eps: float = 1e-12) -> float:
    """1 - the mean pairwise cosine similarity of pooled image features.

    Args:
      features: [N, D], one row per (distinct) image.

    Returns:
      1 - mean_{i != j} cos(f_i, f_j): 0 when all rows point the same way, 1 when they are
      pairwise orthogonal (up to 2 for opposite ones); NaN for N < 2. Computed as
      (|sum_i u_i|^2 - sum_i |u_i|^2) / (N (N - 1)) over the unit rows u_i, O(N D) (no N x N matrix).
      An all-zero row counts as orthogonal to every other.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"feature_diversity: features must be [N, D], got shape {f.shape}.")
    n = f.shape[0]
    if n < 2:
        return math.nan
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    u = np.where(norms > eps, f / np.maximum(norms, eps), 0.0)
    total = float(np.sum(u.sum(axis=0) ** 2))
    diag = float(np.sum(u * u))
    return 1.0 - (total - diag) / (n * (n - 1))


def image_groups(images: Sequence[np.ndarray]) -> np.ndarray:
    """Group ids of identical images (same shape, dtype and bytes), in order of first appearance.

    images: [N] arrays (e.g. [S, S, 3] each). Returns int64 [N]: 0 for the first image and every
    copy of it, 1 for the next different one, ... (several questions about one picture share it)."""
    ids: dict[bytes, int] = {}
    out = np.empty(len(images), np.int64)
    for i, im in enumerate(images):
        a = np.ascontiguousarray(im)
        key = hashlib.sha1(repr((a.shape, a.dtype.str)).encode() + a.tobytes()).digest()
        out[i] = ids.setdefault(key, len(ids))
    return out


def derangement(groups: np.ndarray) -> np.ndarray | None:
    """A fixed derangement of images: row i takes the image of group (g_i + 1) mod G.

    groups: int [N] from ``image_groups`` (0..G-1). Returns int [N], for each row the index of the
    row whose image it gets (the first row of the next group), so no row keeps its own picture,
    nor a copy of it; None when there are fewer than 2 distinct images."""
    groups = np.asarray(groups, np.int64)
    g = int(groups.max()) + 1 if len(groups) else 0
    if g < 2:
        return None
    first = np.full(g, -1, np.int64)
    for i, k in enumerate(groups):
        if first[k] < 0:
            first[k] = i
    return first[(groups + 1) % g]


__all__ = ["accuracy_by_type", "answer_changed", "answer_priors", "bias_baselines", "bias_predictions",
           "counts_by_type", "derangement", "feature_diversity", "image_groups", "most_frequent",
           "plain_normalize", "question_prefix", "vision_drop"]
