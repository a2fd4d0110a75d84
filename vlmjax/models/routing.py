"""Token routing primitives and routers: route / compute / unroute, MoD, DTF and TDTF.

Spec: ``docs/routing.md``. Sources: Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258);
the DTF surprise router (reviewed in ``seeds/002-dtf-router-review.txt``, whose listed prototype bugs
are avoided here: D_st / D_ch are the squared error *divided by d*, not the L2 norm; CU uses the
causal moving average of D_st; CE has the ``log(o_ce + eps)`` term, not an additive offset; the two
criteria combine by the probabilistic OR, not a sum); Variational Predictive Routing (Zakharov et
al. 2022, arXiv 2110.11236) for the CE / CU event criteria.

The one primitive every routed layer uses (``route_compute_unroute``):

    idx [B, k]   = sort(top_k(scores masked to valid tokens, k))      static k = floor(capacity * T)
    x_sel        = x[idx]            positions keep their ORIGINAL ids (RoPE, causal mask by position)
    x[idx]      += gate[idx] * Block(x_sel)                            scatter-add, O(k d)

so the block's FLOPs scale with k, not T (checked with ``cost_analysis()`` in the tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import config_util
from vlmjax import flops as flops_lib
from vlmjax.models import layers

Array = jax.Array

ROUTER_STATE = "router_state"  # non-trainable, checkpointed Linen collection (TrainState.model_state)
KINDS = ("mod", "dtf", "tdtf")
EPS_CE = 1e-10  # spec: CE_i = D_st - (D_ch - log(o_ce + eps)), eps = 1e-10


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """Static routing hyper-parameters (hashable); the one source of the ``config.routing`` defaults
    (the spec's DTF), see ``default_config``."""

    kind: str = "dtf"            # mod | dtf | tdtf
    # Layer i is routed ("dynamic") iff i % every == offset. DTF: layer i-1 is its dense decision
    # layer. Default: layers 1, 3, 5, ... (MoD's "every other block").
    every: int = 2
    offset: int = 1
    capacity: float = 0.5        # k = floor(capacity * T) tokens per routed layer (MoD: 0.125; DTF gamma: 0.5)
    # Causal selection (evaluation, prefill, decoding): a token runs the block when its causal router
    # says so (sigmoid(logit) > 0.5) AND its row is within the running budget: at most
    # max(1, floor(c (p + 1))) chosen tokens among positions 0..p. A wanted token over budget is
    # skipped (passes through like an unchosen one): that is the overflow policy. The budget looks
    # only at earlier tokens, so one-piece, chunked and token-by-token runs choose the same tokens,
    # and a length-T forward gathers a static floor(c T). "auto": c = min(1, capacity + causal_margin)
    # (the causal router is trained towards a selection rate of `capacity`).
    causal_capacity: Any = dataclasses.field(default="auto", metadata={config_util.ANY_TYPE: True})
    causal_margin: float = 0.125
    # Warm start of a pretrained decoder (configs/*.py:pretrained). gate_forward='one': the routed
    # update is added with weight 1 in the forward pass and the gate gets its gradient straight
    # through (1 + g - sg(g)), so a routed layer does not rescale a pretrained block's output.
    gate_forward: str = "value"  # value | one
    # Fraction of training over which the capacity (and the causal budget) anneals (cosine) from 1.0
    # to `capacity`: step 0 is the dense model. 0 disables. While annealing, every token is run with
    # the unchosen ones masked (no FLOPs saved); afterwards the gathered path runs (lax.cond).
    capacity_warmup: float = 0.0
    # Initial bias of the causal router logit (and of the MoD predictor): > 0 starts with every
    # token chosen, which with capacity_warmup makes the causal model dense at step 0 too.
    causal_bias_init: float = 0.0
    mod_causal: str = "aux"      # MoD causal inference: aux (BCE on router logits) | predictor (MLP on sg(x))
    predictor_hidden: int = 0    # MoD predictor width; 0 = max(8, hidden_size // 8)
    prior_ffn_factor: float = 0.125  # DTF PriorFFN / TDTF transition width f in {0.0625, 0.125, 0.25, 0.5}
    ma_window: int = 100         # tokens in the causal moving average of D_st (VPR)
    ma_ema: float = 0.99         # momentum of the long-run mean of D_st (router_state): MA with no history
    gate: str = "prob_or"        # prob_or: G = S_CE + S_CU - S_CE*S_CU | ce_only: G = S_CE
    beta: str = "learned"        # learned (softplus(beta_raw)) | scheduled (cosine beta_start -> beta_end)
    beta_start: float = 0.1
    beta_end: float = 100.0
    d_ch: str = "mse"            # mse: (1/d)||H_post - H_prior||^2 | kl: KL of isotropic Gaussians, / d
    kl_variance: float = 1.0     # sigma^2 of the isotropic posterior and prior for d_ch=kl
    beta_ce_init: float = -0.3   # pre-softplus
    beta_cu_init: float = -0.6   # pre-softplus
    o_ce_init: float = 1.025
    m_cu_init: float = 1.1
    lambda_prior: float = 0.05   # DTF: (lambda_prior / |D|) * sum of L_prior over decision layers
    lambda_causal: float = 0.01  # causal router / MoD aux or predictor BCE (mean over routed layers)
    lambda_tpn: float = 0.05     # TDTF transition-network MSE (mean over routed layers)
    # L_prior (DTF) and L_tpn (TDTF): 'mse' (spec: (1/d)||prediction - sg(target)||^2, in residual-
    # stream units, large in a pretrained model) or 'relative' (the same divided by the batch mean of
    # (1/d)||update||^2, the update being Block(H) / dx: the fraction of the update the head fails to
    # predict; 1.0 at init whatever the model's scale).
    prior_loss: str = "mse"

    @classmethod
    def from_config(cls, cd: ml_collections.ConfigDict | Mapping[str, Any]) -> "RoutingConfig":
        """``config.routing`` -> RoutingConfig; unknown fields are an error with a did-you-mean hint."""
        return config_util.from_config(cls, cd, "config.routing")

    def validate(self, num_layers: int) -> None:
        """Raises ValueError naming the ``config.routing`` field and what it accepts."""
        choices = dict(kind=KINDS, mod_causal=("aux", "predictor"), gate=("prob_or", "ce_only"),
                       beta=("learned", "scheduled"), d_ch=("mse", "kl"), gate_forward=("value", "one"),
                       prior_loss=("mse", "relative"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config.routing.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.kind == "tdtf" and self.beta != "scheduled":
            raise ValueError("config.routing.kind='tdtf' schedules beta_ce/beta_cu (spec: not learned); "
                             "set config.routing.beta='scheduled'.")
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"config.routing.capacity={self.capacity} must be in (0, 1].")
        cc = self.causal_capacity
        if isinstance(cc, str) and cc != "auto" or not isinstance(cc, (str, int, float)) or isinstance(cc, bool):
            raise ValueError(f"config.routing.causal_capacity={cc!r}: use 'auto' or a number in (0, 1].")
        if not isinstance(cc, str) and not 0.0 < cc <= 1.0:
            raise ValueError(f"config.routing.causal_capacity={cc} must be in (0, 1] (or 'auto').")
        if not 0.0 <= self.causal_margin <= 1.0:
            raise ValueError(f"config.routing.causal_margin={self.causal_margin} must be in [0, 1].")
        if not 0.0 <= self.capacity_warmup <= 1.0:
            raise ValueError(f"config.routing.capacity_warmup={self.capacity_warmup} must be in [0, 1] "
                             "(a fraction of config.total_steps; 0 = off).")
        if self.every < 1 or not 0 <= self.offset < self.every:
            raise ValueError(f"config.routing.every={self.every}, offset={self.offset}: need every >= 1 "
                             "and 0 <= offset < every.")
        if self.kind == "dtf" and self.offset == 0:
            raise ValueError("config.routing.kind='dtf' needs a dense decision layer before each dynamic "
                             "layer: offset must be >= 1 (layer offset-1 decides for layer offset).")
        if not self.dynamic_layers(num_layers):
            raise ValueError(f"config.routing (every={self.every}, offset={self.offset}) routes none of "
                             f"the {num_layers} layers.")
        if self.ma_window < 1:
            raise ValueError(f"config.routing.ma_window={self.ma_window} must be >= 1.")
        if not 0.0 < self.prior_ffn_factor <= 1.0:
            raise ValueError(f"config.routing.prior_ffn_factor={self.prior_ffn_factor} must be in (0, 1] "
                             "(spec: 0.0625, 0.125, 0.25 or 0.5).")
        if not 0.0 <= self.ma_ema < 1.0:
            raise ValueError(f"config.routing.ma_ema={self.ma_ema} must be in [0, 1).")
        if self.o_ce_init <= 0 or self.m_cu_init <= 0 or self.kl_variance <= 0:
            raise ValueError("config.routing.o_ce_init, m_cu_init and kl_variance must be > 0.")

    @property
    def causal_fraction(self) -> float:
        """The causal budget c after warm-up: ``causal_capacity``, or capacity + margin for 'auto'."""
        if self.causal_capacity == "auto":
            return min(1.0, self.capacity + self.causal_margin)
        return float(self.causal_capacity)

    def warm(self, progress: Array) -> Array:
        """Weight of the dense start at ``progress`` (fraction of training): 1 at 0, cosine to 0 at
        ``capacity_warmup`` (0 throughout when it is off)."""
        if self.capacity_warmup <= 0:
            return jnp.zeros((), jnp.float32)
        p = jnp.clip(jnp.asarray(progress, jnp.float32) / self.capacity_warmup, 0.0, 1.0)
        return 0.5 * (1.0 + jnp.cos(jnp.pi * p))

    def annealed(self, value: float, progress: Array) -> Array:
        """``value`` annealed from 1.0 (progress 0) to ``value`` (end of capacity_warmup)."""
        return value + (1.0 - value) * self.warm(progress)

    def dynamic_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(i for i in range(num_layers) if i % self.every == self.offset)

    def roles(self, num_layers: int) -> tuple[str, ...]:
        """Per layer: 'dense', 'decision' (DTF), or the routed kind ('mod', 'dtf', 'tdtf')."""
        dyn = set(self.dynamic_layers(num_layers))
        out = []
        for i in range(num_layers):
            if i in dyn:
                out.append(self.kind)
            elif self.kind == "dtf" and i + 1 in dyn:
                out.append("decision")
            else:
                out.append("dense")
        return tuple(out)


def default_config() -> ml_collections.ConfigDict:
    """``config.routing``: which layers route and how (the ``RoutingConfig`` defaults: the spec's DTF)."""
    return config_util.config_dict(RoutingConfig)


# ------------------------------------------------------------------------------------------------
# The route / compute / unroute primitive
# ------------------------------------------------------------------------------------------------

capacity_tokens = flops_lib.capacity_tokens  # static k = floor(capacity * T) in [1, T]


def topk_indices(scores: Array, k: int, valid: Array | None = None) -> tuple[Array, Array]:
    """The k highest-scoring valid tokens per row, in ascending position order.

    Args:
        scores: [B, T] float.
        k: static number of tokens.
        valid: [B, T] bool, False for padding (never chosen while valid tokens remain).

    Returns:
        (idx [B, k] int32 ascending, picked [B, k] bool: the chosen slot is a valid token; only False
        when a row has fewer than k valid tokens).
    """
    s = scores.astype(jnp.float32)
    if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
    _, idx = jax.lax.top_k(s, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    picked = (jnp.ones(idx.shape, jnp.bool_) if valid is None
              else jnp.take_along_axis(valid.astype(jnp.bool_), idx, axis=1))
    return idx, picked


def first_k_indices(selected: Array, k: int) -> tuple[Array, Array]:
    """The first k selected tokens per row (by position), ascending. A token's inclusion depends only
    on tokens before it, so the cap keeps causal decisions causal.

    Args:
        selected: [B, T] bool.

    Returns:
        (idx [B, k] int32 ascending, picked [B, k] bool: the slot holds a selected token).
    """
    t = selected.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)
    key = jnp.where(selected, pos, t + pos)  # selected tokens first, each group by position
    _, idx = jax.lax.top_k(-key, k)
    idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
    return idx, jnp.take_along_axis(selected, idx, axis=1)


def causal_budget(wants: Array, positions: Array, capacity: Array | float,
                  count0: Array | None = None) -> tuple[Array, Array]:
    """The causal selection with a running budget (``RoutingConfig.causal_capacity``).

    Token t is chosen iff ``wants[t]`` and fewer than ``b_t = max(1, floor(c (p_t + 1)))`` tokens of
    its row were chosen before it (p_t its position id; ``count0`` chosen before this chunk). The
    count obeys ``n_t = min(n_{t-1} + w_t, b_t)`` (b is non-decreasing), whose closed form
    ``n_t = W_t + min(n_0, cummin_s<=t (b_s - W_s))`` (W = cumsum w) needs no scan.

    Args:
        wants: [B, T] bool, the router's decisions (padding already False).
        positions: [B, T] int position ids (non-decreasing along each row).
        capacity: c in (0, 1], Python float or traced scalar.
        count0: [B] int32 tokens chosen earlier in the stream (decode cache), default 0.

    Returns:
        (chosen [B, T] bool, count [B] int32 chosen so far including this chunk). Over a length-T
        sequence from position 0, at most ``capacity_tokens(c, T)`` tokens are chosen.
    """
    b = wants.shape[0]
    w = wants.astype(jnp.int32)
    n0 = jnp.zeros((b,), jnp.int32) if count0 is None else count0.astype(jnp.int32)
    # float32 product, as in capacity_tokens: the last budget equals the static k exactly.
    budget = jnp.floor(jnp.asarray(capacity, jnp.float32) * (positions + 1).astype(jnp.float32))
    budget = jnp.maximum(budget.astype(jnp.int32), 1)
    cw = jnp.cumsum(w, axis=1)
    n = cw + jnp.minimum(n0[:, None], jax.lax.cummin(budget - cw, axis=1))
    prev = jnp.concatenate([n0[:, None], n[:, :-1]], axis=1)
    return n > prev, n[:, -1]


def rank_mask(scores: Array, k: Array | int, valid: Array | None = None) -> Array:
    """[B, T] bool: the ``k`` highest-scoring valid tokens per row, ``k`` possibly traced (the
    capacity warm-up), ties broken by position like ``jax.lax.top_k``."""
    s = scores.astype(jnp.float32)
    if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-s, axis=-1, stable=True), axis=-1, stable=True)
    out = rank < k
    return out if valid is None else out & valid.astype(jnp.bool_)


