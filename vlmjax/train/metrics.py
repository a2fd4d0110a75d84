"""Metric writing: a readable line, ``metrics.jsonl`` and optional wandb. Only process 0 writes.

Also the workdir path helpers shared with the checkpointer and the trainer: a workdir is a local
directory or a ``gs://`` (any ``etils.epath``) URI, and every file under it goes through
``etils.epath`` (never ``os.path``/``open``, which would write ``<cwd>/gs:/...`` on every worker).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
    """True for a local path; False for a URI such as ``gs://bucket/run`` (an object store)."""
    return "://" not in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a local one made absolute, a URI kept as given.

    (``os.path.abspath("gs://b/x")`` is ``<cwd>/gs:/b/x``, and so is ``epath.Path("gs://b/x").absolute()``.)
    ``os.fspath`` of the result is what to print: ``gs://bucket/run/checkpoints`` stays that.
    """
    p = epath.Path(path)
    return p if (not is_local(p) or p.is_absolute()) else p.absolute()


def _json_default(v):
    if hasattr(v, "item"):  # numpy / jax scalars
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> epath.Path:
    """Writes ``obj`` as JSON to ``path`` (local or ``gs://``), creating its parent directory.

    Local: written to ``<path>.tmp`` then renamed over ``path`` (atomic: a reader or a crash never
    sees half a file). Object stores (``gs://``): one upload, which is atomic there already (an object
    appears whole when its upload finishes; a rename would be a copy plus a delete). Not
    multi-process aware: call it from process 0 only. Returns the path written.
    """
    path = as_path(path)
    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(path):
        path.write_text(text)
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_json(path: PathLike) -> Any:
    """Reads JSON from ``path`` (local or ``gs://``); FileNotFoundError when it is not there."""
    return json.loads(as_path(path).read_text())


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

    ``workdir``: a local directory or a ``gs://`` URI (through ``etils.epath``). Locally the file is
    opened for appending and flushed after every record. Object stores have no append (gcsfs
    silently turns ``open("a")`` into an overwrite, and an object becomes visible only when closed),
    so there the existing file is read once and the whole file is re-uploaded at most every
    ``flush_every_s`` seconds, on ``flush()`` and on ``close()``: a crash can lose the records of the
    last ``flush_every_s`` seconds, never the earlier ones.

    wandb is imported only when ``config.wandb.mode`` is not 'disabled' (the GPU machine and many
    clusters don't have it installed).
    """

    def __init__(self, workdir: PathLike, config, *, flush_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        self.workdir = as_path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self._local = is_local(self.path)
        self._flush_every_s = float(flush_every_s)
        self._wandb = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._local:
            self._f = self.path.open("a")
        else:
            self._lines: list[str] = []
            if self.path.exists():
                old = self.path.read_text()
                if old:
                    self._lines.append(old if old.endswith("\n") else old + "\n")
            self._dirty = False
            self._last_flush = -math.inf
        mode = config.wandb.mode
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"config.wandb.mode={mode!r} is not one of 'disabled', 'offline', 'online'.")
        if mode != "disabled":
            import wandb  # pylint: disable=g-import-not-at-top

            self._wandb = wandb.init(
                project=config.wandb.project, name=config.wandb.name or None, mode=mode,
                # wandb writes its run files locally: a gs:// workdir would become <cwd>/gs:/...
                dir=os.fspath(self.workdir) if self._local else None,
                config=config.to_dict(), resume="allow",
                id=config.wandb.run_id or None)

    def write(self, step: int, record: dict[str, Any], *, kind: str = "train", line: str | None = None):
        if not self.enabled:
            return
        rec = {"step": int(step), "kind": kind, **{k: _py(v) for k, v in record.items()}}
        if self._local:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
        else:
            self._lines.append(json.dumps(rec) + "\n")
            self._dirty = True
            if time.monotonic() - self._last_flush >= self._flush_every_s:
                self.flush()
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))},
                            step=int(step))
        if line is None:
            line = f"[{kind}] step {step} " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
        print(line, flush=True)

    def flush(self):
        """Makes every record written so far visible in ``metrics.jsonl`` (re-uploads on gs://)."""
        if not self.enabled:
            return
        if self._local:
            self._f.flush()
            return
        if self._dirty:
            self.path.write_text("".join(self._lines))
            self._dirty = False
        self._last_flush = time.monotonic()

    def close(self):
        if not self.enabled:
            return
        if self._local:
            self._f.close()
        else:
            self.flush()
        if self._wandb is not None:
            self._wandb.finish()


def _py(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(workdir: PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Reads ``metrics.jsonl`` back (tests, benchmarks, notebooks); local or ``gs://``."""
    out = []
    for line in (as_path(workdir) / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if kind is None or rec.get("kind") == kind:
            out.append(rec)
    return out
