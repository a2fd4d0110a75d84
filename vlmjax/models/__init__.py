"""Linen model code: layers, the dense and routed decoders, LoRA and KV-cache generation.

Logical-axis rules (logical name -> mesh axis) live in ``vlmjax/sharding.py``, not here.
The ``generate`` function is imported from its module (``from vlmjax.models.generate import
generate``); it is not re-exported here so that the name keeps meaning the submodule.
"""

from vlmjax.models.decoder import Decoder, DecoderConfig, default_config, init_cache
from vlmjax.models.layers import (
    MLP,
    Attention,
    DecoderBlock,
    Embed,
    EncoderAttention,
    RMSNorm,
    apply_rope,
)
from vlmjax.models.attention import attend
from vlmjax.models.lora import LoraConfig, merge_lora
from vlmjax.models.routed_decoder import RoutedDecoder
from vlmjax.models.routing import RoutingConfig

__all__ = [
    "MLP",
    "Attention",
    "Decoder",
    "DecoderBlock",
    "DecoderConfig",
    "Embed",
    "EncoderAttention",
    "LoraConfig",
    "RMSNorm",
    "RoutedDecoder",
    "RoutingConfig",
    "apply_rope",
    "attend",
    "default_config",
    "init_cache",
    "merge_lora",
]
