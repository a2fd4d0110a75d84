"""Orbax checkpointing of the train state, the grain iterator and the config.

MaxText ``common/checkpointing.py`` is the model: one ``CheckpointManager`` with a composite of
items, async saves, ``max_to_keep``, and automatic resume from the workdir. Orbax writes each step
to a temporary directory and renames it on commit, so a half-written step is never listed. A step
that is listed but cannot be read (a disk error, a truncated file) is reported, moved aside (never
deleted) and the previous step is used.

Every path goes through ``etils.epath``, so the directory may be local or ``gs://bucket/...`` (orbax
is epath-native and writes the arrays through tensorstore). ``directory`` is printed as given.
"""

from __future__ import annotations

import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vlmjax.train.metrics import PathLike, as_path, read_json
from vlmjax.tree import flat_with_paths

CORRUPT_DIR = "corrupt_checkpoints"


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
    """Saves and restores ``{"state", "data", "config"}`` under ``directory``.

    ``directory``: a ``str`` or ``epath.Path``, local (made absolute) or ``gs://``. ``.directory`` is
    its string form for messages (``gs://bucket/run/checkpoints`` stays that); ``.path`` the
    ``epath.Path``.
    """

    def __init__(self, directory: PathLike, *, keep: int, every: int, async_save: bool = True):
        self.path = as_path(directory)
        self.directory = os.fspath(self.path)
        self.every = int(every)
        # The save interval is decided here, not by orbax, whose default policy also saves the first
        # step it sees (a resumed run would checkpoint off-interval).
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
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
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config_dict),
            ),
            force=True,
        )

    def restore_latest(self, abstract_state, data_iter) -> tuple[Any, int] | None:
        """Restores the newest readable step onto ``abstract_state``'s shardings.

        ``abstract_state``: ShapeDtypeStructs with the CURRENT run's shardings, so a checkpoint written
        on another mesh is resharded on load. ``data_iter`` is restored in place. Returns
        ``(state, step)`` or None when there is no checkpoint.
        """
        for step in reversed(self.all_steps()):
            try:
                saved = self.manager.item_metadata(step)["state"]
            except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is unusable.
                self._report_unreadable(step, e)
                continue
            # Readable but written by another model/optimizer config: that is the user's config
            # error, not corruption, so nothing is moved aside and training does not restart.
            check_compatible(saved, abstract_state, step, self.directory)
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iter),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any read failure means "this step is unusable".
                self._report_unreadable(step, e)
                continue
            return restored["state"], step
        return None

    def _report_unreadable(self, step: int, e: Exception):
        logging.error("Checkpoint step %d in %s is unreadable (%s: %s); falling back to the "
                      "previous step.", step, self.directory, type(e).__name__, e)
        if jax.process_index() == 0:
            print(f"WARNING: checkpoint step {step} in {self.directory} is unreadable "
                  f"({type(e).__name__}: {str(e)[:300]}); falling back to the previous checkpoint.",
                  flush=True)
        self._quarantine(step, f"{type(e).__name__}: {e}")

    def _quarantine(self, step: int, reason: str = ""):
        """Moves an unreadable step aside (kept for inspection) so the step can be saved again."""
        multihost_utils.sync_global_devices(f"vlmjax_ckpt_quarantine_{step}")
        if jax.process_index() == 0:
            dst = quarantine_step(self.path, step, reason)
            if dst is not None:
                logging.warning("Moved checkpoint step %d to %s.", step, os.fspath(dst))
        multihost_utils.sync_global_devices(f"vlmjax_ckpt_quarantined_{step}")
        self.manager.close()
        self._open()

    def saved_config(self, step: int) -> dict[str, Any]:
        return read_json(self.path / str(step) / "config" / "metadata")

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


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
