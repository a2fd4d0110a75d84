"""Device mesh, logical-axis rules and batch placement.

Model code names axes logically (``("embed", "mlp")``, ``("act_batch", "act_len", "act_embed")``);
the config maps those names to mesh axes (MaxText ``logical_axis_rules``, flax ``examples/lm1b``).
The mesh has three axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters and
optimizer state sharded over it) and ``tensor`` (Megatron-style tensor parallel over heads / mlp /
vocab). Batches are split over ``("data", "fsdp")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis or axes or None). Parameters: vocab, embed, q_heads, kv_heads, head_dim,
# mlp, norm. Activations carry an ``act_`` prefix so they can be sharded differently from weights
# (e.g. the batch over data+fsdp while weights' embed dim is sharded over fsdp only).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis of scanned params (model.scan_layers): replicated
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves ``config.mesh`` (data, fsdp, tensor; one of them may be -1 = "the rest").

    Raises a ValueError naming the field when the product cannot equal the device count.
    """
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    for axis, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"config.mesh.{axis}={s}: each mesh axis is a positive size or -1 (the rest).")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes))}: at most one axis may be -1; set the others "
            "explicitly.")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {fixed}, which does "
                f"not divide the {num_devices} available devices. Choose sizes whose product divides "
                f"{num_devices}.")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {fixed} devices but {num_devices} are "
            f"available. Set one axis to -1 to use all devices, or sizes whose product is {num_devices}.")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh. ``jax.make_mesh`` orders devices for the physical
    topology (ICI rings on TPU), which is what a pod needs."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: GSPMD propagates shardings from the logical constraints (MaxText's default); the
    # Explicit sharding-in-types mode would require every op to agree on shardings statically.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
    """``config.sharding.rules`` overrides entries of DEFAULT_RULES by logical name."""
    overrides = config.get("sharding", {}).get("rules", ()) if hasattr(config, "get") else ()
    rules = dict(DEFAULT_RULES)
    for name, axes in overrides or ():
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(
                    f"config.sharding.rules: logical axis {name!r} maps to {a!r}, which is not a mesh axis "
                    f"{MESH_AXES}.")
        rules[name] = axes
    return tuple(rules.items())


def logical_to_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (possibly ``nn.Partitioned``-boxed) abstract values.

    Leaves without logical metadata (step counters, RNG keys, optimizer scalars) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch axis split over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles a global batch from each process's local slice.

    batch: per-process numpy arrays ``[B_local, ...]``; the global batch is ``[B_local * P, ...]``
    with P processes, split over (data, fsdp). Works unchanged on one host and on a pod.
    """
    def put(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)
    return jax.tree.map(put, batch)
