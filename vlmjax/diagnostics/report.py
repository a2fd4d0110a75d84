"""The diagnostics report: a plain-text table for the log, ``diagnostics.json`` and PNG plots.

The JSON holds the report exactly as ``vqa.diagnose`` returns it (accuracies as fractions in [0, 1],
missing values as null); the table shows percentages. Plots need the optional matplotlib
(``pip install -e '.[bench]'``); without it one line says they were skipped.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

JSON_NAME = "diagnostics.json"
ACCURACY_PNG = "accuracy_by_type.png"
GATES_PNG = "gate_trajectories.png"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a plain-text table (percent accuracies; drops in accuracy points)."""
    acc, drop, bias = report["accuracy"], report["vision_drop"], report["dataset_bias"]
    q_only = (report.get("text_only") or {}).get("question_only")
    head = [report.get("workdir", ""), f"step {report['step']}" if "step" in report else "",
            f"split {report['split']}" if "split" in report else "", f"{report['num_questions']} questions"]
    lines = [f"VQA diagnostics: {', '.join(h for h in head if h)}"]
    cols = [("n", 5), ("real", 6), ("shuffled", 8), ("blank", 6), ("drop:shuf", 9), ("drop:blank", 10),
            ("type-prior", 10), ("prefix-prior", 12)] + ([("q-only", 6)] if q_only else [])
    lines.append(f"  {'type':10s} " + " ".join(f"{name:>{w}s}" for name, w in cols))
    for key in [*report["qtypes"], "overall"]:
        vals = [str(report["counts"].get(key, 0)), _pct(acc["real"].get(key)),
                _pct(acc.get("shuffled", {}).get(key)), _pct(acc["blank"].get(key)),
                _pct(drop.get("shuffled", {}).get(key), True), _pct(drop["blank"].get(key), True),
                _pct(bias["type_prior"].get(key)), _pct(bias["prefix_prior"].get(key))]
        if q_only:
            vals.append(_pct(q_only.get(key)))
        lines.append(f"  {key:10s} " + " ".join(f"{v:>{w}s}" for v, (_, w) in zip(vals, cols)))
    changed = report.get("answer_changed", {})
    lines.append("  answers changed by the image: " + ", ".join(f"{m} {_pct(v)}%" for m, v in changed.items())
                 + f" (images: {report['images']['distinct']} distinct in {report['images']['examples']} examples)")
    if q_only:
        lines.append(f"  question-only baseline: {q_only.get('source', '')}")
    div = report.get("feature_diversity")
    lines.append("  visual feature diversity (1 - mean pairwise cosine): "
                 + (f"{_num(div['value'])} over {div['images']} images, D={div['dim']}" if div else "-"))
    gates = report["gates"]
    if gates["final"]:
        summary = ", ".join(f"{k} mean {_num(s['mean'])} [{_num(s['min'])}, {_num(s['max'])}] over {s['gates']}"
                            for k, s in gates["summary"].items())
        lines.append(f"  gates: {summary}")
        for name, s in gates["final"].items():
            lines.append(f"    {name:48s} {s['kind']:7s} mean {_num(s['mean'])} min {_num(s['min'])} "
                         f"max {_num(s['max'])}")
        if gates["trajectory"]:
            steps = sorted({int(p[0]) for t in gates["trajectory"].values() for p in t})
            lines.append(f"    trajectory ({gates['trajectory_source']}): {len(steps)} step(s) "
                         f"{steps[0]}..{steps[-1]}")
    else:
        lines.append("  gates: none")
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def write_json(report: Mapping[str, Any], out_dir: epath.PathLike) -> epath.Path:
    """Writes ``<out_dir>/diagnostics.json`` (local or gs://); returns its path."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return path


def read_json(path: epath.PathLike) -> dict[str, Any]:
    """A report written by ``write_json`` (the file, or the folder holding it)."""
    path = epath.Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    return json.loads(path.read_text())


def _save(fig, path: epath.Path) -> None:
    buf = io.BytesIO()  # through bytes, so a gs:// folder works like a local one
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path.write_bytes(buf.getvalue())


def plot(report: Mapping[str, Any], out_dir: epath.PathLike) -> list[str]:
    """Per-type accuracy bars per image mode (+ the bias baseline), and the gate trajectories when
    there are any; returns the PNG paths written ([] and one printed line without matplotlib)."""
    try:
        import matplotlib  # pylint: disable=g-import-not-at-top
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:  # an optional extra; the table and the JSON are written either way
        print("(no diagnostics plots: matplotlib is not installed; pip install -e '.[bench]')", flush=True)
        return []
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    keys = [*report["qtypes"], "overall"]
    series = [(m, report["accuracy"][m]) for m in ("real", "shuffled", "blank") if m in report["accuracy"]]
    series.append(("type prior", report["dataset_bias"]["type_prior"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(keys)), 3.5))
    width = 0.8 / len(series)
    for i, (name, acc) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [100 * (acc.get(k) or 0.0) for k in keys], width=width, label=name)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"VQA accuracy by image mode, {report['num_questions']} questions")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    path = out / ACCURACY_PNG
    _save(fig, path)
    plt.close(fig)
    written.append(os.fspath(path))
    traj = report["gates"]["trajectory"]
    if traj:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, points in traj.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("gate value (mean)")
        ax.set_title(f"gates over training ({report['gates']['trajectory_source']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        path = out / GATES_PNG
        _save(fig, path)
        plt.close(fig)
        written.append(os.fspath(path))
    return written


def write(report: Mapping[str, Any], out_dir: epath.PathLike) -> dict[str, Any]:
    """``diagnostics.json`` + plots in ``out_dir``; returns {'json': path, 'plots': [paths]}."""
    path = write_json(report, out_dir)
    return {"json": os.fspath(path), "plots": plot(report, out_dir)}


__all__ = ["ACCURACY_PNG", "GATES_PNG", "JSON_NAME", "format_table", "plot", "read_json", "write", "write_json"]
