r"""Pod planner: will this experiment's train step fit a TPU pod? Answered on any CPU host, no TPU needed.

  python -m vlmjax.plan --config=configs/dtf.py:smollm2_135m --topology=v5e:16x16
  python -m vlmjax.plan --config=configs/dtf.py:qwen25_7b --topology=v5p:4x4x4 --config.mesh.fsdp=-1 --config.mesh.data=1
  python -m vlmjax.plan --config=configs/lm.py:qwen25_05b --topology=v5e:4x4 --num_slices=2 --config.mesh.data=2 --config.mesh.fsdp=-1

Builds the experiment exactly as ``python -m vlmjax.main`` would (the task, the ``Trainer`` with its
sharded state and jitted, donated train step, the eval step), on a mesh of the TPU topology's devices
(``jax.experimental.topologies.get_topology_desc``: libtpu describes any slice, e.g. ``v5e:16x16`` =
256 chips, without one; install it with ``pip install -e ".[tpu]"``), and compiles both steps for it
with abstract arguments (nothing is allocated). It prints, per chip:

  memory     ``compiled.memory_analysis()``: arguments (params, optimizer state, model state, batch),
             outputs, temporaries (activations, gradients, collectives' buffers) and generated code;
             peak = arguments + outputs - donated (aliased) + temporaries + code, against the chip's HBM;
  FLOPs      ``compiled.cost_analysis()`` of the per-chip program, and the step time it implies at
             100% and 40% of the chip's bf16 peak;
  collectives  the all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute ops in
             the optimised HLO (count and bytes of their results; an op inside a scanned layer loop
             counts once).

When the step does not fit (peak > --headroom x HBM) it exits with status 1 and a line saying what to
change: more fsdp when params + optimizer state dominate, remat or a smaller per-chip batch (gradient
accumulation) when temporaries do. ``--json`` writes the plan; ``benchmarks/pod_plan.py`` sweeps
models x topologies x meshes with ``plan()``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from vlmjax import errors  # light: the handler below covers the heavy imports (jax) that follow

# Its own FlagValues (as vlmjax.diagnose): vlmjax.main's flags live in absl's global FLAGS.
FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/dtf.py:smollm2_135m.",
                                lock_config=True, flag_values=FLAGS)
flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:16x16, v5e:2x2, v4:4x4x4, v5p:4x4x8, v6e:8x8.",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_slices", 1, "Multislice: this many copies of --topology joined over the data-center "
                     "network; config.mesh.data must be a multiple of it.", flag_values=FLAGS)
flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB (0 = the generation's datasheet value).",
                   flag_values=FLAGS)
flags.DEFINE_float("headroom", 0.95, "The step fits when its peak memory is at most this fraction of HBM.",
                   flag_values=FLAGS)
flags.DEFINE_bool("eval", True, "Also compile the eval step.", flag_values=FLAGS)
flags.DEFINE_string("json", "", "Write the plan here as JSON.", flag_values=FLAGS)
flags.DEFINE_bool("verbose", False, "On an error, print its traceback too.", flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet figures of a TPU generation (per chip; libtpu's ``device_kind``)."""
    name: str
    hbm_gib: float
    bf16_tflops: float


# Cloud TPU system architecture pages (HBM per chip, peak bf16 TFLOP/s per chip).
CHIPS = {
    "TPU v4": Chip("v4", 32.0, 275.0),
    "TPU v5 lite": Chip("v5e", 16.0, 197.0),
    "TPU v5": Chip("v5p", 95.0, 459.0),
    "TPU v5p": Chip("v5p", 95.0, 459.0),
    "TPU v6 lite": Chip("v6e", 32.0, 918.0),
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 0.5, "u4": 0.5}
_GIB = 2.0 ** 30


