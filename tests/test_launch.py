"""launch/tpu_pod.sh and launch/gpu_slurm.sbatch against fake gcloud / srun (no cloud is reached).

The fake ``gcloud`` logs each call (argv as JSON) and plays a pod of 2 workers on this machine:
``tpu-vm scp`` copies into each worker's own HOME, ``tpu-vm ssh --worker=all --command CMD`` runs CMD
with bash once per worker, with that HOME, a ``hostname`` that names the worker, and the worker's
extra environment (FAKE_GCLOUD_WORKER_ENV). On a real pod JAX finds the other workers through the
TPU metadata server; that needs a TPU VM, so the end-to-end test gives each fake worker the SLURM
variables of one task instead (JAX's SLURM detection, coordinator port via JAX_COORDINATOR_PORT):
the launcher and the trainer are the same, only the discovery source differs."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import portpicker
import pytest

from conftest import ROOT

POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SBATCH = os.path.join(ROOT, "launch", "gpu_slurm.sbatch")

FAKE_GCLOUD = r'''#!PYTHON
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
root, n = os.environ["FAKE_GCLOUD_ROOT"], int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
worker_env = json.loads(os.environ.get("FAKE_GCLOUD_WORKER_ENV", "[]"))

def opt(name):
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return args[i + 1]

def positional(rest):
    out, skip = [], False
    for a in rest:
        if skip:
            skip = False
        elif a.startswith("--"):
            skip = "=" not in a
        else:
            out.append(a)
    return out

def workers(node):
    w = opt("--worker")
    for k in (range(n) if w == "all" else [int(w)]):
        home = os.path.join(root, node, "worker-%d" % k)
        fakebin = os.path.join(home, ".fakebin")
        os.makedirs(fakebin, exist_ok=True)
        with open(os.path.join(fakebin, "hostname"), "w") as f:
            f.write("#!/bin/sh\necho %s-w%d\n" % (node, k))
        os.chmod(os.path.join(fakebin, "hostname"), 0o755)
        yield k, home, fakebin

if args[:3] == ["compute", "tpus", "tpu-vm"] and args[3] == "scp":
    *srcs, dest = positional(args[4:])
    node, path = dest.split(":", 1)
    path = path[2:] if path.startswith("~/") else path
    for _, home, _ in workers(node):
        for s in srcs:
            shutil.copy(s, os.path.join(home, path))
elif args[:3] == ["compute", "tpus", "tpu-vm"] and args[3] == "ssh":
    rc = 0
    for k, home, fakebin in workers(args[4]):
        env = dict(os.environ, HOME=home, PATH=fakebin + os.pathsep + os.environ["PATH"])
        env.update(worker_env[k] if k < len(worker_env) else {})
        rc = rc or subprocess.call(["bash", "-c", opt("--command")], env=env, cwd=home)
    sys.exit(rc)
'''

# Stands in for the worker's python: records argv, cwd and the environment it was started with.
FAKE_PYTHON = r'''#!PYTHON
import json, os, sys
with open(os.path.join(os.environ.get("FAKE_OUT", os.getcwd()), "argv-%s.json" % os.getpid()), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "pythonpath": os.environ.get("PYTHONPATH", ""),
               "local_device_ids": os.environ.get("JAX_LOCAL_DEVICE_IDS"),
               "procid": os.environ.get("SLURM_PROCID")}, f)
'''

# An argument no shell layer may touch: spaces, both quotes, $, ;, a glob, a backslash, a newline.
NASTY = "--config.name=it's a \"run\"; echo $HOME `id` * \\ $(x)\nline2"


def _script(path, text):
    path.write_text(text.replace("#!PYTHON", "#!" + sys.executable, 1))
    path.chmod(0o755)
    return str(path)


def _env(tmp_path, worker_env=(), **extra):
    """Environment for tpu_pod.sh with the fake gcloud first on PATH (never the real one)."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir(exist_ok=True)
    _script(fakebin / "gcloud", FAKE_GCLOUD)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(PATH=str(fakebin) + os.pathsep + env["PATH"], FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
               FAKE_GCLOUD_ROOT=str(tmp_path / "pod"), FAKE_GCLOUD_WORKER_ENV=json.dumps(list(worker_env)),
               # Nothing on this (shared) machine matches these: a test that wants a stale process
               # to be stopped says which.
               VLMJAX_LAUNCH_KILL_PATTERN=f"vlmjax-test-nothing-{uuid.uuid4().hex}",
               VLMJAX_LAUNCH_DEVICES=str(tmp_path / "no-device-*"),
               VLMJAX_LAUNCH_LIBTPU_LOCK=str(tmp_path / "libtpu_lockfile"),
               VLMJAX_LAUNCH_KILL_WAIT="10")
    env.update(extra)
    return env


