"""benchmarks/suite.py: argument handling, the --device check, the part runner (a failing part gives an
error row, the others still run) and the JSON / markdown writer, with fake parts (fast); one real
part end to end at a tiny size (slow)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from benchmarks import suite  # noqa: E402  pylint: disable=g-import-not-at-top
sys.path.remove(ROOT)


def test_args_defaults_and_only(tmp_path):
    a = suite.parse_args(["--device=cpu"])
    assert (a.size, a.dtype, a.only) == ("small", "float32", list(suite.PARTS))
    assert a.out.endswith(os.path.join("benchmarks", "results", "suite_cpu"))
    a = suite.parse_args(["--device=gpu", "--only=lora, ckpt", f"--out={tmp_path}/x"])
    assert (a.size, a.dtype, a.only, a.out) == ("full", "bfloat16", ["lora", "ckpt"], f"{tmp_path}/x")
    assert suite.parse_args(["--device=tpu", "--size=small"]).dtype == "float32"


@pytest.mark.parametrize("argv", [["--device=cpu", "--only=vit_b16,nope"], ["--device=metal"], []])
def test_bad_args_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        suite.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err if "nope" in " ".join(argv) else "--device" in err


def test_device_mismatch_is_one_error_line(capsys, tmp_path):
    other = next(d for d in suite.DEVICES if d != suite.jax.default_backend())
    assert suite.main([f"--device={other}", f"--out={tmp_path}/s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: --device={other} but jax.default_backend() is ")
    assert not os.path.exists(f"{tmp_path}/s.json")  # nothing measured, nothing written
    assert suite.device_error(suite.jax.default_backend()) is None


def test_runner_and_writer_with_fake_parts(tmp_path, capsys):
    def ok(args, sz):
        assert sz is suite.SIZES["small"]["lora"]
        return [suite.make_row("lora", "fake ratio", 2.0, "x", ">= 1.8x", True, "fine", step_ms=[1.0, 2.0]),
                suite.make_row("lora", "fake mfu", 12.5, "TFLOP/s", "MFU >= 32%", None, "no peak")]

    def boom(args, sz):
        raise ValueError("part exploded\nsecond line")

    called = []
    fakes = {"lora": ok, "ckpt": boom, "reuse": lambda a, s: called.append("reuse") or []}
    args = suite.parse_args(["--device=cpu", "--only=ckpt,lora", f"--out={tmp_path}/suite_cpu"])
    rows = suite.run_parts(args, fakes)
    assert not called  # --only: reuse is not run
    assert [r["name"] for r in rows] == ["ckpt", "fake ratio", "fake mfu"]  # --only order
    err = rows[0]
    assert err["met"] is None and err["value"] is None
    assert err["note"] == "ERROR ValueError: part exploded second line"
    assert "Traceback" in err["details"]["traceback"] and "part_s" in rows[1]["details"]
    suite.write_outputs(rows, args, 1.5, info={"platform": "cpu", "device_kind": "cpu", "device_count": 1})
    out = capsys.readouterr().out
    table = out[out.index("\nmachine: "):]
    assert "fake ratio" in table and "targets met 1, missed 0, not applicable / not measured 2" in table
    payload = json.load(open(f"{tmp_path}/suite_cpu.json"))
    assert {"machine", "rows", "args", "seconds", "summary"} <= set(payload)
    assert "load_avg" in payload["machine"] and "cpu_model" in payload["machine"]
    assert payload["rows"][1]["details"]["step_ms"] == [1.0, 2.0] and payload["rows"][1]["met"] is True
    md = open(f"{tmp_path}/suite_cpu.md").read().splitlines()
    assert md[0].startswith("machine: ")
    header = next(i for i, line in enumerate(md) if line.startswith("| part |"))
    assert md[header] == "| " + " | ".join(suite.COLUMNS) + " |"
    assert md[header + 2].startswith("| ckpt | ckpt | - | - | - | - | ERROR ValueError")
    assert "| lora | fake ratio | 2 | x | >= 1.8x | yes | fine |" in md


@pytest.mark.slow
def test_ckpt_part_tiny(tmp_path):
    """The async-checkpoint part on a tiny lm state: async save blocks, sync save writes; real Checkpointer."""
    args = suite.parse_args(["--device=cpu", "--only=ckpt", f"--out={tmp_path}/s"])
    sz = dict(model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16), batch=2, seq_len=16, saves=2, steps_between=1)
    (row,) = suite.part_ckpt(args, sz)
    d = row["details"]
    assert row["unit"] == "ms" and row["value"] > 0 and row["met"] in (True, False)
    assert len(d["async_block_ms"]) == len(d["sync_save_ms"]) == 2 and d["on_disk_MiB_2_steps"] > 0
