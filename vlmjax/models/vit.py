"""Vision Transformer backbones: CLIP, SigLIP and DINOv2 (with registers, SwiGLU) image towers.

One Linen module, ``VisionTransformer``, covers HF ``CLIPVisionModel`` (``variant='clip'``),
``SiglipVisionModel`` (``'siglip'``) and ``Dinov2Model`` / ``Dinov2WithRegistersModel``
(``'dinov2'``). The families share the pre-norm encoder layer and differ in the embeddings, the
norms around the encoder and the pooling:

    variant  tokens                     around the encoder                  pooler_output
    clip     [CLS, patches] + pos       pre_layrnorm before                 post_layernorm(CLS)
    siglip   [patches] + pos            post_layernorm on all tokens        MAP head (or none)
    dinov2   [CLS, regs, patches] + pos post_layernorm on all ("layernorm") CLS after the norm

Input images are NHWC (``[B, H, W, C]``, already normalised). Any H, W >= patch_size works: the
position table is resized to the ``(H // p, W // p)`` patch grid with the same bicubic kernel as HF
(``interpolate_pos_encoding``, see ``interpolate_position_embedding``), exactly as HF with
``interpolate_pos_encoding=True`` (CLIP, SigLIP) or always (DINOv2).

Parameter tree (``D`` hidden, ``H`` heads, ``Dh`` head dim, ``F`` intermediate, ``p`` patch size,
``C`` channels, ``P`` positions = (image_size // p)^2 (+1 with a CLS token), ``R`` registers; HF
names relative to the vision model in brackets, CLIP/SigLIP first, DINOv2 second where they differ):

    embeddings/patch_embedding/kernel [p, p, C, D]  [embeddings.patch_embedding.weight [D, C, p, p]
                                                     | embeddings.patch_embeddings.projection.weight]
    embeddings/patch_embedding/bias   [D]           (SigLIP, DINOv2)
    embeddings/class_embedding        [D]           [embeddings.class_embedding | embeddings.cls_token]
    embeddings/position_embedding     [P, D]        [embeddings.position_embedding.weight
                                                     | embeddings.position_embeddings [1, P, D]]
    embeddings/mask_token             [D]           [embeddings.mask_token [1, D]]  (DINOv2)
    embeddings/register_tokens        [R, D]        [embeddings.register_tokens [1, R, D]]
    pre_layrnorm/{scale,bias}         [D]           (CLIP)
    layers_{i}/layer_norm1/{scale,bias}             [encoder.layers.{i}.layer_norm1 | encoder.layer.{i}.norm1]
    layers_{i}/self_attn/q_proj/kernel [D, H, Dh]   [...self_attn.q_proj.weight | ...attention.attention.query]
    layers_{i}/self_attn/out_proj/kernel [H, Dh, D] [...self_attn.out_proj.weight | ...attention.output.dense]
    layers_{i}/layer_scale1           [D]           [encoder.layer.{i}.layer_scale1.lambda1]  (DINOv2)
    layers_{i}/mlp/fc1/kernel         [D, F]        [...mlp.fc1.weight]  (fc2 alike, [F, D])
    layers_{i}/mlp/weights_in/kernel  [D, 2, F]     [...mlp.weights_in.weight [2F, D]]  (SwiGLU)
    post_layernorm/{scale,bias}       [D]           [post_layernorm | layernorm]
    head/probe                        [D]           [head.probe [1, 1, D]]  (SigLIP MAP head)
    head/attention/in_proj_kernel     [D, 3, H, Dh] [head.attention.in_proj_weight [3D, D]]
    head/attention/out_proj/kernel    [H, Dh, D]    [head.attention.out_proj.weight]
    head/layernorm, head/mlp/fc1, head/mlp/fc2      [head.layernorm, head.mlp.fc1, head.mlp.fc2]

The conventions of ``layers.py`` hold: fp32 parameters, compute in ``dtype``, layer norms and the
attention softmax in fp32, logical axis names on every parameter and main activation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from einops import rearrange

from vlmjax import config_util
from vlmjax.models import attention as attention_lib
from vlmjax.models import axes, layers
from vlmjax.models.layers import ACT_BATCH, ACT_EMBED, ACT_HEAD_DIM, ACT_HEADS, ACT_LEN, ACT_MLP

Array = jax.Array
Dtype = Any

VARIANTS = ("clip", "siglip", "dinov2")
# Pooling per variant: the first is the default. 'none' = SigLIP without head (vision_use_head=False).
POOLS = {"clip": ("cls",), "siglip": ("map", "none"), "dinov2": ("cls",)}


quick_gelu = layers.quick_gelu
ACTIVATIONS = layers.ACTIVATIONS


_parse_dtype = layers.parse_dtype


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Static ViT hyper-parameters (hashable: a Linen attribute / jit static argument).

    Field names follow HF ``config.json`` where HF has them. The structure that a variant fixes
    (CLS token, patch bias, pre-layernorm, layer scale) is derived from ``variant``; the knobs the
    HF families expose are fields.
    """

    variant: str  # 'clip' | 'siglip' | 'dinov2'
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int  # Side of the square image the position table was trained for.
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # quick_gelu (CLIP) | gelu_pytorch_tanh (SigLIP) | gelu (DINOv2)
    qkv_bias: bool = True  # Bias on q/k/v (always for CLIP/SigLIP; DINOv2 ``qkv_bias``).
    pool: str = ""  # '' = the variant's default: 'cls' (CLIP, DINOv2) | 'map' | 'none' (SigLIP).
    layerscale_value: float = 1.0  # DINOv2: initial value of the per-channel layer scale.
    use_mask_token: bool = True  # DINOv2: a learned [MASK] embedding (``mask=`` in __call__).
    num_register_tokens: int = 0  # DINOv2 with registers (Darcet et al. 2023).
    use_swiglu_ffn: bool = False  # DINOv2 giant: fused SwiGLU FFN instead of fc1/act/fc2.
    # Resize positions with torch's antialiased bicubic (a=-0.5), as Dinov2WithRegistersModel does;
    # False: plain bicubic (a=-0.75), as CLIP, SigLIP and Dinov2Model.
    pos_antialias: bool = False
    # Training-only regularisers (no effect with deterministic=True). dropout_rate: on the embeddings
    # and each residual branch (big_vision style; not an HF config field). drop_path_rate: stochastic
    # depth per sample on each residual branch, the same in every layer (HF DINOv2 drop_path_rate).
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    # What the backward pass recomputes per layer: a ``layers.REMAT_POLICIES`` name; True/False mean
    # 'full'/'none'.
    remat: Any = dataclasses.field(default="none", metadata={config_util.ANY_TYPE: True})
    attention_impl: str = "auto"  # attention backend (``attention.IMPLEMENTATIONS``)
    # nn.scan over a stacked ``layers/...`` [L, ...] (compile time independent of depth); the HF
    # converter stacks / unstacks. Token reuse (``ReuseViT``) needs the looped layers.
    scan_layers: bool = False
    dtype: Any = jnp.dtype(jnp.float32)
    param_dtype: Any = jnp.dtype(jnp.float32)

    def __post_init__(self):
        if self.variant in POOLS and not self.pool:
            object.__setattr__(self, "pool", POOLS[self.variant][0])
        object.__setattr__(self, "dtype", _parse_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _parse_dtype("param_dtype", self.param_dtype))
        object.__setattr__(self, "remat", layers.parse_remat("remat", self.remat))

    # Structure fixed by the family.
    @property
    def class_token(self) -> bool:
        return self.variant in ("clip", "dinov2")

    @property
    def patch_bias(self) -> bool:
        return self.variant != "clip"

    @property
    def pre_layernorm(self) -> bool:
        return self.variant == "clip"

    @property
    def layer_scale(self) -> bool:
        return self.variant == "dinov2"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the trained position table."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + int(self.class_token)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in ``last_hidden_state`` (CLS and registers)."""
        return int(self.class_token) + self.num_register_tokens

    def validate(self) -> None:
        """Raises ValueError naming the offending field and what it accepts."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}; use one of {VARIANTS}.")
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "patch_size", "image_size", "num_channels")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads}).")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be >= patch_size ({self.patch_size}).")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; use one of {sorted(ACTIVATIONS)}.")
        if self.pool not in POOLS[self.variant]:
            raise ValueError(f"pool={self.pool!r} does not exist for variant={self.variant!r}; "
                             f"use one of {POOLS[self.variant]}.")
        if self.variant != "dinov2":
            dinov2_only = dict(num_register_tokens=0, use_swiglu_ffn=False, pos_antialias=False,
                               qkv_bias=True)
            for name, default in dinov2_only.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name}={getattr(self, name)!r} exists only for variant='dinov2' "
                                     f"(got variant={self.variant!r}); leave it at {default!r}.")
        if not isinstance(self.num_register_tokens, int) or self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be an integer >= 0, got {self.num_register_tokens!r}.")
        for name in ("dropout_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}.")
        attention_lib.validate_implementation("attention_impl", self.attention_impl)
        allowed = {jnp.dtype(d) for d in layers.DTYPES.values()}
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)} is not supported; use one of {sorted(layers.DTYPES)}.")


# ------------------------------------------------------------------------------------------------
# Position-table interpolation (torch ``F.interpolate(mode='bicubic', align_corners=False)``)
# ------------------------------------------------------------------------------------------------

def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys (1981) cubic convolution kernel at distances ``x`` (torch ``cubic_convolution1/2``)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_resize_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """The ``[out, in]`` matrix of torch's 1-D bicubic resize with ``align_corners=False``.

    antialias=False (``upsample_bicubic2d``): source coordinate ``(o + 0.5) * in/out - 0.5`` (not
    clamped), 4 taps with Keys ``a = -0.75`` at the neighbours ``floor - 1 .. floor + 2``, indices
    clamped to the border (so border taps accumulate onto the edge sample).
    antialias=True (``_upsample_bicubic2d_aa``, PIL-compatible): Keys ``a = -0.5``, the kernel is
    stretched by ``in/out`` when shrinking, taps outside the input are dropped and the remaining
    weights renormalised to sum to 1.
    2-D resizing is separable: ``out = Mh @ x @ Mw^T``.
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        if antialias:
            support = 2.0 * scale if scale >= 1.0 else 2.0
            inv = 1.0 / scale if scale >= 1.0 else 1.0
            center = scale * (o + 0.5)
            lo = max(int(center - support + 0.5), 0)  # C++ truncation, as torch
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _keys_cubic((taps - center + 0.5) * inv, -0.5)
            total = w.sum()
            if total != 0.0:
                w = w / total
            m[o, taps] += w
        else:
            src = scale * (o + 0.5) - 0.5
            base = int(np.floor(src))
            t = src - base
            w = _keys_cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
            for k in range(4):
                m[o, min(max(base - 1 + k, 0), in_size - 1)] += w[k]
    return m


