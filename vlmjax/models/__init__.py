"""Linen model code: layers, the dense and routed decoders, LoRA and KV-cache generation, alignment
heads (Perceiver resampler, attention pooling, Matryoshka) and contrastive losses.

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
from vlmjax.models.contrastive import clip_loss, embedding_bytes, mrl_loss, retrieval_metrics, siglip_loss
from vlmjax.models.lora import LoraConfig, merge_lora
from vlmjax.models.resampler import (
    AttentionPool,
    MatryoshkaHead,
    PerceiverResampler,
    ProjectionHead,
    mrl_embeddings,
    pool_tokens,
)
from vlmjax.models.routed_decoder import RoutedDecoder
from vlmjax.models.routing import RoutingConfig

__all__ = [
    "MLP",
    "Attention",
    "AttentionPool",
    "Decoder",
    "DecoderBlock",
    "DecoderConfig",
    "Embed",
    "EncoderAttention",
    "LoraConfig",
    "MatryoshkaHead",
    "PerceiverResampler",
    "ProjectionHead",
    "RMSNorm",
    "RoutedDecoder",
    "RoutingConfig",
    "apply_rope",
    "attend",
    "clip_loss",
    "default_config",
    "embedding_bytes",
    "init_cache",
    "merge_lora",
    "mrl_embeddings",
    "mrl_loss",
    "pool_tokens",
    "retrieval_metrics",
    "siglip_loss",
]