def _pod(env, *args, ok=True, cwd=ROOT):
    p = subprocess.run(["bash", POD, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _calls(tmp_path):
    log = tmp_path / "gcloud.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _worker_home(tmp_path, k, node="pod"):
    return tmp_path / "pod" / node / f"worker-{k}"


def _latest_run(home):
    run_id = (home / "vlmjax" / "latest").read_text().strip()
    return home / "vlmjax" / "runs" / run_id


def _wait_gone(pids, timeout):
    deadline = time.time() + timeout
    alive = set(pids)
    while alive and time.time() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:  # a zombie has exited too
                    if f.read().split(") ", 1)[1].startswith("Z"):
                        alive.discard(pid)
            except (ProcessLookupError, FileNotFoundError):
                alive.discard(pid)
        time.sleep(0.5)
    return alive


def _bash_words(line):
    """The argv bash reads from one printed (printf %q quoted) command line."""
    p = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line], capture_output=True,
                       text=True, check=True)
    return p.stdout.split("\0")[:-1]


def _toy_repo(tmp_path):
    """A git repository with tracked, deleted-tracked, untracked, .venv and runs/ files."""
    repo = tmp_path / "repo"
    for rel, text in {"pyproject.toml": "[project]\nname='toy'\n", "vlmjax/__init__.py": "",
                      "sub dir/b.txt": "b", "gone.txt": "x", "extra.txt": "e", "other.txt": "o",
                      "assets/one.bin": "1", ".venv/bin/python": "", "runs/old/worker.log": "",
                      ".gitignore": "/.venv/\n/runs/\n"}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "pyproject.toml", "vlmjax", "sub dir", "gone.txt",
                    ".gitignore"], check=True)
    (repo / "gone.txt").unlink()  # tracked but deleted in the working tree: not shipped
    return repo


