"""Text towers of two-tower contrastive models: CLIP (causal, EOS pooling) and SigLIP (bidirectional).

Both are pre-norm transformer encoders with learned absolute position embeddings, biased q/k/v/out
projections, a two-layer MLP and a final LayerNorm (HF ``CLIPTextModel`` / ``SiglipTextModel``):

    x = token_embedding[ids] + position_embedding[:T]
    x = x + attn(layer_norm1(x));  x = x + fc2(act(fc1(layer_norm2(x))))      (num_hidden_layers x)
    h = final_layer_norm(x)

They differ in the attention mask and the pooled output:

- ``variant="clip"``: causal self-attention (the original CLIP text transformer is a causal LM
  body); ``pooler_output`` is ``h`` at the end-of-text token, found exactly as HF 5.x does: with
  the legacy ``eos_token_id == 2`` of pre-#24773 configs, at ``argmax(input_ids)`` (the EOT token
  had the largest id); otherwise at the FIRST position where ``input_ids == eos_token_id`` (padding
  may reuse the EOS id). A row without that token pools position 0, as HF.
- ``variant="siglip"``: bidirectional attention; ``pooler_output = head(h[:, -1])``, the LAST
  position whether or not it is padding (SigLIP is trained on max-length padded text).

Parameter tree (HF ``CLIPTextModel`` / ``SiglipTextModel`` names in brackets; ``D`` hidden, ``H``
heads, ``Dh = D / H``, ``F`` intermediate, ``P`` max positions, ``V`` vocab, ``E`` SigLIP
projection size; HF ``nn.Linear`` weights are ``[out, in]``):

    token_embedding/embedding          [V, D]      [embeddings.token_embedding.weight]
    position_embedding                 [P, D]      [embeddings.position_embedding.weight]
    layers_{i}/layer_norm1/{scale,bias}  [D]       [encoder.layers.{i}.layer_norm1.{weight,bias}]
    layers_{i}/self_attn/q_proj/kernel [D, H, Dh]  [encoder.layers.{i}.self_attn.q_proj.weight.T]
    layers_{i}/self_attn/q_proj/bias   [H, Dh]     [encoder.layers.{i}.self_attn.q_proj.bias]
        (k_proj, v_proj alike)
    layers_{i}/self_attn/out_proj/kernel [H, Dh, D] [encoder.layers.{i}.self_attn.out_proj.weight.T]
    layers_{i}/self_attn/out_proj/bias [D]         [encoder.layers.{i}.self_attn.out_proj.bias]
    layers_{i}/layer_norm2/{scale,bias}  [D]       [encoder.layers.{i}.layer_norm2.{weight,bias}]
    layers_{i}/mlp/fc1/{kernel [D, F], bias [F]}   [encoder.layers.{i}.mlp.fc1.{weight.T,bias}]
    layers_{i}/mlp/fc2/{kernel [F, D], bias [D]}   [encoder.layers.{i}.mlp.fc2.{weight.T,bias}]
    final_layer_norm/{scale,bias}      [D]         [final_layer_norm.{weight,bias}]
    head/{kernel [D, E], bias [E]}                 [head.{weight.T,bias}]        (SigLIP only)

Parameters are ``param_dtype`` (fp32); activations ``dtype``; LayerNorm and the attention softmax
run in fp32. Config field names are the HF ``config.json`` names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax import config_util
from vlmjax.models import attention as attention_lib
from vlmjax.models import layers
from vlmjax.models.layers import ACT_BATCH, ACT_EMBED, ACT_LEN

Array = jax.Array

VARIANTS = ("clip", "siglip")
# HF legacy CLIP configs (before transformers PR #24773) carry eos_token_id=2 and pool at argmax(ids).
LEGACY_CLIP_EOS_TOKEN_ID = 2


quick_gelu = layers.quick_gelu
ACTIVATIONS = layers.ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Static text-tower hyper-parameters (hashable: a Linen attribute). Defaults: CLIP ViT-B/32 text."""

    variant: str = "clip"  # "clip": causal + EOS pooling | "siglip": bidirectional + last token + head
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # CLIP pooling token (2 = legacy: pool at argmax(input_ids)); unused by SigLIP.
    eos_token_id: int = 49407
    # SigLIP ``head`` output size (HF ``projection_size``); 0 = hidden_size. Unused by CLIP.
    projection_size: int = 0
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # What the backward pass recomputes per layer: a ``layers.REMAT_POLICIES`` name; True/False mean
    # 'full'/'none'.
    remat: Any = dataclasses.field(default="none", metadata={config_util.ANY_TYPE: True})
    attention_impl: str = "auto"  # attention backend (``attention.IMPLEMENTATIONS``)

    def __post_init__(self):
        object.__setattr__(self, "dtype", layers.parse_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", layers.parse_dtype("param_dtype", self.param_dtype))
        object.__setattr__(self, "remat", layers.parse_remat("remat", self.remat))
        if self.variant == "siglip" and self.projection_size == 0:
            object.__setattr__(self, "projection_size", self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def causal(self) -> bool:
        return self.variant == "clip"

    def validate(self) -> None:
        """Raises ValueError naming the offending field and what it accepts."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not a text tower; use one of {VARIANTS}.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}).")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                             f"{sorted(ACTIVATIONS)}.")
        if self.variant == "clip" and (not isinstance(self.eos_token_id, int)
                                       or isinstance(self.eos_token_id, bool)):
            raise ValueError(f"eos_token_id must be one integer for CLIP EOS pooling, got "
                             f"{self.eos_token_id!r}.")
        if self.variant == "siglip" and self.projection_size <= 0:
            raise ValueError(f"projection_size must be > 0, got {self.projection_size!r}.")
        attention_lib.validate_implementation("attention_impl", self.attention_impl)
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}.")


LayerNorm = layers.LayerNorm


# Biased q/k/v/out projections, no RoPE; the mask decides causal vs bidirectional. The same module as
# the ViT towers' (``vit.VisionAttention``), so both keep the HF CLIPAttention param names.
EncoderAttention = layers.EncoderAttention

EncoderMLP = layers.EncoderMLP


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer (HF ``CLIPEncoderLayer``): ``x + attn(ln1(x))``, ``x + mlp(ln2(x))``."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, x: Array, kv_valid: Array | None) -> tuple[Array, dict[str, Array]]:
        """x: [B, T, D]; kv_valid: [B, T] bool (False = padding key) or None -> ([B, T, D], aux={}).

        Causal (CLIP) or bidirectional (SigLIP) by ``config.causal``. A query row with no visible
        key (only with left padding under the causal mask) attends uniformly instead of producing
        NaN; HF's output differs there, at padding positions only."""
        c = self.config
        norm = lambda name: LayerNorm(eps=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                                      name=name)
        x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))
        h = EncoderAttention(num_heads=c.num_attention_heads, head_dim=c.head_dim, hidden_size=c.hidden_size,
                             initializer_range=c.initializer_range, dtype=c.dtype,
                             param_dtype=c.param_dtype, attention_impl=c.attention_impl,
                             name="self_attn")(norm("layer_norm1")(x), causal=c.causal, kv_valid=kv_valid)
        x = x + h
        h = EncoderMLP(c.intermediate_size, c.hidden_act, initializer_range=c.initializer_range,
                       dtype=c.dtype, param_dtype=c.param_dtype, name="mlp")(norm("layer_norm2")(x))
        x = x + h
        return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED)), {}


