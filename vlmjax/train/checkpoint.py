"""Orbax checkpointing of the train state, the grain iterator and the config.

MaxText ``common/checkpointing.py`` is the model: one ``CheckpointManager`` with a composite of
items, async saves, ``max_to_keep``, and automatic resume from the workdir. Orbax writes each step
to a temporary directory and renames it on commit, so a half-written step is never listed. A step
that is listed but cannot be read (a disk error, a truncated file) is reported, moved aside (never
deleted) and the previous step is used.

Every path goes through ``etils.epath``, so the directory may be local or ``gs://bucket/...`` (orbax
is epath-native and writes the arrays through tensorstore). ``directory`` is printed as given.

Integrity: orbax's commit protects against a crash mid-write, not against a file that is damaged
later (a bit flipped on disk or in transit keeps the size and the metadata). So every step carries
``vlmjax_checksums.json``, the SHA-256 of each of its files, written inside the step BEFORE orbax
commits it (orbax's ``post_finalization_callback`` runs between finalize and the rename), so a
committed step always has its checksums. Restore verifies them, then checks that every restored
float is finite; a step that fails either is quarantined like an unreadable one and the previous
step is used. A step without checksums (written by an older vlmjax) is used after the finiteness
check, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vlmjax import errors
from vlmjax.train.metrics import PathLike, as_path, read_json
from vlmjax import tree as tree_lib
from vlmjax.tree import flat_with_paths

CORRUPT_DIR = "corrupt_checkpoints"
CHECKSUMS = "vlmjax_checksums.json"
# Files orbax may rewrite after our checksums are taken (commit markers, step metadata timestamps).
_UNHASHED = ("commit_success.txt", "_CHECKPOINT_METADATA", CHECKSUMS)
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CorruptCheckpoint(Exception):
    """A step whose files do not match its checksums, or whose restored state is not finite."""


class NoReadableCheckpoint(errors.UserError, RuntimeError):
    """Every checkpoint of a workdir was unreadable (all moved to corrupt_checkpoints/)."""


def _files(root: epath.Path, rel: str = ""):
    """(relative path, Path) of every file under ``root``, local or gs:// (no os.walk on URIs)."""
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        name = f"{rel}{p.name}"
        if p.is_dir():
            yield from _files(p, name + "/")
        elif p.name not in _UNHASHED:
            yield name, p


def _sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(step_dir: PathLike) -> int:
    """Writes ``<step_dir>/vlmjax_checksums.json`` ({relative path: sha256}); returns the file count."""
    step_dir = as_path(step_dir)
    sums = {rel: _sha256(p) for rel, p in _files(step_dir)}
    (step_dir / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1, sort_keys=True) + "\n")
    return len(sums)


def verify_checksums(step_dir: PathLike) -> bool:
    """True when every file listed in the step's checksums is there with the same SHA-256; False when
    the step has no checksums (an older vlmjax wrote it); raises CorruptCheckpoint naming the file."""
    step_dir = as_path(step_dir)
    listing = step_dir / CHECKSUMS
    if not listing.exists():
        return False
    try:
        want = json.loads(listing.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        raise CorruptCheckpoint(f"{CHECKSUMS} is unreadable ({e})") from None
    for rel, digest in sorted(want.items()):
        p = step_dir / rel
        if not p.exists():
            raise CorruptCheckpoint(f"{rel} is missing")
        got = _sha256(p)
        if got != digest:
            raise CorruptCheckpoint(f"{rel} has SHA-256 {got[:12]}... but {digest[:12]}... was written")
    return True


_all_finite = jax.jit(tree_lib.all_finite)


def nonfinite_paths(state, limit: int = 5) -> list[str]:
    """Up to ``limit`` 'a/b/c' paths of float arrays in ``state`` holding NaN or Inf ([] when all are
    finite; one fused on-device check first, so a healthy state costs one reduction)."""
    if bool(_all_finite(state)):
        return []
    bad = [k for k, v in flat_with_paths(state).items()
           if jnp.issubdtype(v.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(v)))]
    return bad[:limit]


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_with_paths(state).items() if hasattr(v, "shape")}


