"""Shared helpers of the benchmark scripts: device peak FLOPs, table printing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
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
            "python": sys.version.split()[0], "host": platform.machine(), "cpus": os.cpu_count()}


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
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(md_lines) + "\n")
    print(f"wrote {out_prefix}.md")
    png = plot_fn(rows, out_prefix + ".png")
    print(f"wrote {png}" if png else "matplotlib not importable: plot skipped (pip install -e '.[bench]')")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
