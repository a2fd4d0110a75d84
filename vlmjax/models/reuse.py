"""Inter-frame token reuse for video ViTs (ReuseViT).

Hwang et al., "Deja Vu: Efficient Video-Language Query Engine with Learning-based Inter-Frame
Computation Reuse", PVLDB 18(10), 2025 (arXiv 2506.14107); spec ``docs/token-reuse.md`` (with
the pitfalls of the PyTorch prototype that must not come back).

A CLIP / SigLIP / DINOv2 ViT (``vit.VisionTransformer``, same parameter names, so HF checkpoints
load unchanged) embeds the frames of a clip one at a time in a codec-like order (``Grouping``).
In every reuse layer (never layer 0) each reusable token (patch tokens; CLS and registers stay
fixed with ``skip_cls``) may take its state from the same spatial position of an already processed
reference frame instead of being recomputed:

    sim     = max over allowed references r of cos(x_cur[p], x_r[p])       (local similarity)
    inputs  = [importance, sim, compressed_map, ref_type(3)]              (decision MLP, 6 -> 2)
    restored_t = cached_t[r*, p] + MLP_t(x_cur[p] - x_r*[p]),  t in {h, k, v (, q)}
    out     = g_reuse * restored + g_recompute * recomputed

``importance`` is the attention CLS pays the token in the preceding layer, summed over heads. The
gate ``g`` is a Gumbel-softmax of the log-softmax of the decision logits at temperature tau
(straight-through hard optional); evaluation uses a hard argmax.

Two execution paths share every parameter:
- ``mode='soft'`` (training): every token is computed and mixed by the gate, so gradients reach
  the decision and restoration MLPs. Keys and values of the mixed tokens are mixed too, so the
  recomputed tokens attend to exactly what the hard path gives them.
- ``mode='hard'`` (inference): decisions first; only the recompute tokens run q/k/v, attention
  (against the whole frame's keys, restored ones included) and the MLP, and only the reused ones
  their restoration MLPs; the results are scattered into the restored states. This is what saves
  FLOPs. ``execution='packed'`` (default) packs the batch's recompute tokens into a ragged list run
  in chunks by a loop of dynamic length (``packed_map``), so every example runs exactly its own
  decisions; ``execution='bucket'`` gathers them to one static capacity for the batch (the smallest
  of ``capacity_buckets`` that holds the busiest example, via ``nn.switch``). With the same
  decisions the paths agree (tested). ``StreamingEncoder`` runs it one frame per call (online video).

Why Q is not restored by default: a reused token's output ``h`` is restored, so its query is never
read (it does not attend). ``restore_q=True`` restores and caches Q as in the brief's layout, at
one more restoration MLP per reused token.

Caches live in the ``reuse_cache`` Linen collection (never params, never differentiated through
the optimizer): per reuse layer, per frame slot, the layer input, output ``h``, K, V (and Q) of the
reusable tokens only, so no token can ever reference CLS. ``filled`` marks slots written, so a
frame can only reference frames processed before it. A clip is encoded in one ``apply`` with
``mutable=['reuse_cache']`` (training; gradients then flow through the cache from later frames to
earlier ones), or frame by frame for streaming by carrying the collection between calls.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from einops import einsum, rearrange

from vlmjax import config_util
from vlmjax.models import layers, vit

Array = jax.Array

REUSE_CACHE = "reuse_cache"
SIMILARITIES = ("local_cosine", "low_rank", "headwise")
RESTORATIONS = ("mlp", "shared_mlp", "passthrough")
POLICIES = ("mlp", "topk_similarity")
MODES = ("soft", "hard")
EXECUTIONS = ("packed", "bucket")
NUM_REF_TYPES = 3  # I / P / B (vlmjax.data.video.REF_TYPES)
_BIG = 1e4


@dataclasses.dataclass(frozen=True)
class ReuseConfig:
    """Static reuse hyper-parameters (hashable Linen attribute); the one source of the
    ``config.reuse`` defaults (``default_config``)."""

    # Layers whose tokens may reuse; () = every layer but 0 (layer 0 never reuses).
    reuse_layers: tuple[int, ...] = ()
    # CLS (and DINOv2 registers) are split off before the decision and always recomputed.
    skip_cls: bool = True
    similarity: str = "local_cosine"   # local_cosine | low_rank | headwise
    similarity_rank: int = 64          # low_rank: project to r dims (learned, no bias) first
    # Decision MLP inputs that can be switched off (their input is then 0).
    use_importance: bool = True
    use_compressed_map: bool = True
    decision_hidden: int = 64
    decision_init_std: float = 1e-3    # spec: weights N(0, 0.001), zero bias
    policy: str = "mlp"                # mlp | topk_similarity (reuse the most similar fraction; no training)
    topk_reuse_fraction: float = 0.5   # topk_similarity only
    tau: float = 0.025                 # Gumbel-softmax temperature
    tau_end: float = 0.0               # > 0: linear schedule tau -> tau_end over training
    hard_gumbel: bool = False          # straight-through: one-hot forward, soft gradient
    # mlp (one D -> r -> D MLP per state, the spec) | shared_mlp (one shared D -> r layer, an
    # r -> D output per state: 2/3 of the FLOPs) | passthrough (cached states as they are)
    restoration: str = "mlp"
    restoration_dim: int = 64          # D -> 64 -> D, no bias
    restore_q: bool = False            # see module docstring
    # Hard path execution:
    # - 'packed' (default): every example (and frame) runs exactly the tokens its decisions
    #   recompute. The batch's recompute tokens (and, separately, its reused tokens for restoration)
    #   are packed into one ragged list and processed in chunks of ``chunk_tokens`` by a loop whose
    #   trip count is ceil(count / chunk_tokens): executed reuse == decided reuse, and the only
    #   extra compute is the last chunk's padding (< chunk_tokens tokens per layer and frame for the
    #   whole batch). Inference only (the loop has a dynamic trip count: not reverse-differentiable).
    # - 'bucket': one static capacity per (layer, frame) for the whole batch, the smallest of
    #   ``capacity_buckets`` that holds the busiest example's recompute tokens (``nn.switch``);
    #   the other examples recompute padding tokens too. Static shapes, so XLA's cost analysis
    #   counts it exactly (the FLOPs benchmarks use it with a single bucket).
    execution: str = "packed"
    chunk_tokens: int = 16
    # 'bucket': static capacities (fraction of the reusable tokens) to gather recompute tokens
    # into; the smallest that holds every batch row's recompute tokens is run. If the largest is
    # < 1, tokens beyond it are reused anyway (reported as overflow).
    capacity_buckets: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0)

    @classmethod
    def from_config(cls, cfg) -> ReuseConfig:
        """``config.reuse`` -> ReuseConfig; unknown fields are an error with a did-you-mean hint."""
        return config_util.from_config(cls, cfg, "config.reuse")

    def layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.reuse_layers) if self.reuse_layers else tuple(range(1, num_layers))

    def validate(self, num_layers: int) -> None:
        """Raises ValueError naming the field and what it accepts."""
        for name, allowed in (("similarity", SIMILARITIES), ("restoration", RESTORATIONS), ("policy", POLICIES),
                              ("execution", EXECUTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config.reuse.{name}={getattr(self, name)!r}; use one of {allowed}.")
        lyr = self.layers(num_layers)
        if 0 in lyr:
            raise ValueError("config.reuse.reuse_layers contains 0: layer 0 never reuses (its input is the "
                             "patch embedding; there is nothing cheaper to restore from).")
        bad = [i for i in lyr if not 0 < i < num_layers]
        if bad or len(set(lyr)) != len(lyr):
            raise ValueError(f"config.reuse.reuse_layers={lyr} must be distinct layers in [1, {num_layers - 1}].")
        buckets = self.capacity_buckets
        if not buckets or any(not 0 < b <= 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"config.reuse.capacity_buckets={buckets} must be increasing fractions in (0, 1].")
        if not 0 <= self.topk_reuse_fraction < 1:
            raise ValueError(f"config.reuse.topk_reuse_fraction={self.topk_reuse_fraction} must be in [0, 1).")
        if not self.tau > 0 or self.tau_end < 0:
            raise ValueError(f"config.reuse.tau={self.tau} must be > 0 and tau_end={self.tau_end} >= 0.")
        for name in ("similarity_rank", "decision_hidden", "restoration_dim", "chunk_tokens"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"config.reuse.{name} must be a positive integer.")


def default_config() -> ml_collections.ConfigDict:
    """The ``config.reuse`` section (the model's ``ReuseConfig`` defaults); ``config.reuse_loss``
    is ``loss_config()``."""
    return config_util.config_dict(ReuseConfig)


def loss_config() -> ml_collections.ConfigDict:
    """``config.reuse_loss``: the spec's ReuseLoss weights."""
    return ml_collections.ConfigDict(dict(
        sloss_scaler=1.0,
        # One weight per layer for the LAST len(hloss_scaler) layers, earliest first.
        hloss_scaler=(0.0, 1.5),
        rloss_scaler=0.35,
        target_reuse_rate=0.5,
        max_layer_rate=0.95,         # per-layer rates are capped before averaging (spec)
        # The rate rloss reads: 'argmax_st' (noise-free decisions, straight-through; see
        # reuse.reuse_rates) or 'gate' (the mean Gumbel gate).
        rate_estimator="argmax_st",
        # Optional per-token MSE on the last layer's patch tokens (the brief's fix for patch drift).
        patch_mse_scaler=0.0,
    ))


@dataclasses.dataclass(frozen=True)
class Grouping:
    """The static frame schedule of a clip (``vlmjax.data.video.frame_grouping``).

    order: frame indices in processing order; refs[f]: frames f may reference (all processed
    before f); ref_type[f]: one-hot I/P/B role. Static, so each frame's reference set and whether it
    can reuse at all are known at trace time (I frames run the plain layers).
    """

    order: tuple[int, ...]
    refs: tuple[tuple[int, ...], ...]
    ref_type: tuple[tuple[float, ...], ...]

    @classmethod
    def from_arrays(cls, process_order, ref_mask, ref_type) -> Grouping:
        """process_order [F], ref_mask [F, F] bool, ref_type [F, 3] (one example's, numpy)."""
        order = tuple(int(i) for i in np.asarray(process_order))
        mask = np.asarray(ref_mask, bool)
        refs = tuple(tuple(int(j) for j in np.flatnonzero(mask[f])) for f in range(mask.shape[0]))
        seen: set[int] = set()
        for f in order:
            if not set(refs[f]) <= seen:
                raise ValueError(f"ref_mask lets frame {f} reference {sorted(set(refs[f]) - seen)}, which are "
                                 f"not processed before it in order {order}.")
            seen.add(f)
        return cls(order, refs, tuple(tuple(float(v) for v in row) for row in np.asarray(ref_type)))

    @property
    def num_frames(self) -> int:
        return len(self.order)


# ------------------------------------------------------------------------------------------------
# Pure pieces (NumPy-checked in tests)
# ------------------------------------------------------------------------------------------------

def cosine(a: Array, b: Array, eps: float = 1e-6) -> Array:
    """Cosine similarity over the last axis (fp32)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    num = jnp.sum(a * b, -1)
    return num / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)


def gumbel_gate(logits: Array, tau: Array | float, rng: Array | None, hard: bool) -> Array:
    """Gate [..., 2] (reuse, recompute) from decision logits [..., 2].

    ``rng`` given: Gumbel-softmax ``softmax((log_softmax(logits) + G) / tau)`` (Jang et al. 2017),
    straight-through one-hot forward with ``hard``. ``rng`` None (evaluation): hard argmax.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    if rng is None:
        return jax.nn.one_hot(jnp.argmax(logp, -1), 2, dtype=jnp.float32)
    g = jax.random.gumbel(rng, logp.shape, jnp.float32)
    soft = jax.nn.softmax((logp + g) / tau, -1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, -1), 2, dtype=jnp.float32)
    return one_hot + soft - jax.lax.stop_gradient(soft)


