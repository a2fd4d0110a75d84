"""Building blocks of a Llama/Qwen-style decoder: RMSNorm, RoPE, GQA attention, SwiGLU, block.

Conventions (followed by every module here):

- Parameters are stored in ``param_dtype`` (fp32 by default); activations are computed in ``dtype``
    (e.g. bfloat16). Norms, RoPE and the attention softmax always run in fp32.
- Every parameter carries logical axis names via ``nn.with_logical_partitioning`` and the main
    activations are constrained with ``nn.with_logical_constraint``; the trainer maps the names to the
    mesh axes (``vlmjax/sharding.py``). Parameter axes: "vocab", "embed", "q_heads", "kv_heads",
    "head_dim", "mlp", "norm". Activation axes: "act_batch", "act_len", "act_embed", "act_heads",
    "act_kv_heads", "act_head_dim", "act_mlp", "act_vocab".
- Projections use ``DenseGeneral`` (below) with per-head kernels (as MaxText and deepmind/gemma
    do), so the head axis is a real array axis that can be sharded and named. The HF -> vlmjax
    mapping of every parameter is written next to it; in short (``D`` hidden, ``H`` query heads,
    ``K`` kv heads, ``Dh`` head dim, ``F`` intermediate, HF ``nn.Linear`` weights are ``[out, in]``):

            self_attn/q_proj/kernel [D, H, Dh]   = q_proj.weight.T.reshape(D, H, Dh)
            self_attn/q_proj/bias   [H, Dh]      = q_proj.bias.reshape(H, Dh)          (Qwen2 only)
            self_attn/k_proj/kernel [D, K, Dh]   = k_proj.weight.T.reshape(D, K, Dh)   (v_proj alike)
            self_attn/o_proj/kernel [H, Dh, D]   = o_proj.weight.T.reshape(H, Dh, D)
            self_attn/q_norm/scale  [Dh]         = q_norm.weight                       (Qwen3 only)
            mlp/gate_proj/kernel    [D, F]       = gate_proj.weight.T                  (up_proj alike)
            mlp/down_proj/kernel    [F, D]       = down_proj.weight.T
            input_layernorm/scale   [D]          = input_layernorm.weight

- Sharding follows the flax logical-rules model: meshes with ``AxisType.Auto`` axes (jit
    in/out shardings + ``with_sharding_constraint``). ``AxisType.Explicit`` meshes are not supported:
    flax's ``with_logical_constraint`` asserts instead of resharding there.
- LoRA (Hu et al. 2021, arXiv 2106.09685): a ``DenseGeneral`` given a ``lora.LoraConfig`` with
    ``rank > 0`` keeps its ``kernel`` (so HF weights still load into it) and adds
    ``lora_a [*in_dims, r]`` and ``lora_b [r, *features]`` (HF peft ``lora_A.weight.T`` /
    ``lora_B.weight.T``). ``Attention`` and ``MLP`` take one ``lora`` field and hand it to the
    projections named in its ``targets`` (``LORA_TARGETS``); ``DecoderBlock`` takes the whole
    ``DecoderConfig`` (as MaxText passes ``config`` to every layer). ``vlmjax/models/lora.py`` holds
    the settings and merges the adapters.
- 4-bit bases (QLoRA, Dettmers et al. 2023): a ``DenseGeneral`` or ``Embed`` given a
    ``quant.QuantConfig`` holds no ``kernel`` / ``embedding`` param; its weight lives in the "quant"
    collection as NF4 codes and block scales (``vlmjax/models/quant.py``), dequantised to ``dtype``
    in the forward. Bias, norms and LoRA adapters stay fp params. ``Attention`` and ``MLP`` take one
    ``quant`` field for all their projections; ``DecoderBlock`` reads ``config.quant``.
- Attention masks are built from *position ids*, not from array indices: a query at position p sees
    the keys at positions <= p. A block can therefore run on a gathered subset of tokens
    (Mixture-of-Depths: ``[B, k, D]`` with their original positions) and stay causal.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vlmjax.models import attention as attention_lib
from vlmjax.models import axes
from vlmjax.models import quant as quant_lib
from vlmjax.models.lora import LORA_TARGETS, LoraConfig, lora_a_init
from vlmjax.models.quant import QuantConfig

Array = jax.Array
Dtype = Any

# Config dtype names (what configs and HF config.json files use) -> jnp dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(field: str, value: Any) -> Any:
    """'bfloat16' (or a dtype) -> jnp.dtype; an unknown name is an error naming ``field``."""
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"{field}={value!r} is not supported; use one of {sorted(DTYPES)}.")
        return jnp.dtype(DTYPES[value])
    return jnp.dtype(value)


# Activation logical axis names live in ``axes`` (re-exported here, where model code looks for them).
ACT_BATCH = axes.ACT_BATCH
ACT_LEN = axes.ACT_LEN
ACT_EMBED = axes.ACT_EMBED
ACT_HEADS = axes.ACT_HEADS
ACT_KV_HEADS = axes.ACT_KV_HEADS
ACT_HEAD_DIM = axes.ACT_HEAD_DIM
ACT_MLP = axes.ACT_MLP
ACT_VOCAB = axes.ACT_VOCAB


def _normal(stddev: float) -> nn.initializers.Initializer:
    # HF Llama/Qwen `_init_weights` draws every Linear and the Embedding from N(0, initializer_range^2).
    return nn.initializers.normal(stddev=stddev)


# LORA_TARGETS (projection names that can carry adapters) and lora_a_init (peft's lora_A init) live in
# vlmjax.models.lora with LoraConfig; imported above and re-exported here.


def _lora_for(lora: LoraConfig | None, name: str) -> LoraConfig | None:
    """The ``DenseGeneral(lora=...)`` of projection ``name``: ``lora`` if it targets ``name``, else None."""
    return None if lora is None else lora.for_target(name)


class DenseGeneral(nn.Module):
    """Linear map contracting the input ``axis`` dims with a kernel ``[*in_dims, *features]``.

    Unlike ``flax.linen.DenseGeneral`` (which initialises a flattened 2-D kernel and reshapes it),
    the initializer sees the full kernel shape, so ``nn.with_logical_partitioning`` metadata with one
    name per kernel axis stays valid while a mesh and logical rules are active (as MaxText's
    ``DenseGeneral``). Bias, if any, has shape ``features``.

    LoRA (Hu et al. 2021), when ``lora`` is given with ``rank = r > 0``: two more params,
    ``lora_a [*in_dims, r]`` (logical axes: the kernel's input axes + None; HF peft's kaiming-uniform
    init, ``lora.lora_a_init``) and ``lora_b [r, *features]`` (None + the kernel's output axes; zeros,
    so a fresh adapter is an exact no-op), and the output becomes
    ``x W (+ bias) + (alpha / r) * dropout(x) A B``, the low-rank term computed in ``dtype``.
    The dropout (rate ``lora.dropout``, on the adapter input only, as peft) is active only when the
    caller passes a "dropout" rng (``apply(..., rngs={"dropout": key})``); without one the layer is
    deterministic. ``kernel`` keeps its name and shape, so HF checkpoints load unchanged.
    ``lora.targets`` is not read here: the caller decides which projections get ``lora``.

    4-bit base (``quant`` given): no ``kernel`` param; the "quant" collection holds
    ``kernel_codes`` / ``kernel_scales`` / ... blocked along the last contracted axis (see
    ``quant.py``), initialised by quantising the usual N(0, initializer_range^2) draw. The forward
    dequantises them to fp32, casts to ``dtype`` and runs the same ``dot_general``, so it equals the
    fp layer holding the dequantised kernel. No gradient reaches them (they are not params).
    """

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # fp32 for the output logits: bf16 inputs, fp32 accumulation and result.
    preferred_element_type: Dtype | None = None
    lora: LoraConfig | None = None  # None or rank 0 = no adapter
    quant: QuantConfig | None = None  # None = fp kernel param; else a frozen quantised kernel

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., *in_dims] -> [..., *features] in ``dtype`` (or ``preferred_element_type``)."""
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        kernel_shape = tuple(x.shape[a] for a in axis) + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(
                f"kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}."
            )
        if self.quant is None:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(_normal(self.initializer_range), self.kernel_axes),
                kernel_shape,
                self.param_dtype,
            )
        else:
            # Blocks along the last contracted axis (embed / head_dim / mlp): B input weights of one
            # output unit share a scale, as bitsandbytes blocks the torch [out, in] weight.
            block_axis = len(axis) - 1
            self.quant.check_divisible(kernel_shape, block_axis, f"{self.path} kernel")
            q = quant_lib.quantized_variables(
                self, "kernel", _normal(self.initializer_range), kernel_shape, self.param_dtype,
                self.kernel_axes, block_axis, self.quant)
            kernel = quant_lib.dequantize(q, self.quant, block_axis)  # fp32, cast below like params
        contract = ((axis, tuple(range(len(axis)))), ((), ()))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            contract,
            preferred_element_type=self.preferred_element_type,
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros_init(), self.kernel_axes[len(axis) :]
                ),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(y.dtype)
        if self.lora is not None and self.lora.rank:
            y = y + self._lora(x, axis, features, y.dtype)
        return y

    def _lora(self, x: Array, axis: tuple[int, ...], features: tuple[int, ...], out_dtype: Dtype) -> Array:
        """The LoRA term ``(alpha / r) * dropout(x) A B``: [..., *features] in ``out_dtype``."""
        lora = self.lora
        lora.validate()
        r = lora.rank
        n_in = len(axis)
        in_dims = tuple(x.shape[a] for a in axis)
        # HF peft lora_A.weight [r, in] -> lora_a [*in_dims, r]; lora_B.weight [out, r] -> lora_b [r, *out].
        lora_a = self.param(
            "lora_a",
            nn.with_logical_partitioning(lora_a_init, tuple(self.kernel_axes[:n_in]) + (None,)),
            in_dims + (r,),
            self.param_dtype,
        )
        lora_b = self.param(
            "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,) + tuple(self.kernel_axes[n_in:])),
            (r,) + features,
            self.param_dtype,
        )
        if lora.dropout > 0:
            x = nn.Dropout(rate=lora.dropout, name="lora_dropout")(
                x, deterministic=not self.has_rng("dropout")
            )
        h = jax.lax.dot_general(  # [..., r]
            x.astype(self.dtype),
            lora_a.astype(self.dtype),
            ((axis, tuple(range(n_in))), ((), ())),
        )
        h = h * jnp.asarray(lora.scale, h.dtype)  # scale the rank-r side: cheapest place
        out = jax.lax.dot_general(  # [..., *features]
            h,
            lora_b.astype(self.dtype),
            (((h.ndim - 1,), (0,)), ((), ())),
            preferred_element_type=self.preferred_element_type,
        )
        return out.astype(out_dtype)


