r"""The tiny recursive decoder (TRM) beside the Qwen/Llama-style decoder at equal training FLOPs, on the
procedural-scene VQA of ``configs/trm_vlm_qa.py``.

  python benchmarks/vlm_trm_vs_qwen.py                       # 2-core CPU: ~30 min (docs/vlm.md)
  python benchmarks/vlm_trm_vs_qwen.py --qwen_steps=20 --workdir=/tmp/trm_vs_qwen_quick   # a quick check

Both arms train from scratch in full precision with the same frozen vision tower (the config's
scene-parsing stage), connector (the default's linear projector over the patch tokens), data, batch and optimizer; only the
decoder differs:

  qwen   the ``default`` variant's 4-layer, 128-wide Llama/Qwen-style decoder (no text-only stage, no 4-bit
         base: the TRM has no pretrained base either, so both start from the same point)
  trm    the ``trm`` variant: a 2-layer net applied over 3 cycles of 2 latent updates (9 applications),
         deep supervision over the cycles

Training FLOPs per step are XLA's (``cost_analysis()`` of each compiled train step: every matmul of
the tower, the connector and the decoder, forward and backward). The qwen arm trains ``--qwen_steps``
steps; the trm arm trains round(qwen_steps x qwen FLOPs/step / trm FLOPs/step) steps, so both spend the
same training FLOPs (the learning-rate schedule of each spans its own steps). Evaluation is the task's:
greedy answers on the held-out scenes, exact match per question type, beside the answer prior.
Prints a table, writes JSON.
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from benchmarks import common  # noqa: E402
from configs import trm_vlm_qa  # noqa: E402
from vlmjax import run as runner  # noqa: E402
from vlmjax import sharding as shd  # noqa: E402
from vlmjax import tasks  # noqa: E402
from vlmjax.train import Trainer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("qwen_steps", 400, "Training steps of the qwen arm (the trm arm gets the same FLOPs).")
flags.DEFINE_string("workdir", "/tmp/vlm_trm_vs_qwen", "Where the two runs write (WORKDIR/qwen, WORKDIR/trm).")
flags.DEFINE_string("out", "benchmarks/results/vlm_trm_vs_qwen.json", "JSON output path.")


def arm_config(arm: str, steps: int) -> ml_collections.ConfigDict:
    """The ``default`` (qwen) or ``trm`` variant, from scratch in full precision, ``steps`` steps."""
    c = trm_vlm_qa.get_config("trm" if arm == "trm" else "default")
    # No text-only decoder stage; the vision stage stays (the same frozen scene-parsing tower for both
    # arms: each arm's WORKDIR/<arm>/vision, identical runs of the same config and seed).
    c.stages = ml_collections.ConfigDict(dict(vision=c.stages.vision.to_dict()))
    c.decoder.update(dict(load_in_4bit=False, use_lora=False, lora_rank=0, lora_alpha=0.0))
    c.total_steps = steps
    c.eval_every = c.ckpt_every = steps
    c.log_every = max(1, steps // 4)
    c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, steps // 10))
    return c


def step_flops(c) -> float:
    """XLA's FLOPs of one compiled train step of config ``c``."""
    task = tasks.build(c, None)
    tr = Trainer(c, task, shd.make_mesh(c.mesh))
    state = tr.abstract_state
    batch = next(iter(task.train_dataset(global_batch_size=c.batch_size, seed=0, process_index=0, process_count=1)))
    flops = common.compiled_flops(tr.train_step.lower(state, tr.put(batch)).compile())
    if flops is None:
        raise SystemExit("this backend gives no cost_analysis() FLOPs; run on CPU/GPU/TPU with XLA cost analysis.")
    return flops


def main(argv):
    del argv
    q_cfg = arm_config("qwen", FLAGS.qwen_steps)
    flops = {"qwen": step_flops(q_cfg), "trm": step_flops(arm_config("trm", 1))}
    steps = {"qwen": FLAGS.qwen_steps, "trm": max(1, round(FLAGS.qwen_steps * flops["qwen"] / flops["trm"]))}
    rows = []
    for arm in ("qwen", "trm"):
        c = arm_config(arm, steps[arm])
        c.lock()
        shared, mine = os.path.join(FLAGS.workdir, "qwen", "vision"), os.path.join(FLAGS.workdir, arm, "vision")
        if arm != "qwen" and os.path.isdir(shared) and not os.path.exists(mine):
            shutil.copytree(shared, mine)  # the finished vision stage: the same tower, trained once
        s = runner.run(c, os.path.join(FLAGS.workdir, arm))
        end = s["eval_end"]
        row = {"decoder": arm, "params_M": s["params"] / 1e6, "GFLOP_per_step": flops[arm] / 1e9,
               "steps": steps[arm], "train_PFLOP": flops[arm] * steps[arm] / 1e15, "wall_s": s["wall_time_s"],
               "vqa": end["vqa_accuracy"], "prior": end["prior_accuracy"], "vqa_loss": end["vqa_loss"],
               "caption_loss": end["caption_loss"]}
        row.update({k.split("/", 1)[1]: v for k, v in end.items() if k.startswith("vqa_accuracy/")})
        rows.append(row)
    types = [k for k in rows[0] if k.isupper()]
    print(f"\nTRM vs Qwen-style decoder at equal training FLOPs (XLA cost analysis), batch {q_cfg.batch_size}, "
          f"held-out scene VQA exact match")
    common.print_table(rows, ["decoder", "params_M", "GFLOP_per_step", "steps", "train_PFLOP", "wall_s", "vqa",
                              "prior", *types, "vqa_loss", "caption_loss"])
    common.write_json(FLAGS.out, {"device": common.device_info(), "qwen_steps": FLAGS.qwen_steps, "rows": rows})


if __name__ == "__main__":
    app.run(main)