def scheduled_tau(cfg: ReuseConfig, progress: Array | float | None) -> Array:
    """tau, or the linear schedule tau -> tau_end at training progress in [0, 1]."""
    if not cfg.tau_end or progress is None:
        return jnp.asarray(cfg.tau, jnp.float32)
    p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
    return cfg.tau + (cfg.tau_end - cfg.tau) * p


def cls_importance(q_cls: Array, k: Array) -> Array:
    """How much CLS attends to each token, summed over heads.

    q_cls: [B, H, Dh]; k: [B, N, H, Dh] -> [B, N] fp32 (sums to H over N).
    """
    logits = einsum(q_cls.astype(jnp.float32), k.astype(jnp.float32), "b h d, b n h d -> b h n")
    return jax.nn.softmax(logits * q_cls.shape[-1] ** -0.5, -1).sum(1)


def _take_tokens(x: Array, idx: Array) -> Array:
    """x [B, N, ...], idx [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _put_tokens(base: Array, idx: Array, new: Array, valid: Array) -> Array:
    """base [B, N, ...] with rows idx [B, K] replaced by new [B, K, ...] where valid [B, K]."""
    new = jnp.where(valid.reshape(valid.shape + (1,) * (new.ndim - 2)), new, _take_tokens(base, idx))
    return jax.vmap(lambda b, i, n: b.at[i].set(n))(base, idx, new.astype(base.dtype))


def packed_map(fn, select: Array, chunk: int, init: dict[str, Array]) -> tuple[dict[str, Array], Array]:
    """Runs ``fn`` on the selected rows only, ``chunk`` rows at a time: a ragged gather with real savings.

    The selected rows of ``select`` [M] are packed first (ascending row order) and a loop of
    ceil(count / chunk) iterations (a dynamic trip count, so unselected rows cost nothing) calls
    ``fn(idx [chunk])`` -> {name: [chunk, ...]} and writes the results into ``init[name]`` [M, ...]
    at those rows. The last chunk's unused slots run ``fn`` on row 0 and their results are dropped
    (an out-of-range scatter index with mode='drop'). Returns (outputs, rows run incl. that padding).
    Inference only: the loop is not reverse-differentiable.
    """
    m = select.shape[0]
    count = select.sum().astype(jnp.int32)
    order = jnp.argsort(~select, stable=True).astype(jnp.int32)  # selected rows first, ascending
    order = jnp.concatenate([order, jnp.zeros(((-m) % chunk,), jnp.int32)])
    n_chunks = (count + chunk - 1) // chunk

    def body(j, out):
        start = j * chunk
        idx = jax.lax.dynamic_slice(order, (start,), (chunk,))
        dest = jnp.where(start + jnp.arange(chunk) < count, idx, m)  # padding -> dropped
        new = fn(idx)
        return {k: out[k].at[dest].set(new[k].astype(out[k].dtype), mode="drop") for k in out}
    return jax.lax.fori_loop(0, n_chunks, body, dict(init)), n_chunks * chunk


def reuse_loss(pooled, pooled_orig, hidden, hidden_orig, patch, patch_orig, rates, example_mask, cfg):
    """The spec's ReuseLoss (targets are stop-gradient outputs of the original model).

    Args:
      pooled, pooled_orig: [B, F, Dp] pooled embeddings with / without reuse.
      hidden, hidden_orig: lists (one per hloss layer, earliest first) of [B, F, N, D].
      patch, patch_orig: [B, F, Np, D] last-layer patch tokens (for the optional MSE).
      rates: [L_reuse] soft reuse rate per reuse layer (mean gate over reusable tokens of frames
        with references).
      example_mask: [B] 1 for real clips.
      cfg: ``loss_config()``.
    Returns:
      (loss, terms dict).
    """
    m = example_mask.astype(jnp.float32)
    denom = jnp.maximum(m.sum(), 1.0)
    mean_b = lambda v: jnp.sum(v * m) / denom
    sg = jax.lax.stop_gradient
    # 1 - min over frames of cos(pooled, pooled_original).
    pooled_cos = cosine(pooled, sg(pooled_orig))  # [B, F]
    sloss = mean_b(1.0 - pooled_cos.min(-1))
    terms = {"sloss": sloss, "pooled_cos": mean_b(pooled_cos.mean(-1)),
             "pooled_cos_min": mean_b(pooled_cos.min(-1))}
    loss = cfg.sloss_scaler * sloss
    for j, (scale, h, ho) in enumerate(zip(cfg.hloss_scaler, hidden, hidden_orig)):
        cos = cosine(h, sg(ho)).mean(-1)  # [B, F], mean over all tokens
        hl = mean_b(1.0 - cos.min(-1))
        terms[f"hloss_{j}"] = hl
        loss = loss + scale * hl
    capped = jnp.minimum(rates, cfg.max_layer_rate)
    rloss = jax.nn.relu(cfg.target_reuse_rate - capped.mean()) if rates.size else jnp.zeros(())
    terms["rloss"] = rloss
    loss = loss + cfg.rloss_scaler * rloss
    mse = jnp.mean((patch.astype(jnp.float32) - sg(patch_orig).astype(jnp.float32)) ** 2, axis=(1, 2, 3))
    terms["patch_mse"] = mean_b(mse)
    if cfg.patch_mse_scaler:
        loss = loss + cfg.patch_mse_scaler * terms["patch_mse"]
    terms["patch_cos"] = mean_b(cosine(patch, sg(patch_orig)).mean((1, 2)))
    return loss, terms


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class _MLP(nn.Module):
    """Dense -> GELU -> Dense (no bias unless ``bias``); ``out_init_std=0`` zero-inits the output."""

    hidden: int
    out: int
    init_std: float
    out_init_std: float
    bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = layers.DenseGeneral(self.hidden, kernel_axes=(None, None), use_bias=self.bias,
                                initializer_range=self.init_std, dtype=jnp.float32, name="fc1")(x)
        return layers.DenseGeneral(self.out, kernel_axes=(None, None), use_bias=self.bias,
                                   initializer_range=self.out_init_std, dtype=jnp.float32,
                                   name="fc2")(jax.nn.gelu(h))


class ReuseModule(nn.Module):
    """Per-layer reuse decision, restoration and cache (the brief's ``ReuseModule``).

    Parameters: ``decision`` (6 -> decision_hidden -> 2, N(0, decision_init_std), zero bias),
    ``restore_{h,k,v[,q]}`` (D -> restoration_dim -> D, no bias; output zero-initialised so an
    untrained module restores exactly the cached state; ``restoration='shared_mlp'`` shares one
    ``restore_in`` D -> restoration_dim layer and keeps a ``restore_{t}`` output layer per state),
    ``low_rank`` (D -> r, low_rank only).
    Cache (``reuse_cache``): x, h, k, v[, q] [B, S, Nr, D] and filled [B, S], created on first write.
    """

    config: ReuseConfig
    vit_config: vit.ViTConfig
    num_slots: int

    def setup(self):
        c, d = self.config, self.vit_config.hidden_size
        self.decision = _MLP(c.decision_hidden, 2, c.decision_init_std, c.decision_init_std, bias=True)
        dense = lambda f, std: layers.DenseGeneral(f, kernel_axes=(None, None), initializer_range=std,
                                                   dtype=jnp.float32)
        if c.similarity == "low_rank":
            self.low_rank = dense(c.similarity_rank, d**-0.5)
        if c.restoration == "mlp":
            for t in self.targets:
                setattr(self, f"restore_{t}", _MLP(c.restoration_dim, d, 0.02, 0.0))
        elif c.restoration == "shared_mlp":
            self.restore_in = dense(c.restoration_dim, 0.02)
            for t in self.targets:
                setattr(self, f"restore_{t}", dense(d, 0.0))

    @property
    def targets(self) -> tuple[str, ...]:
        return ("h", "k", "v") + (("q",) if self.config.restore_q else ())

    def _cache(self, name: str, shape, dtype=jnp.float32) -> Array:
        value = self.get_variable(REUSE_CACHE, name)
        return jnp.zeros(shape, dtype) if value is None else value

    def __call__(self, x: Array, refs: tuple[int, ...], importance: Array, cmap: Array,
                 ref_type: tuple[float, ...]) -> dict[str, Array]:
        """Decision inputs and logits of the reusable tokens of one frame, and their references.

        Args:
          x: [B, Nr, D] layer input of the reusable tokens.
          refs: static slots this frame may reference (non-empty).
          importance: [B, Nr] CLS attention in the preceding layer.
          cmap: [B, Nr] compressed_map (change energy).
          ref_type: this frame's one-hot role (3,).
        Returns:
          dict: logits [B, Nr, 2] (reuse, recompute), sim [B, Nr] (max over references),
          cached {h, k, v[, q]} [B, Nr, D] of the most similar reference, diff [B, Nr, D] = x - x_ref,
          valid [B, Nr] (some reference was written; else the token must recompute).
        """
        c, v = self.config, self.vit_config
        b, nr, d = x.shape
        shape = (b, self.num_slots, nr, d)
        slots = jnp.asarray(refs, jnp.int32)
        xr = self._cache("x", shape)[:, slots]  # [B, R, Nr, D]
        if c.similarity == "local_cosine":
            sim = cosine(x[:, None], xr)
        elif c.similarity == "low_rank":
            sim = cosine(self.low_rank(x)[:, None], self.low_rank(xr))
        else:  # headwise: mean over heads of the per-head cosine
            split = lambda t: rearrange(t, "... (h d) -> ... h d", h=v.num_attention_heads)
            sim = cosine(split(x)[:, None], split(xr)).mean(-1)
        # [B, R, Nr]: only references that were written (processed before this frame) count.
        filled = self._cache("filled", (b, self.num_slots), jnp.bool_)[:, slots]
        sim = jnp.where(filled[:, :, None], sim, -2.0)
        best = jnp.argmax(sim, axis=1)  # [B, Nr] index into refs
        max_sim = jnp.max(sim, axis=1)
        pick = lambda t: jnp.take_along_axis(t, best[:, None, :, None], axis=1)[:, 0]  # [B, R, Nr, D] -> [B, Nr, D]
        cached = {t: pick(self._cache(t, shape)[:, slots]) for t in self.targets}
        feats = [importance if c.use_importance else jnp.zeros_like(max_sim), max_sim,
                 cmap if c.use_compressed_map else jnp.zeros_like(max_sim)]
        feats = jnp.stack(feats, -1).astype(jnp.float32)
        feats = jnp.concatenate([feats, jnp.broadcast_to(jnp.asarray(ref_type, jnp.float32), (b, nr, 3))], -1)
        if self.is_initializing():  # create the restoration params even if no token is ever restored
            self.restore(cached, x.astype(jnp.float32) - pick(xr))
        # A token whose references are all unwritten (a frame streamed out of order) must recompute.
        return {"logits": self.decision(feats), "sim": max_sim, "cached": cached,
                "diff": x.astype(jnp.float32) - pick(xr), "valid": max_sim > -1.5}

    def restore(self, cached: dict[str, Array], diff: Array) -> dict[str, Array]:
        """``cached_t + MLP_t(diff)`` for t in h, k, v (, q): rows [..., D] of any subset of tokens."""
        c = self.config
        if c.restoration == "passthrough":
            return dict(cached)
        if c.restoration == "shared_mlp":
            hidden = jax.nn.gelu(self.restore_in(diff))
            return {t: cached[t] + getattr(self, f"restore_{t}")(hidden) for t in self.targets}
        return {t: cached[t] + getattr(self, f"restore_{t}")(diff) for t in self.targets}

    def store(self, slot: int, x: Array, states: dict[str, Array]) -> None:
        """Writes this frame's reusable-token states ([B, Nr, D] each) into cache slot ``slot``."""
        b, nr, d = x.shape
        for t in ("x",) + self.targets:
            value = x if t == "x" else states[t]
            old = self._cache(t, (b, self.num_slots, nr, d))
            self.put_variable(REUSE_CACHE, t, old.at[:, slot].set(value.astype(old.dtype)))
        filled = self._cache("filled", (b, self.num_slots), jnp.bool_)
        self.put_variable(REUSE_CACHE, "filled", filled.at[:, slot].set(True))


class ReuseViT(vit.VisionTransformer):
    """A ``VisionTransformer`` (same params) plus ``reuse_{i}`` modules on the reuse layers.

    ``__call__`` (inherited) is the original per-image model. ``encode_clip`` runs a clip with reuse;
    ``encode_frame`` is one step of it (streaming); ``original_clip`` gives the targets.
    """

    reuse_config: ReuseConfig = ReuseConfig()
    num_slots: int = 8

    def setup(self):
        if self.config.scan_layers:
            raise ValueError("Token reuse runs its layers one by one (per-layer decisions and caches): set "
                             "--config.model.scan_layers=False.")
        if self.config.variant == "dinov3":
            # Its layers rotate q/k with RoPE tables of the full token grid; the reuse paths project
            # gathered subsets of tokens without them (and would silently drop the rotation).
            raise ValueError("Token reuse supports the clip, siglip and dinov2 towers; variant='dinov3' (RoPE "
                             "positions) is not wired into the gathered-token paths yet: use another tower.")
        super().setup()
        self.reuse_config.validate(self.config.num_hidden_layers)
        self.reuse = {i: ReuseModule(self.reuse_config, self.config, self.num_slots)
                      for i in self.reuse_config.layers(self.config.num_hidden_layers)}

    @property
    def _fixed(self) -> int:
        """Tokens before the reusable ones (CLS + registers with skip_cls)."""
        return self.config.num_prefix_tokens if self.reuse_config.skip_cls else 0

    # ---- original model ------------------------------------------------------------------------
    def original_frame(self, pixels: Array) -> tuple[dict[str, Array], list[Array]]:
        """pixels [B, H, W, C] -> (outputs, [output of every layer] each [B, N, D])."""
        x = self.embed(pixels)
        hiddens = []
        for layer in self.layers:
            x, _ = layer(x)
            hiddens.append(x)
        return self.outputs(x), hiddens

    def original_clip(self, frames: Array, keep_hidden: tuple[int, ...] = ()) -> dict[str, Any]:
        """frames [B, F, H, W, C] -> pooled [B, F, Dp], last_hidden_state [B, F, N, D],
        hidden {l: [B, F, N, D]} for l in keep_hidden (each frame encoded alone)."""
        b = frames.shape[0]
        out, hiddens = self.original_frame(rearrange(frames, "b f h w c -> (b f) h w c"))
        unflat = lambda t: rearrange(t, "(b f) ... -> b f ...", b=b)
        return {"pooled": unflat(_pooled(out)), "last_hidden_state": unflat(out["last_hidden_state"]),
                "hidden": {l: unflat(hiddens[l]) for l in keep_hidden}}

    # ---- reuse ----------------------------------------------------------------------------------
    def encode_frame(self, pixels: Array, slot: int, refs: tuple[int, ...], ref_type: tuple[float, ...],
                     cmap: Array | None = None, *, mode: str = "soft", rng: Array | None = None,
                     tau: Array | float | None = None, keep_hidden: tuple[int, ...] = (),
                     forced: dict[int, Array] | None = None) -> tuple[dict[str, Array], dict[str, Any]]:
        """Encodes one frame with reuse from earlier frames in the cache, and caches it in ``slot``.

        Args:
          pixels: [B, H, W, C].
          slot: static cache slot of this frame (its index in the clip).
          refs: static slots it may reference (empty: an I frame, every layer runs in full).
          ref_type: one-hot I/P/B role (3,).
          cmap: optional [B, Np] compressed_map / change energy of the patches (0 when None).
          mode: 'soft' (all tokens computed and mixed) or 'hard' (gather the recompute tokens).
          rng: Gumbel noise key (soft training); None: hard argmax decisions.
          tau: Gumbel temperature (default config.tau).
          keep_hidden: layers whose output to return.
          forced: {layer: [B, Nr] bool reuse decisions} overriding the policy (tests, ablations).
        Returns:
          (outputs dict with pooled [B, Dp], last_hidden_state [B, N, D], hidden {l: [B, N, D]};
           stats {layer: dict(gate [B, Nr] reuse gate, reused [B] hard fraction, overflow [B])}).
        """
        c = self.reuse_config
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; use one of {MODES}.")
        tau = c.tau if tau is None else tau
        x = self.embed(pixels)
        fixed = self._fixed
        nr = x.shape[1] - fixed
        if cmap is None:
            cmap = jnp.zeros((x.shape[0], nr), jnp.float32)
        elif cmap.shape[1] != nr:  # prefix tokens (skip_cls=False) carry no codec signal
            cmap = jnp.concatenate([jnp.zeros((x.shape[0], nr - cmap.shape[1]), cmap.dtype), cmap], 1)
        importance = None
        hidden, stats = {}, {}
        for i, layer in enumerate(self.layers):
            module = self.reuse.get(i)
            if module is None or not refs:
                q, k, v = layer.qkv(x)
                h = layer.finish(x, layer.attend(q, k, v))
                if module is not None:
                    module.store(slot, x[:, fixed:], {"h": h[:, fixed:], "k": _merge_heads(k[:, fixed:]),
                                                      "v": _merge_heads(v[:, fixed:]), "q": _merge_heads(q[:, fixed:])})
                q_cls, k_all = q[:, 0], k
            else:
                imp = importance[:, fixed:] if importance is not None else jnp.zeros(cmap.shape, jnp.float32)
                dec = module(x[:, fixed:], refs, imp, cmap, ref_type)
                h, q_cls, k_all, st = self._reuse_layer(i, layer, module, x, dec, slot, mode, rng, tau,
                                                        None if forced is None else forced.get(i))
                stats[i] = st
            if self.config.class_token:
                importance = cls_importance(q_cls, k_all)
            x = h
            if i in keep_hidden:
                hidden[i] = h
        out = self.outputs(x)
        return {"pooled": _pooled(out), "last_hidden_state": out["last_hidden_state"], "hidden": hidden}, stats

    def _decide(self, dec, mode, rng, tau, forced):
        """-> (gate [B, Nr, 2] (reuse, recompute), margin [B, Nr] = recompute preference)."""
        c = self.reuse_config
        logits, sim = dec["logits"], dec["sim"]
        if forced is not None:
            gate = jax.nn.one_hot(jnp.where(forced, 0, 1), 2, dtype=jnp.float32)
            return gate, jnp.where(forced, -1.0, 1.0)
        if c.policy == "topk_similarity":
            # Reuse the floor(r Nr) most similar tokens of every frame (a fixed-rate baseline policy).
            k = int(math.floor(c.topk_reuse_fraction * sim.shape[1]))
            rank = jnp.argsort(jnp.argsort(-sim, axis=1), axis=1)  # 0 = most similar
            reuse = rank < k
            return jax.nn.one_hot(jnp.where(reuse, 0, 1), 2, dtype=jnp.float32), -sim
        margin = logits[..., 1] - logits[..., 0]
        if mode == "hard":
            rng = None
        return gumbel_gate(logits, tau, rng, c.hard_gumbel), margin

    def _reuse_layer(self, i, layer, module, x, dec, slot, mode, rng, tau, forced):
        c = self.reuse_config
        fixed = self._fixed
        b, n, d = x.shape
        nh = self.config.num_attention_heads
        layer_rng = None if rng is None else jax.random.fold_in(rng, i)
        gate, margin = self._decide(dec, mode, layer_rng, tau, forced)
        gate = jnp.where(dec["valid"][..., None], gate, jnp.asarray([0.0, 1.0]))
        if forced is None and c.policy == "mlp":
            p_reuse = jax.nn.softmax(dec["logits"].astype(jnp.float32), -1)[..., 0]
            # The noise-free decision exactly as the hard path takes it (gumbel_gate without rng:
            # argmax of the log-softmax, ties -> reuse), so decided and executed reuse can be compared.
            decided = jnp.argmax(jax.nn.log_softmax(dec["logits"].astype(jnp.float32), -1), -1) == 0
        else:
            p_reuse = gate[..., 0]
            decided = gate[..., 0] > 0.5
        p_reuse = jnp.where(dec["valid"], p_reuse, 0.0)
        decided = decided & dec["valid"]
        heads = lambda t: rearrange(t, "b n (h d) -> b n h d", h=nh)  # cached [B, Nr, D] -> per head
        if mode == "soft":
            rest = module.restore(dec["cached"], dec["diff"])
            g_r, g_c = gate[..., 0], gate[..., 1]
            q, k, v = layer.qkv(x)

            def mix(comp, restored):  # comp [B, N, ...], restored [B, Nr, ...] -> [B, N, ...]
                gr = g_r.reshape(g_r.shape + (1,) * (comp.ndim - 2))
                gc = g_c.reshape(gr.shape)
                mixed = gr * restored.astype(jnp.float32) + gc * comp[:, fixed:].astype(jnp.float32)
                return jnp.concatenate([comp[:, :fixed], mixed.astype(comp.dtype)], 1)

            k_m, v_m = mix(k, heads(rest["k"])), mix(v, heads(rest["v"]))
            attn = layer.attend(q, k_m, v_m)
            h = mix(layer.finish(x, attn), rest["h"])
            states = {"h": h[:, fixed:], "k": _merge_heads(k_m[:, fixed:]), "v": _merge_heads(v_m[:, fixed:])}
            if c.restore_q:
                states["q"] = _merge_heads(mix(q, heads(rest["q"]))[:, fixed:])
            q_cls = q[:, 0]
            reused = (gate[..., 0] > 0.5).astype(jnp.float32).mean(-1)
            overflow = jnp.zeros((b,), jnp.float32)
            k_all = k_m
            gate_reuse = gate[..., 0]
        elif c.execution == "packed":
            recompute = gate[..., 1] > 0.5  # [B, Nr]
            h, states, q_cls, k_all, run_rows = self._packed_layer(layer, module, x, recompute, dec)
            gate_reuse = (~recompute).astype(jnp.float32)
            reused = gate_reuse.mean(-1)
            overflow = jnp.zeros((b,), jnp.float32)
            # Rows run: each example's own computed tokens plus an equal share of the last chunk's padding.
            own = fixed + recompute.sum(-1).astype(jnp.float32)
            computed = (own + (run_rows - own.sum()) / b) / n
        else:
            recompute = gate[..., 1] > 0.5  # [B, Nr]
            need = recompute.sum(-1).max()
            nr = n - fixed
            caps = sorted({max(1, math.ceil(f * nr)) for f in c.capacity_buckets})

            def branch(cap):
                def run(mdl, x, recompute, margin, cached, diff):
                    layer, rmod = mdl.layers[i], mdl.reuse[i]  # through the (lifted) module, as nn.switch requires
                    # The `cap` tokens that most want recomputing run the layer (decided recompute tokens
                    # first, then by margin: a bucket larger than needed recomputes its padding tokens
                    # too, which only raises fidelity); only the other Nr - cap are restored.
                    score = jnp.where(recompute, _BIG, 0.0) + margin
                    perm = jnp.argsort(-score, axis=-1)
                    idx = jnp.sort(perm[:, :cap], axis=-1)  # ascending: locality of the gathers
                    x_sel = jnp.concatenate([x[:, :fixed], _take_tokens(x[:, fixed:], idx)], 1)
                    q, k, v = layer.qkv(x_sel)
                    full = jnp.ones(idx.shape, jnp.bool_)
                    base = dict(cached)
                    if cap < nr:
                        comp = jnp.sort(perm[:, cap:], axis=-1)
                        restored = rmod.restore({t: _take_tokens(cached[t], comp) for t in cached},
                                                _take_tokens(diff, comp))
                        ones = jnp.ones(comp.shape, jnp.bool_)
                        base = {t: _put_tokens(cached[t], comp, restored[t], ones) for t in cached}
                    merge = lambda t, new: _put_tokens(heads(base[t]).astype(new.dtype), idx, new[:, fixed:], full)
                    k_full = jnp.concatenate([k[:, :fixed], merge("k", k)], 1)
                    v_full = jnp.concatenate([v[:, :fixed], merge("v", v)], 1)
                    attn = layer.attend(q, k_full, v_full)
                    h_sel = layer.finish(x_sel, attn)
                    h_full = jnp.concatenate(
                        [h_sel[:, :fixed], _put_tokens(base["h"].astype(h_sel.dtype), idx, h_sel[:, fixed:], full)], 1)
                    states = {"h": h_full[:, fixed:], "k": _merge_heads(k_full[:, fixed:]), "v": _merge_heads(v_full[:, fixed:])}
                    if c.restore_q:
                        states["q"] = _merge_heads(merge("q", q))
                    q_cls = q[:, 0] if fixed else layer.qkv(x[:, :1])[0][:, 0]
                    computed = _put_tokens(jnp.zeros(recompute.shape, jnp.float32), idx,
                                           jnp.ones(idx.shape, jnp.float32), full)
                    return h_full, states, q_cls, k_full, 1.0 - computed
                return run

            branches = [branch(cap) for cap in caps]
            operands = (x, recompute, margin, dec["cached"], dec["diff"])
            if len(branches) == 1:
                h, states, q_cls, k_all, gate_reuse = branches[0](self, *operands)
            else:
                which = jnp.searchsorted(jnp.asarray(caps), need)  # smallest bucket >= need
                which = jnp.minimum(which, len(caps) - 1)
                h, states, q_cls, k_all, gate_reuse = nn.switch(which, branches, self, *operands)
            reused = gate_reuse.mean(-1)
            # Tokens decided "recompute" that did not fit the largest capacity (reused anyway).
            overflow = jnp.sum(recompute & (gate_reuse > 0.5), -1).astype(jnp.float32) / nr
            computed = (fixed + nr - gate_reuse.sum(-1)) / n
        if mode == "soft":
            computed = jnp.ones((b,), jnp.float32)
        module.store(slot, x[:, fixed:], states)
        # gate: the reuse gate (soft) or the effective reuse mask (hard: padding tokens recomputed).
        # computed: fraction of the frame's N tokens this layer ran (padding included) per example.
        return h, q_cls, k_all, {"gate": gate_reuse, "reused": reused, "overflow": overflow,
                                 "sim": dec["sim"], "p_reuse": p_reuse, "decided": decided.astype(jnp.float32),
                                 "computed": computed}

    def _packed_layer(self, layer, module, x, recompute, dec):
        """The hard path of one reuse layer with ``execution='packed'`` (see ``ReuseConfig``).

        x: [B, N, D] layer input; recompute: [B, Nr] bool decisions. Restores the reused tokens, runs
        q/k/v, attention (each computed query against all N keys of its own example, restored keys
        included) and the MLP on the prefix + recompute tokens only, each in ``packed_map`` chunks
        over the whole batch. Returns (h [B, N, D], states to cache, q_cls [B, H, Dh], k [B, N, H, Dh],
        rows run by the q/k/v and attention loops incl. padding).
        """
        c = self.reuse_config
        fixed = self._fixed
        b, n, d = x.shape
        nr = n - fixed
        nh = self.config.num_attention_heads
        dh = d // nh
        dt = x.dtype
        chunk = c.chunk_tokens
        # 1. Restoration of the reused tokens only: cached_t + MLP_t(x - x_ref).
        cached = {t: v.reshape(b * nr, d) for t, v in dec["cached"].items()}
        if c.restoration == "passthrough":
            base = cached
        else:
            diff = dec["diff"].reshape(b * nr, d)
            base, _ = packed_map(lambda idx: module.restore({t: v[idx] for t, v in cached.items()}, diff[idx]),
                                 (~recompute).reshape(-1), chunk, cached)

        def full(t):  # [B * Nr, D] restored states -> [B * N, ...] with zero prefix rows
            v = jnp.concatenate([jnp.zeros((b, fixed, d), dt), base[t].reshape(b, nr, d).astype(dt)], 1)
            return v.reshape(b * n, d)
        comp = jnp.concatenate([jnp.ones((b, fixed), jnp.bool_), recompute], 1).reshape(-1)  # [B * N]
        xf = x.reshape(b * n, d)

        # 2. q, k, v of the computed tokens; the reused tokens keep their restored k, v.
        def qkv_fn(idx):
            q, k, v = layer.qkv(xf[idx][None])
            return {"q": _merge_heads(q)[0], "k": _merge_heads(k)[0], "v": _merge_heads(v)[0]}
        init = {"q": full("q") if c.restore_q else jnp.zeros((b * n, d), dt), "k": full("k"), "v": full("v")}
        qkv, run_rows = packed_map(qkv_fn, comp, chunk, init)
        split = lambda t: rearrange(t, "(b n) (h e) -> b n h e", b=b, h=nh)
        qf, kf, vf = split(qkv["q"]), split(qkv["k"]), split(qkv["v"])

        # 3. Attention of each computed query over its own example's N keys, then the rest of the layer.
        def finish_fn(idx):
            ex = idx // n
            attn = layer.attend(qf.reshape(b * n, nh, dh)[idx][:, None], kf[ex], vf[ex])  # [chunk, 1, H, Dh]
            return {"h": layer.finish(xf[idx][:, None], attn)[:, 0]}
        h = packed_map(finish_fn, comp, chunk, {"h": full("h")})[0]["h"].reshape(b, n, d)
        states = {"h": h[:, fixed:], "k": _merge_heads(kf[:, fixed:]), "v": _merge_heads(vf[:, fixed:])}
        if c.restore_q:
            states["q"] = _merge_heads(qf[:, fixed:])
        q_cls = qf[:, 0] if fixed else layer.qkv(x[:, :1])[0][:, 0]
        return h, states, q_cls, kf, run_rows

    def encode_clip(self, frames: Array, grouping: Grouping, cmap: Array | None = None, *,
                    mode: str = "soft", rng: Array | None = None, tau=None, keep_hidden: tuple[int, ...] = (),
                    forced: dict[int, dict[int, Array]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Encodes clips frame by frame in ``grouping.order`` with reuse.

        Args:
          frames: [B, F, H, W, C] normalised pixels.
          grouping: static schedule (``Grouping``).
          cmap: optional [B, F, Np] change energy per patch.
          forced: optional {frame: {layer: [B, Nr] bool reuse}}.
          Other arguments as ``encode_frame``.
        Returns:
          (outputs: pooled [B, F, Dp], last_hidden_state [B, F, N, D], hidden {l: [B, F, N, D]};
           stats: gate {l: [B, F, Nr]} (0 on frames without references), reused {l: [B, F]},
           overflow {l: [B, F]}, computed {l: [B, F]} (fraction of the N tokens the layer ran, padding
           included: 1 on frames without references and in soft mode), sim {l: [B, F, Nr]},
           decided {l: [B, F, Nr]} (1 where the noise-free decision is "reuse", as the hard path takes
           it), p_reuse {l: [B, F, Nr]} (noise-free reuse
           probability of the decision MLP), has_ref [F] numpy bool)
          in frame order.
        """
        f_count = frames.shape[1]
        if grouping.num_frames != f_count or f_count > self.num_slots:
            raise ValueError(f"grouping has {grouping.num_frames} frames, the clip {f_count}, the cache "
                             f"{self.num_slots} slots; they must agree (num_slots >= frames).")
        per_frame: dict[int, tuple] = {}
        for f in grouping.order:
            frame_rng = None if rng is None else jax.random.fold_in(rng, f)
            out, st = self.encode_frame(frames[:, f], f, grouping.refs[f], grouping.ref_type[f],
                                        None if cmap is None else cmap[:, f], mode=mode, rng=frame_rng,
                                        tau=tau, keep_hidden=keep_hidden,
                                        forced=None if forced is None else forced.get(f))
            per_frame[f] = (out, st)
        stack = lambda get: jnp.stack([get(f) for f in range(f_count)], 1)
        outputs = {"pooled": stack(lambda f: per_frame[f][0]["pooled"]),
                   "last_hidden_state": stack(lambda f: per_frame[f][0]["last_hidden_state"]),
                   "hidden": {l: stack(lambda f, l=l: per_frame[f][0]["hidden"][l]) for l in keep_hidden}}
        b = frames.shape[0]
        nr = outputs["last_hidden_state"].shape[2] - self._fixed
        stats: dict[str, Any] = {"has_ref": np.array([bool(grouping.refs[f]) for f in range(f_count)])}
        for name, zero in (("gate", (b, nr)), ("reused", (b,)), ("overflow", (b,)), ("sim", (b, nr)),
                           ("p_reuse", (b, nr)), ("decided", (b, nr)), ("computed", (b,))):
            fill = 1.0 if name == "computed" else 0.0  # frames without references run every token
            stats[name] = {l: stack(lambda f, l=l, name=name, zero=zero, fill=fill: per_frame[f][1][l][name]
                                    if l in per_frame[f][1] else jnp.full(zero, fill, jnp.float32))
                           for l in self.reuse_config.layers(self.config.num_hidden_layers)}
        return outputs, stats


class StreamingEncoder:
    """Online video: frames are encoded one call at a time, the reuse cache carried between calls.

    For a live stream (batch 1, or B streams in lockstep) the frames of a clip arrive one by one; each
    ``push`` runs ``ReuseViT.encode_frame`` on one frame (jitted; one executable per distinct
    (slot, references, role), i.e. at most one per frame of the grouping) and keeps the
    ``reuse_cache`` collection on the device for the next frame. Frames must be pushed in
    ``grouping.order`` (``order=(0,)`` references the previous frame only: zero added latency; a
    codec-like order buffers a group first). With ``execution='packed'`` every stream's compute
    follows its own decisions, so streaming a clip alone gives the batched ``encode_clip`` result for
    that clip (tested). ``reset()`` starts the next clip.
    """

    def __init__(self, model: ReuseViT, params, grouping: Grouping, *, mode: str = "hard"):
        self.model, self.params, self.grouping, self.mode = model, params, grouping, mode
        self._step = jax.jit(self._apply, static_argnames=("slot", "refs", "ref_type"))
        self.reset()

    def _apply(self, params, cache, pixels, cmap, *, slot, refs, ref_type):
        variables = {"params": params, **({REUSE_CACHE: cache} if cache is not None else {})}
        (out, stats), new = self.model.apply(variables, pixels, slot, refs, ref_type, cmap, mode=self.mode,
                                             method=self.model.encode_frame, mutable=[REUSE_CACHE])
        return out, stats, new[REUSE_CACHE]

    def reset(self) -> None:
        self._cache, self._pushed = None, []

    def push(self, pixels: Array, cmap: Array | None = None) -> tuple[dict[str, Array], dict[str, Any]]:
        """pixels [B, H, W, C] (normalised), cmap [B, Np]: the next frame in ``grouping.order``.

        Returns ``encode_frame``'s (outputs, per-layer stats) of this frame."""
        if len(self._pushed) == self.grouping.num_frames:
            raise ValueError(f"{self.grouping.num_frames} frames already pushed for this clip; call reset().")
        f = self.grouping.order[len(self._pushed)]
        if cmap is None:
            cmap = jnp.zeros((pixels.shape[0], (pixels.shape[1] // self.model.config.patch_size)
                              * (pixels.shape[2] // self.model.config.patch_size)), jnp.float32)
        out, stats, self._cache = self._step(self.params, self._cache, pixels, cmap, slot=f,
                                             refs=self.grouping.refs[f], ref_type=self.grouping.ref_type[f])
        self._pushed.append(f)
        return out, stats

    def encode_clip(self, frames: Array, cmap: Array | None = None) -> dict[str, Array]:
        """frames [B, F, H, W, C] streamed frame by frame -> pooled [B, F, Dp], last_hidden_state
        [B, F, N, D] in frame order (the ``encode_clip`` outputs, for comparing the two modes)."""
        self.reset()
        outs = {}
        for f in self.grouping.order:
            outs[f], _ = self.push(frames[:, f], None if cmap is None else cmap[:, f])
        return {k: jnp.stack([outs[f][k] for f in range(frames.shape[1])], 1)
                for k in ("pooled", "last_hidden_state")}


def _merge_heads(t: Array) -> Array:
    """Per-head states [B, N, H, Dh] -> the cached layout [B, N, H * Dh]."""
    return rearrange(t, "b n h d -> b n (h d)")


def _pooled(out: dict[str, Array]) -> Array:
    """The embedding a clip-level task reads: pooler_output, or mean of the tokens without a pooler."""
    if "pooler_output" in out:
        return out["pooler_output"]
    return out["last_hidden_state"].mean(1)


def reuse_rates(stats: dict[str, Any], example_mask: Array) -> dict[str, Array]:
    """Reuse rates per reuse layer over the reusable tokens of frames with references.

    Returns (each [L_reuse], in ``sorted(stats['gate'])`` layer order):
      soft: mean gate (the Gumbel sample in training);
      hard: fraction of tokens actually reused (``stats['reused']``);
      argmax_st: fraction whose noise-free decision is "reuse" (what evaluation runs), with the
        gradient of the reuse probability (straight-through). The Gumbel sample's rate can sit at
        the target while every logit stays near 0, so the argmax used at evaluation reuses almost
        nothing; regularising this rate instead makes the evaluated decisions meet the target.
    """
    has_ref = jnp.asarray(stats["has_ref"], jnp.float32)  # [F]
    m = example_mask.astype(jnp.float32)[:, None] * has_ref[None]  # [B, F]
    denom = jnp.maximum(m.sum(), 1.0)
    lyr = sorted(stats["gate"])
    if not lyr:
        return {k: jnp.zeros((0,)) for k in ("soft", "hard", "argmax_st")}
    per = lambda v: jnp.stack([(v(l) * m).sum() / denom for l in lyr])

    def st(l):
        p = stats["p_reuse"][l]
        hard = stats["decided"][l] if "decided" in stats else (p > 0.5).astype(jnp.float32)
        return (hard + p - jax.lax.stop_gradient(p)).mean(-1)
    out = {"soft": per(lambda l: stats["gate"][l].mean(-1)), "hard": per(lambda l: stats["reused"][l])}
    if "p_reuse" in stats:
        out["argmax_st"] = per(st)
    return out


def build(vit_config: vit.ViTConfig, reuse_config: ReuseConfig, num_slots: int) -> ReuseViT:
    return ReuseViT(vit_config, reuse_config=reuse_config, num_slots=num_slots)


__all__ = ["Grouping", "REUSE_CACHE", "ReuseConfig", "ReuseModule", "ReuseViT", "StreamingEncoder", "build",
           "cls_importance", "packed_map",
           "cosine", "default_config", "gumbel_gate", "loss_config", "reuse_loss", "reuse_rates",
           "scheduled_tau"]
