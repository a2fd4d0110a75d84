"""4-bit NormalFloat (NF4) frozen base weights for QLoRA (Dettmers et al. 2023, arXiv 2305.14314).

A quantised weight is stored in its own Linen collection, ``"quant"`` (never ``"params"``: its
integer leaves cannot be differentiated and the trainer differentiates exactly ``"params"``), as
up to four variables next to where the fp weight would be (``W`` = ``kernel`` or ``embedding``):

        W_codes          uint8 [..., n/2, ...]   two 4-bit codes per byte along the block axis
                                                   (int8 [..., n, ...] for qtype "int8")
        W_scales         fp32  [..., n/B, ...]   absmax of each block of B values (QLoRA eq. 1)
                     or  int8  [..., n/B, ...]   with double quantisation (QLoRA sec. 3): the
                                                   fp32 absmax scales minus their mean, int8 in
                                                   blocks of B2 = 256 (row-major order)
        W_scales_scale   fp32  [ceil(S/B2)]      (double quantisation) absmax / 127.5 of each block
        W_scales_offset  fp32  []                (double quantisation) the mean subtracted first

where ``n`` is the weight's size along its *block axis* and ``S`` the number of scales. Every other
axis keeps its size and its logical axis name, so the sharding rules of the fp weight apply
unchanged (the scales' block axis is replicated: n/B need not divide a mesh axis). The block axis:

- ``DenseGeneral`` kernels ``[*in, *out]``: the last contracted axis (``embed`` for q/k/v/gate/up
    and an untied lm_head, ``head_dim`` for o_proj, ``mlp`` for down_proj), so a block is B
    consecutive input weights of one output unit (bitsandbytes blocks the row-major ``[out, in]``
    torch weight the same way);
- ``Embed`` tables ``[V, D]``: ``D``, so a token lookup dequantises only the gathered rows.

Codes and block scales come from qwix: ``qwix.quantize(w, "nf4", tiled_axes={axis: B},
channelwise_axes=<the other axes>)`` computes
the scale (absmax) and maps ``w / scale`` to the nearest of the 16 NF4 levels (QLoRA App. E,
``qwix._src.core.numerics.get_nf4_buckets``) with an ``argmin`` over a ``[N, 16]`` distance
table. Here the same argmin is a running minimum over the 16 levels (``nf4_codes``; identical
codes, O(N) memory), so a 28M-entry embedding table quantises without a 1.8 GB temporary. Dequantisation is ``qwix.dequantize``.

Per value, NF4 with B = 64 and double quantisation costs 4 + 8/64 + 32/(64*256) = 4.127 bits
(QLoRA sec. 3: 4.127), without double quantisation 4 + 32/64 = 4.5 bits.

``quantize_params`` turns the fp params of a model into its 4-bit twin's ``(params, quant)``;
``dequantize_params`` is the inverse (up to the quantisation error), for export, merging and tests.
The modules take a ``QuantConfig`` (``layers.DenseGeneral(quant=...)``, ``layers.Embed(quant=...)``);
a decoder builds it from its ``load_in_4bit`` / ``quant_*`` fields (``DecoderConfig.quant``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import numerics as qwix_numerics
from qwix._src.core import qarray as qwix_qarray

from vlmjax import tree as tree_lib

Array = jax.Array

COLLECTION = "quant"
QTYPES = ("nf4", "int4", "int8")
# Variable-name suffixes of one quantised weight ``W``: ``W_codes``, ``W_scales``, ...
CODES, SCALES, SCALES_SCALE, SCALES_OFFSET = "_codes", "_scales", "_scales_scale", "_scales_offset"
SUFFIXES = (CODES, SCALES, SCALES_SCALE, SCALES_OFFSET)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How frozen base weights are quantised (hashable: a Linen attribute). Errors name the
    ``config.model.quant_*`` field a decoder builds each setting from.

    qtype: "nf4" (QLoRA's 4-bit NormalFloat), or qwix's symmetric absmax "int4" / "int8".
    block_size: B, values sharing one absmax scale along a weight's block axis (QLoRA: 64).
    double_quant: quantise the fp32 block scales too (int8, blocks of ``double_block_size``).
    double_block_size: B2, scales sharing one second-level fp32 scale (QLoRA: 256).
    """

    qtype: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    double_block_size: int = 256

    def validate(self) -> None:
        """Raises ValueError naming the field and what it accepts."""
        if self.qtype not in QTYPES:
            raise ValueError(f"quant qtype={self.qtype!r} is not supported; use one of {QTYPES}.")
        b = self.block_size
        if not isinstance(b, int) or isinstance(b, bool) or b < 4 or b % 2:
            # >= 4: with B = 2 the packed codes and the scales would have the same shape and the
            # block axis could not be told from the shapes (quantize_params / dequantize_params).
            raise ValueError(f"quant_block_size must be an even integer >= 4 (QLoRA uses 64), got {b!r}.")
        b2 = self.double_block_size
        if not isinstance(b2, int) or isinstance(b2, bool) or b2 < 1:
            raise ValueError(f"quant double_block_size must be a positive integer (QLoRA uses 256), got {b2!r}.")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"quant_double must be True or False, got {self.double_quant!r}.")

    @property
    def packed(self) -> bool:
        """Two codes per byte (4-bit qtypes)."""
        return self.qtype != "int8"

    def check_divisible(self, shape: tuple[int, ...], axis: int, what: str) -> None:
        """Raises ValueError unless ``shape[axis]`` splits into blocks of ``block_size``."""
        n = shape[axis]
        if n % self.block_size:
            raise ValueError(
                f"{what} of shape {tuple(shape)} is quantised in blocks of quant_block_size="
                f"{self.block_size} along axis {axis} (size {n}), which does not divide it; use a "
                f"block size that divides {n} (e.g. {math.gcd(n, self.block_size)}) or load_in_4bit=False."
            )