def check_compatible(saved_metadata, abstract_state, step: int, directory: PathLike) -> None:
    """Raises ValueError listing missing, unexpected and mis-shaped arrays together."""
    saved, want = _shapes(saved_metadata), _shapes(abstract_state)
    first_params = lambda k: (not k.startswith("params/"), k)  # the informative ones first
    missing = sorted(set(want) - set(saved), key=first_params)
    unexpected = sorted(set(saved) - set(want), key=first_params)
    shape = [f"{k}: checkpoint {saved[k]} vs config {want[k]}"
             for k in sorted(set(saved) & set(want), key=first_params) if saved[k] != want[k]]
    if not (missing or unexpected or shape):
        return
    def show(items):
        return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
    raise ValueError(
        f"The checkpoint at step {step} in {directory} was written by a different model or optimizer "
        f"config than the one given. Missing in checkpoint: [{show(missing)}]; unexpected in "
        f"checkpoint: [{show(unexpected)}]; shape mismatches: [{show(shape)}]. Use a fresh --workdir, "
        f"or run with the config saved next to it (config.json).")


def quarantine_step(directory: PathLike, step: int, reason: str = "") -> epath.Path | None:
    """Moves step ``step`` of the checkpoint ``directory`` aside, kept for inspection (never deleted).

    ``<directory>/<step>`` goes to ``<directory>/../corrupt_checkpoints/<step>.<unix time>``, next to it a
    ``<step>.<unix time>.reason.txt`` with ``reason``. That note is written first: on an object store
    (``gs://``) a folder exists only once something is in it, and etils refuses to rename into a
    folder that does not exist. On gs:// the move is a copy and a delete per file (not atomic; the
    source is deleted only after its copy is made). Returns the new location, or None when the step
    directory is not there. Not multi-process aware: call it on process 0 only (the ``Checkpointer``
    does, between barriers).
    """
    directory = as_path(directory)
    src = directory / str(step)
    if not src.exists():
        return None
    stamp = int(time.time())
    dst = directory.parent / CORRUPT_DIR / f"{step}.{stamp}"
    while dst.exists():  # a second quarantine of the same step within the same second
        stamp += 1
        dst = directory.parent / CORRUPT_DIR / f"{step}.{stamp}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    note = dst.parent / f"{dst.name}.reason.txt"
    note.write_text(f"Checkpoint step {step} of {os.fspath(directory)} was moved here by vlmjax at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(stamp))} because it could "
                    f"not be read:\n{reason}\n")
    src.rename(dst)
    return dst


