"""Analytic FLOP counts (multiply-add = 2 FLOPs), checked against XLA's ``cost_analysis()``.

The routing benchmarks compare these with the compiled step's count; the two disagree mostly by
elementwise work (norms, softmax, RoPE), which the formulas leave out on purpose.
"""

from __future__ import annotations

import math

import numpy as np


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


def gated_xattn_block_forward_flops(*, hidden_size: int, num_heads: int, head_dim: int, ffn_mult: int,
                                    text_tokens: int, visual_tokens: int) -> float:
    """One Flamingo GATED XATTN-DENSE block (``vlmjax.models.fusion``), one sequence: q / out projections
    of the text queries, k / v projections of the visual tokens, the two attention matmuls (T x Nv)
    and the dense branch (D -> mult D -> D). The tanh gates are elementwise (left out)."""
    d, hd, t, nv = hidden_size, num_heads * head_dim, text_tokens, visual_tokens
    proj = 2 * t * d * hd * 2 + 2 * nv * d * hd * 2
    attn = 2 * t * nv * hd * 2
    ffn = 2 * t * d * (ffn_mult * d) * 2
    return float(proj + attn + ffn)


# ------------------------------------------------------------------------------------------------
# Routed decoders (MoD, DTF, TDTF): docs/routing.md, vlmjax/models/routed_decoder.py
# ------------------------------------------------------------------------------------------------

def capacity_tokens(capacity: float, length: int) -> int:
    """Static k = floor(capacity * T) clipped to [1, T]; the product is taken in float32 so it equals
    the traced causal budget ``floor(c * (p + 1))`` at p = T - 1 bit for bit (``routing.causal_budget``)."""
    k = int(np.floor(np.float32(capacity) * np.float32(length)))
    return int(min(length, max(1, k)))


def swiglu_head_intermediate(hidden_size: int, factor: float) -> int:
    """PriorFFN / transition-net width ``d_i = max(2, ceil(d f) + (ceil(d f) mod 2))`` (spec, DTF)."""
    c = math.ceil(hidden_size * factor)
    return max(2, c + c % 2)