def clip_eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """input_ids: [B, T] -> [B] int32 pooling position of each row, exactly as HF ``CLIPTextModel``.

    ``eos_token_id == 2`` (legacy configs): ``argmax(input_ids)``, the first largest id (CLIP's EOT
    49407 is the largest id of its vocabulary). Otherwise the first position holding
    ``eos_token_id`` (0 when a row has none). ``jnp.argmax`` returns the first maximum, as torch.
    """
    if eos_token_id == LEGACY_CLIP_EOS_TOKEN_ID:
        return jnp.argmax(input_ids.astype(jnp.int32), axis=-1).astype(jnp.int32)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


class TextEncoder(nn.Module):
    """CLIP / SigLIP text transformer; see the module docstring for the math and the param tree."""

    config: TextEncoderConfig

    def setup(self):
        c = self.config
        c.validate()
        self.token_embedding = layers.Embed(num_embeddings=c.vocab_size, features=c.hidden_size,
                                            initializer_range=c.initializer_range, dtype=c.dtype,
                                            param_dtype=c.param_dtype)
        # Learned absolute positions; the position axis is never sharded (max 77 / 64 rows).
        self.position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), (None, "embed")),
            (c.max_position_embeddings, c.hidden_size),
            c.param_dtype,
        )
        # Both layer inputs (x, kv_valid) are arrays (or None), so remat needs no static_argnums.
        block = layers.remat(EncoderLayer, c.remat)
        self.layers = [block(c) for _ in range(c.num_hidden_layers)]
        self.final_layer_norm = LayerNorm(eps=c.layer_norm_eps, dtype=jnp.float32,
                                          param_dtype=c.param_dtype)
        if c.variant == "siglip":
            # HF head.weight [E, D] -> kernel [D, E]; fp32 accumulation and output (a pooled embedding).
            self.head = layers.DenseGeneral(c.projection_size, kernel_axes=("embed", None),
                                            use_bias=True, initializer_range=c.initializer_range,
                                            dtype=c.dtype, param_dtype=c.param_dtype,
                                            preferred_element_type=jnp.float32)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None
                 ) -> tuple[dict[str, Array], dict[str, Array]]:
        """Encodes token ids.

        Args:
            input_ids: [B, T] int token ids, T <= max_position_embeddings.
            attention_mask: [B, T], 1 = real token, 0 = padding (padding keys are never attended);
                None = no padding.

        Returns:
            ({"last_hidden_state": [B, T, D] in ``dtype`` (after final_layer_norm),
              "pooler_output": [B, D] (CLIP: EOS token) or [B, E] (SigLIP: head of last token),
              float32}, aux flat dict with keys ``layers_{i}/<name>``; empty for these dense towers).
        """
        c = self.config
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}.")
        b, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(f"Sequence length {t} exceeds max_position_embeddings="
                             f"{c.max_position_embeddings}; truncate the text to at most that.")
        # HF CLIPTextEmbeddings: token_embedding(ids) + position_embedding(arange(T)).
        x = self.token_embedding(input_ids)
        x = x + self.position_embedding[:t].astype(c.dtype)[None]
        x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LEN, ACT_EMBED))
        valid = None if attention_mask is None else attention_mask.astype(jnp.bool_)
        aux: dict[str, Array] = {}
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, valid)
            aux.update({f"layers_{i}/{k}": v for k, v in layer_aux.items()})
        h = self.final_layer_norm(x)  # [B, T, D] float32
        if c.variant == "clip":
            idx = clip_eos_positions(input_ids, c.eos_token_id)
            pooled = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
        else:
            pooled = self.head(h[:, -1])
        last = nn.with_logical_constraint(h.astype(c.dtype), (ACT_BATCH, ACT_LEN, ACT_EMBED))
        return {"last_hidden_state": last, "pooler_output": pooled.astype(jnp.float32)}, aux
