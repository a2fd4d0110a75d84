r"""Input pipeline vs train step: can every data source keep the step fed?

  python benchmarks/input_pipeline.py [--batch_size=32 --seq_len=128 --batches=200 --steps=20]

1. batches/s of each source (embedded bytes and BPE, local text files, JSONL, a TFDS array_record
   directory; the files are written from the embedded corpus into a temporary directory);
2. the train step's own rate (configs/lm.py default model) on a synthetic on-device batch, and
   with the real loader feeding it (embedded BPE), with the fraction of time spent waiting for data.
Headroom = loader batches/s / step batches/s: below 1 the step starves.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from benchmarks import common  # noqa: E402
from configs import lm as lm_config  # noqa: E402
from vlmjax import data as data_lib  # noqa: E402
from vlmjax import sharding as shd  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax.data import corpus, tfds_text  # noqa: E402
from vlmjax.train import Trainer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 32, "Global batch.")
flags.DEFINE_integer("seq_len", 128, "Sequence length.")
flags.DEFINE_integer("batches", 200, "Batches timed per source (after 5 warm-up batches).")
flags.DEFINE_integer("steps", 20, "Train steps timed (after 2 warm-up steps).")
flags.DEFINE_string("out", "benchmarks/results/input_pipeline.json", "JSON output path.")


def _write_sources(tmp: str) -> dict[str, dict]:
    docs = corpus.embedded_corpus()
    train, val = corpus.split_by_hash(docs, 0.05)
    os.makedirs(os.path.join(tmp, "text"), exist_ok=True)
    for i, d in enumerate(docs):
        with open(os.path.join(tmp, "text", f"doc{i:05d}.txt"), "w") as f:
            f.write(d)
    with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    builder_dir = tfds_text.write_text_dataset(os.path.join(tmp, "tfds"), {"train": train, "validation": val})
    return {
        "embedded": dict(source="embedded"),
        "text": dict(source="text", path=os.path.join(tmp, "text", "*.txt")),
        "jsonl": dict(source="jsonl", path=os.path.join(tmp, "docs.jsonl")),
        "tfds": dict(source="tfds", path=builder_dir),
    }


def _data_cfg(**kw):
    c = lm_config.get_config().data
    c.seq_len = FLAGS.seq_len
    c.update(kw)
    return c


def source_rate(name: str, tokenizer: str, kw: dict, workdir: str) -> dict:
    cfg = _data_cfg(tokenizer=tokenizer, **kw)
    t0 = time.perf_counter()
    lm_data = data_lib.build_lm_data(cfg, workdir=workdir)
    build_s = time.perf_counter() - t0
    it = iter(lm_data.train_dataset(global_batch_size=FLAGS.batch_size, seed=0, process_index=0,
                                    process_count=1))
    for _ in range(5):
        next(it)
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(it)
    dt = time.perf_counter() - t0
    bps = FLAGS.batches / dt
    return {"source": name, "tokenizer": tokenizer, "build_s": build_s, "batches_per_s": bps,
            "tokens_per_s": bps * FLAGS.batch_size * FLAGS.seq_len}


def step_rates(workdir: str) -> dict:
    c = lm_config.get_config()
    c.data.seq_len = FLAGS.seq_len
    c.batch_size = FLAGS.batch_size
    task = tasks.build(c, workdir)
    tr = Trainer(c, task, shd.make_mesh(c.mesh))
    state = tr.init()
    it = iter(task.train_dataset(global_batch_size=c.batch_size, seed=0, process_index=0, process_count=1))
    _, r = common.loader_vs_synthetic(tr, state, it, FLAGS.steps)
    return {"synthetic_step_ms": r["synthetic_step_ms"], "real_loader_step_ms": r["real_loader_step_ms"],
            "real_over_synthetic": 1.0 / r["synthetic_over_real"], "data_wait_frac": r["data_wait_frac"],
            "step_batches_per_s": 1e3 / r["synthetic_step_ms"]}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        sources = _write_sources(tmp)
        rows = []
        for name, kw in sources.items():
            for tok in ("bytes", "bpe"):
                rows.append(source_rate(name, tok, kw, os.path.join(tmp, f"wd_{name}_{tok}")))
        steps = step_rates(os.path.join(tmp, "wd_step"))
    for r in rows:
        r["headroom_vs_step"] = r["batches_per_s"] / steps["step_batches_per_s"]
    info = common.device_info()
    print(f"\ninput pipeline, batch {FLAGS.batch_size} x seq {FLAGS.seq_len}, {info['cpus']} CPUs, "
          f"step on {info['device_count']}x {info['platform']}")
    common.print_table(rows, ["source", "tokenizer", "build_s", "batches_per_s", "tokens_per_s",
                              "headroom_vs_step"])
    print()
    common.print_table([steps], ["synthetic_step_ms", "real_loader_step_ms", "real_over_synthetic",
                                 "data_wait_frac"], machine=False)
    common.write_json(FLAGS.out, {"device": info, "sources": rows, "train_step": steps,
                                  "flags": {k: FLAGS[k].value for k in ("batch_size", "seq_len", "batches", "steps")}})


if __name__ == "__main__":
    app.run(main)
