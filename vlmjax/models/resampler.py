"""Token poolers and heads for vision-text alignment: Perceiver resampler, attention pooling, token
pooling, projection heads and Matryoshka (nested) embeddings.

    PerceiverResampler   visual tokens [B, N, Dv] -> L learned latents [B, L, D]
                         (Flamingo, Alayrac et al. 2022, sec. 2.1 and appendix A.1.1)
    AttentionPool        tokens [B, N, D] -> [B, D] (one probe) or [B, P, D] (P probes)
                         (big_vision ``MAPHead``, the SigLIP pooling head; Zhai et al. 2023)
    pool_tokens          tokens [B, N, D] -> [B, D] by the CLS token or a masked mean
    ProjectionHead       [..., Din] -> [..., E]: one linear map or Dense -> GELU -> Dense
    MatryoshkaHead       [B, D] -> {m: [B, m] unit-norm} for nested dims m (Kusupati et al. 2022)
    mrl_embeddings       the same for the weight-tied variant (MRL-E), as a pure function

Every attention goes through ``attention.attend`` (``attention_impl`` picks the backend). Params are
stored in ``param_dtype`` and carry logical axis names (``embed``, ``q_heads``, ``head_dim``, ``mlp``,
``norm``; ``vlmjax/sharding.py`` maps them to mesh axes); activations are computed in ``dtype``.

Parameter trees (``D`` width, ``H`` heads, ``Dh`` head dim, ``F = ffn_mult * D``):

    PerceiverResampler
        input_proj/kernel             [Dv, D]       only when Dv != D
        latents                       [L, D]
        layers_{i}/norm_media/{scale,bias}          [D]   LayerNorm of the visual tokens
        layers_{i}/norm_latents/{scale,bias}        [D]   LayerNorm of the latents
        layers_{i}/attn/{q,k,v}_proj/kernel         [D, H, Dh]
        layers_{i}/attn/out_proj/kernel             [H, Dh, D]
        layers_{i}/ffn/norm/{scale,bias}            [D]
        layers_{i}/ffn/fc1/kernel     [D, F]
        layers_{i}/ffn/fc2/kernel     [F, D]
        norm/{scale,bias}             [D]           final LayerNorm
    AttentionPool
        probe                         [P, D]
        attention/{q,k,v}_proj/{kernel [D, H, Dh], bias [H, Dh]}
        attention/out_proj/{kernel [H, Dh, D], bias [D]}
        layernorm/{scale,bias}        [D]
        mlp/fc1/{kernel [D, M], bias [M]}, mlp/fc2/{kernel [M, D], bias [D]}
    ProjectionHead
        num_layers=1: proj/kernel [Din, E] (+ bias [E])
        num_layers=2: fc1/kernel [Din, Hd] (+ bias), fc2/kernel [Hd, E] (+ bias)
    MatryoshkaHead
        tied=True:  no params
        tied=False: head_{m}                [m, m] per dim m (identity init)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vlmjax.models import attention as attention_lib
from vlmjax.models import layers
from vlmjax.models.layers import ACT_BATCH, ACT_EMBED, ACT_HEAD_DIM, ACT_HEADS, ACT_LEN, DenseGeneral, LayerNorm
from vlmjax.models.two_tower import l2_normalize

Array = jax.Array
Dtype = Any

POOL_MODES = ("cls", "mean")


def _head_dim(width: int, num_heads: int, head_dim: int | None, owner: str) -> int:
    if head_dim is not None:
        return head_dim
    if width % num_heads:
        raise ValueError(f"{owner}: width {width} is not divisible by num_heads={num_heads}; "
                         "set head_dim explicitly.")
    return width // num_heads


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x_q`` [B, T, D] over keys/values ``x_kv`` [B, S, D]
    (K = H heads, scale Dh^-0.5, fp32 softmax, no causal mask) -> [B, T, D].

    Projections: ``{q,k,v}_proj/kernel [D, H, Dh]``, ``out_proj/kernel [H, Dh, D]`` (+ biases
    ``[H, Dh]`` / ``[D]`` when ``use_bias``). ``kv_valid`` [B, S]: 0 = padding key.
    """

    num_heads: int
    head_dim: int
    use_bias: bool = False
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x_q: Array, x_kv: Array, kv_valid: Array | None = None) -> Array:
        d = x_q.shape[-1]
        dense = functools.partial(DenseGeneral, use_bias=self.use_bias, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        heads = lambda name: dense(features=(self.num_heads, self.head_dim),
                                   kernel_axes=("embed", "q_heads", "head_dim"), name=name)
        act = (ACT_BATCH, ACT_LEN, ACT_HEADS, ACT_HEAD_DIM)
        q = nn.with_logical_constraint(heads("q_proj")(x_q), act)  # [B, T, H, Dh]
        k = nn.with_logical_constraint(heads("k_proj")(x_kv), act)  # [B, S, H, Dh]
        v = nn.with_logical_constraint(heads("v_proj")(x_kv), act)  # [B, S, H, Dh]
        out = attention_lib.attend(q, k, v, dtype=self.dtype, implementation=self.attention_impl,
                                   kv_valid=kv_valid)  # [B, T, H, Dh]
        out = checkpoint_name(out, layers.ATTENTION_OUT)  # what remat="save_attention_out" keeps
        out = nn.with_logical_constraint(out, act)
        return dense(features=d, kernel_axes=("q_heads", "head_dim", "embed"), axis=(-2, -1), name="out_proj")(out)


# ------------------------------------------------------------------------------------------------
# Perceiver resampler (Flamingo)
# ------------------------------------------------------------------------------------------------

class PerceiverFeedForward(nn.Module):
    """Flamingo's FFW (appendix A.1.1, OpenFlamingo ``FeedForward``): LayerNorm -> Dense(mult*D) ->
    GELU -> Dense(D), no biases. [B, L, D] -> [B, L, D] (the caller adds the residual)."""

    ffn_mult: int = 4
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        dense = functools.partial(DenseGeneral, initializer_range=self.initializer_range, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        h = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        h = dense(self.ffn_mult * d, kernel_axes=("embed", "mlp"), name="fc1")(h)
        h = jax.nn.gelu(h, approximate=False)  # torch nn.GELU() (erf), as OpenFlamingo
        h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LEN, layers.ACT_MLP))
        return dense(d, kernel_axes=("mlp", "embed"), name="fc2")(h)


