"""Analytic FLOP counts (multiply-add = 2 FLOPs), checked against XLA's ``cost_analysis()``.

The routing benchmarks compare these with the compiled step's count; the two disagree mostly by
elementwise work (norms, softmax, RoPE), which the formulas leave out on purpose.
"""

from __future__ import annotations


def decoder_layer_forward_flops(cfg, tokens: int, kv_tokens: int | None = None) -> float:
    """One pre-norm decoder layer on ``tokens`` queries attending to ``kv_tokens`` keys (per sequence).

    Projections q/k/v/o, SwiGLU (gate, up, down) and the two attention matmuls (QK^T and AV). The
    attention matrix is counted in full (T x T): our kernels compute it and mask, they don't skip
    the upper triangle.
    """
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    d, h, hkv, dh, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim, cfg.intermediate_size)
    proj = 2 * tokens * d * (h * dh) * 2 + 2 * tokens * d * (hkv * dh) * 2   # q, o; k, v
    mlp = 2 * tokens * d * f * 3
    attn = 2 * tokens * kv_tokens * h * dh * 2
    return float(proj + mlp + attn)


def decoder_forward_flops(cfg, seq_len: int) -> float:
    """Whole dense decoder, one sequence: layers plus the LM head (the embedding lookup is free)."""
    layers = cfg.num_hidden_layers * decoder_layer_forward_flops(cfg, seq_len)
    head = 2 * seq_len * cfg.hidden_size * cfg.vocab_size
    return layers + head


def decoder_train_flops(cfg, batch_size: int, seq_len: int, remat: bool = False) -> float:
    """Forward + backward (2x forward) per optimizer step; +1 forward with rematerialisation."""
    return (4.0 if remat else 3.0) * batch_size * decoder_forward_flops(cfg, seq_len)


def vit_forward_flops(*, hidden_size: int, intermediate_size: int, num_layers: int, patch_size: int,
                      image_hw: tuple[int, int], num_channels: int = 3, num_prefix_tokens: int = 1,
                      swiglu: bool = False) -> float:
    """ViT encoder forward FLOPs for one image (patch embedding, layers; heads excluded).

    ViT-B/16 at 224 with a class token: 35.1 GFLOP (17.6 GMAC). Attention is counted in full
    (N x N) for the bidirectional encoder.
    """
    n = (image_hw[0] // patch_size) * (image_hw[1] // patch_size)
    tokens = n + num_prefix_tokens
    d, f = hidden_size, intermediate_size
    patch = 2 * n * (patch_size * patch_size * num_channels) * d
    mlp = 2 * tokens * d * f * (3 if swiglu else 2)
    per_layer = 2 * tokens * d * d * 4 + mlp + 2 * tokens * tokens * d * 2
    return float(patch + num_layers * per_layer)
