r"""Dense decoder train-step speed: step time, tokens/s, FLOPs (analytic and XLA) and MFU.

  python benchmarks/lm_step.py                       # CPU-sized models
  python benchmarks/lm_step.py --sizes=small,base,large --batch_size=32 --seq_len=1024 --dtype=bfloat16

Uses the real trainer (`vlmjax.train.Trainer`: sharded init, donated jitted step) on a synthetic
on-device batch, so the number is the step alone (benchmarks/input_pipeline.py measures the loader).
MFU = analytic train FLOPs / step time / device peak; on CPU pass --peak_tflops to get one.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import lm as lm_config  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax import sharding as shd  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax.train import Trainer  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64),
    "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=64),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["tiny", "small", "base"], f"Model sizes among {list(SIZES)}.")
flags.DEFINE_integer("batch_size", 16, "Global batch.")
flags.DEFINE_integer("seq_len", 128, "Sequence length.")
flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (default: datasheet table).")
flags.DEFINE_string("out", "benchmarks/results/lm_step.json", "JSON output path.")


def bench(size: str) -> dict:
    c = lm_config.get_config()
    c.data.tokenizer = "bytes"
    c.data.seq_len = FLAGS.seq_len
    c.batch_size = FLAGS.batch_size
    c.model.update(SIZES[size])
    c.model.dtype = FLAGS.dtype
    c.total_steps = 1000
    task = tasks.build(c, None)
    mesh = shd.make_mesh(c.mesh)
    tr = Trainer(c, task, mesh)
    state = tr.init()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, task.model_config.vocab_size, (FLAGS.batch_size, FLAGS.seq_len + 1), dtype=np.int32)
    batch = tr.put({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                    "loss_mask": np.ones((FLAGS.batch_size, FLAGS.seq_len), np.float32)})
    compiled = tr.train_step.lower(state, batch).compile()
    xla = common.compiled_flops(compiled)
    for _ in range(2):
        state, m = tr.train_step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, m = tr.train_step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / FLAGS.steps
    analytic = flops_lib.decoder_train_flops(task.model_config, FLAGS.batch_size, FLAGS.seq_len)
    peak = common.device_peak_tflops(FLAGS.dtype, FLAGS.peak_tflops)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return {
        "size": size, "params_M": n_params / 1e6, "step_ms": dt * 1e3,
        "tokens_per_s": FLAGS.batch_size * FLAGS.seq_len / dt,
        "analytic_GFLOP": analytic / 1e9, "xla_GFLOP": None if xla is None else xla / 1e9,
        "xla_over_analytic": None if xla is None else xla / analytic,
        "achieved_TFLOPs": analytic / dt / 1e12,
        "MFU": None if peak is None else analytic / dt / (peak * 1e12 * jax.device_count()),
    }


def main(argv):
    del argv
    rows = [bench(s) for s in FLAGS.sizes]
    info = common.device_info()
    print(f"\ndense decoder train step on {info['device_count']}x {info['platform']} "
          f"({info['device_kind']}), batch {FLAGS.batch_size} x seq {FLAGS.seq_len}, {FLAGS.dtype}")
    common.print_table(rows, ["size", "params_M", "step_ms", "tokens_per_s", "analytic_GFLOP", "xla_GFLOP",
                              "xla_over_analytic", "achieved_TFLOPs", "MFU"])
    common.write_json(FLAGS.out, {"device": info, "flags": {k: FLAGS[k].value for k in
                                  ("sizes", "batch_size", "seq_len", "steps", "dtype", "peak_tflops")},
                                  "rows": rows})


if __name__ == "__main__":
    app.run(main)
