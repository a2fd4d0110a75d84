"""One attention function for every family, with backends per platform.

``attend(q, k, v, ..., implementation=...)`` computes scaled dot-product attention
``softmax(q k^T / sqrt(Dh) + mask) v`` with grouped-query heads (query head h reads kv head
``h // (H // K)``, HF ``repeat_kv``) and the softmax in fp32. What may attend is given by structure,
not by a materialised [B, T, S] array, so that fused kernels can skip masked blocks:

    allowed[b, t, s] = kv_valid[b, s]                                   (padding / unwritten cache)
                     & kv_positions[b, s] <= q_positions[b, t]          (causal, by position id)
                     & mask[b, t, s]                                    (anything else, e.g. reuse)

each factor optional (none = bidirectional). Backends (``model.attention_impl`` in every config):

    einsum  two batched matmuls with the query heads of each kv head folded into the rows; the
            fastest on CPU (``auto`` picks it there). ``reference_attention`` is the same math in
            the grouped 5-D layout vlmjax had before backends existed; tests compare with it.
    xla     ``jax.nn.dot_product_attention(implementation="xla")``: the same math through JAX's
            portable op (materialises [B, H, T, S] logits; any platform).
    cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN flash attention on
            NVIDIA GPUs (fp16/bf16 only; head_dim <= 128 and a multiple of 8). Sequences are padded
            inside to a multiple of 64 (ViT-B/16 at 224 px has T = 197, ViT-L/14 T = 257) and the
            padding masked, so callers never see it.
    splash  the Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu.
            splash_attention``, what MaxText uses): self-attention (T == S) only, causal through its
            static ``CausalMask`` and padding through segment ids, so masked blocks are skipped;
            padded inside to a multiple of the 128-token block. Under a mesh it runs per shard
            (``jax.shard_map`` over the batch and head axes of the active logical rules).
    auto    the fastest valid one for the platform and the call: TPU -> splash, GPU -> cudnn, CPU
            (and any other platform) -> einsum; a call splash or cuDNN cannot take (decode against
            a KV cache, an arbitrary ``mask``, fp32 on cuDNN, cross-attention on splash) falls back
            to xla with one log line.

The causal factor is by *position id*, so a block may run on a gathered subset of tokens with their
original positions (Mixture-of-Depths) or on left-padded rows. The splash backend's ``CausalMask`` is
by index; it equals the position rule whenever positions increase along the sequence, which holds for
every non-decode call vlmjax makes (``arange``, left-padding offsets, gathered subsets kept in
index order).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from vlmjax.models import axes

Array = jax.Array
Dtype = Any

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "einsum")

# Padding granularity of the fused kernels (sequence lengths are padded to a multiple inside).
CUDNN_MULTIPLE = 64
SPLASH_BLOCK = 128

_log = logging.getLogger("vlmjax")


def validate_implementation(field: str, value: str) -> None:
    """Raises ValueError naming ``field`` when ``value`` is not a known backend."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{field}={value!r} is not an attention backend; use one of {IMPLEMENTATIONS}.")


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    _log.warning("%s", message)