# ------------------------------------------------------------------------------------------------
# Codes: NF4 levels, nibble packing
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _nf4_levels_host() -> tuple[float, ...]:
    # Read once, with transfers allowed: qwix builds the table as a jax array, and the first call may
    # come from inside a jitted step run under jax.transfer_guard("disallow") (the trainer's eval).
    with jax.transfer_guard("allow"), jax.ensure_compile_time_eval():
        return tuple(float(v) for v in np.asarray(qwix_numerics.get_nf4_buckets(), np.float32))


def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels in [-1, 1] (QLoRA App. E), as qwix defines them: [16] fp32 (host constant)."""
    return np.asarray(_nf4_levels_host(), np.float32)


def nf4_codes(x: Array) -> Array:
    """Index of the nearest NF4 level of each value of ``x`` (already divided by its block absmax).

    Exactly qwix's ``argmin(|levels - x|)`` (same fp32 arithmetic, first index on ties) without its
    ``[N, 16]`` distance table: a running minimum over the 16 levels, 16 elementwise steps that XLA
    fuses into one pass (O(N) memory). x: [...] float -> [...] uint8.
    """
    levels = _nf4_levels_host()  # constants, also when traced
    x = x.astype(jnp.float32)
    best = jnp.zeros(x.shape, jnp.uint8)
    best_d = jnp.abs(jnp.float32(levels[0]) - x)
    for j, level in enumerate(levels[1:], start=1):
        d = jnp.abs(jnp.float32(level) - x)
        take = d < best_d  # strict: on a tie the lower index (argmin's first) wins
        best = jnp.where(take, jnp.uint8(j), best)
        best_d = jnp.minimum(d, best_d)
    return best


def pack_nibbles(codes: Array, axis: int) -> Array:
    """Two 4-bit codes per byte along ``axis``: [..., n, ...] (values 0..15) -> uint8 [..., n/2, ...]
    (element 2i in the low nibble, 2i + 1 in the high one). ``n`` must be even."""
    axis = axis % codes.ndim
    shape = codes.shape
    pairs = codes.astype(jnp.uint8).reshape(shape[:axis] + (shape[axis] // 2, 2) + shape[axis + 1:])
    lo = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
    hi = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
    return lo | (hi << 4)


def unpack_nibbles(packed: Array, axis: int) -> Array:
    """Inverse of ``pack_nibbles``: uint8 [..., n/2, ...] -> uint8 [..., n, ...] with values 0..15."""
    axis = axis % packed.ndim
    both = jnp.stack([packed & 0xF, packed >> 4], axis=axis + 1)  # [..., n/2, 2, ...]
    shape = packed.shape
    return both.reshape(shape[:axis] + (2 * shape[axis],) + shape[axis + 1:])


def _signed_nibbles(codes: Array) -> Array:
    """uint8 nibbles 0..15 -> the int4 values -8..7 they store (two's complement), as int8."""
    c = codes.astype(jnp.int8)
    return jnp.where(c >= 8, c - 16, c)


# ------------------------------------------------------------------------------------------------
# One tensor: quantise / dequantise along a block axis
# ------------------------------------------------------------------------------------------------


def variable_shapes(shape: tuple[int, ...], axis: int, config: QuantConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of the quant variables of one weight of ``shape`` blocked along ``axis``
    (suffix -> ShapeDtypeStruct; see the module docstring)."""
    shape = tuple(shape)
    axis = axis % len(shape)
    config.check_divisible(shape, axis, "a weight")
    n = shape[axis]
    at = lambda size: shape[:axis] + (size,) + shape[axis + 1:]
    out = {
        CODES: jax.ShapeDtypeStruct(at(n // 2) if config.packed else shape,
                                    jnp.uint8 if config.packed else jnp.int8),
        SCALES: jax.ShapeDtypeStruct(at(n // config.block_size),
                                     jnp.int8 if config.double_quant else jnp.float32),
    }
    if config.double_quant:
        num_scales = math.prod(at(n // config.block_size))
        out[SCALES_SCALE] = jax.ShapeDtypeStruct((-(-num_scales // config.double_block_size),), jnp.float32)
        out[SCALES_OFFSET] = jax.ShapeDtypeStruct((), jnp.float32)
    return out


def logical_axes(names: tuple[str | None, ...], axis: int, config: QuantConfig) -> dict[str, tuple]:
    """Logical axis names of the quant variables of a weight whose axes are ``names``: the codes keep
    them all; the scales' block axis is replicated (n/B rarely divides a mesh axis)."""
    names = tuple(names)
    axis = axis % len(names)
    scales = names[:axis] + (None,) + names[axis + 1:]
    out = {CODES: names, SCALES: scales}
    if config.double_quant:
        out[SCALES_SCALE] = (None,)
        out[SCALES_OFFSET] = ()
    return out


def _double_quantize(scales: Array, config: QuantConfig) -> dict[str, Array]:
    """QLoRA sec. 3: the fp32 block scales [...] minus their mean, int8 absmax in row-major blocks
    of ``double_block_size`` (qwix int8: step = absmax / 127.5)."""
    flat = scales.reshape(-1)
    offset = jnp.mean(flat)
    b2 = config.double_block_size
    nb = -(-flat.size // b2)
    centered = jnp.pad(flat - offset, (0, nb * b2 - flat.size))  # zero padding: absmax unchanged
    q = qwix.quantize(centered, jnp.int8, tiled_axes={0: b2})
    return {SCALES: q.qvalue[: flat.size].reshape(scales.shape), SCALES_SCALE: q.scale.reshape(nb),
            SCALES_OFFSET: offset}


def _scale_values(q: Mapping[str, Array], config: QuantConfig, flat_index: Array | None = None) -> Array:
    """The fp32 block scales of ``q``: stored as they are, or undone double quantisation.
    ``flat_index``: the row-major position of each stored scale in the full scale array (given
    when ``q[SCALES]`` holds gathered rows only); default: ``q[SCALES]`` is the full array."""
    scales = q[SCALES]
    if not config.double_quant:
        return scales.astype(jnp.float32)
    if flat_index is None:
        flat_index = jnp.arange(scales.size, dtype=jnp.int32).reshape(scales.shape)
    second = jnp.take(q[SCALES_SCALE], flat_index // config.double_block_size)
    return scales.astype(jnp.float32) * second + q[SCALES_OFFSET]


def quantize(w: Array, config: QuantConfig, axis: int) -> dict[str, Array]:
    """One weight ``w`` [...] quantised in blocks of ``config.block_size`` along ``axis``.

    Returns the quant variables by suffix (``CODES``, ``SCALES``, and with double quantisation
    ``SCALES_SCALE``, ``SCALES_OFFSET``), shaped as ``variable_shapes`` says. ``w`` is quantised in
    fp32 (scales are fp32 whatever its dtype).
    """
    axis = axis % w.ndim
    config.check_divisible(w.shape, axis, "a weight")
    w = w.astype(jnp.float32)
    # One scale per block of block_size along `axis` and per position on every other axis (qwix
    # reduces the axes that are neither tiled nor channelwise into one scale).
    how = dict(tiled_axes={axis: config.block_size}, channelwise_axes=tuple(a for a in range(w.ndim) if a != axis))
    if config.qtype == "nf4":
        # qwix.quantize(w, "nf4", **how) with its argmin replaced by nf4_codes (same codes, no
        # [N, 16] temporary): absmax scale per block, then w / scale -> nearest level.
        how = qwix_qarray.HowToQuantize(qtype="nf4", **how)
        scale, _ = qwix_qarray.compute_scale_zero_point(qwix_qarray.calibrate(w, how), "nf4")
        codes = nf4_codes(qwix_qarray.call_with_generic_broadcast(jnp.divide, w, scale))
    else:
        q = qwix.quantize(w, jnp.int4 if config.qtype == "int4" else jnp.int8, **how)
        codes, scale = q.qvalue.astype(jnp.int8), q.scale
        if config.packed:
            codes = codes.astype(jnp.uint8) & 0xF  # two's complement nibble
    out = {CODES: pack_nibbles(codes, axis) if config.packed else codes, SCALES: scale.astype(jnp.float32)}
    if config.double_quant:
        out.update(_double_quantize(out[SCALES], config))
    return out


def _dequantize_values(codes: Array, scales: Array, config: QuantConfig) -> Array:
    """Unpacked codes [...] and fp32 scales (one per block) -> fp32 values via ``qwix.dequantize``."""
    if config.qtype == "nf4":
        qa = qwix.QArray(codes, scales, qtype="nf4")
    else:
        values = _signed_nibbles(codes) if config.packed else codes
        qa = qwix.QArray(values.astype(jnp.int8), scales, qtype=jnp.int8)
    return qwix.dequantize(qa)


def dequantize(q: Mapping[str, Array], config: QuantConfig, axis: int, dtype: Any = jnp.float32) -> Array:
    """The weight [...] back from its quant variables (``quantize``'s output), in ``dtype``
    (computed in fp32, then cast: the same numbers as the fp twin casting fp32 params)."""
    codes = q[CODES]
    axis = axis % codes.ndim
    if config.packed:
        codes = unpack_nibbles(codes, axis)
    return _dequantize_values(codes, _scale_values(q, config), config).astype(dtype)


def dequantize_rows(q: Mapping[str, Array], config: QuantConfig, rows: Array, dtype: Any = jnp.float32) -> Array:
    """Rows ``rows`` [...] (int) of a table [V, D] quantised along D, without dequantising the rest:
    -> [..., D] in ``dtype``. Equal to ``dequantize(q, config, axis=1)[rows]``."""
    codes = jnp.take(q[CODES], rows, axis=0)  # [..., D/2]
    if config.packed:
        codes = unpack_nibbles(codes, -1)
    sub = {**q, SCALES: jnp.take(q[SCALES], rows, axis=0)}  # [..., D/B]
    flat_index = None
    if config.double_quant:
        per_row = q[SCALES].shape[1]
        flat_index = rows.astype(jnp.int32)[..., None] * per_row + jnp.arange(per_row, dtype=jnp.int32)
    return _dequantize_values(codes, _scale_values(sub, config, flat_index), config).astype(dtype)


# ------------------------------------------------------------------------------------------------
# Linen: the "quant" variables of one weight
# ------------------------------------------------------------------------------------------------


def quantized_variables(
    module: nn.Module,
    name: str,
    init_fn: Callable[..., Array],
    shape: tuple[int, ...],
    param_dtype: Any,
    names: tuple[str | None, ...],
    axis: int,
    config: QuantConfig,
) -> dict[str, Array]:
    """The "quant" variables ``{name}{suffix}`` of ``module`` standing in for ``module.param(name,
    init_fn, shape, param_dtype)`` with logical axes ``names``; returns them by suffix (unboxed).

    On ``init`` the fp weight is drawn as the param would be (same rng stream, so a random 4-bit
    model quantises exactly the weights of its fp twin with the same seed) and quantised; the
    variables are boxed with logical axis names like params. Otherwise they must be passed
    (``apply({"params": ..., "quant": ...})``).
    """
    config.validate()
    if not module.has_variable(COLLECTION, name + CODES):
        if not module.is_initializing():
            raise ValueError(
                f"{module.path}: the quantised weight {name!r} is missing from the {COLLECTION!r} "
                f"collection; pass it: model.apply({{'params': params, {COLLECTION!r}: quant}}, ...) "
                f"(quant.quantize_params makes it from fp params)."
            )
        values = quantize(init_fn(module.make_rng("params"), shape, param_dtype), config, axis)
    axes_of = logical_axes(names, axis, config)
    out = {}
    for suffix in variable_shapes(shape, axis, config):
        var = module.variable(COLLECTION, name + suffix,
                              lambda s=suffix: nn.LogicallyPartitioned(values[s], axes_of[s]))
        out[suffix] = var.value
    return out


# ------------------------------------------------------------------------------------------------
# Whole trees: fp params <-> (params, quant); memory
# ------------------------------------------------------------------------------------------------


def _weights(quant_flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{'a/kernel_codes': x, 'a/kernel_scales': y, ...}`` -> ``{'a/kernel': {CODES: x, SCALES: y}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in quant_flat.items():
        for suffix in SUFFIXES:
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[suffix] = value
                break
        else:
            raise ValueError(f"{COLLECTION!r} variable {key!r} is not a quantised weight part ({SUFFIXES}).")
    for key, parts in out.items():
        if CODES not in parts or SCALES not in parts:
            raise ValueError(f"{COLLECTION!r} weight {key!r} has parts {sorted(parts)}, needs {CODES} and {SCALES}.")
    return out


def _layout(key: str, parts: Mapping[str, Any], config: QuantConfig) -> tuple[int, int]:
    """(number of leading stacked axes, block axis after them) of one quantised weight, read from
    the shapes: the block axis is the one axis where codes and scales differ (block_size >= 4); the
    stacked axes (``nn.scan``'s [L]) are the dims of ``scales_offset`` (one offset per layer)."""
    codes, scales = tuple(parts[CODES].shape), tuple(parts[SCALES].shape)
    has_double = SCALES_SCALE in parts
    if has_double != config.double_quant:
        raise ValueError(f"{COLLECTION!r} weight {key!r} was {'' if has_double else 'not '}double-quantised "
                         f"but the config says quant_double={config.double_quant}.")
    diff = [i for i, (a, b) in enumerate(zip(codes, scales)) if a != b]
    if len(codes) != len(scales) or len(diff) != 1:
        raise ValueError(f"{COLLECTION!r} weight {key!r}: codes {codes} and scales {scales} do not differ in "
                         f"exactly one (block) axis.")
    batch = len(parts[SCALES_OFFSET].shape) if has_double else 0
    return batch, diff[0] - batch


def _fp_shape(parts: Mapping[str, Any], batch: int, axis: int, config: QuantConfig) -> tuple[int, ...]:
    shape = list(parts[CODES].shape)
    if config.packed:
        shape[batch + axis] *= 2
    return tuple(shape)


def _batched(fn: Callable, batch: int) -> Callable:
    for _ in range(batch):
        fn = jax.vmap(fn)
    return fn


@functools.lru_cache(maxsize=None)
def _quantize_jit(config: QuantConfig, axis: int, batch: int, shardings: tuple | None = None) -> Callable:
    # shardings: ((suffix, sharding), ...) (hashable, for this cache) or None.
    fn = _batched(lambda w: quantize(w, config, axis), batch)
    return jax.jit(fn) if shardings is None else jax.jit(fn, out_shardings=dict(shardings))


@functools.lru_cache(maxsize=None)
def _dequantize_jit(config: QuantConfig, axis: int, batch: int, dtype: Any) -> Callable:
    return jax.jit(_batched(lambda q: dequantize(q, config, axis, dtype), batch))


def quantize_params(
    fp_params: Mapping[str, Any],
    abstract_variables: Mapping[str, Any],
    config: QuantConfig,
    shardings: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits the fp params of a model into the ``(params, quant)`` of its 4-bit twin.

    Args:
        fp_params: the "params" tree of the SAME model without quantisation (e.g. from
            ``vlmjax.convert.load_params``; ``scan_layers`` layout as the 4-bit model's).
        abstract_variables: the 4-bit model's variables (abstract or concrete, boxed or not; e.g.
            ``jax.eval_shape(model.init, ...)``), or just their "quant" collection: every weight
            that has quant variables there is quantised.
        config: the model's ``QuantConfig`` (``DecoderConfig.quant``).
        shardings: optional ``{"params": tree, "quant": tree}`` of shardings (e.g. from the
            logical rules) to place the outputs with; the quantised arrays are produced in place.

    Returns:
        (params: ``fp_params`` without the quantised weights, quant: the "quant" collection).
        One tensor at a time, one compiled program per (shape, layout); a tensor of the wrong shape
        or missing from ``fp_params`` is reported, all of them in one error.
    """
    config.validate()
    abstract = nn.meta.unbox(abstract_variables)
    abstract_quant = abstract.get(COLLECTION, abstract)
    weights = _weights(tree_lib.flatten(abstract_quant))
    flat = tree_lib.flatten(fp_params)
    quant_shardings = tree_lib.flatten((shardings or {}).get(COLLECTION, {}))
    problems, quant_flat = [], {}
    for key, parts in sorted(weights.items()):
        batch, axis = _layout(key, parts, config)
        want = _fp_shape(parts, batch, axis, config)
        if key not in flat:
            problems.append(f"{key}: missing (the 4-bit model quantises it; expected shape {want})")
            continue
        if tuple(flat[key].shape) != want:
            problems.append(f"{key}: shape {tuple(flat[key].shape)}, the 4-bit model expects {want}")
            continue
        out_sh = tuple((s, quant_shardings[key + s]) for s in sorted(parts)) if quant_shardings else None
        fn = _quantize_jit(config, axis, batch, out_sh)
        for suffix, value in fn(flat[key]).items():
            quant_flat[key + suffix] = value
    if problems:
        raise ValueError("quantize_params: the fp params do not fit the 4-bit model:\n  " + "\n  ".join(problems))
    rest = {k: v for k, v in flat.items() if k not in weights}
    if shardings is not None and "params" in shardings:
        rest_sh = tree_lib.flatten(shardings["params"])
        rest = {k: (jax.device_put(v, rest_sh[k]) if k in rest_sh else v) for k, v in rest.items()}
    return tree_lib.unflatten(rest), tree_lib.unflatten(quant_flat)


def dequantize_params(
    params: Mapping[str, Any], quant: Mapping[str, Any], config: QuantConfig, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """The fp params tree of a 4-bit model's ``(params, quant)``: every quantised weight
    dequantised (in ``dtype``) and put back where the fp model holds it (the inverse of
    ``quantize_params`` up to the quantisation error). Feeding them to the fp model gives the
    4-bit model's outputs."""
    config.validate()
    flat = dict(tree_lib.flatten(nn.meta.unbox(params)))
    for key, parts in sorted(_weights(tree_lib.flatten(nn.meta.unbox(quant))).items()):
        if key in flat:
            raise ValueError(f"dequantize_params: {key!r} is both a param and a quantised weight.")
        batch, axis = _layout(key, parts, config)
        flat[key] = _dequantize_jit(config, axis, batch, jnp.dtype(dtype))(dict(parts))
    return tree_lib.unflatten(flat)


def param_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (abstract or concrete, boxed or not)."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nn.meta.unbox(tree))))