def test_scripts_parse_and_help():
    for path in (POD, SBATCH):
        subprocess.run(["bash", "-n", path], check=True)
    p = subprocess.run(["bash", POD, "--help"], capture_output=True, text=True, check=True)
    assert "create NAME" in p.stdout and "run    NAME" in p.stdout and "--dry-run" in p.stdout
    for args, hint in [([], "missing subcommand"), (["launch", "x"], "unknown subcommand"),
                       (["run", "pod"], "missing --zone"), (["create", "pod", "--zone", "z"], "--accelerator-type"),
                       (["run", "pod", "--zone", "z"], "missing trainer arguments"),
                       (["run", "pod", "--zone", "z", "--", "--workdir=gs://b"], "missing --config"),
                       (["stop", "pod", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
                       (["logs", "pod", "--zone", "z", "--worker", "one"], "--worker must be")]:
        p = subprocess.run(["bash", POD, *args], capture_output=True, text=True)
        assert p.returncode == 2 and p.stdout == "", (args, p)
        assert len(p.stderr.splitlines()) == 1 and hint in p.stderr, (args, p.stderr)


def test_dry_run_prints_the_gcloud_commands_and_calls_nothing(tmp_path):
    env = _env(tmp_path, TMPDIR=str(tmp_path))
    out = lambda *a: [_bash_words(line) for line in _pod(env, *a).stdout.splitlines()]  # noqa: E731
    z = ["--zone", "us-west4-a"]
    assert out("create", "pod", *z, "--accelerator-type", "v5litepod-64", "--spot", "--dry-run") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", *z, "--accelerator-type", "v5litepod-64",
         "--version", "v2-alpha-tpuv5-lite", "--spot"]]
    assert out("--dry-run", "create", "pod", *z, "--accelerator-type=v5litepod-64", "--num-slices=2",
               "--version", "img") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "pod", *z, "--accelerator-type",
         "v5litepod-64", "--runtime-version", "img", "--node-count", "2", "--node-prefix", "pod"]]
    assert out("delete", "pod", *z, "--dry-run") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", *z, "--quiet"]]
    assert out("delete", "pod", *z, "--num-slices", "2", "--dry-run") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod", *z, "--force", "--quiet"]]
    [logs] = out("logs", "pod", *z, "--worker", "3", "--project", "p", "--dry-run")
    assert logs[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", *z, "--project", "p"]
    assert logs[10:12] == ["--worker=3", "--command"] and "tail -n 100 -F" in logs[12]
    stop = out("stop", "pod", *z, "--num-slices", "2", "--dry-run")
    assert [c[:8] + c[8:10] for c in stop] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", f"pod-{i}", *z, "--worker=all", "--command"]
        for i in range(2)]
    run = out("run", "pod", *z, "--num-slices", "2", "--dry-run", "--", "--config=configs/lm.py",
              "--workdir=gs://b/r", NASTY)
    assert [c[:5] for c in run] == [["gcloud", "compute", "tpus", "tpu-vm", cmd] for _ in range(2)
                                    for cmd in ("scp", "ssh")]
    for i in range(2):
        scp, ssh = run[2 * i], run[2 * i + 1]
        tarball, script = scp[5:7]
        assert tarball.endswith(".tar.gz") and script.endswith(".sh")
        assert os.path.dirname(tarball).startswith(str(tmp_path))  # kept (dry run) under TMPDIR
        assert scp[7:] == [f"pod-{i}:~/", *z, "--worker=all"]
        assert ssh[5:] == [f"pod-{i}", *z, "--worker=all", "--command", f"bash ~/{os.path.basename(script)}"]
        assert NASTY.replace("\n", "") not in open(script).read()  # quoted in the remote script
    assert _calls(tmp_path) == []  # gcloud was never called


