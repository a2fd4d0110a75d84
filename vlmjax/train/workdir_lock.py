"""One writer per workdir: the lock file ``WORKDIR/vlmjax.lock``.

Two training processes on one workdir interleave checkpoints, ``metrics.jsonl`` and ``config.json``
(or crash inside orbax, or hang). :class:`WorkdirLock` stops the second one with a one-line
:class:`WorkdirLocked` error that names the holder, and lets a restarted run take over the lock its
killed predecessor left behind without anyone deleting anything.

The lock file is JSON::

    {"host": ..., "pid": ..., "started": "<ISO time>", "started_unix": ..., "command": "<sys.argv>",
     "heartbeat": <unix time>, "token": "<random hex: this holder>",
     "proc_start": <the pid's start time from /proc/<pid>/stat, or null>,
     "pid_ns": "<the pid namespace, or null>", "boot_id": "<the kernel's boot id, or null>"}

How it is taken:

* **Local paths** (including NFS v3+ and other shared filesystems, for practical purposes): the
  file is created with ``os.open(O_CREAT | O_EXCL | O_WRONLY)``, which exactly one creator wins.
* **Object stores** (``gs://...``, any non-local ``etils.epath`` URI): epath has no exclusive
  create, so the lock is written when absent, then re-read after ``settle_s`` seconds and kept only
  if it still holds our token (the last writer wins; an earlier one sees the other token and
  stops). This is BEST EFFORT: two launches that both find the lock absent and whose writes are
  more than ``settle_s`` apart could both believe they hold it. The heartbeat notices that later
  (see below) but does not stop either run.

A held lock is STALE, and is taken over with one printed line
``vlmjax: taking over the stale lock of <host> pid <pid> started <time> (<why>)``, when

* it was written on this host, in this pid namespace, and its pid is not running (``os.kill(pid,
  0)`` raises ProcessLookupError), or the pid runs but started at another time than recorded (the
  pid was reused), or the machine has rebooted since (another boot id). This is the common case of
  a killed or preempted run restarted on the same machine: the takeover is immediate. A lock from
  another pid namespace with the same host name (containers sharing the host's name) cannot be
  checked this way and goes by its heartbeat alone;
* or its heartbeat is older than ``stale_after_s`` seconds (any host; this assumes the hosts'
  clocks agree to well within ``stale_after_s``).

Otherwise :meth:`WorkdirLock.acquire` raises :class:`WorkdirLocked`. Taking over locally removes the
stale file and creates ours exclusively, under a short-lived ``vlmjax.lock.takeover`` file created
exclusively too, inside which the stale lock is re-read: two launches that find the same stale lock
cannot both win (one of them then sees the other's live lock and raises).

While held, a daemon thread rewrites the file every ``heartbeat_s`` seconds with a new heartbeat
time (atomically: a temporary file renamed locally, one upload on object stores). If the file holds
another token (someone took the lock over) or is gone, it prints a loud warning to stderr and stops
refreshing; the run itself goes on.

:meth:`WorkdirLock.release` stops the thread and removes the file if it still holds our token; it is
idempotent, safe in ``finally`` blocks, and also registered with ``atexit``. SIGKILL (or a crash of
the machine) leaves the file behind: the next launch on the same host takes it over at once, one on
another host once the heartbeat is ``stale_after_s`` old.

With several jax processes only process 0 may touch the file: use :func:`acquire_for_run`, which
acquires on process 0 and tells every process the outcome, so that all of them raise the same error.

Imports only the standard library, jax, etils and :mod:`vlmjax.train.metrics` (a ground-floor module).
"""

from __future__ import annotations

import atexit
import datetime
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

from etils import epath

from vlmjax import errors
from vlmjax.train import metrics as metrics_lib

LOCK_NAME = "vlmjax.lock"
TAKEOVER_SUFFIX = ".takeover"
DEFAULT_STALE_AFTER_S = 600.0
DEFAULT_HEARTBEAT_S = 60.0
_MAX_MESSAGE_BYTES = 8192  # what acquire_for_run broadcasts of an error message