# ------------------------------------------------------------------------------------------------
# Rematerialisation policies (config field ``remat`` of every family)
# ------------------------------------------------------------------------------------------------

# Names given to intermediates with ``checkpoint_name`` so policies can keep them.
ATTENTION_OUT = "attention_out"  # a layer's attention output [B, T, H, Dh], before the out projection

# What the backward pass keeps from the forward pass of a layer, by name:
#   none                  no remat: keep every activation (fastest, most memory)
#   full                  keep only the layer input, recompute the rest (least memory)
#   dots_saveable         keep matmul outputs, recompute the elementwise ops (norms, activations)
#   dots_no_batch_saveable  keep only matmuls without batch dims (the weight projections, not the
#                         attention logits): MaxText's "minimal"
#   save_attention_out    keep each layer's attention output, recompute the projections and MLP
#   offload_attention_out move the attention output to host memory (pinned_host) and back for the
#                         backward pass (GPU/TPU; on CPU host and device memory are the same)
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_no_batch_saveable", "save_attention_out",
                  "offload_attention_out")


def parse_remat(field: str, value: Any) -> str:
    """A policy name from ``value`` (bools accepted for old configs: True = 'full', False = 'none')."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"{field}={value!r} is not a remat policy; use one of {REMAT_POLICIES}.")
    return value


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a ``REMAT_POLICIES`` name ('none' has none: no remat)."""
    cp = jax.checkpoint_policies
    return {
        "full": None,
        "dots_saveable": cp.dots_saveable,
        "dots_no_batch_saveable": cp.dots_with_no_batch_dims_saveable,
        "save_attention_out": cp.save_only_these_names(ATTENTION_OUT),
        "offload_attention_out": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[ATTENTION_OUT],
            offload_src="device", offload_dst="pinned_host"),
    }[name]


