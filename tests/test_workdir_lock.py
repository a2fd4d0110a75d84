"""One writer per workdir: vlmjax.train.workdir_lock (the lock file WORKDIR/vlmjax.lock)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import portpicker
import pytest

from conftest import ROOT
from helpers.fake_gcs import fake_gcs_root  # noqa: F401 - a fixture
from vlmjax.train import workdir_lock as wl
from vlmjax.train.workdir_lock import WorkdirLock, WorkdirLocked

TAKEOVER = "vlmjax: taking over the stale lock of "


def _lock_file(workdir):
    return os.path.join(os.fspath(workdir), "vlmjax.lock")


def _read(workdir):
    with open(_lock_file(workdir)) as f:
        return json.load(f)


def _write(workdir, **fields):
    """A lock file written by hand: a holder on this host with a live pid unless ``fields`` say else."""
    now = time.time()
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-02T03:04:05+00:00",
            "started_unix": now, "command": "python -m vlmjax.main --workdir=elsewhere",
            "heartbeat": now, "token": "theirs", "proc_start": wl._proc_start(os.getpid()),
            "pid_ns": wl._pid_ns(), "boot_id": wl._boot_id()}
    info.update(fields)
    os.makedirs(workdir, exist_ok=True)
    with open(_lock_file(workdir), "w") as f:
        json.dump(info, f)
    return info


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not wl._pid_alive(p.pid)
    return p.pid


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


# A second process that takes the lock of argv[1]: prints ACQUIRED and exits 0, or prints the
# WorkdirLocked message to stderr and exits 3. With argv[2] == "hold": keeps it until killed.
_CHILD = textwrap.dedent("""
    import sys, time
    from vlmjax.train.workdir_lock import WorkdirLock, WorkdirLocked
    try:
        lock = WorkdirLock(sys.argv[1]).acquire()
    except WorkdirLocked as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(3)
    print("ACQUIRED", flush=True)
    if sys.argv[2:] == ["hold"]:
        time.sleep(600)
