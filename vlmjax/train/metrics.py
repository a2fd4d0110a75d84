"""Metric writing: a readable line, ``metrics.jsonl`` and optional wandb. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
    """Writes each record to ``workdir/metrics.jsonl`` and prints a line; wandb if configured.

    wandb is imported only when ``config.wandb.mode`` is not 'disabled' (the GPU machine and many
    clusters don't have it installed).
    """

    def __init__(self, workdir: str, config):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)
        mode = config.wandb.mode
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"config.wandb.mode={mode!r} is not one of 'disabled', 'offline', 'online'.")
        if mode != "disabled":
            import wandb  # pylint: disable=g-import-not-at-top

            self._wandb = wandb.init(
                project=config.wandb.project, name=config.wandb.name or None, mode=mode,
                dir=workdir, config=config.to_dict(), resume="allow",
                id=config.wandb.run_id or None)

    def write(self, step: int, record: dict[str, Any], *, kind: str = "train", line: str | None = None):
        if not self.enabled:
            return
        rec = {"step": int(step), "kind": kind, **{k: _py(v) for k, v in record.items()}}
        self._f.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))},
                            step=int(step))
        if line is None:
            line = f"[{kind}] step {step} " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
        print(line, flush=True)

    def close(self):
        if not self.enabled:
            return
        self._f.close()
        if self._wandb is not None:
            self._wandb.finish()


def _py(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(workdir: str, kind: str | None = None) -> list[dict[str, Any]]:
    """Reads ``metrics.jsonl`` back (tests, benchmarks, notebooks)."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out