def routed_layer_forward_flops(cfg, rc, role: str, seq_len: int, mode: str = "train") -> dict[str, float]:
    """Matmul FLOPs of one layer of a ``RoutedDecoder`` (one sequence of ``seq_len`` tokens), by term.

    ``role`` is one of ``rc.roles(num_layers)``: 'dense', 'decision', 'mod', 'dtf', 'tdtf'.
    ``mode='train'`` is the "topk" forward (k = floor(capacity T)); ``mode='inference'`` the "causal"
    forward, whose block runs on its static cap k_c = floor(c T) gathered tokens, c = rc.causal_fraction
    (the number actually chosen is data dependent; the compiled program always computes k_c rows).

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
    k = capacity_tokens(rc.capacity if mode == "train" else rc.causal_fraction, t)
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
    "causal" selection at the static cap k_c = floor(c T), c = rc.causal_fraction (TDTF: only those
    tokens run the block). At capacity 1.0 this is ``decoder_forward_flops`` plus the router heads.

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


# ------------------------------------------------------------------------------------------------
# Token reuse for video ViTs (ReuseViT): docs/token-reuse.md, vlmjax/models/reuse.py
# ------------------------------------------------------------------------------------------------

def vit_layer_forward_flops_terms(vit_cfg, tokens: int, kv_tokens: int | None = None) -> dict[str, float]:
    """One pre-norm ViT ``EncoderLayer`` on ``tokens`` queries attending to ``kv_tokens`` keys.

    Terms (D = hidden, F = intermediate, T = tokens, S = kv_tokens; multiply-add = 2):
      proj       q, k, v and out_proj on the T tokens: 2 T D D x 4.
      attention  QK^T and AV of the T queries against all S keys: 2 T S D x 2.
      mlp        fc1 + fc2, 2 T D F x 2 (SwiGLU ``weights_in`` [D, 2F] + ``weights_out``, or DINOv3's
                 gated gate/up/down_proj: x 3).
    Norms, softmax, activation and residual adds are elementwise and not counted.
    """
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    d, f = vit_cfg.hidden_size, vit_cfg.intermediate_size
    return {"proj": 2.0 * tokens * d * d * 4,
            "attention": 2.0 * tokens * kv_tokens * d * 2,
            "mlp": 2.0 * tokens * d * f * (3 if (getattr(vit_cfg, "use_swiglu_ffn", False)
                                                 or getattr(vit_cfg, "use_gated_mlp", False)) else 2)}


def vit_patch_embed_flops(vit_cfg, num_tokens: int) -> float:
    """Patch projection of one frame: 2 Np (p p C) D with Np = num_tokens - prefix tokens."""
    np_ = num_tokens - vit_cfg.num_prefix_tokens
    return 2.0 * np_ * vit_cfg.patch_size ** 2 * vit_cfg.num_channels * vit_cfg.hidden_size


def reuse_capacity_tokens(reuse_cfg, num_reusable: int, need: int | None = None) -> int:
    """Recompute tokens the hard path gathers in a reuse layer (``ReuseViT._reuse_layer``).

    The capacities are ``max(1, ceil(b Nr))`` for b in ``capacity_buckets``; the smallest that holds
    ``need`` recompute tokens runs (the largest when none does; the overflow is reused). ``need`` None:
    the largest bucket (with a single bucket, the static capacity every frame runs).
    """
    caps = sorted({max(1, math.ceil(b * num_reusable)) for b in reuse_cfg.capacity_buckets})
    if need is None:
        return caps[-1]
    return next((c for c in caps if c >= need), caps[-1])


def topk_capacity_bucket(fraction: float, num_reusable: int) -> float:
    """The single ``capacity_buckets`` entry whose capacity is exactly the number of tokens the
    ``topk_similarity`` policy recomputes at ``topk_reuse_fraction=fraction``:
    ``Nr - floor(fraction Nr)`` (as ``ReuseViT._decide``), written as a fraction of Nr that
    ``ceil(b Nr)`` maps back to that count despite float rounding."""
    need = max(1, num_reusable - math.floor(fraction * num_reusable))
    b = need / num_reusable
    while math.ceil(b * num_reusable) > need:
        b = math.nextafter(b, 0.0)
    return b


def reuse_vit_frame_flops(vit_cfg, reuse_cfg, num_tokens: int, recompute: dict[int, int], has_ref: bool,
                          *, num_refs: int = 1, count_decision: bool | None = None) -> dict[str, float]:
    """Matmul FLOPs of ``ReuseViT.encode_frame(mode='hard')`` for one frame (per example), by term.

    Counts what the hard path runs. N = ``num_tokens`` (prefix + patches), P = prefix tokens kept
    out of the decision (CLS + registers with ``skip_cls``, else 0), Nr = N - P reusable tokens,
    D = hidden, F = intermediate, R = ``num_refs`` allowed references, C_l = ``recompute[l]`` the
    recompute capacity gathered in reuse layer l (a static bucket size, see
    ``reuse_capacity_tokens``, or with ``execution='packed'`` the mean tokens run, a float; a
    reuse layer missing from ``recompute`` counts C_l = Nr), r_d =
    ``restoration_dim``, h_d = ``decision_hidden``:

      patch_embed     2 Np (p p C) D, always (the embedding runs for every frame).
      full_layers     ``vit_layer_forward_flops_terms(N)`` summed over layer 0, the non-reuse
                      layers and, for a frame without references (``has_ref`` False: I frame),
                      every layer.
      recompute_proj  per reuse layer of a frame with references: q, k, v, out_proj on the C_l + P
                      gathered tokens, 2 (C_l + P) D D x 4.
      recompute_attention  QK^T and AV of those C_l + P queries against ALL N keys (restored keys
                      and values of the reused tokens included), 2 (C_l + P) N D x 2.
      recompute_mlp   2 (C_l + P) D F x 2 (x 3 SwiGLU).
      similarity      local cosine vs each reference on all Nr tokens: dot products 2 Nr D R,
                      squared norms of the references 2 Nr D R and of the frame 2 Nr D, i.e.
                      2 Nr D (2R + 1) (headwise: the same sums split per head; low_rank: the
                      D -> r projection of the frame and the R references 2 Nr D r (R + 1), then the
                      cosine in r dims 2 Nr r (2R + 1)).
      restoration     on the Nr - C_l reused tokens only (the hard path restores after the decision):
                      ``restoration='mlp'``: one D -> r_d -> D MLP per restored state (h, k, v, and
                      q with ``restore_q``), 4 (Nr - C_l) D r_d per state; ``'shared_mlp'``: one
                      shared D -> r_d layer plus an r_d -> D output per state,
                      2 (Nr - C_l) D r_d (1 + states). 0 for passthrough.
      decision        decision MLP 6 -> h_d -> 2 on all Nr tokens: 2 Nr h_d (6 + 2). Counted when
                      ``count_decision`` (default: ``policy == 'mlp'``; the ``topk_similarity``
                      policy never reads the logits, so XLA removes the MLP).
      importance      CLS attention of the preceding layer feeding that decision (with
                      ``use_importance`` and a class token): q_CLS k^T over N keys, 2 N D (+ 2 D D
                      for CLS's query when the preceding layer is a hard reuse layer without
                      ``skip_cls``, which projects it separately).
    Not counted (elementwise or data movement): norms, softmax, GELU, residual adds, ``diff``,
    argmax / argsort / top_k, gather, scatter, cache writes, the pooler's layer norm. XLA's
    ``cost_analysis()`` includes those (~0.4% at ViT-B/16 size, ~4% at hidden 64;
    ``benchmarks/reuse_speed.py``, ``tests/test_reuse_flops.py``).
    Dead code XLA removes, which this count still includes: with ``restore_q`` the restored Q is
    only written to the cache (nothing reads it), so its MLP disappears unless the jitted function
    returns the ``reuse_cache``; when only ``pooled`` is returned, the last layer's ``h``
    restoration of the last processed frame disappears too. The count matches a function that
    returns ``last_hidden_state`` (or the cache).

    Args:
      vit_cfg: ``vit.ViTConfig``.
      reuse_cfg: ``reuse.ReuseConfig``.
      num_tokens: N.
      recompute: {reuse layer: C_l}.
      has_ref: the frame has references (else every layer runs in full).
      num_refs: R.
      count_decision: see ``decision``.
    Returns:
      dict term -> FLOPs (every term present, 0.0 where it does not apply).
    """
    c = reuse_cfg
    n, d = num_tokens, vit_cfg.hidden_size
    nlayers = vit_cfg.num_hidden_layers
    fixed = vit_cfg.num_prefix_tokens if c.skip_cls else 0
    nr = n - fixed
    count_decision = (c.policy == "mlp") if count_decision is None else count_decision
    reuse_layers = set(c.layers(nlayers)) if has_ref else set()
    terms = {k: 0.0 for k in ("patch_embed", "full_layers", "recompute_proj", "recompute_attention",
                              "recompute_mlp", "similarity", "restoration", "decision", "importance")}
    terms["patch_embed"] = vit_patch_embed_flops(vit_cfg, n)
    n_states = 3 + int(c.restore_q)
    for i in range(nlayers):
        if i not in reuse_layers:
            terms["full_layers"] += sum(vit_layer_forward_flops_terms(vit_cfg, n).values())
            continue
        # A static capacity (int), or a mean count over frames/examples (packed execution: float).
        cap = recompute.get(i, nr)
        if not 0 <= cap <= nr:
            raise ValueError(f"recompute[{i}]={cap} must be in [0, Nr={nr}].")
        lyr = vit_layer_forward_flops_terms(vit_cfg, cap + fixed, n)
        terms["recompute_proj"] += lyr["proj"]
        terms["recompute_attention"] += lyr["attention"]
        terms["recompute_mlp"] += lyr["mlp"]
        if c.similarity == "low_rank":
            rk = c.similarity_rank
            terms["similarity"] += 2.0 * nr * d * rk * (num_refs + 1) + 2.0 * nr * rk * (2 * num_refs + 1)
        else:
            terms["similarity"] += 2.0 * nr * d * (2 * num_refs + 1)
        if c.restoration == "mlp":
            terms["restoration"] += n_states * 4.0 * (nr - cap) * d * c.restoration_dim
        elif c.restoration == "shared_mlp":
            terms["restoration"] += (1 + n_states) * 2.0 * (nr - cap) * d * c.restoration_dim
        if count_decision:
            terms["decision"] += 2.0 * nr * c.decision_hidden * (6 + 2)
            if c.use_importance and vit_cfg.class_token:
                terms["importance"] += 2.0 * n * d
                if fixed == 0 and (i - 1) in reuse_layers:
                    terms["importance"] += 2.0 * d * d
    return terms


def vit_original_frame_flops(vit_cfg, num_tokens: int) -> dict[str, float]:
    """The original model on one frame: ``patch_embed`` and ``full_layers`` (every layer on all N
    tokens), as ``reuse_vit_frame_flops`` names them; equals ``vit_forward_flops``."""
    layer = sum(vit_layer_forward_flops_terms(vit_cfg, num_tokens).values())
    return {"patch_embed": vit_patch_embed_flops(vit_cfg, num_tokens),
            "full_layers": vit_cfg.num_hidden_layers * layer}


def _per_frame(recompute, num_frames: int) -> list[dict[int, int]]:
    if isinstance(recompute, dict):
        return [recompute] * num_frames
    recompute = list(recompute)
    if len(recompute) != num_frames:
        raise ValueError(f"recompute has {len(recompute)} per-frame entries for {num_frames} frames.")
    return recompute


def reuse_vit_clip_flops_terms(vit_cfg, reuse_cfg, num_tokens: int, num_refs, recompute,
                               count_decision: bool | None = None) -> dict[str, float]:
    """``reuse_vit_frame_flops`` summed over the frames of one clip (per example).

    Args:
      num_refs: references per frame, e.g. ``[len(r) for r in grouping.refs]`` (0 = I frame).
      recompute: {layer: C_l} for every frame with references, or one such dict per frame.
    """
    num_refs = list(num_refs)
    per = _per_frame(recompute, len(num_refs))
    total: dict[str, float] = {}
    for r, rec in zip(num_refs, per):
        for k, v in reuse_vit_frame_flops(vit_cfg, reuse_cfg, num_tokens, rec, r > 0, num_refs=max(r, 1),
                                          count_decision=count_decision).items():
            total[k] = total.get(k, 0.0) + v
    return total


def reuse_vit_clip_flops(vit_cfg, reuse_cfg, num_tokens: int, num_refs, recompute,
                         count_decision: bool | None = None) -> float:
    """Total of ``reuse_vit_clip_flops_terms``."""
    return float(sum(reuse_vit_clip_flops_terms(vit_cfg, reuse_cfg, num_tokens, num_refs, recompute,
                                                count_decision).values()))


def vit_original_clip_flops(vit_cfg, num_tokens: int, num_frames: int) -> float:
    """The original model on every frame of one clip (``ReuseViT.original_clip``), per example."""
    return float(num_frames * sum(vit_original_frame_flops(vit_cfg, num_tokens).values()))


def reuse_vit_compute_reuse(vit_cfg, reuse_cfg, num_tokens: int, num_refs, recompute) -> dict[str, float]:
    """Analytic reuse rates of one clip given the recompute capacities.

    ``layer``: mean over (frame with references, reuse layer) of 1 - C_l / Nr (what
    ``reuse.reuse_rates(...)['hard']`` averages); ``overall``: layer x token computations skipped
    over the whole clip, sum of (Nr - C_l) / (F L N), so I frames, layer 0, non-reuse layers and
    the prefix tokens count as computed.
    """
    num_refs = list(num_refs)
    per = _per_frame(recompute, len(num_refs))
    n, nlayers = num_tokens, vit_cfg.num_hidden_layers
    nr = n - (vit_cfg.num_prefix_tokens if reuse_cfg.skip_cls else 0)
    lyr = reuse_cfg.layers(nlayers)
    rates, skipped = [], 0.0
    for r, rec in zip(num_refs, per):
        if r == 0:
            continue
        for i in lyr:
            cap = rec.get(i, nr)
            rates.append(1.0 - cap / nr)
            skipped += nr - cap
    return {"layer": float(sum(rates) / len(rates)) if rates else 0.0,
            "overall": skipped / (len(num_refs) * nlayers * n)}