def straight_through_one(gate: Array) -> Array:
    """1 in the forward pass, d/d gate = identity in the backward pass (``gate_forward='one'``)."""
    return 1.0 + gate - jax.lax.stop_gradient(gate)


def gather_tokens(x: Array, idx: Array) -> Array:
    """x: [B, T, ...], idx: [B, k] -> [B, k, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def scatter_add_tokens(x: Array, idx: Array, update: Array) -> Array:
    """x: [B, T, D] with ``update`` [B, k, D] added at rows ``idx`` [B, k] (distinct per row)."""
    return jax.vmap(lambda xb, ib, ub: xb.at[ib].add(ub.astype(xb.dtype)))(x, idx, update)


def indices_to_mask(idx: Array, picked: Array, length: int) -> Array:
    """[B, k] indices (+ validity) -> [B, T] bool mask of the chosen tokens."""
    hot = jax.nn.one_hot(idx, length, dtype=jnp.bool_) & picked[..., None]
    return jnp.any(hot, axis=1)


BlockFn = Callable[[Array, Array, Array | None, bool], tuple[Array, Any]]


def route_compute_unroute(block: BlockFn, x: Array, positions: Array, attention_mask: Array | None,
                          idx: Array, picked: Array, gate: Array) -> tuple[Array, Array]:
    """Runs ``block`` on the chosen tokens only and adds their gated update back.

    Args:
        block: ``block(x [B, k, D], positions [B, k], key_valid [B, k], decode=False) -> (update, aux)``,
            a ``DecoderBlock`` with ``return_update=True``.
        x: [B, T, D] residual stream.
        positions: [B, T] original position ids (the chosen tokens keep them).
        attention_mask: [B, T] (1 real, 0 padding) or None.
        idx, picked: [B, k] from ``topk_indices`` / ``first_k_indices``.
        gate: [B, k] weight of each chosen token's update (MoD: router logit; DTF: G_cont).

    Returns:
        (x + scatter(gate * Block(x[idx])) [B, T, D], update [B, k, D] ungated).
    """
    update, key_valid = compute_routed(block, x, positions, attention_mask, idx, picked)
    weight = (gate * key_valid).astype(update.dtype)[..., None]
    return scatter_add_tokens(x, idx, update * weight), update


def routed_update(block: BlockFn, x: Array, positions: Array, attention_mask: Array | None, idx: Array,
                  picked: Array) -> Array:
    """compute + unroute without the gate: ``Block(x[idx])`` scattered back to [B, T, D], zero on the
    tokens not chosen (the routed decoder multiplies by its gate, or by 1 with a straight-through
    gate, outside)."""
    update, key_valid = compute_routed(block, x, positions, attention_mask, idx, picked)
    return scatter_add_tokens(jnp.zeros_like(x), idx, update * key_valid[..., None].astype(update.dtype))


def compute_routed(block: BlockFn, x: Array, positions: Array, attention_mask: Array | None, idx: Array,
                   picked: Array) -> tuple[Array, Array]:
    """The "compute" half: ``block`` on the gathered tokens with their original positions.

    Returns (update [B, k, D] ungated, key_valid [B, k] bool: picked and not padding).
    """
    key_valid = picked
    if attention_mask is not None:
        key_valid = key_valid & gather_tokens(attention_mask.astype(jnp.bool_), idx)
    update, _ = block(gather_tokens(x, idx), gather_tokens(positions, idx), key_valid, False)
    return update, key_valid


def masked_compute(block: BlockFn, x: Array, positions: Array, attention_mask: Array | None,
                   selected: Array, gate: Array, decode: bool) -> tuple[Array, Array]:
    """Decoding form of the same layer: every token runs, but only ``selected`` ones are keys (so
    only they write valid K/V into the cache) and only their update is added. On the selected
    tokens it equals ``route_compute_unroute`` (same keys, same positions).

    Returns (x + selected * gate * Block(x) [B, T, D], update [B, T, D]).
    """
    valid = selected if attention_mask is None else selected & attention_mask.astype(jnp.bool_)
    update, _ = block(x, positions, valid, decode)
    weight = (gate * valid).astype(update.dtype)[..., None]
    return x + update * weight, update


# ------------------------------------------------------------------------------------------------
# Surprise statistics (DTF / TDTF)
# ------------------------------------------------------------------------------------------------

def mean_sq(a: Array, b: Array | None = None) -> Array:
    """(1/d) ||a - b||^2 over the last axis in fp32: [B, T, d] -> [B, T] (squared, divided by d)."""
    diff = a.astype(jnp.float32) if b is None else a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=-1)


def causal_moving_average(values: Array, valid: Array, window: int, hist_values: Array,
                          hist_valid: Array) -> tuple[Array, Array, Array, Array]:
    """Mean of the previous ``window`` slots' values (token i excluded), O(T) by cumulative sums.

    Slots are positions of the stream; invalid slots (padding, tokens without a value) are left out
    of the mean. ``hist_*`` are the last ``window`` slots of the stream before this chunk, so a
    sequence fed in chunks gets the same averages as in one piece.

    Args:
        values: [B, T] float (stop-gradient D_st).
        valid: [B, T] bool.
        window: W.
        hist_values, hist_valid: [B, W] the stream's previous W slots (oldest first).

    Returns:
        (ma [B, T] (0 where the window holds no valid slot), count [B, T] valid slots in the window,
         new_hist_values [B, W], new_hist_valid [B, W]).
    """
    b, t = values.shape
    v = jnp.concatenate([hist_values.astype(jnp.float32), values.astype(jnp.float32)], axis=1)
    m = jnp.concatenate([hist_valid, valid], axis=1).astype(jnp.float32)
    v = v * m
    zero = jnp.zeros((b, 1), jnp.float32)
    cs_v = jnp.concatenate([zero, jnp.cumsum(v, axis=1)], axis=1)  # [B, W+T+1]; cs[j] = sum of slots < j
    cs_m = jnp.concatenate([zero, jnp.cumsum(m, axis=1)], axis=1)
    # Token i sits in slot W+i; its window is slots [i, W+i).
    total = cs_v[:, window:window + t] - cs_v[:, :t]
    count = cs_m[:, window:window + t] - cs_m[:, :t]
    ma = total / jnp.maximum(count, 1.0)
    return ma, count, v[:, t:], m[:, t:].astype(jnp.bool_)


def softplus_inverse(y: float) -> float:
    return float(y + math.log(-math.expm1(-y)))


def scheduled_beta(progress: Array, start: float, end: float) -> Array:
    """Cosine ramp from ``start`` (progress 0) to ``end`` (progress 1)."""
    p = jnp.clip(progress.astype(jnp.float32), 0.0, 1.0)
    return start + (end - start) * 0.5 * (1.0 - jnp.cos(jnp.pi * p))


def surprise_gate(d_st: Array, d_ch: Array, ma: Array, *, beta_ce: Array, beta_cu: Array, o_ce: Array,
                  m_cu: Array, gate: str) -> dict[str, Array]:
    """CE / CU criteria and the continuous gate (spec; VPR eqs. for the event criteria).

        CE   = D_st - (D_ch - log(o_ce + eps))
        CU   = D_st - m_cu * MA(D_st)
        S_CE = sigmoid(beta_ce * CE),  S_CU = sigmoid(beta_cu * CU)   (betas already positive)
        G    = S_CE + S_CU - S_CE * S_CU   (probabilistic OR; 'ce_only': G = S_CE)

    All inputs [B, T] (scalars broadcast). Returns a dict of [B, T] arrays.
    """
    ce = d_st - (d_ch - jnp.log(o_ce + EPS_CE))
    cu = d_st - m_cu * ma
    s_ce = jax.nn.sigmoid(beta_ce * ce)
    s_cu = jax.nn.sigmoid(beta_cu * cu)
    g = s_ce + s_cu - s_ce * s_cu if gate == "prob_or" else s_ce
    return {"ce": ce, "cu": cu, "s_ce": s_ce, "s_cu": s_cu, "g_cont": g}


def bce_with_logits(logits: Array, targets: Array, valid: Array) -> Array:
    """Mean binary cross-entropy over valid tokens. logits, targets, valid: [B, T]."""
    loss = jnp.logaddexp(0.0, logits) - logits * targets  # = softplus(x) - x * y
    w = valid.astype(jnp.float32)
    return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1.0)


def masked_mean(x: Array, valid: Array) -> Array:
    w = valid.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * w) / jnp.maximum(jnp.sum(w), 1.0)


def decision_stats(pred: Array, target: Array, valid: Array) -> dict[str, Array]:
    """Accuracy / precision / recall of boolean ``pred`` against ``target`` ([B, T]) on valid tokens."""
    v = valid.astype(jnp.float32)
    p, t = pred.astype(jnp.float32) * v, target.astype(jnp.float32) * v
    tp = jnp.sum(p * t)
    return {
        "causal_acc": jnp.sum((pred == target).astype(jnp.float32) * v) / jnp.maximum(jnp.sum(v), 1.0),
        "causal_precision": tp / jnp.maximum(jnp.sum(p), 1.0),
        "causal_recall": tp / jnp.maximum(jnp.sum(t), 1.0),
    }


# ------------------------------------------------------------------------------------------------
# Router modules
# ------------------------------------------------------------------------------------------------

class SwiGLUHead(nn.Module):
    """RMSNorm then a bias-free SwiGLU MLP (the spec's PriorFFN; TDTF's transition network).

    Intermediate size ``d_i = max(2, ceil(d f) + (ceil(d f) mod 2))``; weights N(0, 0.02^2).
    """

    factor: float
    eps: float = 1e-6
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [B, T, D] -> [B, T, D]."""
        d = x.shape[-1]
        c = math.ceil(d * self.factor)
        inter = max(2, c + c % 2)
        h = layers.RMSNorm(eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return layers.MLP(inter, initializer_range=self.initializer_range, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="mlp")(h)


class CausalRouter(nn.Module):
    """logit_t = w^T [RMSNorm(x_t); RMSNorm(x_{t-1})] + b on stop-gradient inputs (x_{-1} = 0);
    b starts at ``bias_init`` (``routing.causal_bias_init``)."""

    bias_init: float = 0.0
    eps: float = 1e-6
    initializer_range: float = 0.02
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, x_prev: Array) -> Array:
        """x, x_prev: [B, T, D] -> logits [B, T] fp32."""
        norm = lambda name: layers.RMSNorm(eps=self.eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                                           name=name)
        h = jnp.concatenate([norm("norm_cur")(jax.lax.stop_gradient(x)),
                             norm("norm_prev")(jax.lax.stop_gradient(x_prev))], axis=-1)
        logit = layers.DenseGeneral(1, kernel_axes=(None, None), initializer_range=self.initializer_range,
                                    dtype=jnp.float32, param_dtype=self.param_dtype, name="proj")(h)
        bias = self.param("bias", nn.initializers.constant(self.bias_init), (), self.param_dtype)
        return logit[..., 0] + bias


