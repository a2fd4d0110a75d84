"""One of N jax.distributed processes on 127.0.0.1 (CPU, gloo collectives).

Usage: multihost_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR [key=value ...]
Prints "RESULT {json}" with this process's view of the run.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    port, pid, n, workdir, *kv = sys.argv[1:]
    from conftest import smoke_config  # pylint: disable=g-import-not-at-top
    from vlmjax import distributed  # pylint: disable=g-import-not-at-top

    overrides = {"distributed.coordinator_address": f"127.0.0.1:{port}",
                 "distributed.num_processes": int(n), "distributed.process_id": int(pid)}
    for item in kv:
        k, v = item.split("=", 1)
        overrides[k] = int(v)
    cfg = smoke_config(**overrides)
    assert distributed.maybe_initialize(cfg.distributed)
    import jax  # pylint: disable=g-import-not-at-top
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top

    assert jax.process_count() == int(n) and jax.device_count() == int(n)
    s = runner.run(cfg, workdir)
    print("RESULT " + json.dumps({"process": jax.process_index(), "step": s["step"],
                                  "train_loss": s["last_train"]["loss"],
                                  "eval_loss": s["eval_end"]["loss"]}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