def test_run_ships_git_files_quotes_arguments_and_cleans_stale_state(tmp_path):
    """(c) arguments arrive byte-identical, (d) stale processes and the libtpu lock are gone before the
    start, (e) the tarball holds the tracked files plus --include, nothing else; venv built once."""
    repo = _toy_repo(tmp_path)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    fake_python = _script(tmp_path / "fake_python", FAKE_PYTHON)
    # A fake uv: `uv venv` makes a venv whose python is the fake one; `uv pip install` is logged.
    _script(fakebin / "uv", r'''#!PYTHON
import os, shutil, sys
with open(os.environ["FAKE_UV_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:3]) + " " + os.getcwd() + "\n")
if sys.argv[1] == "venv":
    os.makedirs(os.path.join(sys.argv[-1], "bin"))
    shutil.copy(os.environ["FAKE_PYTHON"], os.path.join(sys.argv[-1], "bin", "python"))
''')
    token = uuid.uuid4().hex
    device = tmp_path / "accel0"
    device.write_text("")
    lock = tmp_path / "libtpu_lockfile"
    lock.write_text("")
    stale = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"vlmjax.main-{token}"]),
             subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); time.sleep(120)",
                               str(device)])]
    try:
        time.sleep(0.5)
        env = _env(tmp_path, VLMJAX_REPO=str(repo), FAKE_UV_LOG=str(tmp_path / "uv.log"),
                   FAKE_PYTHON=fake_python, VLMJAX_LAUNCH_KILL_PATTERN=f"vlmjax.main-{token}",
                   VLMJAX_LAUNCH_DEVICES=f"{tmp_path}/accel*")
        args = ["--config=configs/lm.py:smoke", "--workdir", "gs://bucket/a b", NASTY, "", "--config.x=1"]
        p = _pod(env, "run", "pod", "--zone", "z", "--include", str(repo / "extra.txt"), "--include",
                 str(repo / "assets"), "--", *args, cwd=str(tmp_path))
        assert "is not gs://" not in p.stderr
        # (d) both stale processes were stopped (SIGTERM) and the lock removed before the start.
        assert [s.wait(timeout=30) for s in stale] == [-signal.SIGTERM] * 2
        assert not lock.exists()
    finally:
        for s in stale:
            s.kill()
    runs = []
    for k in range(2):
        home = _worker_home(tmp_path, k)
        run_dir = _latest_run(home)
        runs.append(run_dir.name)
        deadline = time.time() + 30
        while not list(run_dir.glob("src/argv-*.json")) and time.time() < deadline:
            time.sleep(0.2)
        [record] = [json.loads(f.read_text()) for f in run_dir.glob("src/argv-*.json")]
        # (c) the arguments exactly as given, with one launcher default after --config.
        assert record["argv"] == ["-m", "vlmjax.main", args[0], "--config.distributed.initialize=yes", *args[1:]]
        assert record["cwd"] == str(run_dir / "src") and record["pythonpath"].split(":")[0] == record["cwd"]
        assert (run_dir / f"worker-pod-w{k}.log").exists() and (run_dir / f"worker-pod-w{k}.pid").exists()
        # (e) only tracked files that exist, plus the includes; no .venv, runs/, other untracked files.
        shipped = sorted(str(f.relative_to(run_dir / "src")) for f in (run_dir / "src").rglob("*")
                         if f.is_file() and not f.name.startswith("argv-"))
        assert shipped == [".gitignore", "assets/one.bin", "extra.txt", "pyproject.toml", "sub dir/b.txt",
                           "vlmjax/__init__.py"]
        assert sorted(os.listdir(run_dir)) == sorted(["src", f"worker-pod-w{k}.log", f"worker-pod-w{k}.pid",
                                                      f"vlmjax-{run_dir.name}.tar.gz", f"vlmjax-{run_dir.name}.sh"])
        assert not list(home.glob("vlmjax-*"))  # the staged files moved into the run directory
    assert runs[0] == runs[1]
    uv = (tmp_path / "uv.log").read_text().splitlines()
    assert [line.split()[:2] for line in uv] == [["venv", "--python"], ["pip", "install"]] * 2

    # A second run reuses each worker's venv (same pyproject.toml): no uv call; a changed one reinstalls.
    _pod(env, "run", "pod", "--zone", "z", "--", *args, cwd=str(tmp_path))
    assert (tmp_path / "uv.log").read_text().splitlines() == uv
    (_worker_home(tmp_path, 1) / "vlmjax" / "venv" / ".vlmjax-pyproject.sha256").write_text("old\n")
    _pod(env, "run", "pod", "--zone", "z", "--", *args, cwd=str(tmp_path))
    assert [line.split()[:2] for line in (tmp_path / "uv.log").read_text().splitlines()[4:]] == [["pip", "install"]]
    assert len(os.listdir(_worker_home(tmp_path, 0) / "vlmjax" / "runs")) == 3  # one directory per run
    for k in range(2):  # logs tails the latest run's log of the chosen worker
        log = _latest_run(_worker_home(tmp_path, k)) / f"worker-pod-w{k}.log"
        log.write_text(f"hello from worker {k}\n")
        p = _pod(env, "logs", "pod", "--zone", "z", "--worker", str(k), "--no-follow")
        assert p.stdout == f"hello from worker {k}\n"
    # stop: SIGTERM to the job on every worker (here a process matching the kill pattern).
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"vlmjax.main-{token}"])
    try:
        time.sleep(0.5)
        p = _pod(env, "stop", "pod", "--zone", "z")
        assert job.wait(timeout=30) == -signal.SIGTERM and "pod-w1: stopped" in p.stdout
    finally:
        job.kill()
    calls = _calls(tmp_path)
    assert [c[3] for c in calls] == ["scp", "ssh"] * 3 + ["ssh"] * 3


