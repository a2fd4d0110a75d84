"""Shared helpers of the benchmark scripts: device peak FLOPs, the machine a run came from, table
printing, JSON output.

Every JSON written by ``write_json`` carries ``machine`` (``machine_info()``: CPU model, cores,
the thread counts XLA and torch use, jax/torch versions, load average) and every table printed by
``print_table`` or written by ``write_report`` starts with the same one-line summary
(``machine_line()``), so a CPU figure is never quoted without the CPU it came from.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import jax

# Dense peak FLOP/s per chip for the compute dtype (vendor datasheets). CPU has no fixed number:
# pass --peak_tflops to get an MFU there.
PEAK_TFLOPS = {
    ("gpu", "H100"): {"bfloat16": 989.0, "float32": 67.0},   # SXM; fp32 without TF32
    ("gpu", "H200"): {"bfloat16": 989.0, "float32": 67.0},
    ("gpu", "A100"): {"bfloat16": 312.0, "float32": 19.5},
    ("tpu", "v4"): {"bfloat16": 275.0, "float32": 275.0 / 2},
    ("tpu", "v5 lite"): {"bfloat16": 197.0, "float32": 197.0 / 2},
    ("tpu", "v5e"): {"bfloat16": 197.0, "float32": 197.0 / 2},
    ("tpu", "v5p"): {"bfloat16": 459.0, "float32": 459.0 / 2},
    ("tpu", "v6"): {"bfloat16": 918.0, "float32": 918.0 / 2},
}


def device_peak_tflops(dtype: str, override: float = 0.0) -> float | None:
    if override:
        return override
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "")
    for (platform_, key), table in PEAK_TFLOPS.items():
        if d.platform == platform_ and key.lower() in kind.lower():
            return table.get(dtype)
    return None


def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": getattr(d, "device_kind", ""),
            "device_count": jax.device_count(), "jax": jax.__version__,
            "python": sys.version.split()[0], "host": platform.machine(), "cpus": os.cpu_count(),
            "machine": machine_info()}


@functools.lru_cache(maxsize=1)
def _cpu_static() -> dict[str, Any]:
    """CPU model, topology and the ISA features that matter for matmuls (lscpu, else /proc/cpuinfo)."""
    out: dict[str, Any] = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", text, re.M))
        out["cpu_model"] = fields.get("Model name", "")
        for key, name in (("CPU family", "cpu_family"), ("Model", "cpu_model_id"), ("Stepping", "cpu_stepping"),
                          ("Socket(s)", "sockets"), ("Core(s) per socket", "cores_per_socket"),
                          ("Thread(s) per core", "threads_per_core"), ("Hypervisor vendor", "hypervisor"),
                          ("L3 cache", "l3_cache")):
            if key in fields:
                out[name] = fields[key]
        flags = fields.get("Flags", "").split()
    except (OSError, subprocess.SubprocessError):
        flags = []
    if not out.get("cpu_model") or not flags:
        try:
            with open("/proc/cpuinfo") as f:
                info = f.read()
            m = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
            if m and not out.get("cpu_model"):
                out["cpu_model"] = m.group(1)
            m = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
            if m and not flags:
                flags = m.group(1).split()
        except OSError:
            pass
    if not out.get("cpu_model"):
        out["cpu_model"] = platform.processor() or platform.machine()
    isa = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    out["isa"] = [f for f in isa if f in flags]
    return out


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model and ISA, cores, threads per library, versions, load.

    ``xla_cpu_threads`` is the size of XLA:CPU's intra-op pool: the CPUs this process may run on
    (jaxlib exposes no knob; ``taskset`` changes it). ``torch_threads`` is ``torch.get_num_threads()``
    when torch is already imported (this helper never imports it). ``load_avg`` is the 1/5/15-minute
    load at the time of the call: on a shared machine, a load above the core count means the
    timings were contended.
    """
    info: dict[str, Any] = dict(_cpu_static())
    info["logical_cpus"] = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info["usable_cpus"] = usable
    d = jax.devices()[0]
    info["jax_platform"] = d.platform
    info["xla_cpu_threads"] = usable
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["jax"] = jax.__version__
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    info["load_avg"] = _load_avg()
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine, for the head of every printed table and report."""
    m = info or machine_info()
    cores = m.get("usable_cpus")
    parts = [f"{m.get('cpu_model', '?')}", f"{cores} CPUs"]
    if m.get("isa"):
        parts.append("+".join(m["isa"]))
    parts.append(f"XLA threads {m.get('xla_cpu_threads')}")
    if "torch_threads" in m:
        parts.append(f"torch threads {m['torch_threads']}")
    parts.append(f"jax {m.get('jax')}" + (f", torch {m['torch']}" if "torch" in m else ""))
    if m.get("jax_platform") != "cpu":
        parts.append(f"jax on {m.get('jax_platform')}")
    if m.get("xla_flags"):
        parts.append(f"XLA_FLAGS={m['xla_flags']}")
    if m.get("load_avg"):
        parts.append("load avg " + "/".join(str(x) for x in m["load_avg"]))
    return "machine: " + "; ".join(parts)


def fmt(v) -> str:
    """A table cell: floats to 4 significant digits, None as '-'."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def md_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows`` (dicts) restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_prefix: str, md_lines: list[str], plot_fn, rows) -> None:
    """Writes ``<out_prefix>.md`` and, when matplotlib is importable, ``<out_prefix>.png``."""
    md_lines = list(md_lines)
    if not any(line.startswith("machine: ") for line in md_lines):
        md_lines[1:1] = ["", machine_line()]  # after the title line
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(md_lines) + "\n")
    print(f"wrote {out_prefix}.md")
    png = plot_fn(rows, out_prefix + ".png")
    print(f"wrote {png}" if png else "matplotlib not importable: plot skipped (pip install -e '.[bench]')")


