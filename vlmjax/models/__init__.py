"""Linen model code: layers, the dense decoder and KV-cache generation.

Logical-axis rules (logical name -> mesh axis) live in ``vlmjax/sharding.py``, not here.
"""

from vlmjax.models.decoder import Decoder, DecoderConfig, default_config, init_cache
from vlmjax.models.generate import generate, sample_logits, top_p_filter
from vlmjax.models.layers import (
    MLP,
    Attention,
    DecoderBlock,
    Embed,
    RMSNorm,
    apply_rope,
    attention_mask_from_positions,
    dot_product_attention,
)

__all__ = [
    "MLP",
    "Attention",
    "Decoder",
    "DecoderBlock",
    "DecoderConfig",
    "Embed",
    "RMSNorm",
    "apply_rope",
    "attention_mask_from_positions",
    "default_config",
    "dot_product_attention",
    "generate",
    "init_cache",
    "sample_logits",
    "top_p_filter",
]