class WorkdirLocked(errors.UserError, RuntimeError):
    """The workdir's lock is held by a live run. ``path``: the lock file; ``holder``: its contents."""

    def __init__(self, message: str, *, path: str | None = None, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.path = path
        self.holder = holder or {}


# --- facts about processes on this host ----------------------------------------------------------

def _hostname() -> str:
    return socket.gethostname()


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks after boot (/proc/<pid>/stat field 22); None when
    there is no /proc (macOS) or no such process."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        return int(text[text.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    text = _read_text("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:  # e.g. a pid out of range
        return False
    return True


def _command() -> str:
    return " ".join(sys.argv).replace("\r", " ").replace("\n", " ")


def _ago(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# --- the lock ------------------------------------------------------------------------------------

class WorkdirLock:
    """The lock ``WORKDIR/vlmjax.lock`` of a local or ``gs://`` (any ``etils.epath``) workdir.

    Use as ``with WorkdirLock(workdir): ...`` or ``lock.acquire()`` ... ``lock.release()``.
    ``acquire`` raises :class:`WorkdirLocked` when a live run holds it and takes a stale lock over
    (see the module docstring for the rules). ``release`` is idempotent and also runs at exit.

    Args:
      workdir: the run's directory (created if missing).
      stale_after_s: a lock whose heartbeat is older than this is stale, whatever its host.
      heartbeat_s: how often the holder rewrites its heartbeat (0 or None: no heartbeat thread).
      settle_s: object stores only: how long to wait before re-reading our freshly written lock.
    """

    def __init__(self, workdir: metrics_lib.PathLike, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 heartbeat_s: float | None = DEFAULT_HEARTBEAT_S, settle_s: float = 1.0):
        self.workdir = metrics_lib.as_path(workdir)
        self.path: epath.Path = self.workdir / LOCK_NAME
        self.local = metrics_lib.is_local(self.path)
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else None
        self.settle_s = float(settle_s)
        self.token: str | None = None
        self.info: dict[str, Any] | None = None  # what we wrote, while held
        self._owner_pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.refreshing = False  # True while the heartbeat thread keeps the file fresh

    # -- context manager --
    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.token is not None

    # -- acquire --
    def acquire(self) -> "WorkdirLock":
        """Takes the lock (or a stale one over); raises WorkdirLocked while a live run holds it."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock.")
        now = time.time()
        token = secrets.token_hex(16)
        info = {
            "host": _hostname(), "pid": os.getpid(),
            "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "started_unix": now, "command": _command(), "heartbeat": now, "token": token,
            "proc_start": _proc_start(os.getpid()), "pid_ns": _pid_ns(), "boot_id": _boot_id(),
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.local:
            self._acquire_local(info)
        else:
            self._acquire_object_store(info)
        self.token, self.info, self._owner_pid = token, info, os.getpid()
        atexit.register(self.release)
        if self.heartbeat_s:
            self._stop.clear()
            self.refreshing = True
            self._thread = threading.Thread(target=self._heartbeat_loop, name="vlmjax-workdir-lock",
                                            daemon=True)
            self._thread.start()
        return self

    def _acquire_local(self, info: dict[str, Any]) -> None:
        path = os.fspath(self.path)
        for _ in range(20):  # each pass either wins, raises, or saw the lock change under it
            if _create_exclusive(path, info):
                return
            holder, mtime = self._read_holder()
            if holder is _GONE:
                continue  # released between our create and our read: try again
            why = self._stale_reason(holder, mtime)
            if why is None:
                raise self._locked(holder)
            if self._take_over_local(holder, why, info):
                return
        raise WorkdirLocked(f"vlmjax: could not take the lock {path}: it keeps changing (several "
                            "launches on this workdir at once?). Try again.", path=path)

    def _take_over_local(self, stale: dict[str, Any] | None, why: str, info: dict[str, Any]) -> bool:
        """Under the takeover file: if the lock still is ``stale``, replaces it with ours. True if we
        hold it now; False to look again (the lock changed, or another launch is taking it over)."""
        path = os.fspath(self.path)
        guard = path + TAKEOVER_SUFFIX
        if not _create_exclusive(guard, {"pid": os.getpid(), "host": _hostname(), "time": time.time()}):
            try:  # a takeover lasts milliseconds: a guard a minute old belongs to a dead launch
                if time.time() - os.stat(guard).st_mtime > 60:
                    os.unlink(guard)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        try:
            current, _ = self._read_holder()
            if current is _GONE:
                return _create_exclusive(path, info)  # released meanwhile
            if _token_of(current) != _token_of(stale):
                return False  # someone else took it meanwhile: judge the new one
            print(_takeover_line(stale, why), flush=True)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return _create_exclusive(path, info)  # False: a fresh launch created it in between
        finally:
            try:
                os.unlink(guard)
            except FileNotFoundError:
                pass

    def _acquire_object_store(self, info: dict[str, Any]) -> None:
        for _ in range(5):
            holder, mtime = self._read_holder()
            if holder is not _GONE:
                why = self._stale_reason(holder, mtime)
                if why is None:
                    raise self._locked(holder)
                print(_takeover_line(holder, why), flush=True)
            metrics_lib.write_json(self.path, info)
            time.sleep(self.settle_s)  # a racer that found it absent too has written by now
            current, _ = self._read_holder()
            if current is not _GONE and _token_of(current) == info["token"]:
                return
            if current is not _GONE:  # another launch won the race
                raise self._locked(current)
        raise WorkdirLocked(f"vlmjax: could not take the lock {os.fspath(self.path)}: it keeps changing "
                            "(several launches on this workdir at once?). Try again.",
                            path=os.fspath(self.path))

    # -- reading and judging --
    def _read_holder(self) -> tuple[Any, float | None]:
        """(contents, mtime) of the lock: _GONE when absent, None when unreadable (being written,
        or truncated). Retries an unreadable file for a moment: a creator writes right after
        creating it."""
        for attempt in range(10):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return _GONE, None
            try:
                holder = json.loads(text)
                if isinstance(holder, dict):
                    return holder, None
            except ValueError:
                pass
            if attempt < 9:
                time.sleep(0.1)
        try:
            mtime = self.path.stat().mtime
        except (FileNotFoundError, OSError):
            return _GONE, None
        return None, mtime

    def _stale_reason(self, holder: dict[str, Any] | None, mtime: float | None = None) -> str | None:
        """Why ``holder``'s lock is stale, or None when it may be alive."""
        now = time.time()
        if holder is None:  # unreadable: its last write is the heartbeat we have
            if mtime is not None and now - mtime > self.stale_after_s:
                return f"unreadable lock file, unchanged for {_ago(now - mtime)}"
            return None
        try:
            pid = int(holder.get("pid"))
        except (TypeError, ValueError):
            pid = None
        same_machine = (holder.get("host") == _hostname() and pid is not None
                        and (holder.get("pid_ns") is None or _pid_ns() is None
                             or holder.get("pid_ns") == _pid_ns()))
        if same_machine:
            boot = _boot_id()
            if holder.get("boot_id") and boot and holder["boot_id"] != boot:
                return "this machine has rebooted since"
            if not _pid_alive(pid):
                return f"process {pid} is not running on this host"
            recorded, actual = holder.get("proc_start"), _proc_start(pid)
            if recorded is not None and actual is not None and int(recorded) != actual:
                return f"pid {pid} now belongs to another process (it started at another time)"
        try:
            heartbeat = float(holder.get("heartbeat"))
        except (TypeError, ValueError):
            heartbeat = None
        if heartbeat is None:
            if mtime is None:
                try:
                    mtime = self.path.stat().mtime
                except (FileNotFoundError, OSError):
                    mtime = now
            heartbeat = mtime
        if now - heartbeat > self.stale_after_s:
            return f"no heartbeat for {_ago(now - heartbeat)}, stale after {_ago(self.stale_after_s)}"
        return None

    def _locked(self, holder: dict[str, Any] | None) -> WorkdirLocked:
        path = os.fspath(self.path)
        workdir = os.fspath(self.workdir)
        if holder is None:
            return WorkdirLocked(
                f"vlmjax: workdir {workdir} is locked by an unreadable lock file {path} (being written "
                f"by a launch starting now?). Wait and retry, use another --workdir, or delete {path} "
                "if you are sure no run uses this workdir.", path=path, holder=None)
        host, pid = holder.get("host", "?"), holder.get("pid", "?")
        started = holder.get("started", "?")
        cmd = str(holder.get("command", "?")).replace("\n", " ")
        try:
            beat = f", last heartbeat {_ago(time.time() - float(holder['heartbeat']))} ago"
        except (KeyError, TypeError, ValueError):
            beat = ""
        who = "this very process (another WorkdirLock)" if (
            host == _hostname() and pid == os.getpid()) else "another run"
        return WorkdirLocked(
            f"vlmjax: workdir {workdir} is in use by {who}: host {host} pid {pid}, started {started}"
            f"{beat}, command: {cmd} (lock file {path}). Wait for that run to finish or stop it, use "
            f"another --workdir, or delete {path} if you are sure that run is dead (it is taken over "
            f"automatically once pid {pid} is gone on {host}, or its heartbeat is "
            f"{_ago(self.stale_after_s)} old).", path=path, holder=holder)

    # -- heartbeat --
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.refresh():
                    return
            except Exception as e:  # pylint: disable=broad-except  (a flaky bucket must not kill the run)
                print(f"vlmjax: WARNING: could not refresh the heartbeat of {os.fspath(self.path)}: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def refresh(self) -> bool:
        """Rewrites the heartbeat now. False (after a loud warning) when the file is gone or holds
        another token: we no longer hold the lock, and stop refreshing."""
        with self._mutex:
            if not self.held or not self.refreshing:
                return False
            holder, _ = self._read_holder()
            if holder is _GONE or _token_of(holder) != self.token:
                self.refreshing = False
                if holder is _GONE:
                    what = "has been deleted"
                elif holder is None:
                    what = "has been overwritten (unreadable now)"
                else:
                    what = (f"has been taken over by host {holder.get('host')} pid {holder.get('pid')} "
                            f"(started {holder.get('started')}, command: {holder.get('command')})")
                bar = "!" * 100
                print(f"{bar}\nvlmjax: WARNING: the workdir lock {os.fspath(self.path)} {what}. This "
                      f"run (host {_hostname()} pid {os.getpid()}) no longer holds it and stops "
                      "refreshing it; if another run now writes to this workdir, their checkpoints and "
                      f"metrics will mix: stop one of them.\n{bar}", file=sys.stderr, flush=True)
                return False
            self.info = dict(self.info or {}, heartbeat=time.time())
            metrics_lib.write_json(self.path, self.info)  # tmp + rename locally; one upload on gs
            return True

    # -- release --
    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it still holds our token. Idempotent."""
        if not self.held or self._owner_pid != os.getpid():  # a forked child must not release it
            return
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        with self._mutex:
            if not self.held:
                return
            token, self.token, self.refreshing = self.token, None, False
            try:
                atexit.unregister(self.release)
            except Exception:  # pylint: disable=broad-except
                pass
            try:
                holder, _ = self._read_holder()
                if holder is not _GONE and _token_of(holder) == token:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            except Exception as e:  # pylint: disable=broad-except  (release runs in finally blocks)
                print(f"vlmjax: WARNING: could not remove the workdir lock {os.fspath(self.path)}: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)


class _Gone:
    def __repr__(self):
        return "<no lock file>"


_GONE = _Gone()


def _token_of(holder: Any) -> str | None:
    return holder.get("token") if isinstance(holder, dict) else None


def _create_exclusive(path: str, obj: dict[str, Any]) -> bool:
    """Creates ``path`` holding ``obj`` as JSON if it does not exist; False if it does."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno == errno.EEXIST:
            return False
        raise
    try:
        os.write(fd, (json.dumps(obj, indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _takeover_line(holder: dict[str, Any] | None, why: str) -> str:
    holder = holder or {}
    return (f"vlmjax: taking over the stale lock of {holder.get('host', '?')} pid {holder.get('pid', '?')} "
            f"started {holder.get('started', '?')} ({why})")


# --- several jax processes -----------------------------------------------------------------------

def acquire_for_run(workdir: metrics_lib.PathLike, **kwargs) -> WorkdirLock | None:
    """Acquires ``workdir``'s lock for a run: the lock on process 0, None on the others.

    With several jax processes only process 0 touches the file, then broadcasts the outcome, so that
    every process raises the same :class:`WorkdirLocked` (or RuntimeError when process 0 failed
    otherwise) instead of some waiting forever at the next collective. With one process: no
    collectives. ``kwargs`` go to :class:`WorkdirLock`.
    """
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
        return WorkdirLock(workdir, **kwargs).acquire()
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    lock, error, status, message = None, None, 0, ""
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir, **kwargs).acquire()
        except WorkdirLocked as e:
            error, status, message = e, 1, str(e)
        except Exception as e:  # pylint: disable=broad-except  (re-raised below, after the broadcast)
            error, status, message = e, 2, f"{type(e).__name__}: {e}"
    data = message.encode("utf-8")[:_MAX_MESSAGE_BYTES]
    payload = np.zeros(_MAX_MESSAGE_BYTES + 2, np.int32)
    payload[0], payload[1] = status, len(data)
    payload[2:2 + len(data)] = np.frombuffer(data, np.uint8)
    payload = np.asarray(multihost_utils.broadcast_one_to_all(payload))
    if error is not None:
        raise error
    status, n = int(payload[0]), int(payload[1])
    message = bytes(payload[2:2 + n].astype(np.uint8)).decode("utf-8", errors="replace")
    if status == 1:
        raise WorkdirLocked(message, path=os.fspath(metrics_lib.as_path(workdir) / LOCK_NAME))
    if status == 2:
        raise RuntimeError(f"vlmjax: process 0 could not take the workdir lock: {message}")
    return lock