class MoDRouter(nn.Module):
    """MoD router ``r_i = w^T x_i`` (no bias) and, for ``mod_causal='predictor'``, a small MLP on
    stop-gradient inputs predicting the top-k decision (Raposo et al. 2024, Sec. 3.5)."""

    predictor: bool
    predictor_hidden: int
    bias_init: float = 0.0  # of the predictor's output (routing.causal_bias_init)
    initializer_range: float = 0.02
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array | None]:
        """x: [B, T, D] -> (router logits [B, T] fp32, predictor logits [B, T] or None)."""
        r = layers.DenseGeneral(1, kernel_axes=("embed", None), initializer_range=self.initializer_range,
                                dtype=jnp.float32, param_dtype=self.param_dtype, name="router")(x)[..., 0]
        if not self.predictor:
            return r, None
        h = layers.DenseGeneral(self.predictor_hidden, kernel_axes=("embed", None),
                                initializer_range=self.initializer_range, use_bias=True, dtype=jnp.float32,
                                param_dtype=self.param_dtype, name="predictor_in")(jax.lax.stop_gradient(x))
        p = layers.DenseGeneral(1, kernel_axes=(None, None), initializer_range=self.initializer_range,
                                use_bias=True, dtype=jnp.float32, param_dtype=self.param_dtype,
                                name="predictor_out")(nn.silu(h))[..., 0]
        return r, p + self.bias_init


