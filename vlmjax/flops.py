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