def tpu_available(topology: str = "v5e:2x2") -> str | None:
    """None when libtpu can describe ``topology`` here, else why not (for skips and error lines)."""
    try:
        topology_devices(topology)
    except Exception as e:  # pylint: disable=broad-except
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The compile-only devices of a TPU slice (``num_slices`` > 1: a multislice job)."""
    # libtpu takes a process lock (/tmp/libtpu_lockfile) meant for a TPU VM's chips; compile-only
    # planning may run beside another jax process (a test, a second sweep shard).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
        kwargs = {"num_slices": int(num_slices)} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
    except Exception as e:  # pylint: disable=broad-except
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if importlib.util.find_spec("libtpu") is None:
            raise errors.UserError(f"--topology={topology}: libtpu cannot describe TPU slices here ({text}); "
                                   "install it with pip install -e \".[tpu]\" (jax[tpu] at the project's jax "
                                   "version).") from e
        raise errors.UserError(f"--topology={topology}: not a TPU slice libtpu knows ({text}); use "
                               "GENERATION:SHAPE, e.g. v5e:2x2, v5e:16x16, v4:2x2x2, v5p:4x4x4, v6e:8x8.") from e


def chip_of(devices, hbm_gib: float = 0.0) -> tuple[Chip, int]:
    """(the chip's datasheet figures, devices per chip). A v4 slice described without megacore has two
    devices (TensorCores) per chip; HBM and peak FLOPs are then split between them."""
    kind = devices[0].device_kind
    chip = CHIPS.get(kind)
    if chip is None:
        if hbm_gib <= 0:
            raise errors.UserError(f"unknown TPU kind {kind!r}: pass --hbm_gib=<HBM per chip in GiB>.")
        chip = Chip(kind, hbm_gib, 0.0)
    elif hbm_gib > 0:
        chip = dataclasses.replace(chip, hbm_gib=float(hbm_gib))
    chips = len({(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices})
    per_chip = max(1, len(devices) // max(1, chips))
    return chip, per_chip


def make_mesh(mesh_cfg, devices, num_slices: int = 1):
    """The (data, fsdp, tensor) mesh over a topology's devices, laid out for its physical torus
    (``mesh_utils``); with several slices the data axis spans them (DCN) and fsdp / tensor stay
    inside a slice (ICI), as MaxText's hybrid mesh."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    from jax.sharding import AxisType, Mesh  # pylint: disable=g-import-not-at-top

    from vlmjax import sharding  # pylint: disable=g-import-not-at-top
    shape = sharding.mesh_shape(mesh_cfg, len(devices))
    if num_slices > 1:
        if shape[0] % num_slices:
            raise errors.UserError(
                f"--num_slices={num_slices}: config.mesh.data={shape[0]} must be a multiple of the slices (the "
                f"data axis spans them); e.g. --config.mesh.data={num_slices} --config.mesh.fsdp=-1.")
        ici = (shape[0] // num_slices,) + tuple(shape[1:])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):  # a shape the torus cannot map
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{op: {count, bytes}} of the collectives in optimised HLO text (async ``-start`` forms counted,
    their ``-done`` halves not); bytes are the op's result sizes."""
    out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES}
    pattern = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        op = m.group(2)
        out[op]["count"] += 1
        for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]", m.group(1)):
            if dtype in _DTYPE_BYTES:
                n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
                out[op]["bytes"] += n * _DTYPE_BYTES[dtype]
    return out


def _memory(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    fields = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                  aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                  code=m.generated_code_size_in_bytes)
    fields["peak"] = fields["arguments"] + fields["outputs"] - fields["aliased"] + fields["temporaries"] + fields["code"]
    return {k: float(v) for k, v in fields.items()}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _abstract_batch(batch: dict[str, Any], global_batch: int, mesh) -> dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top

    from vlmjax import sharding  # pylint: disable=g-import-not-at-top
    return {k: jax.ShapeDtypeStruct((global_batch,) + tuple(v.shape[1:]), v.dtype,
                                    sharding=sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}


def build_task(config, scratch: str):
    """The experiment's task as the runner builds it, in the scratch folder ``scratch`` (its caches,
    e.g. target latents). Each stage the task needs (``config.stages``) is stood in for by a folder
    holding only the stage's ``config.json``: the architecture a task reads from there, never weights
    (the planner compiles with abstract params)."""
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    stage_dirs = {}
    if "stages" in config:
        for name in tasks.task_class(config.task).needed_stages(config):
            folder = os.path.join(scratch, name)
            os.makedirs(folder)
            with open(os.path.join(folder, "config.json"), "w") as f:
                f.write(config.stages[name].to_json_best_effort())
            stage_dirs[name] = folder
    own = os.path.join(scratch, config.task)
    os.makedirs(own, exist_ok=True)
    return tasks.build(config, own, stage_dirs)


def sample_batches(task, config) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One train batch and one eval batch of a few rows from the task's real data pipeline (their
    shapes and dtypes past the batch axis are what the planner needs)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    rows = math.gcd(int(config.batch_size), 8)
    train = next(iter(task.train_dataset(global_batch_size=rows, seed=int(config.seed), process_index=0,
                                         process_count=1)))
    train = {k: np.asarray(v) for k, v in train.items()}
    evals = task.eval_batches(global_batch_size=rows, process_index=0, process_count=1)
    return train, ({k: np.asarray(v) for k, v in evals[0].items()} if evals else None)