""")


def _child(workdir, *extra, timeout=120):
    return subprocess.run([sys.executable, "-c", _CHILD, os.fspath(workdir), *extra], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# --- 1. one process ------------------------------------------------------------------------------

def test_acquire_release_and_held_in_this_process(tmp_path):
    w = tmp_path / "run"
    WorkdirLock(w).release()  # never acquired: nothing to do (a `finally` after a failed acquire)
    with WorkdirLock(w) as lock:
        info = _read(w)
        assert info["token"] == lock.token and info["pid"] == os.getpid()
        assert info["host"] == socket.gethostname() and info["command"] == " ".join(sys.argv)
        assert {"started", "started_unix", "heartbeat"} <= set(info)
        with pytest.raises(WorkdirLocked) as e:
            WorkdirLock(w).acquire()
        msg = str(e.value)
        assert "\n" not in msg
        assert f"pid {os.getpid()}" in msg and "this very process" in msg
        assert " ".join(sys.argv) in msg and _lock_file(w) in msg
        assert "another --workdir" in msg and "delete" in msg
        assert e.value.path == _lock_file(w) and e.value.holder["token"] == lock.token
        assert _read(w)["token"] == lock.token  # the failed attempt left our lock alone
    assert os.listdir(w) == []
    lock.release()  # twice: harmless
    lock.release()
    assert os.listdir(w) == []
    with WorkdirLock(w):  # free again
        assert os.path.exists(_lock_file(w))
    assert os.listdir(w) == []


def test_release_leaves_someone_elses_lock(tmp_path):
    lock = WorkdirLock(tmp_path, heartbeat_s=None).acquire()
    _write(tmp_path, token="theirs")
    lock.release()
    assert _read(tmp_path)["token"] == "theirs"


# --- 2. a second process -------------------------------------------------------------------------

def test_second_process_is_refused_while_held(tmp_path):
    w = tmp_path / "run"
    lock = WorkdirLock(w).acquire()
    try:
        t0 = time.monotonic()
        r = _child(w)
        took = time.monotonic() - t0
        assert r.returncode == 3, r.stdout + r.stderr
        assert "ACQUIRED" not in r.stdout
        lines = r.stderr.strip().splitlines()
        msg = lines[-1]
        assert msg.startswith(f"vlmjax: workdir {w} is in use by another run: host {socket.gethostname()} "
                              f"pid {os.getpid()}"), r.stderr
        assert " ".join(sys.argv) in msg and _lock_file(w) in msg
        assert took < 60, took  # no waiting: the python start-up is most of it
        assert _read(w)["token"] == lock.token
    finally:
        lock.release()
    r = _child(w)
    assert r.returncode == 0 and "ACQUIRED" in r.stdout, r.stdout + r.stderr
    assert os.listdir(w) == []  # released at exit (atexit)


def test_sigkilled_holder_is_taken_over_at_once(tmp_path, capsys):
    """The common case: a run killed with SIGKILL leaves its lock; the restarted run just goes."""
    w = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", _CHILD, os.fspath(w), "hold"], cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ACQUIRED", p.stderr.read()
        with pytest.raises(WorkdirLocked, match=f"pid {p.pid}"):
            WorkdirLock(w).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert _read(w)["pid"] == p.pid  # SIGKILL left the file
    with WorkdirLock(w) as lock:
        assert _read(w)["token"] == lock.token
    out = capsys.readouterr().out
    assert f"{TAKEOVER}{socket.gethostname()} pid {p.pid} started " in out
    assert f"(process {p.pid} is not running on this host)" in out


# --- 3. stale by a dead or reused pid ------------------------------------------------------------

def test_stale_dead_pid_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    _write(tmp_path, pid=pid, proc_start=None)
    with WorkdirLock(tmp_path) as lock:
        assert _read(tmp_path)["token"] == lock.token
        assert not os.path.exists(_lock_file(tmp_path) + ".takeover")
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{TAKEOVER}{socket.gethostname()} pid {pid} started 2026-01-02T03:04:05+00:00 "
                   f"(process {pid} is not running on this host)"]
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="needs /proc")
def test_stale_reused_pid_is_taken_over(tmp_path, capsys):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # p's pid is alive but started at another time than the lock says: a reused pid
        _write(tmp_path, pid=p.pid, proc_start=wl._proc_start(p.pid) - 1)
        with WorkdirLock(tmp_path, heartbeat_s=None):
            pass
        assert f"(pid {p.pid} now belongs to another process" in capsys.readouterr().out
        _write(tmp_path, pid=p.pid, proc_start=wl._proc_start(p.pid))  # the same process: alive
        with pytest.raises(WorkdirLocked, match=f"another run: host {socket.gethostname()} pid {p.pid}"):
            WorkdirLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()


def test_rebooted_machine_and_other_pid_namespace(tmp_path, capsys):
    _write(tmp_path, boot_id="an-earlier-boot")
    with WorkdirLock(tmp_path, heartbeat_s=None):
        pass
    assert "(this machine has rebooted since)" in capsys.readouterr().out
    # Same host name but another pid namespace (containers sharing the host's name): its pid says
    # nothing here, so only the heartbeat counts.
    _write(tmp_path, pid=_dead_pid(), pid_ns="pid:[1]")
    with pytest.raises(WorkdirLocked):
        WorkdirLock(tmp_path).acquire()
    _write(tmp_path, pid=_dead_pid(), pid_ns="pid:[1]", heartbeat=time.time() - 3600)
    with WorkdirLock(tmp_path, heartbeat_s=None):
        pass
    assert re.search(r"\(no heartbeat for 1h00m0\ds, stale after 10m00s\)", capsys.readouterr().out)


# --- 4. stale by heartbeat -----------------------------------------------------------------------

def test_other_host_stale_by_heartbeat(tmp_path, capsys):
    _write(tmp_path, host="other-host", pid=12345, heartbeat=time.time() - 3600)
    with WorkdirLock(tmp_path) as lock:
        assert _read(tmp_path)["token"] == lock.token
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and re.fullmatch(re.escape(f"{TAKEOVER}other-host pid 12345 started 2026-01-02T03:04:05+00:00 ")
                                          + r"\(no heartbeat for 1h00m0\ds, stale after 10m00s\)", out[0]), out

    _write(tmp_path, host="other-host", pid=12345, heartbeat=time.time() - 30)
    with pytest.raises(WorkdirLocked) as e:
        WorkdirLock(tmp_path).acquire()
    msg = str(e.value)
    assert re.match(re.escape(f"vlmjax: workdir {tmp_path} is in use by another run: host other-host pid 12345, "
                              "started 2026-01-02T03:04:05+00:00, last heartbeat ") + r"3\ds ago, command: "
                    + re.escape("python -m vlmjax.main --workdir=elsewhere"), msg), msg
    assert _read(tmp_path)["token"] == "theirs"
    assert capsys.readouterr().out == ""
    # stale_after_s is the caller's: 30 s old is stale after 10 s.
    with WorkdirLock(tmp_path, stale_after_s=10, heartbeat_s=None):
        pass
    assert re.search(r"\(no heartbeat for 3\ds, stale after 10s\)", capsys.readouterr().out)


def test_unreadable_lock_file(tmp_path, capsys):
    with open(_lock_file(tmp_path), "w") as f:
        f.write("{not json")
    with pytest.raises(WorkdirLocked, match="unreadable lock file"):
        WorkdirLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(_lock_file(tmp_path), (old, old))
    with WorkdirLock(tmp_path, heartbeat_s=None):
        pass
    assert re.search(r"\(unreadable lock file, unchanged for 1h00m0\ds\)", capsys.readouterr().out)


def test_racing_takeovers_have_one_winner(tmp_path, capsys):
    for round_ in range(5):
        w = tmp_path / str(round_)
        _write(w, pid=_dead_pid())
        n = 6
        barrier = threading.Barrier(n)
        won, refused = [], []

        def go():
            lock = WorkdirLock(w, heartbeat_s=None)
            barrier.wait()
            try:
                won.append(lock.acquire())
            except WorkdirLocked:
                refused.append(lock)

        threads = [threading.Thread(target=go) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == n - 1, (won, refused)
        assert _read(w)["token"] == won[0].token
        won[0].release()
        assert os.listdir(w) == []
    assert capsys.readouterr().out.count(TAKEOVER) == 5


# --- 5. heartbeat --------------------------------------------------------------------------------

def test_heartbeat_refreshes_and_stops_when_taken_over(tmp_path, capsys):
    lock = WorkdirLock(tmp_path, heartbeat_s=0.2).acquire()
    try:
        first = _read(tmp_path)["heartbeat"]
        deadline = time.time() + 10
        while _read(tmp_path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        info = _read(tmp_path)
        assert info["heartbeat"] > first and info["token"] == lock.token and lock.refreshing
        assert info["started_unix"] == lock.info["started_unix"]
        assert not [n for n in os.listdir(tmp_path) if n != "vlmjax.lock"]  # no temporary file left

        _write(tmp_path, host="other-host", pid=4242, token="theirs")  # someone took it over
        deadline = time.time() + 10
        while lock.refreshing and time.time() < deadline:
            time.sleep(0.05)
        assert not lock.refreshing
        time.sleep(0.5)  # stopped: it does not overwrite the new holder's lock
        assert _read(tmp_path)["token"] == "theirs"
        err = capsys.readouterr().err
        assert "vlmjax: WARNING: the workdir lock" in err and "taken over by host other-host pid 4242" in err
        assert err.count("WARNING") == 1
    finally:
        lock.release()
    assert _read(tmp_path)["token"] == "theirs"  # release removes only our own lock


def test_heartbeat_stops_when_deleted(tmp_path, capsys):
    lock = WorkdirLock(tmp_path, heartbeat_s=0.2).acquire()
    try:
        os.unlink(_lock_file(tmp_path))
        deadline = time.time() + 10
        while lock.refreshing and time.time() < deadline:
            time.sleep(0.05)
        assert not lock.refreshing and not os.path.exists(_lock_file(tmp_path))
        assert "has been deleted" in capsys.readouterr().err
    finally:
        lock.release()


# --- 6. gs:// ------------------------------------------------------------------------------------

def test_lock_on_gs(fake_gcs_root, capsys):
    w = "gs://bucket/run"
    local = os.path.join(fake_gcs_root, "bucket", "run")
    with WorkdirLock(w, settle_s=0.05, heartbeat_s=0.2) as lock:
        assert lock.path.name == "vlmjax.lock" and os.fspath(lock.path) == "gs://bucket/run/vlmjax.lock"
        assert _read(local)["token"] == lock.token
        with pytest.raises(WorkdirLocked) as e:
            WorkdirLock(w, settle_s=0.05).acquire()
        assert "gs://bucket/run/vlmjax.lock" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
        first = _read(local)["heartbeat"]
        deadline = time.time() + 10
        while _read(local)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert _read(local)["heartbeat"] > first
    assert not os.path.exists(_lock_file(local))
    lock.release()

    _write(local, host="other-host", heartbeat=time.time() - 3600)
    with WorkdirLock(w, settle_s=0.05) as lock:
        assert _read(local)["token"] == lock.token
    assert f"{TAKEOVER}other-host pid " in capsys.readouterr().out
    assert not os.path.exists(_lock_file(local))

    _write(local, host="other-host", heartbeat=time.time())
    with pytest.raises(WorkdirLocked, match="host other-host"):
        WorkdirLock(w, settle_s=0.05).acquire()


def test_gs_write_race_last_writer_wins(fake_gcs_root, monkeypatch):
    """Object stores: a racer that overwrote our freshly written lock before we re-read it wins."""
    w = "gs://bucket/run"
    local = os.path.join(fake_gcs_root, "bucket", "run")
    real_sleep = time.sleep

    def racer_writes(s):  # during our settle delay, another launch writes its own lock
        _write(local, host="other-host", token="racer")
        real_sleep(0)

    monkeypatch.setattr(wl.time, "sleep", racer_writes)
    with pytest.raises(WorkdirLocked, match="host other-host"):
        WorkdirLock(w, settle_s=0.05).acquire()
    assert _read(local)["token"] == "racer"


# --- several jax processes -----------------------------------------------------------------------

def test_acquire_for_run_one_process(tmp_path):
    lock = wl.acquire_for_run(tmp_path, heartbeat_s=None)
    try:
        assert isinstance(lock, WorkdirLock) and lock.held
        with pytest.raises(WorkdirLocked):
            wl.acquire_for_run(tmp_path)
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []


_MULTI = textwrap.dedent("""
    import json, os, sys
    port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2, process_id=pid)
    from vlmjax.train.workdir_lock import acquire_for_run, WorkdirLocked
    try:
        lock = acquire_for_run(workdir, heartbeat_s=None)
        result = {"ok": True, "lock": lock is not None,
                  "file": os.path.exists(os.path.join(workdir, "vlmjax.lock"))}
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("after")  # both saw the file before process 0 releases it
        if lock is not None:
            lock.release()
    except WorkdirLocked as e:
        result = {"ok": False, "error": str(e)}
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()
""")


def _two_processes(workdir):
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen([sys.executable, "-c", _MULTI, str(port), str(i), os.fspath(workdir)], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=180)
            assert p.returncode == 0, o + e[-3000:]
            out.append(json.loads(o.split("RESULT ", 1)[1].splitlines()[0]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


@pytest.mark.multihost
def test_acquire_for_run_two_processes_agree(tmp_path):
    w = tmp_path / "run"
    a, b = _two_processes(w)
    assert a == {"ok": True, "lock": True, "file": True}  # process 0 holds it
    assert b["ok"] and not b["lock"]  # process 1 holds nothing and touched nothing
    assert os.listdir(w) == []
    with WorkdirLock(w):  # held by this test: both processes raise the same one-line message
        a, b = _two_processes(w)
    assert not a["ok"] and a == b
    assert a["error"].startswith(f"vlmjax: workdir {w} is in use by another run: host {socket.gethostname()} "
                                 f"pid {os.getpid()}"), a