class SurpriseRouter(nn.Module):
    """Per dynamic layer: the DTF PriorFFN (or TDTF transition network), the criterion parameters,
    the causal router and the long-run mean of D_st (``router_state``).

    Parameters (all fp32 scalars unless noted): ``beta_ce_raw``/``beta_cu_raw`` (learned beta only;
    beta = softplus(raw)), ``o_ce_raw``/``m_cu_raw`` (o_ce = softplus(raw), m_cu = softplus(raw): kept
    positive), ``prior_ffn/...`` (DTF) or ``transition/...`` (TDTF), ``causal/...``.
    """

    rc: RoutingConfig
    eps: float = 1e-6
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        rc = self.rc
        head = SwiGLUHead(rc.prior_ffn_factor, eps=self.eps, initializer_range=0.02, dtype=self.dtype,
                          param_dtype=self.param_dtype)
        if rc.kind == "dtf":
            self.prior_ffn = head
        else:
            self.transition = head
        scalar = lambda v: (lambda *_: jnp.asarray(v, jnp.float32))
        if rc.beta == "learned":
            self.beta_ce_raw = self.param("beta_ce_raw", scalar(rc.beta_ce_init))
            self.beta_cu_raw = self.param("beta_cu_raw", scalar(rc.beta_cu_init))
        self.o_ce_raw = self.param("o_ce_raw", scalar(softplus_inverse(rc.o_ce_init)))
        self.m_cu_raw = self.param("m_cu_raw", scalar(softplus_inverse(rc.m_cu_init)))
        self.causal = CausalRouter(bias_init=rc.causal_bias_init, eps=self.eps,
                                   initializer_range=self.initializer_range, param_dtype=self.param_dtype)
        self.d_st_ema = self.variable(ROUTER_STATE, "d_st_ema", lambda: jnp.zeros((), jnp.float32))
        self.d_st_ema_weight = self.variable(ROUTER_STATE, "d_st_ema_weight",
                                             lambda: jnp.zeros((), jnp.float32))

    def predict(self, x: Array) -> Array:
        """DTF: H_prior = H + PriorFFN(RMSNorm(H)); TDTF: dx_hat = TPN(state). [B, T, D] -> [B, T, D]."""
        if self.rc.kind == "dtf":
            return x + self.prior_ffn(x)
        return self.transition(x)

    def route_logits(self, x: Array, x_prev: Array) -> Array:
        return self.causal(x, x_prev)

    def parameters(self, progress: Array) -> dict[str, Array]:
        rc = self.rc
        if rc.beta == "learned":
            beta_ce, beta_cu = jax.nn.softplus(self.beta_ce_raw), jax.nn.softplus(self.beta_cu_raw)
        else:
            beta_ce = beta_cu = scheduled_beta(progress, rc.beta_start, rc.beta_end)
        return {"beta_ce": beta_ce, "beta_cu": beta_cu, "o_ce": jax.nn.softplus(self.o_ce_raw),
                "m_cu": jax.nn.softplus(self.m_cu_raw)}

    def ma_fallback(self) -> Array:
        """Long-run mean of D_st (scalar; NaN-free 0 before any training update)."""
        w = self.d_st_ema_weight.value
        return jnp.where(w > 0, self.d_st_ema.value / jnp.maximum(w, 1e-12), 0.0)

    def has_history(self) -> Array:
        return self.d_st_ema_weight.value > 0

    def update_ema(self, d_st: Array, valid: Array) -> None:
        """Training only (``router_state`` mutable): EMA of the batch mean of stop-gradient D_st."""
        if self.is_initializing() or not self.is_mutable_collection(ROUTER_STATE):
            return
        m = self.rc.ma_ema
        mean = masked_mean(jax.lax.stop_gradient(d_st), valid)
        self.d_st_ema.value = m * self.d_st_ema.value + (1 - m) * mean
        self.d_st_ema_weight.value = m * self.d_st_ema_weight.value + (1 - m)