def plan(config, topology: str, *, num_slices: int = 1, hbm_gib: float = 0.0, headroom: float = 0.95,
         compile_eval: bool = True, task=None) -> dict[str, Any]:
    """Compiles ``config``'s train (and eval) step for ``topology`` and returns the plan (see the module
    docstring): memory per chip, FLOPs, collectives, whether it fits and, if not, the advice.
    ``task``: a built task to reuse (the sweep builds one per model); None builds it from ``config``."""
    import jax  # pylint: disable=g-import-not-at-top

    from vlmjax import sharding, tree  # pylint: disable=g-import-not-at-top
    from vlmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
    from vlmjax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

    config_lib.validate(config)
    devices = topology_devices(topology, num_slices)
    chip, per_chip = chip_of(devices, hbm_gib)
    hosts = len({d.process_index for d in devices})
    mesh = make_mesh(config.mesh, devices, num_slices)
    config_lib.validate_for_mesh(config, sharding.data_parallel_size(mesh), hosts)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlmjax-plan-") as scratch:
        task = task if task is not None else build_task(config, scratch)
        train_batch, eval_batch = sample_batches(task, config)
    try:
        tr = trainer_lib.Trainer(config, task, mesh)
        t_build = time.perf_counter() - t0
        batch = _abstract_batch(train_batch, int(config.batch_size), mesh)
        t0 = time.perf_counter()
        compiled, oom = tr.train_step.lower(tr.abstract_state, batch).compile(), None
    except ValueError as e:
        raise _indivisible(e, dict(mesh.shape)) or e
    except Exception as e:  # pylint: disable=broad-except  (XLA's TPU compiler refuses what cannot fit)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, oom = None, str(e).splitlines()[0]
    t_compile = time.perf_counter() - t0
    # Per-device bytes of the state and the batch from their shardings (what the arguments hold).
    state_dev = _per_device_bytes(tr.abstract_state)
    if compiled is None:  # XLA says only how much the temporaries need
        temps = _oom_temporaries(oom)
        mem = dict(arguments=state_dev + _per_device_bytes(batch), temporaries=temps or float("nan"))
        mem["peak"] = mem["arguments"] + (temps or 0.0)
        flops = float("nan")
    else:
        mem, flops = _memory(compiled), _flops(compiled)
    hbm = chip.hbm_gib * _GIB / per_chip  # per device
    peak_flops = chip.bf16_tflops * 1e12 / per_chip if compiled is not None else 0.0
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tr.abstract_state))
    result: dict[str, Any] = dict(
        topology=topology, num_slices=num_slices, chip=chip.name, devices=len(devices),
        devices_per_chip=per_chip, hosts=hosts, mesh=dict(mesh.shape), task=config.task,
        batch_size=int(config.batch_size), grad_accum_steps=int(config.optim.grad_accum_steps),
        per_device_batch=int(config.batch_size) / sharding.data_parallel_size(mesh),
        params=tree.num_params(tr.abstract_state.params), state_gib_total=state_bytes / _GIB,
        state_gib_per_device=state_dev / _GIB, hbm_gib=hbm / _GIB, memory_gib={k: v / _GIB for k, v in mem.items()},
        flops_per_device=flops, step_s_at_100pct=(flops / peak_flops) if peak_flops else None,
        step_s_at_40pct=(flops / peak_flops / 0.4) if peak_flops else None,
        collectives=collectives(compiled.as_text() if compiled is not None else ""), build_s=t_build,
        compile_s=t_compile)
    if compiled is None:
        result["compiler_error"] = oom
        return _finish(config, result, headroom, force_no_fit=True)
    if compile_eval and eval_batch is not None:
        t0 = time.perf_counter()
        ev = tr.eval_step.lower(tr.abstract_state.params, tr.abstract_state.model_state,
                                _abstract_batch(eval_batch, int(config.batch_size), mesh)).compile()
        emem = _memory(ev)
        result["eval"] = dict(memory_gib={k: v / _GIB for k, v in emem.items()}, flops_per_device=_flops(ev),
                              compile_s=time.perf_counter() - t0)
    return _finish(config, result, headroom)


def _finish(config, result: dict[str, Any], headroom: float, force_no_fit: bool = False) -> dict[str, Any]:
    peaks = [result["memory_gib"].get("peak", 0.0)] + ([result["eval"]["memory_gib"].get("peak", 0.0)]
                                                        if "eval" in result else [])
    result["fits"] = not force_no_fit and max(peaks) <= headroom * result["hbm_gib"]
    result["advice"] = "" if result["fits"] else advice(config, result, headroom)
    return result


