r"""Pod planner sweep: which model fits which TPU slice, with which mesh (no TPU needed; libtpu).

  pip install -e ".[tpu]"
  python benchmarks/pod_plan.py                              # the full sweep (~1 h on a 2-core CPU)
  python benchmarks/pod_plan.py --models=smollm2_135m --topologies=v5e:2x2 --meshes=dp --extra=   # one row
  python benchmarks/pod_plan.py --shard=0/2 & python benchmarks/pod_plan.py --shard=1/2; wait
  python benchmarks/pod_plan.py --merge        # two processes (XLA's compile is mostly one thread)

Rows already in OUT.json (or its parts) are skipped, so an interrupted sweep resumes.

Every row is ``vlmjax.plan.plan()`` of a real experiment config (the task's own model, loss, optimizer
and data shapes, the trainer's sharded, donated train step) compiled for a TPU topology on this host:

  smollm2_135m   configs/dtf.py:smollm2_135m   DTF decoder, SmolLM2-135M shape, batch 256 x 2048
  qwen25_05b     configs/dtf.py:qwen25_05b     DTF decoder, Qwen2.5-0.5B shape, batch 256 x 2048
  qwen25_1_5b    configs/dtf.py:qwen25_1_5b    DTF decoder, Qwen2.5-1.5B shape, batch 256 x 2048
  qwen25_7b      configs/dtf.py:qwen25_7b      DTF decoder, Qwen2.5-7B shape, batch 256 x 2048
  vitl14         configs/perceiver_mrl_alignment.py:vitl14   ViT-L/14 + CLIP-L text alignment, batch 1024

Meshes: ``dp`` (config.mesh.data=-1: params and optimizer state replicated on every chip), ``fsdp``
(both sharded ZeRO-3 style over F = gcd(devices, hidden size) devices, the most that divide the
params' sharded ``embed`` axis, and data parallel over the rest: e.g. SmolLM2's 576 on 256 chips gives
fsdp 64 x data 4) and ``fsdp_remat`` (fsdp plus
model.remat=full). Columns: peak GiB per device (arguments + outputs - donated + temporaries + code,
``compiled.memory_analysis()``) against HBM, the arguments (state + batch) and temporaries, TFLOP per
device per step (``cost_analysis()``), the step time at 40% of the chip's bf16 peak, tokens (or
examples) per second per chip at that time, the bytes all-reduced / all-gathered / reduce-scattered per
step (static HLO count), fits, and the planner's advice. Writes JSON (after every row, so a partial
sweep keeps its rows) and a markdown table.
"""

from __future__ import annotations

import math
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from vlmjax import plan as plan_lib  # noqa: E402

FLAGS = flags.FLAGS
MODELS = {
    "smollm2_135m": ("configs/dtf.py", "smollm2_135m"),
    "qwen25_05b": ("configs/dtf.py", "qwen25_05b"),
    "qwen25_1_5b": ("configs/dtf.py", "qwen25_1_5b"),
    "qwen25_7b": ("configs/dtf.py", "qwen25_7b"),
    "vitl14": ("configs/perceiver_mrl_alignment.py", "vitl14"),
}
MESHES = {
    "dp": dict(mesh=dict(data=-1, fsdp=1, tensor=1)),
    "fsdp": dict(mesh=dict(data=1, fsdp=-1, tensor=1)),
    "fsdp_remat": dict(mesh=dict(data=1, fsdp=-1, tensor=1), remat="full"),
}
flags.DEFINE_list("models", list(MODELS), f"Models: {', '.join(MODELS)}.")
flags.DEFINE_list("topologies", ["v4:4x4x4", "v5e:16x16", "v5p:4x4x4", "v6e:8x8"], "TPU slices.")
flags.DEFINE_list("meshes", ["fsdp"], f"Meshes for every (model, topology): {', '.join(MESHES)}.")
flags.DEFINE_list("extra", ["v5e:16x16/dp", "qwen25_7b@v5e:4x4/fsdp", "qwen25_7b@v5e:4x4/fsdp_remat"],
                  "More rows (the contrasts the reading needs): TOPOLOGY/MESH for every model, or "
                  "MODEL@TOPOLOGY/MESH for one.")
