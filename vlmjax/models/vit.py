"""Vision Transformer backbones: CLIP, SigLIP, DINOv2 (with registers, SwiGLU) and DINOv3 image towers.

One Linen module, ``VisionTransformer``, covers HF ``CLIPVisionModel`` (``variant='clip'``),
``SiglipVisionModel`` (``'siglip'``), ``Dinov2Model`` / ``Dinov2WithRegistersModel``
(``'dinov2'``) and ``DINOv3ViTModel`` (``'dinov3'``). The families share the pre-norm encoder layer
and differ in the embeddings, the positions, the norms around the encoder and the pooling:

    variant  tokens                     around the encoder                  pooler_output
    clip     [CLS, patches] + pos       pre_layrnorm before                 post_layernorm(CLS)
    siglip   [patches] + pos            post_layernorm on all tokens        MAP head (or none)
    dinov2   [CLS, regs, patches] + pos post_layernorm on all ("layernorm") CLS after the norm
    dinov3   [CLS, regs, patches]       post_layernorm on all ("norm")      CLS after the norm
             (2-D RoPE on the patches' q/k in every layer, no position table)

Input images are NHWC (``[B, H, W, C]``, already normalised). Any H, W >= patch_size works: the
position table is resized to the ``(H // p, W // p)`` patch grid with the same bicubic kernel as HF
(``interpolate_pos_encoding``, see ``interpolate_position_embedding``), exactly as HF with
``interpolate_pos_encoding=True`` (CLIP, SigLIP) or always (DINOv2). DINOv3 has no table: its RoPE
angles come from the patch centres normalised to [-1, 1] on whatever grid the image gives
(``VisionTransformer.rope_tables``), as HF ``DINOv3ViTRopePositionEmbedding``.

Parameter tree (``D`` hidden, ``H`` heads, ``Dh`` head dim, ``F`` intermediate, ``p`` patch size,
``C`` channels, ``P`` positions = (image_size // p)^2 (+1 with a CLS token), ``R`` registers; HF
names relative to the vision model in brackets, CLIP/SigLIP first, DINOv2 second where they differ;
DINOv3's own names in the second table):

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

DINOv3 (``DINOv3ViTModel``; no position table, per-projection bias switches, ``L = layer.{i}.``):

    embeddings/patch_embedding/{kernel,bias}        [embeddings.patch_embeddings.{weight,bias}]
    embeddings/class_embedding        [D]           [embeddings.cls_token [1, 1, D]]
    embeddings/mask_token             [D]           [embeddings.mask_token [1, 1, D]]
    embeddings/register_tokens        [R, D]        [embeddings.register_tokens [1, R, D]]  (R > 0)
    layers_{i}/layer_norm{1,2}/{scale,bias}         [L norm{1,2}]
    layers_{i}/self_attn/{q,k,v}_proj/kernel [D, H, Dh]  [L attention.{q,k,v}_proj.weight] (bias: query_bias,
                                                     key_bias, value_bias)
    layers_{i}/self_attn/out_proj/kernel [H, Dh, D] [L attention.o_proj.weight]  (bias: proj_bias)
    layers_{i}/layer_scale{1,2}       [D]           [L layer_scale{1,2}.lambda1]
    layers_{i}/mlp/{up,gate}_proj/kernel [D, F]     [L mlp.{up,gate}_proj.weight]  (gate: use_gated_mlp)
    layers_{i}/mlp/down_proj/kernel   [F, D]        [L mlp.down_proj.weight]  (biases: mlp_bias)
    post_layernorm/{scale,bias}       [D]           [norm]

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

VARIANTS = ("clip", "siglip", "dinov2", "dinov3")
# Pooling per variant: the first is the default. 'none' = SigLIP without head (vision_use_head=False).
POOLS = {"clip": ("cls",), "siglip": ("map", "none"), "dinov2": ("cls",), "dinov3": ("cls",)}
# Fields that only some variants have: name -> (the value every other variant leaves it at, variants).
VARIANT_FIELDS = {
    "num_register_tokens": (0, ("dinov2", "dinov3")),
    "use_swiglu_ffn": (False, ("dinov2",)),
    "pos_antialias": (False, ("dinov2",)),
    "qkv_bias": (True, ("dinov2",)),
    "rope_theta": (100.0, ("dinov3",)),
    "query_bias": (True, ("dinov3",)),
    "key_bias": (True, ("dinov3",)),
    "value_bias": (True, ("dinov3",)),
    "proj_bias": (True, ("dinov3",)),
    "mlp_bias": (True, ("dinov3",)),
    "use_gated_mlp": (False, ("dinov3",)),
    "pos_embed_shift": (None, ("dinov3",)),
    "pos_embed_jitter": (None, ("dinov3",)),
    "pos_embed_rescale": (None, ("dinov3",)),
}


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

    variant: str  # 'clip' | 'siglip' | 'dinov2' | 'dinov3'
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int  # Side of the square image the position table was trained for.
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # quick_gelu (CLIP) | gelu_pytorch_tanh (SigLIP) | gelu (DINOv2/3)
    qkv_bias: bool = True  # Bias on q/k/v (always for CLIP/SigLIP; DINOv2 ``qkv_bias``).
    pool: str = ""  # '' = the variant's default: 'cls' (CLIP, DINOv2) | 'map' | 'none' (SigLIP).
    layerscale_value: float = 1.0  # DINOv2/3: initial value of the per-channel layer scale.
    use_mask_token: bool = True  # DINOv2/3: a learned [MASK] embedding (``mask=`` in __call__).
    num_register_tokens: int = 0  # DINOv2 with registers (Darcet et al. 2023), DINOv3.
    use_swiglu_ffn: bool = False  # DINOv2 giant: fused SwiGLU FFN instead of fc1/act/fc2.
    # Resize positions with torch's antialiased bicubic (a=-0.5), as Dinov2WithRegistersModel does;
    # False: plain bicubic (a=-0.75), as CLIP, SigLIP and Dinov2Model.
    pos_antialias: bool = False
    # DINOv3 (HF DINOv3ViTConfig names). RoPE base period of the 2-D rotary embedding.
    rope_theta: float = 100.0
    # Biases of q / k / v / o_proj and of the MLP projections. key_bias None = the variant's: False for
    # DINOv3 (HF default), True for the others (which always have one).
    query_bias: bool = True
    key_bias: Any = dataclasses.field(default=None, metadata={config_util.ANY_TYPE: True})
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    use_gated_mlp: bool = False  # down_proj(act(gate_proj(x)) * up_proj(x)) instead of down(act(up(x))).
    # Training-only augmentation of the RoPE patch coordinates (deterministic=False, "dropout" rng; one
    # draw per call, shared by the batch, as HF in training mode): add U(-shift, shift) per axis,
    # multiply by exp(U(-log jitter, log jitter)) per axis and by exp(U(-log rescale, log rescale)).
    # None = off. HF configs default pos_embed_rescale to 2.0; the converter copies the file's values.
    pos_embed_shift: Any = dataclasses.field(default=None, metadata={config_util.ANY_TYPE: True})
    pos_embed_jitter: Any = dataclasses.field(default=None, metadata={config_util.ANY_TYPE: True})
    pos_embed_rescale: Any = dataclasses.field(default=None, metadata={config_util.ANY_TYPE: True})
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
        if self.key_bias is None:
            object.__setattr__(self, "key_bias", self.variant != "dinov3")
        object.__setattr__(self, "dtype", _parse_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _parse_dtype("param_dtype", self.param_dtype))
        object.__setattr__(self, "remat", layers.parse_remat("remat", self.remat))

    # Structure fixed by the family.
    @property
    def class_token(self) -> bool:
        return self.variant in ("clip", "dinov2", "dinov3")

    @property
    def patch_bias(self) -> bool:
        return self.variant != "clip"

    @property
    def pre_layernorm(self) -> bool:
        return self.variant == "clip"

    @property
    def layer_scale(self) -> bool:
        return self.variant in ("dinov2", "dinov3")

    @property
    def learned_positions(self) -> bool:
        """A position table added to the embeddings (all but DINOv3)."""
        return self.variant != "dinov3"

    @property
    def use_rope(self) -> bool:
        """2-D RoPE on the patch tokens' q and k in every layer (DINOv3)."""
        return self.variant == "dinov3"

    @property
    def mask_token(self) -> bool:
        """A learned [MASK] embedding exists (DINOv2/3 with ``use_mask_token``)."""
        return self.variant in ("dinov2", "dinov3") and self.use_mask_token

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the trained position table."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the position table (0 without one: DINOv3)."""
        if not self.learned_positions:
            return 0
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
        for name, (default, variants) in VARIANT_FIELDS.items():
            if self.variant not in variants and getattr(self, name) != default:
                raise ValueError(f"{name}={getattr(self, name)!r} exists only for variant="
                                 f"{' or '.join(map(repr, variants))} (got variant={self.variant!r}); "
                                 f"leave it at {default!r}.")
        if not isinstance(self.num_register_tokens, int) or self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be an integer >= 0, got {self.num_register_tokens!r}.")
        if self.use_rope:
            if self.head_dim % 4:
                raise ValueError(f"DINOv3's 2-D RoPE needs a head_dim divisible by 4, got hidden_size // "
                                 f"num_attention_heads = {self.head_dim}; change hidden_size or num_attention_heads.")
            if not self.rope_theta > 0:
                raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}.")
            for name, low in (("pos_embed_shift", 0.0), ("pos_embed_jitter", 1.0), ("pos_embed_rescale", 1.0)):
                value = getattr(self, name)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not value >= low):
                    raise ValueError(f"{name} must be None (off) or a number >= {low}, got {value!r}.")
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
# DINOv3 2-D rotary position embedding (HF ``DINOv3ViTRopePositionEmbedding``)
# ------------------------------------------------------------------------------------------------

