r"""Time to the first training step of a run, from process start (wall clock, stdout timestamped).

  python benchmarks/first_step.py [--repo=DIR] -- --config=configs/dtf.py:pretrained \
      --config.init_from=$HOME/.cache/vlmjax/smollm2-135m-instruct

Runs ``python -m vlmjax.main`` in a fresh interpreter (no persistent XLA cache, a fresh workdir,
total_steps=1, no evaluation before the step) and prints every stdout line with the seconds since
launch; the 'step 1/1' line's time is the time to the first step, after which the run is stopped.
"""
import os
import subprocess
import sys
import tempfile
import time


def main(argv):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if argv and argv[0].startswith("--repo="):
        repo = os.path.abspath(argv.pop(0).split("=", 1)[1])
    if argv and argv[0] == "--":
        argv = argv[1:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["PYTHONPATH"] = repo
    env["PYTHONUNBUFFERED"] = "1"
    workdir = tempfile.mkdtemp(prefix="first_step_")
    cmd = [sys.executable, "-m", "vlmjax.main", f"--workdir={workdir}", *argv,
           "--config.total_steps=1", "--config.eval_at_start=False", "--config.eval.max_batches=1",
           "--config.sample.max_new_tokens=0", "--config.async_ckpt=False"]
    print("repo:", repo, "\ncmd:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    first = None
    for line in proc.stdout:
        t = time.perf_counter() - t0
        print(f"[{t:7.2f}s] {line.rstrip()}", flush=True)
        if first is None and line.startswith("step 1/"):
            first = t
            proc.kill()  # not SIGTERM, which the trainer takes as a preemption (save, then exit)
    rc = proc.wait()
    print(f"time to first step: {first:.2f}s (exit {rc}, total {time.perf_counter() - t0:.2f}s)"
          if first is not None else f"no step line (exit {rc})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