def _platform() -> str:
    """The platform being compiled for: that of the active (abstract) mesh's devices when one is set
    (e.g. a TPU topology compiled on a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if device is not None and getattr(device, "platform", None):
        return device.platform
    return jax.devices()[0].platform


def resolve(implementation: str, *, q: Array, k: Array, mask: Array | None, dtype: Dtype,
            platform: str | None = None) -> str:
    """The backend that runs this call: ``implementation`` unless it is 'auto' (or cannot take the
    call under 'auto'). An explicit backend that cannot take the call is an error naming why."""
    validate_implementation("attention_impl", implementation)
    platform = platform or _platform()
    if implementation in ("xla", "einsum"):
        return implementation
    wanted = implementation
    if wanted == "auto":
        wanted = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "einsum")
        if wanted == "einsum":  # CPU: the folded-einsum layout is the fastest there (see _einsum)
            return "einsum"
    reason = _unsupported(wanted, q=q, k=k, mask=mask, dtype=dtype, platform=platform)
    if reason is None:
        return wanted
    if implementation == "auto":
        _log_once(f"attention_impl=auto: {wanted} cannot run this call ({reason}); using xla.")
        return "xla"
    raise ValueError(f"attention_impl={implementation!r} cannot run this call: {reason}. "
                     "Use attention_impl='auto' (falls back to xla) or 'xla'.")


def _unsupported(impl: str, *, q: Array, k: Array, mask: Array | None, dtype: Dtype, platform: str) -> str | None:
    """Why ``impl`` cannot take the call, or None."""
    dh = q.shape[-1]
    if impl == "cudnn":
        if platform not in ("gpu", "cuda"):
            return f"cuDNN needs an NVIDIA GPU (platform is {platform})"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention runs in bfloat16/float16, not {jnp.dtype(dtype).name}"
        if dh > 128 or dh % 8:
            return f"cuDNN needs head_dim <= 128 and a multiple of 8 (head_dim={dh})"
        if q.shape[1] == 1:
            return "single-token decode steps gain nothing from flash attention"
        return None
    if impl == "splash":
        if platform != "tpu":
            return f"splash attention is a TPU kernel (platform is {platform})"
        if mask is not None:
            return "an arbitrary [B, T, S] mask has no splash form (only causal + padding)"
        if q.shape[1] != k.shape[1]:
            return f"splash runs self-attention only (T={q.shape[1]}, S={k.shape[1]}: decode/cross-attention)"
        return None
    return None


# ------------------------------------------------------------------------------------------------
# The public function
# ------------------------------------------------------------------------------------------------

def attend(
    q: Array,
    k: Array,
    v: Array,
    *,
    dtype: Dtype,
    implementation: str = "xla",
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    kv_valid: Array | None = None,
    mask: Array | None = None,
    platform: str | None = None,
) -> Array:
    """Grouped-query scaled dot-product attention, scale ``Dh ** -0.5`` (HF ``scaling``).

    Args:
        q: [B, T, H, Dh] queries (already rotated where RoPE applies).
        k, v: [B, S, K, Dh] keys and values, H % K == 0.
        dtype: dtype of the probabilities fed to the value matmul and of the output.
        implementation: one of ``IMPLEMENTATIONS`` (module docstring).
        q_positions, kv_positions: [B, T] / [B, S] position ids: causal by position (both or none).
        kv_valid: [B, S] bool/int, 0 = padding key (never attended).
        mask: [B, T, S] bool, True = may attend (any other rule, ANDed with the above).
        platform: the platform to pick backends for (default: that of ``jax.devices()``).

    Returns:
        [B, T, H, Dh] in ``dtype``. A query with no visible key gets the mean of all values (a large
        finite negative, not -inf, keeps padding queries NaN-free).
    """
    b, t, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"{h} query heads are not a multiple of {kh} kv heads.")
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("Pass both q_positions and kv_positions (causal by position) or neither.")
    impl = resolve(implementation, q=q, k=k, mask=mask, dtype=dtype, platform=platform)
    if impl == "splash":
        return _splash(q, k, v, dtype=dtype, causal=q_positions is not None, kv_valid=kv_valid)
    full = dense_mask(b, t, s, q_positions=q_positions, kv_positions=kv_positions, kv_valid=kv_valid,
                      mask=mask)
    if impl == "einsum":
        return _einsum(q, k, v, full, dtype)
    if impl == "xla":
        return _xla(q, k, v, full, dtype, "xla")
    return _padded(functools.partial(_xla, implementation="cudnn"), q, k, v, full, dtype, CUDNN_MULTIPLE)


def dense_mask(b: int, t: int, s: int, *, q_positions=None, kv_positions=None, kv_valid=None,
               mask=None) -> Array | None:
    """The [B, T, S] bool mask of ``attend``'s rule, or None when every key is visible."""
    out = None
    if q_positions is not None:
        out = kv_positions[:, None, :] <= q_positions[:, :, None]
    if kv_valid is not None:
        valid = jnp.broadcast_to(kv_valid.astype(jnp.bool_)[:, None, :], (b, t, s))
        out = valid if out is None else out & valid
    if mask is not None:
        out = mask.astype(jnp.bool_) if out is None else out & mask.astype(jnp.bool_)
    return out


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------

def reference_attention(q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype) -> Array:
    """The reference (the path vlmjax had before backends, kept for tests): q [B, T, H, Dh], k/v [B, S, K, Dh], mask [B, T, S] bool or None -> [B, T, H, Dh].

    k/v are never materialised repeated: the query heads are grouped per kv head instead.
    """
    dh = q.shape[-1]
    q = rearrange(q, "b t (k g) d -> b t k g d", k=k.shape[2])  # query head h = k * G + g
    # Scale q before the matmul (cheaper than scaling [.., T, S]).
    q = q * jnp.asarray(dh**-0.5, q.dtype)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dtype))
    return rearrange(out, "b t k g d -> b t (k g) d")