def patch_coordinates(gh: int, gw: int) -> Array:
    """Centres of a (gh, gw) patch grid normalised to [-1, 1]: [gh * gw, 2] fp32, (y, x) per row,
    row-major (HF ``get_patches_center_coordinates``)."""
    ys = (jnp.arange(gh, dtype=jnp.float32) + 0.5) / gh
    xs = (jnp.arange(gw, dtype=jnp.float32) + 0.5) / gw
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(gh * gw, 2)
    return 2.0 * coords - 1.0


def augment_patch_coordinates(coords: Array, rng: Array, shift: float | None = None, jitter: float | None = None,
                              rescale: float | None = None) -> Array:
    """HF ``augment_patches_center_coordinates`` (training only): one draw for the whole call.

    coords [Np, 2] -> [Np, 2]: ``+ U(-shift, shift)`` per axis, ``* exp(U(-log jitter, log jitter))``
    per axis, ``* exp(U(-log rescale, log rescale))`` for both axes; a None factor is skipped.
    """
    k_shift, k_jitter, k_rescale = jax.random.split(rng, 3)
    if shift is not None:
        coords = coords + jax.random.uniform(k_shift, (1, 2), jnp.float32, -shift, shift)
    if jitter is not None:
        r = float(np.log(jitter))
        coords = coords * jnp.exp(jax.random.uniform(k_jitter, (1, 2), jnp.float32, -r, r))
    if rescale is not None:
        r = float(np.log(rescale))
        coords = coords * jnp.exp(jax.random.uniform(k_rescale, (1,), jnp.float32, -r, r))
    return coords