def _per_device_bytes(tree_) -> float:
    """Bytes one device holds of a tree of sharded abstract arrays (its shard of each)."""
    import jax  # pylint: disable=g-import-not-at-top
    return float(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree_)))


def _oom_temporaries(message: str) -> float | None:
    """Bytes of temporaries in XLA's TPU out-of-memory error ('... HLO temporaries (36.21G) exceeds
    available HBM (31.25G)'), None when the message says no size."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", message)
    if not m:
        return None
    return float(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m[2]]


def _indivisible(exc: ValueError, mesh: dict[str, int]) -> errors.UserError | None:
    """jax's IndivisibleError (a param axis that a mesh axis does not divide) as the config change."""
    m = re.search(r"spec=P\((.*?)\).*?array axis (\d+) is partitioned (\d+) times, but the dimension size "
                  r"is (\d+) \(full shape: \(([\d, ]+)\)", str(exc), re.S)
    if not m:
        return None
    axis, ways, size, shape = int(m[2]), int(m[3]), int(m[4]), m[5]
    spec = [a.strip().strip("'\"") for a in re.findall(r"'[^']*'|None|\([^)]*\)", m[1])]
    names = spec[axis] if axis < len(spec) else "?"
    fits = [d for d in range(ways, 0, -1) if size % d == 0 and ways % d == 0][0]
    return errors.UserError(
        f"config.mesh={mesh}: a param of shape ({shape}) cannot split its axis {axis} (size {size}) {ways} ways "
        f"over mesh axis {names}: use a {names} size that divides {size}, e.g. --config.mesh.{names}={fits} "
        f"--config.mesh.data=-1 (or change config.sharding.rules).")