@pytest.mark.multihost
def test_run_starts_one_two_process_job(tmp_path):
    """(a) `run` on 2 fake workers starts python -m vlmjax.main on each; they form one 2-process
    jax.distributed job on 127.0.0.1 (gloo) that trains to the end in the shared workdir."""
    port = portpicker.pick_unused_port()
    workdir = tmp_path / "shared workdir"
    cluster = [dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                    SLURM_PROCID=str(k), SLURM_LOCALID=str(k), JAX_COORDINATOR_PORT=str(port))
               for k in range(2)]
    env = _env(tmp_path, cluster, JAX_PLATFORMS="cpu", VLMJAX_LAUNCH_PYTHON=sys.executable)
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k.startswith("FAKE")}
    steps = 2
    p = _pod(env, "run", "pod", "--zone", "z", "--", "--config=configs/lm.py:smoke", f"--workdir={workdir}",
             f"--config.total_steps={steps}", "--config.eval_every=2", "--config.ckpt_every=2",
             "--config.sample.max_new_tokens=2")
    assert "is not gs://" in p.stderr  # the shared-workdir warning
    pids = []
    run_dirs = [_latest_run(_worker_home(tmp_path, k)) for k in range(2)]
    for k, run_dir in enumerate(run_dirs):
        pids.append(int((run_dir / f"worker-pod-w{k}.pid").read_text()))
    left = _wait_gone(pids, 240)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    logs = [(d / f"worker-pod-w{k}.log").read_text() for k, d in enumerate(run_dirs)]
    assert not left, "timed out:\n" + "\n".join(log[-3000:] for log in logs)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == steps, logs[0][-3000:]
    # One job, two processes: each saved its own data-iterator state in the one checkpoint.
    files = os.listdir(workdir / "checkpoints" / str(steps) / "data")
    assert any("process_1" in f for f in files), (files, logs[1][-3000:])


def test_slurm_batch_script_starts_one_task_per_gpu(tmp_path):
    """gpu_slurm.sbatch: 8 tasks per node with 8 GPUs, each task its own GPU, arguments intact."""
    header = [line.split()[1] for line in open(SBATCH) if line.startswith("#SBATCH")]
    assert "--ntasks-per-node=8" in header and "--gpus-per-node=8" in header
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    # Fake srun: logs its argv, then runs the command once per task with that task's SLURM variables.
    _script(fakebin / "srun", r'''#!PYTHON
import json, os, subprocess, sys
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
cmd = sys.argv[1:]
while cmd[0].startswith("-"):
    cmd = cmd[1:]
per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
for rank in range(int(os.environ["SLURM_NTASKS"])):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
               SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"])
    subprocess.check_call(cmd, env=env)
''')
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PATH=str(fakebin) + os.pathsep + os.environ["PATH"], FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
               FAKE_OUT=str(out), VLMJAX_PYTHON=_script(tmp_path / "fake_python", FAKE_PYTHON),
               SLURM_JOB_ID="123", SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NNODES="2", SLURM_NTASKS="16",
               SLURM_NTASKS_PER_NODE="8", SLURM_SUBMIT_DIR=ROOT)
    args = ["--config.total_steps=5", NASTY]
    subprocess.run(["bash", SBATCH, "configs/lm.py:smoke", "/shared/runs/a b", *args], env=env, cwd=str(tmp_path),
                   check=True, timeout=60)
    [srun] = [json.loads(line) for line in (tmp_path / "srun.log").read_text().splitlines()]
    assert srun[0] == "--kill-on-bad-exit=1" and srun[-len(args):] == args
    records = sorted((json.loads(f.read_text()) for f in out.iterdir()), key=lambda r: int(r["procid"]))
    assert [r["procid"] for r in records] == [str(i) for i in range(16)]
    assert [r["local_device_ids"] for r in records] == [str(i % 8) for i in range(16)]
    for r in records:
        assert r["cwd"] == ROOT
        assert r["argv"] == ["-m", "vlmjax.main", "--config=configs/lm.py:smoke", "--workdir=/shared/runs/a b",
                             "--config.distributed.initialize=auto", *args]
    p = subprocess.run(["bash", SBATCH, "only-one-arg"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "usage: sbatch" in p.stderr