def rope_2d_tables(coords: Array, head_dim: int, theta: float, num_prefix_tokens: int = 0) -> tuple[Array, Array]:
    """(cos, sin) of the tokens ``[prefix, patches]``: each [num_prefix_tokens + Np, Dh] fp32.

    Patch rows as HF: ``inv_freq = 1 / theta^(4i/Dh)`` for i < Dh/4; angles ``2 pi * coord * inv_freq``
    of y then x ([Np, Dh/2]) tiled twice, the ``rotate_half`` layout of ``apply_rope_tables``. Prefix
    rows (CLS, registers) are the identity rotation, cos = 1 and sin = 0, which is how HF
    ``apply_rotary_pos_emb`` leaves them alone.
    """
    inv_freq = 1.0 / theta ** jnp.asarray(np.arange(head_dim // 4) * (4.0 / head_dim), jnp.float32)  # [Dh/4]
    angles = 2.0 * np.pi * coords[:, :, None] * inv_freq  # [Np, 2, Dh/4]
    angles = jnp.tile(angles.reshape(coords.shape[0], head_dim // 2), 2)  # [Np, Dh]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if num_prefix_tokens:
        cos = jnp.concatenate([jnp.ones((num_prefix_tokens, head_dim), jnp.float32), cos], axis=0)
        sin = jnp.concatenate([jnp.zeros((num_prefix_tokens, head_dim), jnp.float32), sin], axis=0)
    return cos, sin


def apply_rope_tables(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates q or k [B, N, H, Dh] by per-token tables cos / sin [N, Dh] or [B, N, Dh]:
    ``x cos + rotate_half(x) sin`` in fp32, back in the dtype of ``x`` (HF ``apply_rotary_pos_emb``)."""
    if cos.shape != sin.shape or cos.shape[-1] != x.shape[-1] or cos.shape[-2] != x.shape[1]:
        raise ValueError(f"rope tables must be (cos, sin) of shape [N, Dh] or [B, N, Dh] = [{x.shape[1]}, "
                         f"{x.shape[-1]}] for these tokens, got {cos.shape} and {sin.shape}; build them with "
                         "VisionTransformer.rope_tables (add identity rows, cos=1 sin=0, for extra tokens).")
    cos = cos.astype(jnp.float32)[..., None, :]  # [(B,) N, 1, Dh]
    sin = sin.astype(jnp.float32)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

# One LayerNorm for every encoder (fp32 statistics; HF weight -> scale, bias -> bias).
LayerNorm = layers.LayerNorm


# The encoder attention (q/k/v/out_proj with biases; ``project`` / ``output`` halves for token reuse)
# is shared with the text towers: ``layers.EncoderAttention``.
VisionAttention = layers.EncoderAttention


MLP = layers.EncoderMLP


class DINOv3Attention(layers.EncoderAttention):
    """``EncoderAttention`` with a bias switch per projection: HF ``DINOv3ViTAttention``
    (``q_proj`` / ``k_proj`` / ``v_proj``, ``o_proj`` -> ``out_proj``; ``query_bias``, ``key_bias``,
    ``value_bias``, ``proj_bias``). ``qkv_bias`` is unused. RoPE is applied by ``EncoderLayer.qkv``."""

    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True

    def setup(self):
        dense = functools.partial(layers.DenseGeneral, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        proj = lambda bias: dense(features=(self.num_heads, self.head_dim),
                                  kernel_axes=("embed", "q_heads", "head_dim"), use_bias=bias)
        self.q_proj, self.k_proj, self.v_proj = proj(self.query_bias), proj(self.key_bias), proj(self.value_bias)
        self.out_proj = dense(features=self.hidden_size, kernel_axes=("q_heads", "head_dim", "embed"),
                              axis=(-2, -1), use_bias=self.proj_bias)


class DINOv3MLP(nn.Module):
    """HF ``DINOv3ViTMLP`` ``down_proj(act(up_proj(x)))``, or with ``gated`` ``DINOv3ViTGatedMLP``
    ``down_proj(act(gate_proj(x)) * up_proj(x))``; biases when ``use_bias`` (HF ``mlp_bias``).

    up_proj / gate_proj weight [F, D] -> kernel [D, F]; down_proj weight [D, F] -> kernel [F, D].
    """

    intermediate_size: int
    hidden_act: str
    gated: bool = False
    use_bias: bool = True
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, N, D] -> [B, N, D]."""
        dense = functools.partial(layers.DenseGeneral, use_bias=self.use_bias, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        up = lambda name: dense(self.intermediate_size, kernel_axes=("embed", "mlp"), name=name)(x)
        if self.gated:
            h = ACTIVATIONS[self.hidden_act](up("gate_proj")) * up("up_proj")
        else:
            h = ACTIVATIONS[self.hidden_act](up("up_proj"))
        h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LEN, ACT_MLP))
        return dense(x.shape[-1], kernel_axes=("mlp", "embed"), name="down_proj")(h)


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

    HF ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` (no layer scale), ``Dinov2Layer`` (layer
    scale ``layer_scale{1,2}.lambda1`` [D], SwiGLU FFN when ``use_swiglu_ffn``) and ``DINOv3ViTLayer``
    (layer scale, per-projection biases, RoPE on q/k through ``rope=``, gated MLP when
    ``use_gated_mlp``).

    ``__call__`` is ``qkv`` -> attention -> ``finish``; the halves are public so that token reuse
    (``vlmjax.models.reuse``) can run them on a gathered subset of tokens with keys and values of
    the whole frame. ``rope`` = (cos, sin) [N, Dh] (or [B, N, Dh]) of the tokens in ``x``
    (``VisionTransformer.rope_tables``; identity rows, cos=1 sin=0, for tokens without a position);
    None = no rotation (every variant but DINOv3).
    """

    config: ViTConfig
    drop_path_rate: float = 0.0

    def setup(self):
        c = self.config
        norm = lambda: LayerNorm(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.layer_norm1 = norm()
        if c.variant == "dinov3":
            self.self_attn = DINOv3Attention(num_heads=c.num_attention_heads, head_dim=c.head_dim,
                                             hidden_size=c.hidden_size, query_bias=c.query_bias,
                                             key_bias=c.key_bias, value_bias=c.value_bias, proj_bias=c.proj_bias,
                                             initializer_range=c.initializer_range, dtype=c.dtype,
                                             param_dtype=c.param_dtype, attention_impl=c.attention_impl)
        else:
            self.self_attn = VisionAttention(num_heads=c.num_attention_heads, head_dim=c.head_dim,
                                             hidden_size=c.hidden_size, qkv_bias=c.qkv_bias,
                                             initializer_range=c.initializer_range, dtype=c.dtype,
                                             param_dtype=c.param_dtype, attention_impl=c.attention_impl)
        self.layer_norm2 = norm()
        if c.variant == "dinov3":
            self.mlp = DINOv3MLP(c.intermediate_size, c.hidden_act, gated=c.use_gated_mlp, use_bias=c.mlp_bias,
                                 initializer_range=c.initializer_range, dtype=c.dtype, param_dtype=c.param_dtype)
        elif c.use_swiglu_ffn:
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

    def qkv(self, x: Array, *, rope: tuple[Array, Array] | None = None) -> tuple[Array, Array, Array]:
        """x: [B, N, D] layer input -> q, k, v [B, N, H, Dh] of ``ln1(x)``; q and k rotated by
        ``rope`` = (cos, sin) [N, Dh] or [B, N, Dh] of these N tokens when given."""
        x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))
        q, k, v = self.self_attn.project(self.layer_norm1(x))
        if rope is not None:
            q, k = apply_rope_tables(q, *rope), apply_rope_tables(k, *rope)
        return q, k, v

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

    def __call__(self, x: Array, deterministic: bool = True, rope: tuple[Array, Array] | None = None
                 ) -> tuple[Array, dict[str, Array]]:
        """x: [B, N, D], rope: optional (cos, sin) [N, Dh] of these tokens -> ([B, N, D], aux={}).
        (``rope`` may also be passed positionally: nn.scan / nn.remat pass arguments by position.)"""
        q, k, v = self.qkv(x, rope=rope)
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

    HF ``CLIPVisionEmbeddings`` / ``SiglipVisionEmbeddings`` / ``Dinov2(WithRegisters)Embeddings`` /
    ``DINOv3ViTEmbeddings`` (no positions here: DINOv3 rotates q/k in the layers).
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
        """pixel_values: [B, H, W, C]; mask: optional [B, Np] bool (DINOv2/3 [MASK]) -> [B, N, D]."""
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
            if not c.mask_token:
                raise ValueError("mask= needs a [MASK] embedding: variant='dinov2' or 'dinov3' with "
                                 "use_mask_token=True.")
            if mask.shape != (b, gh * gw):
                raise ValueError(f"mask must be [B, Np] = {(b, gh * gw)}, got {mask.shape}.")
        if c.mask_token:
            mask_token = vector("mask_token", (d,), ("embed",))
            if mask is not None:
                x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)

        if c.learned_positions:
            table = vector("position_embedding", (c.num_positions, d), (None, "embed"))
            pos = interpolate_position_embedding(table[int(c.class_token):], c.grid_size, (gh, gw), c.pos_antialias)
        if c.class_token:
            cls = vector("class_embedding", (d,), ("embed",))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
            if c.learned_positions:
                pos = jnp.concatenate([table[:1].astype(jnp.float32), pos], axis=0)
        if c.learned_positions:
            x = x + pos.astype(x.dtype)
        if c.num_register_tokens:
            # Registers carry no position and sit between CLS and the patches (HF order).
            regs = vector("register_tokens", (c.num_register_tokens, d), (None, "embed"))
            regs = jnp.broadcast_to(regs.astype(x.dtype), (b, c.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))


class VisionTransformer(nn.Module):
    """CLIP / SigLIP / DINOv2 / DINOv3 image encoder.

    Outputs (``__call__``):
        last_hidden_state [B, N, D]: CLIP: encoder output (before post_layernorm, as HF);
            SigLIP / DINOv2 / DINOv3: after the final layer norm. N = prefix tokens + gh * gw.
        pooler_output [B, D]: CLIP post_layernorm(CLS), SigLIP MAP head (absent when pool='none'),
            DINOv2 / DINOv3 normed CLS.
        DINOv2 / DINOv3 also: cls_token [B, D], register_tokens [B, R, D], patch_tokens [B, gh*gw, D]
            (normed).

    The layers by hand (token reuse, extra tokens): ``x = embed(images)``, ``rope = rope_tables(gh, gw)``
    (None but for DINOv3), ``x, _ = layer(x, deterministic, rope)`` for each of ``layers``, then
    ``outputs(x)``.
    """

    config: ViTConfig

    def setup(self):
        c = self.config
        c.validate()
        self.embeddings = VisionEmbeddings(c)
        norm = lambda: LayerNorm(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if c.pre_layernorm:
            self.pre_layrnorm = norm()  # HF spelling
        # static_argnums counts `self` as 0: (x=1, deterministic=2, rope=3).
        block = layers.remat(EncoderLayer, c.remat, static_argnums=(2,))
        # The same stochastic-depth rate in every layer, as HF Dinov2Layer(config.drop_path_rate).
        if c.scan_layers:
            self.layers = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                                  split_rngs={"params": True, "dropout": True},
                                  in_axes=(nn.broadcast, nn.broadcast),
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
                (DINOv2/3 ``bool_masked_pos``; Np = (H // p) * (W // p)).
            deterministic: False enables dropout / stochastic depth and DINOv3's RoPE coordinate
                augmentation (``pos_embed_*``); needs a "dropout" rng.

        Returns:
            (outputs dict as in the class docstring, aux flat dict with keys ``layers_{i}/<name>``).
        """
        c = self.config
        x = self.embed(pixel_values, mask=mask, deterministic=deterministic)
        rope = self.rope_tables(pixel_values.shape[1] // c.patch_size, pixel_values.shape[2] // c.patch_size,
                                deterministic=deterministic)
        aux: dict[str, Array] = {}
        if c.scan_layers:
            x, _ = self.layers(x, deterministic, rope)  # encoder layers have no aux
            return self.outputs(x), aux
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, deterministic, rope)
            aux.update({f"layers_{i}/{k}": v for k, v in layer_aux.items()})
        return self.outputs(x), aux

    def embed(self, pixel_values: Array, *, mask: Array | None = None, deterministic: bool = True) -> Array:
        """[B, H, W, C] images -> [B, N, D] input of encoder layer 0 (embeddings, dropout, pre-norm)."""
        x = self.embeddings(pixel_values, mask)
        x = self.embed_dropout(x, deterministic=deterministic)
        if self.config.pre_layernorm:
            x = self.pre_layrnorm(x)
        return x

    def rope_tables(self, gh: int, gw: int, *, deterministic: bool = True) -> tuple[Array, Array] | None:
        """The RoPE (cos, sin) of the tokens ``embed`` gives for a (gh, gw) patch grid, each
        [num_prefix_tokens + gh * gw, Dh] fp32 with identity rows (cos=1, sin=0) for CLS and the
        registers; None for variants without RoPE (all but DINOv3).

        deterministic=False applies the training augmentation ``pos_embed_shift`` / ``_jitter`` /
        ``_rescale`` of the config (one draw per call from the "dropout" rng), as HF in training mode.
        For an extra token without position, append a row of ones to cos and of zeros to sin.
        """
        c = self.config
        if not c.use_rope:
            return None
        coords = patch_coordinates(gh, gw)
        augment = (c.pos_embed_shift, c.pos_embed_jitter, c.pos_embed_rescale)
        if not deterministic and any(a is not None for a in augment):
            coords = augment_patch_coordinates(coords, self.make_rng("dropout"), *augment)
        return rope_2d_tables(coords, c.head_dim, c.rope_theta, c.num_prefix_tokens)

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
        if c.variant in ("dinov2", "dinov3"):
            out["cls_token"] = x[:, 0]
            out["register_tokens"] = x[:, 1 : c.num_prefix_tokens]
            out["patch_tokens"] = x[:, c.num_prefix_tokens :]
        return out


__all__ = [
    "ACTIVATIONS",
    "DINOv3Attention",
    "DINOv3MLP",
    "EncoderLayer",
    "LayerNorm",
    "MAPHead",
    "MLP",
    "SwiGLUFFN",
    "ViTConfig",
    "VisionAttention",
    "VisionEmbeddings",
    "VisionTransformer",
    "apply_rope_tables",
    "augment_patch_coordinates",
    "bicubic_resize_matrix",
    "interpolate_position_embedding",
    "patch_coordinates",
    "rope_2d_tables",
]