def print_table(rows: list[dict[str, Any]], columns: list[str], machine: bool = True) -> None:
    """Prints ``rows`` as an aligned table, headed by ``machine_line()`` unless ``machine=False``."""
    if machine:
        print(machine_line())
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = dict(payload)
    payload.setdefault("machine", machine_info())
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled executable from XLA's cost analysis (None where the backend has none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    f = cost.get("flops")
    return float(f) if f is not None and f >= 0 else None


def time_compiled_step(compiled, state, batch, steps: int):
    """Runs a compiled (donating) train step once to warm up, then ``steps`` timed times;
    returns (state, last metrics, median seconds per step)."""
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return state, m, statistics.median(times)


def loader_vs_synthetic(trainer, state, data_iter, steps: int, rounds: int = 1) -> tuple[Any, dict[str, float]]:
    """The train step fed one synthetic on-device batch (the first of ``data_iter``, reused) vs fed by
    the real loader (``data_iter`` itself), ``steps`` timed steps each after 2 warm-up steps; with
    ``rounds`` > 1 the pair is measured that many times and each number is the median over rounds (a
    shared VM's step time drifts by 10-15% between blocks of steps, as much as the loader costs).

    Returns (state, {synthetic_step_ms, real_loader_step_ms, synthetic_over_real (1.0 = the loader
    costs nothing), data_wait_frac (share of the real loop spent in ``next`` + host-to-device)}).
    """
    synthetic = trainer.put(next(data_iter))
    for _ in range(2):
        state, m = trainer.train_step(state, synthetic)
    jax.block_until_ready(m)
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = trainer.train_step(state, synthetic)
        jax.block_until_ready(m)
        synth_s = (time.perf_counter() - t0) / steps
        wait = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            t1 = time.perf_counter()
            batch = trainer.put(next(data_iter))
            wait += time.perf_counter() - t1
            state, m = trainer.train_step(state, batch)
        jax.block_until_ready(m)
        real_s = (time.perf_counter() - t0) / steps
        per_round.append({"synthetic_step_ms": synth_s * 1e3, "real_loader_step_ms": real_s * 1e3,
                          "synthetic_over_real": synth_s / real_s, "data_wait_frac": wait / (real_s * steps)})
    return state, {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}


def compiled_train_step(config, batch_size: int):
    """The real task and ``Trainer`` of ``config`` (sharded init), one batch of its training data on
    device, and the compiled (donating) train step: (task, trainer, state, batch, compiled)."""
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    task = tasks.build(config, None)
    tr = Trainer(config, task, shd.make_mesh(config.mesh))
    state = tr.init()
    batch = tr.put(next(iter(task.train_dataset(global_batch_size=batch_size, seed=0, process_index=0,
                                                process_count=1))))
    return task, tr, state, batch, tr.train_step.lower(state, batch).compile()
