"""The VQA diagnostics: a finished model's own evaluation, run with real, shuffled and blank images.

A task supports them by returning a ``VQAProbe`` from ``Task.vqa_probe()`` (``vlmjax/train/task.py``).
The caller (``vlmjax.run.diagnose``) hands ``diagnose`` the eval batches and the trainer's jitted
evaluation; nothing here imports the trainer or a task, so a hand-made model is tested the same way:

  evaluate(batches) -> outputs      the task's eval_fn over the batches, combined as the trainer
                                    combines them (scalars summed, per-example arrays concatenated:
                                    exactly what ``finalize_eval`` gets)
  probe.rows(outputs) -> columns    per VQA question: index, qtype, question, answer, prediction,
                                    correct (the task's own answer decoding and exact match)

Image modes (every other field of the batch unchanged):

  real      the batches as they are;
  shuffled  each example gets the image of the NEXT DISTINCT image of the eval set (identical
            images, e.g. several questions about one picture, form one group; group g takes group
            g + 1's image, the last the first's): a fixed derangement, so no example keeps its own
            picture or a copy of it;
  blank     every image is ``probe.blank_image``: a constant mid-grey picture through the task's
            own preprocessing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vlmjax.diagnostics import gates as gates_lib
from vlmjax.diagnostics import metrics

MODES = ("real", "shuffled", "blank")
ROW_FIELDS = ("index", "qtype", "question", "answer", "prediction", "correct")


@dataclasses.dataclass(frozen=True)
class VQAProbe:
    """What a task gives the VQA diagnostics (``Task.vqa_probe()``).

    Attributes:
      rows: combined eval outputs (what ``finalize_eval`` gets) -> per VQA question (captions and
        padding rows left out), columns of equal length N: 'index' (int, the eval row), 'qtype',
        'question', 'answer', 'prediction' (str), 'correct' (bool: the task's exact match).
      train_examples: the TRAINING questions the bias baselines learn from, [M] dicts with 'qtype',
        'question', 'answer' (e.g. the sample the task's own answer prior is taken from).
      blank_image: [S, S, C] float: a mid-grey image through the task's preprocessing.
      qtypes: the question types in report order.
      normalize: the answer normal form of the task's exact match.
      image_key / mask_key: batch fields of the images [B, S, S, C] and of the real-row mask [B].
      image_features: None, or ``(params, model_state, batch) -> [B, D]`` pooled image features of
        the vision encoder (traced under the trainer's jit): for the feature diversity.
      question_only: None, or the accuracy by type of a question-only baseline run,
        ``{'source': its workdir, 'overall': acc, <qtype>: acc, ...}``.
      gate_patterns: (regex, 'tanh' | 'sigmoid') pairs naming the model's gate params.
      notes: lines the report repeats (e.g. "text-only run: the model never sees an image").
    """

    rows: Callable[[Mapping[str, Any]], Mapping[str, Sequence[Any]]]
    train_examples: Sequence[Mapping[str, str]]
    blank_image: np.ndarray
    qtypes: tuple[str, ...] = ()
    normalize: Callable[[str], str] = metrics.plain_normalize
    image_key: str = "image"
    mask_key: str = "mask"
    image_features: Callable[..., Any] | None = None
    question_only: Mapping[str, Any] | None = None
    gate_patterns: tuple[tuple[str, str], ...] = gates_lib.GATE_PATTERNS
    notes: tuple[str, ...] = ()


class ImageModes:
    """The eval batches in each image mode (module docstring).

    Args:
      batches: the task's eval batches (dicts of numpy arrays with a leading batch axis B).
      image_key / mask_key: the image field [B, S, S, C] and the real-row mask [B] (> 0 = real).
      blank_image: [S, S, C], what every image becomes in 'blank'.
    """

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]], image_key: str, blank_image: np.ndarray,
                 mask_key: str = "mask"):
        self.batches = list(batches)
        self.image_key, self.mask_key = image_key, mask_key
        for b in self.batches:
            if image_key not in b or mask_key not in b:
                raise ValueError(f"an eval batch has no {image_key!r} / {mask_key!r} field (has {sorted(b)}).")
        self.blank = np.asarray(blank_image)
        shape = tuple(np.shape(self.batches[0][image_key])[1:]) if self.batches else self.blank.shape
        if self.blank.shape != shape:
            raise ValueError(f"blank image {self.blank.shape} differs from the batches' images {shape}.")
        # Real rows (b, r) in eval order, their image groups and where each shuffled image comes from.
        self.rows = [(b, r) for b, batch in enumerate(self.batches)
                     for r in np.flatnonzero(np.asarray(batch[mask_key]).reshape(-1) > 0)]
        self.groups = metrics.image_groups([self.batches[b][image_key][r] for b, r in self.rows])
        self.num_images = int(self.groups.max()) + 1 if len(self.groups) else 0
        src = metrics.derangement(self.groups)
        self._source = None if src is None else {row: self.rows[int(j)] for row, j in zip(self.rows, src)}

    @property
    def can_shuffle(self) -> bool:
        """False with fewer than 2 distinct images (nothing to swap)."""
        return self._source is not None

    def __call__(self, mode: str) -> Iterator[dict[str, np.ndarray]]:
        """The batches of ``mode`` ('real' | 'shuffled' | 'blank'), one at a time (shallow copies)."""
        if mode not in MODES:
            raise ValueError(f"image mode {mode!r} is not one of {MODES}.")
        if mode == "shuffled" and not self.can_shuffle:
            raise ValueError(f"the eval set has {self.num_images} distinct image(s): nothing to shuffle.")
        for b, batch in enumerate(self.batches):
            if mode == "real":
                yield dict(batch)
                continue
            images = np.array(batch[self.image_key], copy=True)
            if mode == "blank":
                images[...] = self.blank.astype(images.dtype)
            else:
                for r in range(images.shape[0]):
                    src = self._source.get((b, r))
                    if src is not None:
                        images[r] = self.batches[src[0]][self.image_key][src[1]]
            yield {**batch, self.image_key: images}

    def distinct_real(self) -> list[tuple[int, int]]:
        """(batch, row) of the first example of each distinct image, in group order."""
        first: dict[int, tuple[int, int]] = {}
        for row, g in zip(self.rows, self.groups):
            first.setdefault(int(g), row)
        return [first[g] for g in range(self.num_images)]


def check_rows(rows: Mapping[str, Sequence[Any]], mode: str) -> dict[str, np.ndarray]:
    """A task's per-question columns as numpy arrays sorted by 'index' (a ValueError names what is
    missing or ragged)."""
    missing = [f for f in ROW_FIELDS if f not in rows]
    if missing:
        raise ValueError(f"VQAProbe.rows ({mode} images) lacks column(s) {missing}; it must give {ROW_FIELDS}.")
    n = {len(rows[f]) for f in ROW_FIELDS}
    if len(n) != 1:
        raise ValueError(f"VQAProbe.rows ({mode} images): columns of different lengths "
                         f"{ {f: len(rows[f]) for f in ROW_FIELDS} }.")
    order = np.argsort(np.asarray(rows["index"], np.int64), kind="stable")
    out = {f: np.asarray(rows[f], dtype=object)[order] for f in ROW_FIELDS}
    out["index"] = out["index"].astype(np.int64)
    out["correct"] = out["correct"].astype(bool)
    return out


def pooled_features(modes: ImageModes, features: Callable[[Mapping[str, np.ndarray]], Any]) -> np.ndarray:
    """[G, D] features of the G distinct real images (one row each, the first example showing it).

    features: batch -> [B, D] (the probe's ``image_features`` jitted and bound to the params)."""
    wanted: dict[int, list[int]] = {}
    for b, r in modes.distinct_real():
        wanted.setdefault(b, []).append(int(r))
    rows = []
    for b in sorted(wanted):
        f = np.asarray(features(modes.batches[b]), np.float64)
        rows.extend(f[wanted[b]])
    return np.stack(rows) if rows else np.zeros((0, 0))


def _nan_to_none(x):
    """The report as strict JSON: NaN / inf -> None (json.dumps would write NaN)."""
    if isinstance(x, dict):
        return {str(k): _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def diagnose(probe: VQAProbe, batches: Sequence[Mapping[str, np.ndarray]],
             evaluate: Callable[[Iterable[Mapping[str, np.ndarray]]], Mapping[str, Any]], *,
             features: Callable[[Mapping[str, np.ndarray]], Any] | None = None,
             params: Mapping[str, Any] | None = None,
             trajectory: Mapping[str, Sequence[Sequence[float]]] | None = None,
             trajectory_source: str = "", meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Runs every diagnostic; returns the report (a JSON-ready dict; ``report.format_table`` prints it).

    Args:
      probe: the task's ``VQAProbe``.
      batches: the eval batches (the task's ``eval_batches``).
      evaluate: iterable of batches -> combined eval outputs (``Trainer.eval_outputs`` bound to the
        params), run once per image mode.
      features: None, or batch -> [B, D] pooled image features (for the feature diversity).
      params: the model's params (the gates' final values), or None.
      trajectory: {gate: [[step, mean, min, max], ...]} over training (``gates.trajectory`` of the
        checkpoints, or ``gates.metric_trajectory`` of metrics.jsonl), or None.
      trajectory_source: where the trajectory comes from (for the report).
      meta: extra top-level fields (workdir, task, step, split).

    Report keys: meta's, 'num_questions', 'qtypes', 'counts', 'accuracy' {mode: by type},
    'vision_drop' {'shuffled' | 'blank': by type}, 'answer_changed' {'shuffled' | 'blank': fraction},
    'text_only' {'blank_images': by type, 'question_only': by type | None}, 'dataset_bias',
    'feature_diversity', 'gates', 'images', 'headline', 'notes' (docs/diagnostics.md).
    """
    notes = list(probe.notes)
    modes = ImageModes(batches, probe.image_key, probe.blank_image, probe.mask_key)
    run_modes = [m for m in MODES if m != "shuffled" or modes.can_shuffle]
    if not modes.can_shuffle:
        notes.append(f"the eval set has {modes.num_images} distinct image(s): no shuffled-image mode")
    rows = {m: check_rows(probe.rows(evaluate(modes(m))), m) for m in run_modes}
    real = rows["real"]
    for m in run_modes:
        if not np.array_equal(rows[m]["index"], real["index"]):
            raise ValueError(f"VQAProbe.rows gave other questions with {m} images than with the real ones.")
    if not len(real["index"]):
        raise ValueError("the eval batches hold no VQA question: nothing to diagnose.")
    types = list(probe.qtypes) or None
    qt = list(real["qtype"])
    acc = {m: metrics.accuracy_by_type(rows[m]["correct"], qt, types) for m in run_modes}
    order = list(acc["real"])
    drop = {m: metrics.vision_drop(acc["real"], acc[m]) for m in run_modes if m != "real"}
    changed = {m: metrics.answer_changed(real["prediction"], rows[m]["prediction"], probe.normalize)
               for m in run_modes if m != "real"}
    bias = metrics.bias_baselines(probe.train_examples, real, probe.normalize, types)
    if not probe.train_examples:
        notes.append("no training questions: the bias baselines answer '' (all wrong)")
    q_only = None
    if probe.question_only is not None:
        q_only = dict(probe.question_only)

    diversity = None
    if features is not None and modes.num_images:
        f = pooled_features(modes, features)
        diversity = {"value": metrics.feature_diversity(f), "images": int(f.shape[0]), "dim": int(f.shape[1])}

    stats = gates_lib.gate_stats(params, probe.gate_patterns) if params is not None else {}
    summary = gates_lib.summarize(stats)
    gate_report = {"final": stats, "summary": summary, "trajectory": dict(trajectory or {}),
                   "trajectory_source": trajectory_source if trajectory else ""}
    if params is not None and not stats:
        notes.append("no gate params in the model (names: docs/diagnostics.md)")

    headline = {
        "vqa_accuracy": acc["real"]["overall"],
        "vision_dependency_drop": drop["shuffled"]["overall"] if "shuffled" in drop else None,
        "vision_dependency_drop_blank": drop["blank"]["overall"],
        "text_only_accuracy": acc["blank"]["overall"],
        "question_only_accuracy": q_only.get("overall") if q_only else None,
        "dataset_bias": bias["type_prior"]["overall"],
        "dataset_bias_prefix": bias["prefix_prior"]["overall"],
        "feature_diversity": diversity["value"] if diversity else None,
        "vision_gate_mean": summary.get(gates_lib.SIGMOID, {}).get("mean"),
        "tanh_gate_mean": summary.get(gates_lib.TANH, {}).get("mean"),
    }
    report = {
        **dict(meta or {}),
        "num_questions": int(len(real["index"])),
        "qtypes": [k for k in order if k != "overall"],
        "counts": metrics.counts_by_type(qt, types),
        "accuracy": acc,
        "vision_drop": drop,
        "answer_changed": changed,
        "text_only": {"blank_images": acc["blank"], "question_only": q_only},
        "dataset_bias": bias,
        "feature_diversity": diversity,
        "gates": gate_report,
        "images": {"examples": len(modes.rows), "distinct": modes.num_images},
        "headline": headline,
        "notes": notes,
    }
    return _nan_to_none(report)


__all__ = ["MODES", "ROW_FIELDS", "ImageModes", "VQAProbe", "check_rows", "diagnose", "pooled_features"]