flags.DEFINE_string("out", "benchmarks/results/pod_plan", "Output prefix (.json, .md).")
flags.DEFINE_string("shard", "0/1", "I/N: run every N-th case from the I-th (N processes share a sweep; "
                    "each writes OUT.partI.json, and --merge joins them).")
flags.DEFINE_string("part", "", "Name of this process's part file (default: its shard index).")
flags.DEFINE_bool("force", False, "Recompile the cases even when OUT already has them.")
flags.DEFINE_bool("merge", False, "Only join OUT.json and OUT.part*.json into OUT.json / OUT.md.")


def _config(model: str, mesh: str, devices: int):
    from configs import dtf, perceiver_mrl_alignment  # pylint: disable=g-import-not-at-top
    path, variant = MODELS[model]
    module = dtf if path.endswith("dtf.py") else perceiver_mrl_alignment
    c = module.get_config(variant)
    c.unlock()
    c.mesh.update(MESHES[mesh]["mesh"])
    if c.mesh.fsdp == -1:  # fsdp over as many chips as divide the hidden size (sharded "embed" axis)
        hidden = int(c.model.hidden_size if "hidden_size" in c.model else c.vision_encoder.tower.hidden_size)
        c.mesh.update(dict(fsdp=math.gcd(devices, hidden), data=-1))
    if "remat" in MESHES[mesh]:
        if "model" in c and "remat" in c.model:
            c.model.remat = MESHES[mesh]["remat"]
        for section in ("vision_encoder", "text_encoder"):
            if section in c and "remat" in c[section].tower:
                c[section].tower.remat = MESHES[mesh]["remat"]
    c.lock()
    return c


def _units(c) -> int:
    return int(c.batch_size) * (int(c.data.seq_len) if c.task in ("lm", "routed_lm") else 1)


def main(argv):
    del argv
    cases = [(m, t, mesh) for m in FLAGS.models for t in FLAGS.topologies for mesh in FLAGS.meshes]
    for e in FLAGS.extra:
        model, _, rest = e.rpartition("@")
        cases += [(m, *rest.split("/")) for m in ([model] if model else FLAGS.models) if m in FLAGS.models]
    for m, _, mesh in cases:
        if m not in MODELS or mesh not in MESHES:
            raise app.UsageError(f"unknown model {m!r} or mesh {mesh!r}; models {list(MODELS)}, meshes {list(MESHES)}.")
    if FLAGS.merge:
        _write(_done_rows(), 0.0, final=True)
        return
    index, count = (int(x) for x in FLAGS.shard.split("/"))
    done = {(r["model"], r["topology"], r["mesh_name"]) for r in _done_rows() if "error" not in r}
    cases = [c for c in cases[index::count] if FLAGS.force or c not in done]  # resume: rows already written are kept
    out = f"{FLAGS.out}.part{FLAGS.part or index}"
    rows, t_all = _read_rows(out + ".json"), time.perf_counter()
    tasks_built = {}
    for model, topo, mesh in cases:
        c = _config(model, mesh, len(plan_lib.topology_devices(topo)))
        t0 = time.perf_counter()
        try:
            from vlmjax import tasks  # pylint: disable=g-import-not-at-top
            if model not in tasks_built:  # the data / tokenizer do not depend on the mesh or remat
                tasks_built[model] = tasks.build(c, None, {})
            task = tasks_built[model]
            if "remat" in MESHES[mesh]:
                task = tasks.build(c, None, {})
            p = plan_lib.plan(c, topo, compile_eval=False, task=task)
        except Exception as e:  # pylint: disable=broad-except  (a row that cannot compile says why)
            rows.append(dict(model=model, topology=topo, mesh_name=mesh, error=f"{type(e).__name__}: {e}"[:300]))
            print(f"{model} {topo} {mesh}: ERROR {rows[-1]['error']}", flush=True)
            continue
        mem = p["memory_gib"]
        coll = p["collectives"]
        step40 = p["step_s_at_40pct"]
        row = dict(
            model=model, topology=topo, mesh_name=mesh, devices=p["devices"], chip=p["chip"],
            mesh="x".join(str(v) for v in p["mesh"].values()), params_M=p["params"] / 1e6,
            per_device_batch=p["per_device_batch"], hbm_gib=p["hbm_gib"], peak_gib=mem.get("peak"),
            args_gib=mem.get("arguments"), temp_gib=mem.get("temporaries"),
            tflop_per_device=p["flops_per_device"] / 1e12, step_ms_at_40pct=step40 * 1e3 if step40 else None,
            units_per_s_per_chip=(_units(c) / step40 / (p["devices"] / p["devices_per_chip"])) if step40 else None,
            allreduce_MiB=coll["all-reduce"]["bytes"] / 2**20, allgather_MiB=coll["all-gather"]["bytes"] / 2**20,
            reducescatter_MiB=coll["reduce-scatter"]["bytes"] / 2**20, fits=p["fits"], advice=p["advice"],
            compile_s=p["compile_s"], wall_s=time.perf_counter() - t0)
        rows.append(row)
        print(f"{model} {topo} {mesh}: peak {row['peak_gib']:.2f} / {row['hbm_gib']:.1f} GiB "
              f"{'fits' if row['fits'] else 'DOES NOT FIT'}; {row['tflop_per_device']:.3f} TFLOP/device; "
              f"compiled in {row['compile_s']:.0f}s", flush=True)
        _write(rows, time.perf_counter() - t_all, out=out)
    if count == 1:
        _write(_done_rows(), time.perf_counter() - t_all, final=True)