def interpolate_position_embedding(
    table: Array, grid: int, out_hw: tuple[int, int], antialias: bool = False
) -> Array:
    """Resizes a square patch-position table to another patch grid, as HF ``interpolate_pos_encoding``.

    Args:
        table: [grid * grid, D] patch position embeddings (row-major over the grid).
        grid: patches per side of ``table``.
        out_hw: (gh, gw) target patch grid.
        antialias: torch's antialiased bicubic (Dinov2WithRegisters) instead of plain bicubic.

    Returns:
        [gh * gw, D] float32. Runs in fp32 at full matmul precision (HF interpolates in fp32 too).
    """
    gh, gw = out_hw
    if (gh, gw) == (grid, grid):
        return table.astype(jnp.float32)
    mh = jnp.asarray(bicubic_resize_matrix(grid, gh, antialias), jnp.float32)
    mw = jnp.asarray(bicubic_resize_matrix(grid, gw, antialias), jnp.float32)
    x = rearrange(table.astype(jnp.float32), "(h w) d -> h w d", h=grid)
    x = jnp.einsum("oh,pw,hwd->opd", mh, mw, x, precision=jax.lax.Precision.HIGHEST)
    return rearrange(x, "h w d -> (h w) d")


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

# One LayerNorm for every encoder (fp32 statistics; HF weight -> scale, bias -> bias).
LayerNorm = layers.LayerNorm