def advice(config, result: dict[str, Any], headroom: float) -> str:
    """What to change when the step does not fit: the largest part of the peak says which knob."""
    mem, hbm = result["memory_gib"], result["hbm_gib"]
    mesh = result["mesh"]
    n = result["devices"]
    args = mem.get("arguments", 0.0)
    temps = mem.get("temporaries", 0.0)
    tips = []
    # The state and batch alone over half the HBM, or the larger part: shard them (ZeRO-3) first.
    if (args >= temps or args > 0.5 * hbm) and mesh["fsdp"] < n // max(1, mesh["tensor"]):
        tips.append(f"shard params and optimizer state over more chips: --config.mesh.fsdp=-1 --config.mesh.data=1 "
                    f"(fsdp is {mesh['fsdp']} of {n} devices)")
    if result["state_gib_total"] / n > headroom * hbm:
        tips.append(f"the state alone is {result['state_gib_total']:.1f} GiB = {result['state_gib_total'] / n:.2f} "
                    f"GiB per device even fully sharded: use a larger slice, a frozen base (LoRA) or bf16 "
                    f"optimizer moments")
    remat = str(config.get("model", {}).get("remat", "none")) if "model" in config else "none"
    if temps > args or not tips:
        if remat in ("none", "False"):
            tips.append("recompute activations in the backward pass: --config.model.remat=full (or "
                        "dots_saveable)")
        if result["per_device_batch"] > 1:
            accum = result["grad_accum_steps"] * 2
            tips.append(f"halve the per-device batch ({result['per_device_batch']:g} now): "
                        f"--config.optim.grad_accum_steps={accum} (same global batch) or a smaller "
                        f"--config.batch_size")
    which = "eval" if "eval" in result and result["eval"]["memory_gib"].get("peak", 0) > mem.get("peak", 0) else "train"
    peak = max(mem.get("peak", 0.0), result.get("eval", {}).get("memory_gib", {}).get("peak", 0.0))
    if result.get("compiler_error"):
        return (f"XLA cannot fit the train step on {result['topology']}: {result['compiler_error']} (state + batch "
                f"{args:.2f} GiB per device of {hbm:.1f} GiB): " + "; or ".join(tips) + ".")
    return (f"the {which} step needs {peak:.2f} GiB per device on {result['topology']} but a {result['chip']} "
            f"device has {hbm:.1f} GiB (limit {headroom:.0%}: {headroom * hbm:.1f} GiB; params + optimizer "
            f"state + batch {args:.2f} GiB, temporaries {temps:.2f} GiB): " + "; or ".join(tips) + ".")


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable report of ``plan()``."""
    m = p["memory_gib"]
    lines = [
        f"{p['task']} on {p['topology']}" + (f" x{p['num_slices']} slices" if p["num_slices"] > 1 else "")
        + f": {p['devices']} {p['chip']} devices ({p['devices_per_chip']} per chip), {p['hosts']} host(s), "
          f"mesh {p['mesh']}",
        f"  params {p['params'] / 1e6:,.1f}M; train state {p['state_gib_total']:.2f} GiB in all, "
        f"{p['state_gib_per_device']:.3f} GiB per device; global batch "
        f"{p['batch_size']} ({p['per_device_batch']:g} per device, grad_accum {p['grad_accum_steps']})",
        f"  train step per device: arguments {m.get('arguments', 0):.3f} GiB, outputs {m.get('outputs', 0):.3f} "
        f"(donated {m.get('aliased', 0):.3f}), temporaries {m.get('temporaries', 0):.3f}, code "
        f"{m.get('code', 0):.3f} -> peak {m.get('peak', 0):.3f} GiB of {p['hbm_gib']:.1f} GiB HBM "
        f"({m.get('peak', 0) / p['hbm_gib']:.0%})",
    ]
    if p.get("compiler_error"):  # XLA refused: only its temporaries count and our state + batch are known
        lines[-1] = (f"  train step per device: state + batch {m.get('arguments', 0):.3f} GiB, temporaries "
                     f"{m.get('temporaries', 0):.3f} GiB (XLA: {p['compiler_error']})")
        lines.append("  DOES NOT FIT: " + p["advice"])
        return "\n".join(lines)
    if "eval" in p:
        lines.append(f"  eval step per device: peak {p['eval']['memory_gib'].get('peak', 0):.3f} GiB, "
                     f"{p['eval']['flops_per_device'] / 1e12:.3f} TFLOP")
    t100, t40 = p["step_s_at_100pct"], p["step_s_at_40pct"]
    lines.append(f"  FLOPs per device per step {p['flops_per_device'] / 1e12:.3f} TFLOP"
                 + (f" -> {t100 * 1e3:.1f} ms at 100% of bf16 peak, {t40 * 1e3:.1f} ms at 40%" if t100 else ""))
    coll = ", ".join(f"{op} {c['count']} ({c['bytes'] / 2**20:,.1f} MiB)" for op, c in p["collectives"].items()
                     if c["count"])
    lines.append(f"  collectives (static ops in the HLO): {coll or 'none'}")
    lines.append(f"  compiled in {p['compile_s']:.1f}s (task + trainer built in {p['build_s']:.1f}s)")
    lines.append("  FITS" if p["fits"] else f"  DOES NOT FIT: {p['advice']}")
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
        field = errors.missing_field(e)
        if field:
            key, hint = field
            raise errors.UserError(f"config.{key}: no such field" + (f" (did you mean {hint!r}?)" if hint else "")) from e
        if isinstance(e, flags.Error):
            raise errors.UserError(f"{e} (--help lists the flags)") from e
        raise
    if len(rest) > 1:
        raise errors.UserError(f"unexpected argument(s) {rest[1:]}: everything is a flag, --name=value.")
    if FLAGS.config is None:
        raise errors.UserError("--config is required, e.g. --config=configs/dtf.py:smollm2_135m.")
    if not FLAGS.topology:
        raise errors.UserError("--topology is required, e.g. --topology=v5e:16x16 (a TPU slice: GENERATION:SHAPE).")
    if FLAGS.num_slices < 1:
        raise errors.UserError(f"--num_slices={FLAGS.num_slices}: use 1 or more.")
    return rest


def main(argv: list[str]) -> int:
    parse_flags(argv)
    logging.set_verbosity(logging.WARNING)
    p = plan(FLAGS.config, FLAGS.topology, num_slices=FLAGS.num_slices, hbm_gib=FLAGS.hbm_gib,
             headroom=FLAGS.headroom, compile_eval=FLAGS.eval)
    print(format_plan(p), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(p, f, indent=1, default=str)
    if not p["fits"]:
        raise errors.UserError(p["advice"])
    return 0


def cli(argv: list[str] | None = None) -> None:
    """Runs ``main``: exit 0 when the step fits, 1 with one line 'vlmjax: error: ...' (the fix) when it
    does not or the input is wrong; --verbose adds the traceback."""
    errors.run_cli(main, list(sys.argv if argv is None else argv),
                   __doc__.rstrip() + "\n\nflags:\n" + FLAGS.get_help())


if __name__ == "__main__":
    from vlmjax import main as main_lib  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, main_lib.config_root(sys.argv))  # experiment files import `from configs import common`
    cli()