class Checkpointer:
    """Saves and restores ``{"state", "data", "config"}`` under ``directory``, with checksums.

    ``directory``: a ``str`` or ``epath.Path``, local (made absolute) or ``gs://``. ``.directory`` is
    its string form for messages (``gs://bucket/run/checkpoints`` stays that); ``.path`` the
    ``epath.Path``. Saves are asynchronous unless ``async_save=False`` (then ``save`` returns once the
    step is committed); one save is in flight at a time (orbax waits for the previous one).
    """

    def __init__(self, directory: PathLike, *, keep: int, every: int, async_save: bool = True):
        self.path = as_path(directory)
        self.directory = os.fspath(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"{self.directory} is a file, not a directory: the trainer keeps its "
                                     "checkpoints there; move the file away or use another --workdir.")
        self.every = int(every)
        self.async_save = bool(async_save)
        self._sealing: int | None = None  # the step whose save is in flight
        # The save interval is decided here, not by orbax, whose default policy also saves the first
        # step it sees (a resumed run would checkpoint off-interval). The async checkpointer is used
        # for synchronous saves too (followed by a wait): its post-finalization hook is where the
        # checksums are written, before the commit.
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            # A step left half-written by a killed process (`<step>.orbax-checkpoint-tmp`) is removed
            # when the manager opens; it was never committed, so nothing readable is lost.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._open()

    def _open(self):
        self.manager = ocp.CheckpointManager(
            self.path,
            item_names=("state", "data", "config"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
            options=self._options,
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iter, config_dict: dict[str, Any], *, force: bool = False) -> bool:
        """Saves if ``step`` is on the save interval (or ``force``). Returns whether it saved."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        self.manager.wait_until_finished()  # the previous step is sealed before _sealing moves on
        self._sealing = step
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config_dict),
            ),
            force=True,
        )
        if not self.async_save:
            self.manager.wait_until_finished()
        return saved

    def _seal(self):
        """Orbax's post-finalization hook (background thread, every process): process 0 writes the
        checksums of the step being saved into its still-uncommitted directory."""
        step = self._sealing
        if step is None or jax.process_index() != 0:
            return
        # Local: orbax writes `<step>.orbax-checkpoint-tmp[-<time>]` and renames it on commit; object
        # stores: the final directory, committed by a marker file written after this hook.
        tmp = [p for p in self.path.glob(f"{step}{_TMP_SUFFIX}*") if p.is_dir()]
        step_dir = tmp[0] if len(tmp) == 1 else self.path / str(step)
        try:
            write_checksums(step_dir)
        except Exception as e:  # noqa: BLE001 - the step is still a valid (unverified) checkpoint
            logging.error("Could not write checksums for checkpoint step %d in %s: %s", step, step_dir, e)

    def restore_latest(self, abstract_state, data_iter, *, allow_fresh: bool = False) -> tuple[Any, int] | None:
        """Restores the newest usable step onto ``abstract_state``'s shardings.

        ``abstract_state``: ShapeDtypeStructs with the CURRENT run's shardings, so a checkpoint written
        on another mesh is resharded on load. ``data_iter`` is restored in place. A step is usable when
        its metadata and arrays read, its checksums match and every restored float is finite; others
        are quarantined (``corrupt_checkpoints/``). Returns ``(state, step)``, or None when there is
        nothing to resume. When checkpoints existed but none is usable (now or in an earlier run, whose
        quarantined steps are still in ``corrupt_checkpoints/``), raises NoReadableCheckpoint unless
        ``allow_fresh`` (then None: start again from step 0).
        """
        bad: list[int] = []
        for step in reversed(self.all_steps()):
            try:
                saved = self.manager.item_metadata(step)["state"]
            except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is unusable.
                self._report_unreadable(step, e)
                bad.append(step)
                continue
            # Readable but written by another model/optimizer config: that is the user's config
            # error, not corruption, so nothing is moved aside and training does not restart.
            check_compatible(saved, abstract_state, step, self.directory)
            try:
                verified = self._verify(step)
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iter),
                    ),
                )
                nonfinite = nonfinite_paths(restored["state"])
                if nonfinite:
                    raise CorruptCheckpoint(f"non-finite values in {', '.join(nonfinite)}")
            except Exception as e:  # noqa: BLE001 - any read failure means "this step is unusable".
                self._report_unreadable(step, e)
                bad.append(step)
                continue
            if not verified and jax.process_index() == 0:
                print(f"WARNING: checkpoint step {step} in {self.directory} has no {CHECKSUMS} (written "
                      "by an older vlmjax); its values are finite, so it is used unverified.", flush=True)
            return restored["state"], step
        earlier = self.quarantined()
        if (bad or earlier) and not allow_fresh:
            where = os.fspath(self.path.parent / CORRUPT_DIR)
            raise NoReadableCheckpoint(
                f"No usable checkpoint in {self.directory}: "
                + (f"step(s) {', '.join(map(str, bad))} failed now" if bad else "it is empty")
                + (f"; quarantined in {where}: {', '.join(earlier)}" if earlier else "")
                + ". Nothing was deleted. To train again from step 0 in this workdir, rerun with "
                "--config.allow_fresh_start=True (or use a fresh --workdir).")
        return None

    def quarantined(self) -> list[str]:
        """Names (``<step>.<unix time>``) of the steps of this run moved to ``corrupt_checkpoints/``."""
        folder = self.path.parent / CORRUPT_DIR
        if not folder.exists():
            return []
        return sorted((p.name for p in folder.iterdir() if p.is_dir()),
                      key=lambda n: [int(x) for x in re.findall(r"\d+", n)])

    def _verify(self, step: int) -> bool:
        """Checksums of ``step`` on process 0, the outcome shared with every process (one reads)."""
        code, reason = 0, ""
        if jax.process_index() == 0:
            try:
                code = 1 if verify_checksums(self.path / str(step)) else 0
            except CorruptCheckpoint as e:
                code, reason = -1, str(e)
        if jax.process_count() > 1:
            code = int(multihost_utils.broadcast_one_to_all(jnp.int32(code)))
        if code < 0:
            raise CorruptCheckpoint(reason or "checksum mismatch (see process 0's log)")
        return code == 1

    def _report_unreadable(self, step: int, e: Exception):
        what = f"{type(e).__name__}: {e}".strip()
        dst = self._quarantine(step, what)
        if jax.process_index() == 0:
            print(f"WARNING: checkpoint step {step} in {self.directory} is unusable ({_short(what)}); moved "
                  f"to {os.fspath(dst) if dst else CORRUPT_DIR}, falling back to the previous checkpoint.",
                  flush=True)
        else:
            logging.error("Checkpoint step %d in %s is unusable (%s).", step, self.directory, what)

    def _quarantine(self, step: int, reason: str = "") -> epath.Path | None:
        """Moves an unusable step aside (kept for inspection) so the step can be saved again; returns
        where it went (on process 0; None elsewhere)."""
        multihost_utils.sync_global_devices(f"vlmjax_ckpt_quarantine_{step}")
        dst = quarantine_step(self.path, step, reason) if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices(f"vlmjax_ckpt_quarantined_{step}")
        self.manager.close()
        self._open()
        return dst

    def saved_config(self, step: int) -> dict[str, Any]:
        return read_json(self.path / str(step) / "config" / "metadata")

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        """Waits for the in-flight save to commit (and be sealed), then closes the manager."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


def _short(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters (orbax/tensorstore errors span many lines)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_params(workdir: PathLike, subtree: str = "") -> tuple[dict[str, Any], int]:
    """The params (or the ``subtree`` 'a/b' of them) of a vlmjax workdir's newest readable checkpoint.

    For starting another experiment from a finished run (``init_from=<vlmjax workdir>``): the whole
    saved train state is read onto the host (its structure from the checkpoint's metadata), and only
    the params are returned as numpy-backed arrays; the caller places them. Returns (params, step).
    """
    directory = as_path(workdir) / "checkpoints"
    if not directory.is_dir():  # on gs:// a "directory" exists when something is in it
        raise FileNotFoundError(f"{os.fspath(workdir)} has no checkpoints/ directory: init_from must be "
                                "a vlmjax workdir with a finished run, or an HF directory with config.json.")
    manager = ocp.CheckpointManager(directory, item_names=("state",),
                                    item_handlers={"state": ocp.StandardCheckpointHandler()})
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    # Orbax warns that it skips the data iterator and config items, which is what we want here.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        for step in reversed(sorted(manager.all_steps())):
            try:
                verify_checksums(directory / str(step))  # a damaged step is skipped here too
                meta = manager.item_metadata(step)["state"]
                abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta)
                state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as e:  # noqa: BLE001 - an unreadable step: try the previous one
                logging.error("Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                              step, os.fspath(directory), e)
                continue
            params = state["state"]["params"]
            for k in [p for p in subtree.split("/") if p]:
                if k not in params:
                    raise ValueError(f"{os.fspath(workdir)} step {step}: no {k!r} in its params "
                                     f"(have {sorted(params)}).")
                params = params[k]
            return params, step
    finally:
        logging.set_verbosity(verbosity)
        manager.close()
    raise FileNotFoundError(f"No readable checkpoint in {os.fspath(directory)}.")


def checkpoint_steps(workdir: PathLike) -> list[int]:
    """The committed checkpoint steps of a vlmjax workdir (``<workdir>/checkpoints``), ascending; []
    when it has none."""
    directory = as_path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def read_state(workdir: PathLike, abstract, *, step: int | None = None) -> tuple[Any, int]:
    """Reads PART of the saved train state of a vlmjax workdir, read-only (the diagnostics).

    Args:
      workdir: the run's workdir (its ``checkpoints/``).
      abstract: a nested dict of ``jax.ShapeDtypeStruct`` (with shardings) shaped like a subset of
        the saved state, e.g. ``{"params": ..., "model_state": ...}`` from ``Trainer.abstract_state``,
        or only a few leaves ``{"params": {"decoder": {"xattn_0": {"alpha_attn": ...}}}}``: only those
        arrays are read.
      step: the step to read (None: the newest readable one).

    Returns:
      (the restored subset, its step). Checksums are verified; an unreadable step is skipped (step
      None) or an error (a given step). Nothing is moved or deleted, unlike ``restore_latest``.
    """
    directory = as_path(workdir) / "checkpoints"
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{os.fspath(workdir)} has no checkpoints: train the run first.")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{os.fspath(directory)} has no step {step} (have {steps}).")
    manager = ocp.CheckpointManager(directory, item_names=("state",),
                                    item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns about the items (data, config) left unread
    errors_seen = []
    try:
        for s in reversed(steps) if step is None else [step]:
            try:
                verify_checksums(directory / str(s))
                restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True)))
                return restored["state"], s
            except Exception as e:  # noqa: BLE001 - an unreadable step: try the previous one
                errors_seen.append(f"step {s}: {_short(f'{type(e).__name__}: {e}', 200)}")
                if step is None:
                    logging.error("Checkpoint step %d in %s is unreadable (%s); trying the previous one.",
                                  s, os.fspath(directory), e)
    finally:
        logging.set_verbosity(verbosity)
        manager.close()
    raise FileNotFoundError(f"No readable checkpoint in {os.fspath(directory)}: {'; '.join(errors_seen)}.")
