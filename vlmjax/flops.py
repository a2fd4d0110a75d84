"""Analytic FLOP counts (multiply-add = 2 FLOPs), checked against XLA's ``cost_analysis()``.

The routing benchmarks compare these with the compiled step's count; the two disagree mostly by
elementwise work (norms, softmax, RoPE), which the formulas leave out on purpose.
"""

from __future__ import annotations

import math


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


# ------------------------------------------------------------------------------------------------
# Routed decoders (MoD, DTF, TDTF): shared/specs/routing.md, vlmjax/models/routed_decoder.py
# ------------------------------------------------------------------------------------------------

def _capacity_tokens(capacity: float, length: int) -> int:
    """Static k = floor(capacity * T) clipped to [1, T] (as ``routing.capacity_tokens``)."""
    return int(min(length, max(1, math.floor(capacity * length))))


def swiglu_head_intermediate(hidden_size: int, factor: float) -> int:
    """PriorFFN / transition-net width ``d_i = max(2, ceil(d f) + (ceil(d f) mod 2))`` (spec, DTF)."""
    c = math.ceil(hidden_size * factor)
    return max(2, c + c % 2)


def routed_layer_forward_flops(cfg, rc, role: str, seq_len: int, mode: str = "train") -> dict[str, float]:
    """Matmul FLOPs of one layer of a ``RoutedDecoder`` (one sequence of ``seq_len`` tokens), by term.

    ``role`` is one of ``rc.roles(num_layers)``: 'dense', 'decision', 'mod', 'dtf', 'tdtf'.
    ``mode='train'`` is the "topk" forward (k = floor(capacity T)); ``mode='inference'`` the "causal"
    forward, whose block runs on its static cap k_c = floor(causal_capacity T) gathered tokens (the
    number actually chosen is data dependent; the compiled program always computes k_c rows).

    Terms (d = hidden, T = seq_len, d_i = ``swiglu_head_intermediate(d, prior_ffn_factor)``):
      block        ``decoder_layer_forward_flops(cfg, n)`` on the n tokens the block sees: T for
                   dense / decision / TDTF-train (teacher), k or k_c for routed layers; attention
                   is counted in full n x n among the gathered tokens.
      router       MoD: ``r = w^T x`` on all T tokens, 2 T d (+ predictor MLP 2 T d h + 2 T h for
                   ``mod_causal='predictor'``, h = predictor_hidden or max(8, d // 8)).
      causal       DTF / TDTF causal router ``w^T [RMSNorm(x_t); RMSNorm(x_{t-1})]``: 2 T (2d).
      prior_ffn    DTF decision layer: PriorFFN SwiGLU (gate, up, down) on all T tokens, 6 T d d_i.
      transition   TDTF routed layer: transition net (same SwiGLU head) on all T tokens, 6 T d d_i;
                   it runs in both modes (D_ch needs dx_hat for every token).
    Not counted (elementwise or data movement): norms, RoPE, softmax, the surprise criteria, the
    moving average, top_k / sort, gather and scatter-add. ``benchmarks/routing_flops.py`` reports how
    far XLA's count (which includes them) is from this.

    Returns:
        dict term -> FLOPs (terms absent for the role are omitted).
    """
    if mode not in ("train", "inference"):
        raise ValueError(f"mode={mode!r}: use 'train' (top-k forward) or 'inference' (causal forward).")
    t, d = seq_len, cfg.hidden_size
    k = _capacity_tokens(rc.capacity if mode == "train" else rc.causal_capacity, t)
    d_i = swiglu_head_intermediate(d, rc.prior_ffn_factor)
    swiglu_head = 2.0 * t * d * d_i * 3
    causal_router = 2.0 * t * (2 * d)
    if role == "dense":
        return {"block": decoder_layer_forward_flops(cfg, t)}
    if role == "decision":
        return {"block": decoder_layer_forward_flops(cfg, t), "prior_ffn": swiglu_head}
    if role == "mod":
        out = {"block": decoder_layer_forward_flops(cfg, k), "router": 2.0 * t * d}
        if rc.mod_causal == "predictor":
            h = rc.predictor_hidden or max(8, d // 8)
            out["router"] += 2.0 * t * d * h + 2.0 * t * h
        return out
    if role == "dtf":
        return {"block": decoder_layer_forward_flops(cfg, k), "causal": causal_router}
    if role == "tdtf":
        # Training: the teacher runs the dense block on every token; inference: only the chosen ones.
        n = t if mode == "train" else k
        return {"block": decoder_layer_forward_flops(cfg, n), "causal": causal_router,
                "transition": swiglu_head}
    raise ValueError(f"role={role!r} is not one of 'dense', 'decision', 'mod', 'dtf', 'tdtf'.")


def routed_decoder_forward_flops_terms(cfg, rc, seq_len: int, mode: str = "train") -> dict[str, float]:
    """``routed_decoder_forward_flops`` split into terms summed over layers: ``block`` (all decoder
    blocks), ``router``, ``causal``, ``prior_ffn``, ``transition`` (see ``routed_layer_forward_flops``)
    and ``lm_head`` (2 T d V)."""
    terms = {"block": 0.0, "router": 0.0, "causal": 0.0, "prior_ffn": 0.0, "transition": 0.0}
    for role in rc.roles(cfg.num_hidden_layers):
        for name, v in routed_layer_forward_flops(cfg, rc, role, seq_len, mode).items():
            terms[name] += v
    terms["lm_head"] = 2.0 * seq_len * cfg.hidden_size * cfg.vocab_size
    return terms


def routed_decoder_forward_flops(cfg, rc, seq_len: int, mode: str = "train") -> float:
    """Forward FLOPs of a ``RoutedDecoder`` for one sequence (matmuls; multiply-add = 2).

    Sum over layers of ``routed_layer_forward_flops`` plus the LM head (2 T d V); the embedding lookup
    is free. ``mode='train'``: "topk" selection (MoD / DTF blocks on k = floor(capacity T) tokens; TDTF
    runs the dense teacher block on all T plus its transition net and router). ``mode='inference'``:
    "causal" selection at the static cap k_c = floor(causal_capacity T) (TDTF: only those tokens run
    the block). At capacity 1.0 this is ``decoder_forward_flops`` plus the router heads.

    Args:
        cfg: ``DecoderConfig``.
        rc: ``routing.RoutingConfig``.
        seq_len: T.
        mode: 'train' | 'inference'.
    """
    return float(sum(routed_decoder_forward_flops_terms(cfg, rc, seq_len, mode).values()))


def routed_decoder_train_flops(cfg, rc, batch_size: int, seq_len: int, remat: bool = False) -> float:
    """Forward + backward (2x forward) of the training ("topk") forward per optimizer step, as
    ``decoder_train_flops``; +1 forward with rematerialisation.

    The backward of the stop-gradient router inputs (causal router, MoD predictor) is skipped by
    autodiff, so this slightly overcounts them (O(T d) per routed layer and sequence: negligible).
    """
    return (4.0 if remat else 3.0) * batch_size * routed_decoder_forward_flops(cfg, rc, seq_len, "train")