class PerceiverLayer(nn.Module):
    """One resampler layer (Flamingo appendix A.1.1, Fig. 5 pseudo-code):

        kv = concat([LN_media(x_f), LN_latents(x)])       along the sequence
        x  = x + attn(q=LN_latents(x), kv=kv)             no causal mask; padded visual tokens masked
        x  = x + ffw(x)

    The queries come from the layer-normed latents (OpenFlamingo ``PerceiverAttention``); the
    latents themselves are always valid keys, so no query row is ever fully masked.

    ``attend_latents=False`` keeps the latents out of the keys/values (``kv = LN_media(x_f)``: the
    Perceiver IO / Q-Former / Qwen-VL resampler cross-attention). With Flamingo's concat, L latents and
    N media tokens give the media N / (N + L) of each query's attention at init: 10 / 74 for 64 latents
    over a 3x3-grid tower's 10 tokens, so the prefix starts nearly image-independent.
    """

    num_heads: int
    head_dim: int
    ffn_mult: int = 4
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    attend_latents: bool = True

    @nn.compact
    def __call__(self, latents: Array, media: Array, kv_valid: Array | None) -> Array:
        """latents: [B, L, D]; media: [B, N, D]; kv_valid: [B, N] or None -> [B, L, D]."""
        ln = functools.partial(LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
        media_n = ln(name="norm_media")(media)
        lat_n = ln(name="norm_latents")(latents)
        if not self.attend_latents:
            kv = media_n  # [B, N, D]
        else:
            kv = jnp.concatenate([media_n, lat_n], axis=1)  # [B, N + L, D]
        if kv_valid is not None and self.attend_latents:
            kv_valid = jnp.concatenate(
                [kv_valid.astype(jnp.bool_), jnp.ones(latents.shape[:2], jnp.bool_)], axis=1)  # [B, N + L]
        attn = CrossAttention(self.num_heads, self.head_dim, use_bias=False, initializer_range=self.initializer_range,
                              dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                              name="attn")
        x = latents + attn(lat_n, kv, kv_valid)
        x = x + PerceiverFeedForward(self.ffn_mult, initializer_range=self.initializer_range, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name="ffn")(x)
        return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver resampler (Alayrac et al. 2022, sec. 2.1, appendix A.1.1): a fixed number
    L of learned latent queries cross-attend to a variable number of visual tokens.

    Input visual tokens [B, N, Dv] (already flattened over frames and patches; Flamingo adds learned
    time embeddings per frame before flattening, which the caller does if it wants them) are
    projected to ``dim`` D by ``input_proj`` when Dv != D, then ``num_layers`` ``PerceiverLayer``s
    update the latents, and a final LayerNorm gives [B, L, D]. ``kv_valid`` [B, N] (1 = real token,
    0 = padding) keeps padded visual tokens out of every attention; the latents are always valid.

    Latent init: N(0, ``latent_init_std``^2) with std 1.0 by default, as the open reimplementations
    (OpenFlamingo / lucidrains ``torch.randn(num_latents, dim)``, HF IDEFICS) do; the DeepMind
    original is unpublished. The latents enter the attention only through LayerNorm, so their scale
    does not change the queries/keys at init; it does set (a) their share of the residual stream,
    where std 1 matches the unit-RMS normalised features the updates are built from, and (b) how fast
    Adam moves them relative to their size (an lr-sized step per coordinate: a 0.02-scale latent would
    change by ~lr/0.02 relative per step, 50x faster than a unit-scale one). Configurable for sweeps.

    Fields: ``dim`` D (None = Dv), ``num_latents`` L, ``num_layers``, ``num_heads`` H, ``head_dim``
    (None = D / H), ``ffn_mult`` (F = ffn_mult * D), ``remat`` (a ``layers.REMAT_POLICIES`` name or
    bool; per layer), ``attend_latents`` (default True, Flamingo: the latents are keys too;
    False: media keys only, ``PerceiverLayer``).
    """

    num_latents: int = 64
    num_layers: int = 6
    num_heads: int = 8
    head_dim: int | None = None
    dim: int | None = None
    ffn_mult: int = 4
    latent_init_std: float = 1.0
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    remat: Any = "none"
    attend_latents: bool = True

    @nn.compact
    def __call__(self, x: Array, kv_valid: Array | None = None) -> Array:
        """x: [B, N, Dv] visual tokens; kv_valid: [B, N] (0 = padding) or None -> [B, L, D] in ``dtype``."""
        attention_lib.validate_implementation("attention_impl", self.attention_impl)
        policy = layers.parse_remat("remat", self.remat)
        d = self.dim or x.shape[-1]
        dh = _head_dim(d, self.num_heads, self.head_dim, "PerceiverResampler")
        if x.shape[-1] != d:
            x = DenseGeneral(d, kernel_axes=("embed", None), initializer_range=self.initializer_range,
                             dtype=self.dtype, param_dtype=self.param_dtype, name="input_proj")(x)
        x = nn.with_logical_constraint(x.astype(self.dtype), (ACT_BATCH, ACT_LEN, ACT_EMBED))
        latents = self.param("latents", nn.with_logical_partitioning(
            nn.initializers.normal(self.latent_init_std), (None, "embed")), (self.num_latents, d), self.param_dtype)
        h = jnp.broadcast_to(latents.astype(self.dtype)[None], (x.shape[0], self.num_latents, d))
        block = layers.remat(PerceiverLayer, policy)
        for i in range(self.num_layers):
            h = block(self.num_heads, dh, self.ffn_mult, initializer_range=self.initializer_range, dtype=self.dtype,
                      param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                      attend_latents=self.attend_latents, name=f"layers_{i}")(
                          h, x, kv_valid)
        return LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(h)


# ------------------------------------------------------------------------------------------------
# Attention pooling, token pooling, projection heads
# ------------------------------------------------------------------------------------------------

class AttentionPool(nn.Module):
    """Multihead attention pooling (big_vision ``MAPHead``; SigLIP, Zhai et al. 2023): P learned probes
    cross-attend to the tokens, then ``y + mlp(layernorm(y))``.

    x [B, N, D], kv_valid [B, N] (0 = padding token, never attended) -> [B, D] when
    ``num_probes == 1``, else [B, P, D]. Biased projections as ``nn.MultiHeadDotProductAttention``;
    the probe is drawn from N(0, initializer_range^2) (HF SigLIP's ``head.probe`` init). ``mlp_dim``
    None = 4 D. Unlike ``vit.MAPHead`` (which keeps HF SigLIP's packed ``in_proj`` names for
    checkpoint loading), the projections here are separate ``{q,k,v}_proj`` and the head count and
    probe count are free.
    """

    num_heads: int = 8
    head_dim: int | None = None
    num_probes: int = 1
    mlp_dim: int | None = None
    hidden_act: str = "gelu_pytorch_tanh"  # flax nn.gelu (tanh) as big_vision's MlpBlock
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: Array, kv_valid: Array | None = None) -> Array:
        """x: [B, N, D]; kv_valid: [B, N] or None -> [B, D] (P = 1) or [B, P, D]."""
        b, _, d = x.shape
        dh = _head_dim(d, self.num_heads, self.head_dim, "AttentionPool")
        probe = self.param("probe", nn.with_logical_partitioning(
            nn.initializers.normal(self.initializer_range), (None, "embed")), (self.num_probes, d), self.param_dtype)
        q_in = jnp.broadcast_to(probe.astype(self.dtype)[None], (b, self.num_probes, d))
        y = CrossAttention(self.num_heads, dh, use_bias=True, initializer_range=self.initializer_range,
                           dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                           name="attention")(q_in, x.astype(self.dtype), kv_valid)  # [B, P, D]
        ln = LayerNorm(eps=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="layernorm")
        y = y + layers.EncoderMLP(self.mlp_dim or 4 * d, self.hidden_act, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(ln(y))
        return y[:, 0] if self.num_probes == 1 else y


def pool_tokens(x: Array, kv_valid: Array | None = None, mode: str = "mean") -> Array:
    """Pools tokens x [B, N, D] -> [B, D].

    mode 'cls': token 0 (``kv_valid`` ignored; the CLS token is never padding). mode 'mean': mean
    over the valid tokens (``kv_valid`` [B, N], 0 = padding; None = all valid), accumulated in fp32 and
    returned in x's dtype; a row with no valid token gives zeros.
    """
    if mode == "cls":
        return x[:, 0]
    if mode != "mean":
        raise ValueError(f"pool mode {mode!r} is not supported; use one of {POOL_MODES}.")
    if kv_valid is None:
        return jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    w = kv_valid.astype(jnp.float32)  # [B, N]
    total = jnp.einsum("bnd,bn->bd", x.astype(jnp.float32), w)
    return (total / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)).astype(x.dtype)


class ProjectionHead(nn.Module):
    """Projection to the embedding size E = ``features``: [..., Din] -> [..., E].

    ``num_layers=1``: one linear map ``proj`` (CLIP's ``visual_projection``/``text_projection``);
    ``num_layers=2``: ``fc2(gelu(fc1(x)))`` with hidden size ``hidden_dim`` (None = Din), the MLP
    projection of SimCLR (Chen et al. 2020) / LiT-style alignment heads. Output in ``dtype``.
    """

    features: int
    num_layers: int = 2
    hidden_dim: int | None = None
    use_bias: bool = True
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = functools.partial(DenseGeneral, use_bias=self.use_bias, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        if self.num_layers == 1:
            return dense(self.features, kernel_axes=("embed", None), name="proj")(x)
        if self.num_layers != 2:
            raise ValueError(f"ProjectionHead num_layers={self.num_layers}; use 1 (linear) or 2 (MLP).")
        h = dense(self.hidden_dim or x.shape[-1], kernel_axes=("embed", "mlp"), name="fc1")(x)
        h = layers.ACTIVATIONS[self.hidden_act](h)
        return dense(self.features, kernel_axes=("mlp", None), name="fc2")(h)


# ------------------------------------------------------------------------------------------------
# Matryoshka Representation Learning (Kusupati et al. 2022)
# ------------------------------------------------------------------------------------------------

def validate_dims(dims: Sequence[int], width: int) -> tuple[int, ...]:
    """Nested MRL dims: distinct positive ints, each <= ``width``, the largest == ``width`` (the full
    embedding is always one of the granularities, as in the paper's M = {8, 16, ..., d})."""
    dims = tuple(int(m) for m in dims)
    if not dims or len(set(dims)) != len(dims) or min(dims) <= 0:
        raise ValueError(f"Matryoshka dims {dims} must be distinct positive integers.")
    if max(dims) != width:
        raise ValueError(f"Matryoshka dims {dims}: the largest must equal the embedding size {width}.")
    return dims


def mrl_embeddings(z: Array, dims: Sequence[int], *, normalize: bool = True) -> dict[int, Array]:
    """Weight-tied Matryoshka embeddings (MRL-E, Kusupati et al. 2022, sec. 3): z [B, D] ->
    ``{m: l2_normalize(z[:, :m])}`` ([B, m] float32) for each m in ``dims`` (index by dim: dict
    order does not survive jax transformations).
    ``normalize=False`` returns the raw prefixes (in z's dtype)."""
    dims = validate_dims(dims, z.shape[-1])
    return {m: (l2_normalize(z[:, :m]) if normalize else z[:, :m]) for m in dims}


class MatryoshkaHead(nn.Module):
    """Matryoshka embeddings at nested dims (Kusupati et al. 2022): z [B, D] -> dict {m: [B, m]}
    float32, L2-normalised, one key per m in ``dims`` (the largest must equal D). Built in the order
    of ``dims``, but jax pytrees sort dict keys (e.g. on leaving ``jit``): index by dim, never rely on
    the order.

    ``tied=True`` (MRL-E, the paper's weight-tied variant): the dim-m embedding is the first m
    coordinates of z (``mrl_embeddings``); no params.
    ``tied=False`` (MRL): a separate linear map ``head_{m} [m, m]`` per dim reads the first m
    coordinates (as the paper's per-granularity heads ``W^(m)`` read ``z_{1:m}``, eq. 1), no bias,
    initialised to the identity so that a fresh untied head equals the tied one.
    """

    dims: tuple[int, ...]
    tied: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> dict[int, Array]:
        dims = validate_dims(self.dims, z.shape[-1])
        if self.tied:
            return mrl_embeddings(z, dims)
        out = {}
        for m in dims:
            # Replicated (None, None): at most 512 x 512, and small dims need not divide a mesh axis.
            w = self.param(f"head_{m}", nn.with_logical_partitioning(
                lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype), (None, None)), (m, m), self.param_dtype)
            y = jnp.einsum("bi,io->bo", z[:, :m].astype(self.dtype), w.astype(self.dtype),
                           preferred_element_type=jnp.float32)
            out[m] = l2_normalize(y)
        return out


__all__ = ["POOL_MODES", "AttentionPool", "CrossAttention", "MatryoshkaHead", "PerceiverFeedForward",
           "PerceiverLayer", "PerceiverResampler", "ProjectionHead", "mrl_embeddings", "pool_tokens",
           "validate_dims"]