def remat(module_cls, policy: str, static_argnums: tuple[int, ...] = ()):
    """``module_cls`` rematerialised per ``policy`` (``nn.remat``; 'none' returns it unchanged).
    ``static_argnums`` counts ``self`` as 0, as ``nn.remat`` does. ``prevent_cse=False`` would be
    right under ``nn.scan`` only; callers that scan pass the class through ``nn.scan`` after this."""
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=remat_policy(policy), static_argnums=static_argnums)


def quick_gelu(x: Array) -> Array:
    """CLIP's ``x * sigmoid(1.702 x)`` (HF ``quick_gelu``)."""
    return x * jax.nn.sigmoid(1.702 * x)


# HF ``hidden_act`` names -> functions (HF ``ACT2FN``).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf GELU (DINOv2)
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),  # SigLIP
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class EncoderMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with biases (HF ``CLIPMLP`` / ``SiglipMLP`` / ``Dinov2MLP``).

    fc1 weight [F, D] -> kernel [D, F]; fc2 weight [D, F] -> kernel [F, D].
    """

    intermediate_size: int
    hidden_act: str
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, N, D] -> [B, N, D]."""
        dense = functools.partial(DenseGeneral, use_bias=True, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.intermediate_size, kernel_axes=("embed", "mlp"), name="fc1")(x)
        h = ACTIVATIONS[self.hidden_act](h)
        h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LEN, ACT_MLP))
        return dense(x.shape[-1], kernel_axes=("mlp", "embed"), name="fc2")(h)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) as torch ``nn.LayerNorm``: biased variance, learned scale and bias.

    Computed in fp32 and cast to ``dtype``. HF ``*.weight`` -> ``scale``, ``*.bias`` -> ``bias``.
    """

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., D] -> [..., D] in ``dtype``."""
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                          (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        # x - mean computed once and reused (same numbers; XLA:CPU otherwise computes it twice:
        # LayerNorm forward ~2x, backward ~1.8x faster on a 2-core Xeon).
        xc = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), as HF ``LlamaRMSNorm``.

    ``y = x / sqrt(mean(x^2) + eps) * scale``, computed in fp32 and cast back to ``dtype``.
    HF weight: ``*.weight`` -> ``scale`` (initialised to ones, no ``1 + scale`` offset as in Gemma).
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., F] -> [..., F] in ``dtype``."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float) -> Array:
    """Inverse frequencies ``theta^(-2i/Dh)`` for i in [0, Dh/2): [Dh/2] fp32 (HF ``inv_freq``)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021) in the HF "rotate_half" layout.

    HF pairs feature i with feature i + Dh/2 (not the interleaved 2i, 2i+1 of the paper), so HF
    q/k projection weights load without any permutation.

    Args:
        x: [B, T, H, Dh] queries or keys (Dh even).
        positions: [B, T] integer position ids (the original positions for a gathered subset).
        theta: RoPE base (HF ``rope_theta``).

    Returns:
        [B, T, H, Dh] rotated, in the dtype of ``x`` (the rotation itself runs in fp32).
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
    inv_freq = rope_frequencies(head_dim, theta)  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # HF rotate_half
    return (x32 * cos + rotated * sin).astype(x.dtype)


class EncoderAttention(nn.Module):
    """Multi-head self-attention with biased projections and no RoPE (positions are added at the
    input), shared by the ViT towers (``vit.VisionAttention``) and the text towers
    (``text_encoder.EncoderAttention``).

    HF ``CLIPAttention`` / ``SiglipAttention`` (q_proj/k_proj/v_proj/out_proj) and
    ``Dinov2Attention`` (legacy names attention.query/key/value, output.dense): weight [H*Dh, D] ->
    kernel [D, H, Dh], bias [H*Dh] -> [H, Dh]; out weight [D, H*Dh] -> kernel [H, Dh, D], bias [D].

    ``project`` and ``output`` are the two halves of ``__call__``, so callers that compute the
    attention themselves (token reuse runs the queries of a gathered subset against keys/values
    partly restored from a cache) use the same parameters.
    """

    num_heads: int
    head_dim: int
    hidden_size: int
    qkv_bias: bool = True  # DINOv2 ``qkv_bias``; always True for CLIP / SigLIP
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"  # backend of ``attention.attend`` (config ``attention_impl``)

    def setup(self):
        dense = functools.partial(DenseGeneral, initializer_range=self.initializer_range,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = lambda: dense(features=(self.num_heads, self.head_dim), kernel_axes=("embed", "q_heads", "head_dim"),
                            use_bias=self.qkv_bias)
        self.q_proj, self.k_proj, self.v_proj = qkv(), qkv(), qkv()
        self.out_proj = dense(features=self.hidden_size, kernel_axes=("q_heads", "head_dim", "embed"),
                              axis=(-2, -1), use_bias=True)

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """x: [B, N, D] (already layer-normed) -> q, k, v, each [B, N, H, Dh]."""
        return tuple(nn.with_logical_constraint(proj(x), (ACT_BATCH, ACT_LEN, ACT_HEADS, ACT_HEAD_DIM))
                     for proj in (self.q_proj, self.k_proj, self.v_proj))

    def output(self, out: Array) -> Array:
        """Attention output [B, N, H, Dh] -> [B, N, D] (``out_proj``)."""
        out = nn.with_logical_constraint(out, (ACT_BATCH, ACT_LEN, ACT_HEADS, ACT_HEAD_DIM))
        return self.out_proj(out)

    def attend(self, q: Array, k: Array, v: Array, **structure) -> Array:
        """q [B, T, H, Dh], k/v [B, S, H, Dh] -> [B, T, H, Dh] through ``attention.attend`` with this
        module's backend; ``structure``: its ``q_positions`` / ``kv_positions`` / ``kv_valid`` /
        ``mask`` (none = bidirectional)."""
        return attention_lib.attend(q, k, v, dtype=self.dtype, implementation=self.attention_impl, **structure)

    def __call__(self, x: Array, *, causal: bool = False, kv_valid: Array | None = None) -> Array:
        """x: [B, N, D] -> [B, N, D]. causal: token t sees tokens <= t (CLIP text); kv_valid: [B, N],
        0 = padding key. Plain multi-head attention (K = H), scale Dh^-0.5, fp32 softmax."""
        q, k, v = self.project(x)
        positions = None
        if causal:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None], x.shape[:2])
        out = self.attend(q, k, v, q_positions=positions, kv_positions=positions, kv_valid=kv_valid)
        return self.output(checkpoint_name(out, ATTENTION_OUT))  # what remat="save_attention_out" keeps


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, RoPE, optional qkv bias / q-k norm, KV cache.

    HF: ``LlamaAttention`` / ``Qwen2Attention`` (``attention_bias=True``) / ``Qwen3Attention``
    (``qk_norm=True``: RMSNorm over head_dim on q and k, before RoPE).

    Decode: the "cache" collection holds ``cached_key``/``cached_value`` [B, L, K, Dh],
    ``cached_positions`` [B, L] (position id of each slot), ``cached_valid`` [B, L] (slot written and
    not padding) and ``cache_index`` (next slot to write). The cache is created with length L equal to
    the sequence length of the ``init(..., decode=True)`` call (flax lm1b convention). A call with
    ``decode=True`` writes its T tokens at ``cache_index`` (T > 1 = prefill, T = 1 = one step) and
    attends over the whole cache, masked by position and validity. The caller sizes the cache: past
    L tokens, ``dynamic_update_slice`` clamps the write index and overwrites the last slots.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    use_bias: bool = False
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # LoRA adapters on the projections named in lora.targets (see DenseGeneral); None = none.
    lora: LoraConfig | None = None
    attention_impl: str = "xla"  # backend of ``attention.attend`` (config ``attention_impl``)
    quant: QuantConfig | None = None  # 4-bit q/k/v/o_proj kernels (see DenseGeneral); None = fp

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        attention_mask: Array | None = None,
        decode: bool = False,
    ) -> Array:
        """x: [B, T, D]; positions: [B, T] int; attention_mask: [B, T] (1 real, 0 pad) -> [B, T, D]."""
        features = x.shape[-1]

        def proj(name: str, heads: int, heads_axis: str) -> DenseGeneral:
            return DenseGeneral(
                features=(heads, self.head_dim),
                kernel_axes=("embed", heads_axis, "head_dim"),
                use_bias=self.use_bias,
                initializer_range=self.initializer_range,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
                lora=_lora_for(self.lora, name),
                quant=self.quant,
            )

        # HF q_proj/k_proj/v_proj: weight [heads*Dh, D] -> kernel [D, heads, Dh]; bias [heads, Dh].
        q = proj("q_proj", self.num_heads, "q_heads")(x)  # [B, T, H, Dh]
        k = proj("k_proj", self.num_kv_heads, "kv_heads")(x)  # [B, T, K, Dh]
        v = proj("v_proj", self.num_kv_heads, "kv_heads")(x)  # [B, T, K, Dh]

        if self.qk_norm:
            # Qwen3: per-head RMSNorm over head_dim, shared across heads (HF q_norm.weight [Dh]).
            norm = lambda name: RMSNorm(
                eps=self.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )
            q = norm("q_norm")(q)
            k = norm("k_norm")(k)

        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        q = nn.with_logical_constraint(q, (ACT_BATCH, ACT_LEN, ACT_HEADS, ACT_HEAD_DIM))
        k = nn.with_logical_constraint(k, (ACT_BATCH, ACT_LEN, ACT_KV_HEADS, ACT_HEAD_DIM))
        v = nn.with_logical_constraint(v, (ACT_BATCH, ACT_LEN, ACT_KV_HEADS, ACT_HEAD_DIM))

        kv_positions, kv_valid = positions, attention_mask
        if decode:
            k, v, kv_positions, kv_valid = self._update_cache(k, v, positions, attention_mask)

        out = attention_lib.attend(  # [B, T, H, Dh]
            q, k, v, dtype=self.dtype, implementation=self.attention_impl, q_positions=positions,
            kv_positions=kv_positions, kv_valid=kv_valid)
        out = checkpoint_name(out, ATTENTION_OUT)  # what remat="save_attention_out" keeps
        out = nn.with_logical_constraint(out, (ACT_BATCH, ACT_LEN, ACT_HEADS, ACT_HEAD_DIM))

        # HF o_proj: weight [D, H*Dh] -> kernel [H, Dh, D]; Llama/Qwen have no o_proj bias.
        return DenseGeneral(
            features=features,
            kernel_axes=("q_heads", "head_dim", "embed"),
            axis=(-2, -1),
            initializer_range=self.initializer_range,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="o_proj",
            lora=_lora_for(self.lora, "o_proj"),
            quant=self.quant,
        )(out)

    def skip_cache(self, positions: Array) -> None:
        """Advances the decode cache by T slots marked invalid, without computing k/v: what a call
        whose tokens are all masked leaves behind (their k/v are never read). positions: [B, T]."""
        t = positions.shape[1]
        i = self.get_variable("cache", "cache_index")
        pos = self.get_variable("cache", "cached_positions")
        valid = self.get_variable("cache", "cached_valid")
        self.put_variable("cache", "cached_positions",
                          jax.lax.dynamic_update_slice(pos, positions.astype(jnp.int32), (0, i)))
        self.put_variable("cache", "cached_valid",
                          jax.lax.dynamic_update_slice(valid, jnp.zeros(positions.shape, jnp.bool_), (0, i)))
        self.put_variable("cache", "cache_index", i + t)

    def _update_cache(
        self, k: Array, v: Array, positions: Array, attention_mask: Array | None
    ) -> tuple[Array, Array, Array, Array]:
        """Writes k/v [B, T, K, Dh] at ``cache_index``; returns the full cache (k, v, positions, valid).

        On the ``init`` call the variables are only created (with length T) and the inputs are
        returned unchanged, so ``init(..., decode=True)`` on a [B, L] input allocates a length-L cache.
        """
        b, t = positions.shape
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_positions = self.variable("cache", "cached_positions", jnp.zeros, (b, t), jnp.int32)
        cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (b, t), jnp.bool_)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        valid = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(bool)
        if not is_initialized:
            return k, v, positions, valid

        max_len = cached_key.value.shape[1]
        if t > max_len:
            raise ValueError(f"decode step of {t} tokens does not fit a KV cache of length {max_len}.")
        i = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, k.astype(cached_key.value.dtype), (0, i, 0, 0)
        )
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, v.astype(cached_value.value.dtype), (0, i, 0, 0)
        )
        cached_positions.value = jax.lax.dynamic_update_slice(
            cached_positions.value, positions.astype(jnp.int32), (0, i)
        )
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid, (0, i))
        cache_index.value = i + t
        return cached_key.value, cached_value.value, cached_positions.value, cached_valid.value


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``, no biases.

    HF ``LlamaMLP``/``Qwen2MLP``: gate_proj/up_proj weight [F, D] -> kernel [D, F];
    down_proj weight [D, F] -> kernel [F, D].
    """

    intermediate_size: int
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # LoRA adapters on the projections named in lora.targets (see DenseGeneral); None = none.
    lora: LoraConfig | None = None
    quant: QuantConfig | None = None  # 4-bit gate/up/down_proj kernels (see DenseGeneral); None = fp

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, T, D] -> [B, T, D]."""
        def dense(name: str, features: int, axes: tuple[str, str]) -> DenseGeneral:
            return DenseGeneral(
                features,
                kernel_axes=axes,
                initializer_range=self.initializer_range,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
                lora=_lora_for(self.lora, name),
                quant=self.quant,
            )

        gate = dense("gate_proj", self.intermediate_size, ("embed", "mlp"))(x)
        up = dense("up_proj", self.intermediate_size, ("embed", "mlp"))(x)
        h = nn.silu(gate) * up
        h = nn.with_logical_constraint(h, (ACT_BATCH, ACT_LEN, ACT_MLP))
        return dense("down_proj", x.shape[-1], ("mlp", "embed"))(h)


class DecoderBlock(nn.Module):
    """Pre-norm decoder layer (HF ``LlamaDecoderLayer``): ``x + attn(norm(x))``, ``x + mlp(norm(x))``.

    Takes the whole ``decoder.DecoderConfig`` (its head counts, RoPE, norms, dtypes, LoRA settings
    ``config.lora`` and 4-bit base settings ``config.quant``). The block only needs positions and a key-validity mask, so a routing wrapper
    can call it on a gathered subset ``[B, k, D]`` with the subset's original positions. With
    ``return_update=True`` it returns the residual update ``Block(x) = attn + mlp`` instead of
    ``x + Block(x)`` (routed layers scale it by a gate; subtracting ``x`` afterwards would lose
    precision in bf16).
    """

    # A ``decoder.DecoderConfig`` (typed Any: decoder.py imports this module, not the reverse).
    config: Any
    return_update: bool = False

    def setup(self):
        c = self.config
        norm = lambda: RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            rope_theta=c.rope_theta,
            use_bias=c.attention_bias,
            qk_norm=c.qk_norm,
            rms_norm_eps=c.rms_norm_eps,
            initializer_range=c.initializer_range,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            lora=c.lora,
            attention_impl=c.attention_impl,
            quant=c.quant,
        )
        self.post_attention_layernorm = norm()
        self.mlp = MLP(
            c.intermediate_size,
            initializer_range=c.initializer_range,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            lora=c.lora,
            quant=c.quant,
        )

    def __call__(
        self,
        x: Array,
        positions: Array,
        attention_mask: Array | None = None,
        decode: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """x: [B, T, D]; positions: [B, T]; attention_mask: [B, T] or None -> ([B, T, D], aux={}).

        The output is ``x + Block(x)``, or ``Block(x)`` alone when ``return_update``.
        """
        x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))
        h = self.self_attn(self.input_layernorm(x), positions, attention_mask, decode)
        h_attn, x = h, x + h
        h = self.mlp(self.post_attention_layernorm(x))
        x = h_attn + h if self.return_update else x + h
        x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))
        return x, {}

    def skip_decode(self, x: Array, positions: Array) -> tuple[Array, dict[str, Array]]:
        """Decode step of a routed layer that no row chose: no compute, the KV cache records T
        masked slots (``Attention.skip_cache``) so later steps see the same cache as a masked run.
        Returns (zero update [B, T, D], {})."""
        self.self_attn.skip_cache(positions)
        return jnp.zeros_like(x), {}


class Embed(nn.Module):
    """Token embedding with an fp32-accumulated ``attend`` for tied output logits.

    HF ``model.embed_tokens.weight`` [V, D] -> ``embedding`` [V, D] (same layout).

    4-bit table (``quant`` given): no ``embedding`` param; "quant" holds ``embedding_codes`` [V, D/2]
    and ``embedding_scales`` [V, D/B] (+ double-quantisation parts), blocked along D so a lookup
    dequantises only the gathered rows; ``attend`` dequantises the whole table.
    """

    num_embeddings: int
    features: int
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant: QuantConfig | None = None  # None = fp table param; else a frozen quantised table

    def setup(self):
        shape, names = (self.num_embeddings, self.features), ("vocab", "embed")
        if self.quant is None:
            self.embedding = self.param(
                "embedding", nn.with_logical_partitioning(_normal(self.initializer_range), names),
                shape, self.param_dtype)
        else:
            self.quant.check_divisible(shape, 1, f"{self.path} embedding")
            self.embedding_quant = quant_lib.quantized_variables(
                self, "embedding", _normal(self.initializer_range), shape, self.param_dtype, names, 1, self.quant)

    def __call__(self, tokens: Array) -> Array:
        """tokens: [B, T] int -> [B, T, D] in ``dtype``."""
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}.")
        if self.quant is None:
            x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        else:
            x = quant_lib.dequantize_rows(self.embedding_quant, self.quant, tokens, self.dtype)
        return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))

    def attend(self, x: Array) -> Array:
        """x: [B, T, D] -> logits [B, T, V] float32 (inputs in ``dtype``, fp32 accumulation)."""
        if self.quant is None:
            table = self.embedding
        else:
            table = quant_lib.dequantize(self.embedding_quant, self.quant, 1)
        return jnp.einsum(
            "btd,vd->btv",
            x.astype(self.dtype),
            table.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