def _folded_logits(q: Array, k: Array, mask: Array | None, g: int) -> Array:
    """fp32 logits [B, K, G*T, S] of pre-scaled, folded queries q [B, K, G*T, Dh] against k [B, S, K, Dh];
    disallowed entries set to the fp32 minimum (a fully masked row becomes uniform, as in softmax)."""
    logits = jnp.einsum("bkmd,bskd->bkms", q, k, preferred_element_type=jnp.float32)
    if mask is None:
        return logits
    logits = rearrange(logits, "b k (g t) s -> b k g t s", g=g)
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    return rearrange(logits, "b k g t s -> b k (g t) s")


def _folded_forward(q, k, v, mask, g):
    # Normalise after the value matmul: o = (e v) / l with e = exp(logits - max), l = sum(e). The
    # division then touches [G*T, Dh] instead of [G*T, S], and no normalised copy of e is written
    # (the flash-attention ordering; on a 2-core Xeon it took the ViT-B/16 layer's attention forward
    # from 16 to 9 ms, torch SDPA 6 ms).
    logits = _folded_logits(q, k, mask, g)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    inv_l = 1.0 / jnp.sum(e, axis=-1, keepdims=True)  # [B, K, M, 1], fp32
    out = jnp.einsum("bkms,bskd->bkmd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) * inv_l
    return out.astype(v.dtype), (q, k, v, mask, e, inv_l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _folded_attention(q: Array, k: Array, v: Array, mask: Array | None, g: int) -> Array:
    return _folded_forward(q, k, v, mask, g)[0]


def _folded_backward(g, residuals, d_out):
    # With p = e / l: dv = p^T do, dp = do v^T, ds = p * (dp - rowsum(p * dp)). The 1/l factor is
    # applied to do's rows, so the saved e is used as is and nothing is recomputed. rowsum(p * dp) is
    # taken over [M, S] rather than by the flash-attention identity rowsum(do * o) ([M, Dh]): the
    # identity rounds differently from dp, so a query with one visible key (the first token under a
    # causal mask), whose ds is exactly 0, got noise that differed between remat and plain backward
    # passes (tests/test_text_towers.py::test_remat_matches_plain_with_grads).
    q, k, v, mask, e, inv_l = residuals
    d_scaled = d_out.astype(jnp.float32) * inv_l  # [B, K, M, Dh]
    dv = jnp.einsum("bkms,bkmd->bskd", e.astype(v.dtype), d_scaled.astype(v.dtype), preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkmd,bskd->bkms", d_scaled.astype(v.dtype), v, preferred_element_type=jnp.float32)
    delta = jnp.sum(e * dp, axis=-1, keepdims=True) * inv_l
    ds = (e * (dp - delta)).astype(q.dtype)  # masked entries have e = 0
    dq = jnp.einsum("bkms,bskd->bkmd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkms,bkmd->bskd", ds, q, preferred_element_type=jnp.float32)
    d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_mask


_folded_attention.defvjp(_folded_forward, _folded_backward)


def _einsum(q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype) -> Array:
    """The reference math with the query heads of a kv head folded into the matmul rows
    ([B, K, G*T, Dh] x [B, S, K, Dh]): plain batched matmuls that XLA:CPU runs without the transposes
    the 5-D grouped einsum and ``jax.nn.dot_product_attention`` compile to, normalised after the value
    matmul with a hand-written backward (``_folded_backward``). Measured on a 2-core Xeon, ViT-B/16
    layer at batch 4: forward 9 ms (grouped einsum 36, xla 28-34, the folded einsum with a plain
    softmax 16; torch SDPA 6), forward + backward 32 ms with the flash-attention form of the
    backward (36; torch 22; the backward now sums rowsum(p * dp) over [M, S], see _folded_backward)."""
    kh = k.shape[2]
    g = q.shape[2] // kh
    q = q.astype(dtype) * jnp.asarray(q.shape[-1] ** -0.5, dtype)
    q = rearrange(q, "b t (k g) d -> b k (g t) d", k=kh)
    out = _folded_attention(q, k.astype(dtype), v.astype(dtype), mask, g)
    return rearrange(out, "b k (g t) d -> b t (k g) d", g=g)


def _xla(q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype, implementation: str) -> Array:
    """``jax.nn.dot_product_attention``: inputs in ``dtype`` (its xla path accumulates the logits
    and takes the softmax in fp32), GQA handled by the op."""
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    m = None if mask is None else mask[:, None, :, :]  # [B, 1, T, S], broadcast over heads
    out = jax.nn.dot_product_attention(q, k, v, mask=m, implementation=implementation)
    return out.astype(dtype)


def _pad_len(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded(fn, q, k, v, mask, dtype, multiple: int) -> Array:
    """Runs ``fn(q, k, v, mask, dtype)`` on sequences padded to ``multiple``; padding keys are masked,
    padding query rows dropped. Exact: a masked key gets zero probability."""
    b, t = q.shape[:2]
    s = k.shape[1]
    tp, sp = _pad_len(t, multiple), _pad_len(s, multiple)
    if (tp, sp) == (t, s):
        return fn(q, k, v, mask, dtype)
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1])) + ((0, 0),) * (a.ndim - 2))
    if mask is None:
        mask = jnp.ones((b, t, s), jnp.bool_)
    mask = jnp.pad(mask, ((0, 0), (0, tp - t), (0, sp - s)))  # padded keys and query rows: False
    return fn(pad(q, tp), pad(k, sp), pad(v, sp), mask, dtype)[:, :t]