def _read_rows(path: str) -> list[dict]:
    import json  # pylint: disable=g-import-not-at-top
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def _done_rows() -> list[dict]:
    """The rows of OUT.json and OUT.part*.json (later files win for the same case)."""
    import glob  # pylint: disable=g-import-not-at-top
    by_case = {}
    for path in [FLAGS.out + ".json"] + sorted(glob.glob(FLAGS.out + ".part*.json")):
        for r in _read_rows(path):
            by_case[(r["model"], r["topology"], r["mesh_name"])] = r
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(by_case.values(), key=lambda r: (order.get(r["model"], 99), r["topology"], r["mesh_name"]))


COLUMNS = ["model", "topology", "mesh_name", "devices", "mesh", "params_M", "per_device_batch", "peak_gib",
           "hbm_gib", "args_gib", "temp_gib", "tflop_per_device", "step_ms_at_40pct", "units_per_s_per_chip",
           "allreduce_MiB", "allgather_MiB", "reducescatter_MiB", "fits", "compile_s"]


def _write(rows, wall_s, final=False, out=None):
    out = out or FLAGS.out
    machine = common.machine_info()
    common.write_json(out + ".json", dict(flags=dict(models=FLAGS.models, topologies=FLAGS.topologies,
                                                          meshes=FLAGS.meshes, extra=FLAGS.extra),
                                               machine=machine, wall_s=wall_s, rows=rows))
    ok = [r for r in rows if "error" not in r]
    md = ["# Pod planner sweep (compiled for TPU topologies on a CPU host; nothing ran on a TPU)", "",
          f"`python benchmarks/pod_plan.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
          common.machine_line(machine), "",
          "Per device: peak = arguments + outputs - donated + temporaries + code (XLA memory_analysis of "
          "the compiled train step); TFLOP from cost_analysis; step time and throughput at 40% of the "
          "chip's bf16 peak (an assumption, not a measurement); collective MiB are static HLO counts "
          "(a scanned layer's ops count once).", "", common.md_table(ok, COLUMNS), ""]
    bad = [r for r in ok if not r["fits"]]
    if bad:
        md += ["Advice for the rows that do not fit:", ""]
        md += [f"- {r['model']} {r['topology']} {r['mesh_name']}: {r['advice']}" for r in bad]
    errs = [r for r in rows if "error" in r]
    if errs:
        md += ["", "Rows that did not compile:", ""] + [f"- {r['model']} {r['topology']} {r['mesh_name']}: "
                                                      f"{r['error']}" for r in errs]
    if out != FLAGS.out:
        return
    with open(out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    if final:
        common.print_table(ok, COLUMNS)
        print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    app.run(main)