# The encoder attention (q/k/v/out_proj with biases; ``project`` / ``output`` halves for token reuse)
# is shared with the text towers: ``layers.EncoderAttention``.
VisionAttention = layers.EncoderAttention


MLP = layers.EncoderMLP


class SwiGLUFFN(nn.Module):
    """DINOv2's fused SwiGLU: ``weights_out(silu(x W_gate) * x W_up)`` with biases.

    HF checkpoints keep gate and up stacked: ``mlp.weights_in.weight [2F, D]`` (gate rows first) ->
    kernel [D, 2, F]; ``mlp.weights_out.weight [D, F]`` -> kernel [F, D].
    """

    intermediate_size: int
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, N, D] -> [B, N, D]."""
        dense = functools.partial(layers.DenseGeneral, use_bias=True, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense((2, self.intermediate_size), kernel_axes=("embed", None, "mlp"), name="weights_in")(x)
        h = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]  # [B, N, F]
        h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LEN, ACT_MLP))
        return dense(x.shape[-1], kernel_axes=("mlp", "embed"), name="weights_out")(h)


class EncoderLayer(nn.Module):
    """Pre-norm ViT layer: ``x + ls1 * attn(ln1(x))``, ``x + ls2 * mlp(ln2(x))``.

    HF ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` (no layer scale) and ``Dinov2Layer`` (layer
    scale ``layer_scale{1,2}.lambda1`` [D], SwiGLU FFN when ``use_swiglu_ffn``).

    ``__call__`` is ``qkv`` -> attention -> ``finish``; the halves are public so that token reuse
    (``vlmjax.models.reuse``) can run them on a gathered subset of tokens with keys and values of
    the whole frame.
    """

    config: ViTConfig
    drop_path_rate: float = 0.0

    def setup(self):
        c = self.config
        norm = lambda: LayerNorm(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.layer_norm1 = norm()
        self.self_attn = VisionAttention(num_heads=c.num_attention_heads, head_dim=c.head_dim,
                                         hidden_size=c.hidden_size, qkv_bias=c.qkv_bias,
                                         initializer_range=c.initializer_range, dtype=c.dtype,
                                         param_dtype=c.param_dtype, attention_impl=c.attention_impl)
        self.layer_norm2 = norm()
        if c.use_swiglu_ffn:
            self.mlp = SwiGLUFFN(c.intermediate_size, initializer_range=c.initializer_range, dtype=c.dtype,
                                 param_dtype=c.param_dtype)
        else:
            self.mlp = MLP(c.intermediate_size, c.hidden_act, initializer_range=c.initializer_range,
                           dtype=c.dtype, param_dtype=c.param_dtype)
        if c.layer_scale:
            scale = lambda: nn.with_logical_partitioning(nn.initializers.constant(c.layerscale_value), ("norm",))
            self.layer_scale1 = self.param("layer_scale1", scale(), (c.hidden_size,), c.param_dtype)
            self.layer_scale2 = self.param("layer_scale2", scale(), (c.hidden_size,), c.param_dtype)
        self.dropout = nn.Dropout(c.dropout_rate)

    def _residual(self, x: Array, h: Array, gamma: Array | None, deterministic: bool) -> Array:
        if gamma is not None:
            h = h * gamma.astype(h.dtype)
        h = self.dropout(h, deterministic=deterministic)
        return x + _drop_path(self, h, self.drop_path_rate, deterministic)

    def qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """x: [B, N, D] layer input -> q, k, v [B, N, H, Dh] of ``ln1(x)``."""
        x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))
        return self.self_attn.project(self.layer_norm1(x))

    def finish(self, x: Array, attn: Array, deterministic: bool = True) -> Array:
        """The rest of the layer given the attention output.

        Args:
            x: [B, N, D] layer input (the residual stream of the same tokens).
            attn: [B, N, H, Dh] attention output of those tokens' queries.
        Returns:
            [B, N, D] layer output.
        """
        ls = self.config.layer_scale
        x = self._residual(x, self.self_attn.output(attn), self.layer_scale1 if ls else None, deterministic)
        x = self._residual(x, self.mlp(self.layer_norm2(x)), self.layer_scale2 if ls else None, deterministic)
        return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))

    def attend(self, q: Array, k: Array, v: Array) -> Array:
        """Bidirectional attention of q [B, T, H, Dh] over k/v [B, S, H, Dh] with the configured
        backend -> [B, T, H, Dh] (named for ``remat='save_attention_out'``)."""
        return checkpoint_name(self.self_attn.attend(q, k, v), layers.ATTENTION_OUT)

    def __call__(self, x: Array, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
        """x: [B, N, D] -> ([B, N, D], aux={})."""
        q, k, v = self.qkv(x)
        return self.finish(x, self.attend(q, k, v), deterministic), {}


def _drop_path(module: nn.Module, h: Array, rate: float, deterministic: bool) -> Array:
    """Stochastic depth (Huang et al. 2016): zero a sample's branch with prob ``rate``, rescale the rest."""
    if deterministic or rate == 0.0:
        return h
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (h.shape[0],) + (1,) * (h.ndim - 1))
    return jnp.where(keep, h / (1.0 - rate), 0).astype(h.dtype)


class MAPHead(nn.Module):
    """SigLIP multihead attention pooling (big_vision ``MAPHead``; HF ``SiglipMultiheadAttentionPoolingHead``).

    A learned probe attends over the tokens with a torch ``nn.MultiheadAttention`` (packed
    ``in_proj_weight [3D, D]`` -> ``in_proj_kernel [D, 3, H, Dh]``, q/k/v in that order), then
    ``y + mlp(layernorm(y))``.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, N, D] -> [B, D]."""
        c = self.config
        # HF head.probe [1, 1, D].
        probe = self.param("probe", nn.with_logical_partitioning(
            nn.initializers.normal(c.initializer_range), ("embed",)), (c.hidden_size,), c.param_dtype)
        y = _PoolingAttention(c, name="attention")(probe, x)  # [B, 1, D]
        ln = LayerNorm(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name="layernorm")
        y = y + MLP(c.intermediate_size, c.hidden_act, initializer_range=c.initializer_range, dtype=c.dtype,
                    param_dtype=c.param_dtype, name="mlp")(ln(y))
        return y[:, 0]


class _PoolingAttention(nn.Module):
    """torch ``nn.MultiheadAttention(D, H)`` with one query (the probe): HF ``head.attention``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, probe: Array, x: Array) -> Array:
        """probe: [D]; x: [B, N, D] -> [B, 1, D]."""
        c = self.config
        d, h, dh = c.hidden_size, c.num_attention_heads, c.head_dim
        kernel = self.param("in_proj_kernel", nn.with_logical_partitioning(
            nn.initializers.normal(c.initializer_range), ("embed", None, "q_heads", "head_dim")),
            (d, 3, h, dh), c.param_dtype).astype(c.dtype)
        bias = self.param("in_proj_bias", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None, "q_heads", "head_dim")), (3, h, dh), c.param_dtype).astype(c.dtype)
        # Only the probe is projected to a query and only the tokens to keys/values.
        q = jnp.einsum("d,dhk->hk", probe.astype(c.dtype), kernel[:, 0]) + bias[0]  # [H, Dh]
        q = jnp.broadcast_to(q, (x.shape[0], 1, h, dh))
        kv = jnp.einsum("bnd,dshk->bnshk", x.astype(c.dtype), kernel[:, 1:]) + bias[1:]  # [B, N, 2, H, Dh]
        k, v = kv[:, :, 0], kv[:, :, 1]
        k = nn.with_logical_constraint(k, (ACT_BATCH, ACT_LEN, ACT_HEADS, ACT_HEAD_DIM))
        v = nn.with_logical_constraint(v, (ACT_BATCH, ACT_LEN, ACT_HEADS, ACT_HEAD_DIM))
        out = attention_lib.attend(q, k, v, dtype=c.dtype, implementation=c.attention_impl)  # [B, 1, H, Dh]
        return layers.DenseGeneral(d, kernel_axes=("q_heads", "head_dim", "embed"), axis=(-2, -1), use_bias=True,
                                   initializer_range=c.initializer_range, dtype=c.dtype,
                                   param_dtype=c.param_dtype, name="out_proj")(out)


class VisionEmbeddings(nn.Module):
    """Patchify + project, prepend CLS, add (interpolated) positions, insert registers.

    HF ``CLIPVisionEmbeddings`` / ``SiglipVisionEmbeddings`` / ``Dinov2(WithRegisters)Embeddings``.
    The patch projection is the stride-p conv of HF written as a matmul over ``[p, p, C]`` patches
    (conv weight [D, C, p, p] -> kernel [p, p, C, D]); rows/columns past the last whole patch are
    dropped, as by the strided conv.

    XLA:CPU measurements (2-core Xeon, 2026-12-03): a strided ``lax.conv_general_dilated`` is slower
    than this matmul; flattening the patches into one 2-D dot made the projection's backward 1.5x
    faster in isolation but nothing measurable at model scale, so the plain ``DenseGeneral`` stays.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values: Array, mask: Array | None = None) -> Array:
        """pixel_values: [B, H, W, C]; mask: optional [B, Np] bool (DINOv2 [MASK]) -> [B, N, D]."""
        c = self.config
        b, height, width, channels = pixel_values.shape
        p, d = c.patch_size, c.hidden_size
        if channels != c.num_channels:
            raise ValueError(f"pixel_values must be NHWC with {c.num_channels} channels (num_channels), "
                             f"got shape {pixel_values.shape}.")
        gh, gw = height // p, width // p
        if gh == 0 or gw == 0:
            raise ValueError(f"Images of {height}x{width} are smaller than one {p}x{p} patch.")
        x = rearrange(pixel_values[:, : gh * p, : gw * p], "b (gh ph) (gw pw) c -> b gh gw ph pw c", ph=p, pw=p)
        x = layers.DenseGeneral(d, kernel_axes=(None, None, None, "embed"), axis=(-3, -2, -1),
                                use_bias=c.patch_bias, initializer_range=c.initializer_range, dtype=c.dtype,
                                param_dtype=c.param_dtype, name="patch_embedding")(x)
        x = rearrange(x, "b gh gw d -> b (gh gw) d")

        vector = lambda name, shape, axes: self.param(
            name, nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), axes), shape,
            c.param_dtype)
        if mask is not None:
            if not (c.variant == "dinov2" and c.use_mask_token):
                raise ValueError("mask= needs a [MASK] embedding: variant='dinov2' with use_mask_token=True.")
            if mask.shape != (b, gh * gw):
                raise ValueError(f"mask must be [B, Np] = {(b, gh * gw)}, got {mask.shape}.")
        if c.variant == "dinov2" and c.use_mask_token:
            mask_token = vector("mask_token", (d,), ("embed",))
            if mask is not None:
                x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)

        table = vector("position_embedding", (c.num_positions, d), (None, "embed"))
        pos = interpolate_position_embedding(table[int(c.class_token):], c.grid_size, (gh, gw), c.pos_antialias)
        if c.class_token:
            cls = vector("class_embedding", (d,), ("embed",))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
            pos = jnp.concatenate([table[:1].astype(jnp.float32), pos], axis=0)
        x = x + pos.astype(x.dtype)
        if c.num_register_tokens:
            # Registers carry no position and sit between CLS and the patches (HF order).
            regs = vector("register_tokens", (c.num_register_tokens, d), (None, "embed"))
            regs = jnp.broadcast_to(regs.astype(x.dtype), (b, c.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))


class VisionTransformer(nn.Module):
    """CLIP / SigLIP / DINOv2 image encoder.

    Outputs (``__call__``):
        last_hidden_state [B, N, D]: CLIP: encoder output (before post_layernorm, as HF);
            SigLIP / DINOv2: after the final layer norm. N = prefix tokens + gh * gw.
        pooler_output [B, D]: CLIP post_layernorm(CLS), SigLIP MAP head (absent when pool='none'),
            DINOv2 normed CLS.
        DINOv2 also: cls_token [B, D], register_tokens [B, R, D], patch_tokens [B, gh*gw, D] (normed).
    """

    config: ViTConfig

    def setup(self):
        c = self.config
        c.validate()
        self.embeddings = VisionEmbeddings(c)
        norm = lambda: LayerNorm(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if c.pre_layernorm:
            self.pre_layrnorm = norm()  # HF spelling
        # static_argnums counts `self` as 0: (x=1, deterministic=2).
        block = layers.remat(EncoderLayer, c.remat, static_argnums=(2,))
        # The same stochastic-depth rate in every layer, as HF Dinov2Layer(config.drop_path_rate).
        if c.scan_layers:
            self.layers = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                                  split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,),
                                  length=c.num_hidden_layers,
                                  metadata_params={nn.PARTITION_NAME: axes.LAYERS},
                                  )(c, drop_path_rate=c.drop_path_rate)
        else:
            self.layers = [block(c, drop_path_rate=c.drop_path_rate) for _ in range(c.num_hidden_layers)]
        self.post_layernorm = norm()
        if c.pool == "map":
            self.head = MAPHead(c)
        self.embed_dropout = nn.Dropout(c.dropout_rate)

    def __call__(
        self, pixel_values: Array, *, mask: Array | None = None, deterministic: bool = True
    ) -> tuple[dict[str, Array], dict[str, Array]]:
        """Encodes images.

        Args:
            pixel_values: [B, H, W, C] float, normalised (see ``vlmjax.data.image_processing``);
                H and W need not be ``image_size`` (positions are interpolated).
            mask: optional [B, Np] bool, True = replace that patch embedding by the [MASK] token
                (DINOv2 ``bool_masked_pos``; Np = (H // p) * (W // p)).
            deterministic: False enables dropout / stochastic depth (needs a "dropout" rng).

        Returns:
            (outputs dict as in the class docstring, aux flat dict with keys ``layers_{i}/<name>``).
        """
        x = self.embed(pixel_values, mask=mask, deterministic=deterministic)
        aux: dict[str, Array] = {}
        if self.config.scan_layers:
            x, _ = self.layers(x, deterministic)  # encoder layers have no aux
            return self.outputs(x), aux
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, deterministic)
            aux.update({f"layers_{i}/{k}": v for k, v in layer_aux.items()})
        return self.outputs(x), aux

    def embed(self, pixel_values: Array, *, mask: Array | None = None, deterministic: bool = True) -> Array:
        """[B, H, W, C] images -> [B, N, D] input of encoder layer 0 (embeddings, dropout, pre-norm)."""
        x = self.embeddings(pixel_values, mask)
        x = self.embed_dropout(x, deterministic=deterministic)
        if self.config.pre_layernorm:
            x = self.pre_layrnorm(x)
        return x

    def outputs(self, x: Array) -> dict[str, Array]:
        """Output of the last encoder layer [B, N, D] -> the outputs dict of ``__call__``."""
        c = self.config
        out: dict[str, Array] = {}
        if c.variant == "clip":
            out["last_hidden_state"] = x
            out["pooler_output"] = self.post_layernorm(x[:, 0])
        else:
            x = self.post_layernorm(x)
            out["last_hidden_state"] = x
            if c.pool == "map":
                out["pooler_output"] = self.head(x)
            elif c.pool == "cls":
                out["pooler_output"] = x[:, 0]
        if c.variant == "dinov2":
            out["cls_token"] = x[:, 0]
            out["register_tokens"] = x[:, 1 : c.num_prefix_tokens]
            out["patch_tokens"] = x[:, c.num_prefix_tokens :]
        return out


__all__ = [
    "ACTIVATIONS",
    "EncoderLayer",
    "LayerNorm",
    "MAPHead",
    "MLP",
    "SwiGLUFFN",
    "ViTConfig",
    "VisionAttention",
    "VisionEmbeddings",
    "VisionTransformer",
    "bicubic_resize_matrix",
    "interpolate_position_embedding",
]