def _splash(q: Array, k: Array, v: Array, *, dtype: Dtype, causal: bool, kv_valid: Array | None) -> Array:
    """Pallas splash attention (TPU) for self-attention: causal by index (see the module docstring),
    padding keys through segment ids (padding = segment 1, real = 0; a padding query sees only
    padding keys, so no row is empty)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top

    b, t, h, dh = q.shape
    tp = _pad_len(t, SPLASH_BLOCK)
    seg = jnp.zeros((b, t), jnp.int32) if kv_valid is None else 1 - kv_valid.astype(jnp.int32)
    if tp != t:
        seg = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=1)  # padding tokens: their own segment
        pad = lambda a: jnp.pad(a, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        q, k, v = pad(q), pad(k), pad(v)
    # The kernel takes [heads, len, Dh] per example and does not scale: scale q (HF scaling).
    q = (q * jnp.asarray(dh**-0.5, q.dtype)).astype(dtype)
    k, v = k.astype(dtype), v.astype(dtype)

    def per_shard(q, k, v, seg):
        heads = q.shape[2]
        base = sm.CausalMask((tp, tp)) if causal else sm.FullMask((tp, tp))
        kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([base] * heads), head_shards=1, q_seq_shards=1)
        one = lambda q, k, v, seg: kernel(
            rearrange(q, "t h d -> h t d"), rearrange(k, "s k d -> k s d"), rearrange(v, "s k d -> k s d"),
            segment_ids=sk.SegmentIds(q=seg, kv=seg))
        return rearrange(jax.vmap(one)(q, k, v, seg), "b h t d -> b t h d")

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = per_shard(q, k, v, seg)
    else:
        spec = lambda *names: nn.logical_to_mesh_axes(names)
        qs = spec(axes.ACT_BATCH, axes.ACT_LEN, axes.ACT_HEADS, axes.ACT_HEAD_DIM)
        ks = spec(axes.ACT_BATCH, axes.ACT_LEN, axes.ACT_KV_HEADS, axes.ACT_HEAD_DIM)
        ss = spec(axes.ACT_BATCH, axes.ACT_LEN)
        out = jax.shard_map(per_shard, mesh=mesh, in_specs=(qs, ks, ks, ss), out_specs=qs,
                            check_vma=False)(q, k, v, seg)
    return out[:, :t].astype(dtype)


def tpu_topology_available(topology: str = "v5e:2x2") -> str | None:
    """None when libtpu can describe a TPU ``topology`` on this host (so TPU programs compile here
    without a TPU), else why not. Used by tests and ``benchmarks`` that compile for a pod."""
    try:
        from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

        topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001  (libtpu missing or too old: any error means "not here")
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


__all__ = ["IMPLEMENTATIONS", "attend", "dense_mask", "reference_attention", "resolve", "tpu_topology_available",
           "validate_implementation"]
