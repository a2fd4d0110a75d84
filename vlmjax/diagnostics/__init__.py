"""Diagnostics of VQA-style models: how much a finished model uses vision (docs/diagnostics.md).

  metrics   accuracy by question type, vision-dependency drop, answer-prior (dataset bias)
            baselines per type and per question prefix, visual feature diversity, image groups and
            the shuffling derangement (plain numpy)
  gates     gate params found by name (tanh Flamingo gates, sigmoid vision gates): per-layer
            statistics and their trajectory over training
  vqa       ``VQAProbe`` (what ``Task.vqa_probe()`` returns) and ``diagnose``: the model's own
            evaluation with real, shuffled and blank images -> the report
  report    the report as a table, ``diagnostics.json`` and PNG plots (matplotlib optional)

This package sits beside ``vlmjax.models`` / ``vlmjax.data`` (it imports only the ground floor); the
runner (``vlmjax.run.diagnose``, ``python -m vlmjax.diagnose``) hands it the task's probe and the
trainer's jitted evaluation.
"""

from vlmjax.diagnostics import gates, metrics, report
from vlmjax.diagnostics.vqa import MODES, ImageModes, VQAProbe, diagnose

__all__ = ["MODES", "ImageModes", "VQAProbe", "diagnose", "gates", "metrics", "report"]
