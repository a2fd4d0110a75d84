"""Contrastive image-text losses (CLIP, SigLIP), Matryoshka losses and retrieval metrics.

Pure functions on L2-normalised embeddings ``img`` [B, P] and ``txt`` [B, P] (row i of each is a
matching pair):

    clip_loss    symmetric InfoNCE (Radford et al. 2021, Fig. 3 pseudo-code)
    siglip_loss  pairwise sigmoid loss (Zhai et al. 2023, eq. 1)
    mrl_loss     Matryoshka sum over nested dims (Kusupati et al. 2022, eq. 1), or one sampled dim
    retrieval_metrics, embedding_bytes   evaluation helpers (NumPy)

Global batch under data parallelism: the losses are plain ``jnp`` on the full [B, P] arrays, so
under ``jit`` with the batch sharded over a mesh axis XLA inserts the all-gather of the other
devices' embeddings for the [B, B] similarity matrix: every device's negatives come from the whole
global batch (what CLIP/SigLIP train with), and gradients flow back to each shard
(``tests/helpers/contrastive_sharding_check.py`` checks equality with one device). No sharding
constraint is needed for correctness. The [B, B] logits are small next to the towers; SigLIP's
chunked ring (sec. 3.3) that avoids materialising them is not implemented.

Logits are computed in float32 with ``Precision.HIGHEST`` (on TPU a default-precision fp32 matmul
rounds the operands to bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
LossFn = Callable[[Array, Array], tuple[Array, dict[str, Array]]]

# CLIP (Radford et al. 2021, sec. 2.5): the learnable temperature is "clipped to prevent scaling the
# logits by more than 100".
CLIP_MAX_LOGIT_SCALE = math.log(100.0)


def _check_pair(img: Array, txt: Array) -> None:
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"Contrastive losses take paired embeddings img [B, P] and txt [B, P]; got "
                         f"{tuple(img.shape)} and {tuple(txt.shape)}.")


def _similarity(img: Array, txt: Array) -> Array:
    """[B, P] x [B, P] -> cosine similarities [B_img, B_txt] in float32."""
    return jnp.einsum("ip,tp->it", img.astype(jnp.float32), txt.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def _accuracies(logits: Array) -> dict[str, Array]:
    """In-batch top-1 accuracy both ways from logits [B_img, B_txt] (argmax ties go to the lower index)."""
    labels = jnp.arange(logits.shape[0])
    return {"i2t_acc": jnp.mean(jnp.argmax(logits, axis=1) == labels),
            "t2i_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels)}


def clip_loss(img: Array, txt: Array, logit_scale: Array,
              max_logit_scale: float | None = CLIP_MAX_LOGIT_SCALE) -> tuple[Array, dict[str, Array]]:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3):

        logits = exp(min(logit_scale, max_logit_scale)) * img @ txt.T          [B, B]
        loss   = (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2          (means over rows)

    Args:
        img, txt: [B, P] L2-normalised embeddings, row i a matching pair.
        logit_scale: [] the learnable log of the multiplier (CLIP init log(1/0.07)).
        max_logit_scale: the clamp, log(100) as CLIP (the multiplier never exceeds 100; past it the
            scale gets no gradient, like CLIP's in-place clamp); None = no clamp.

    Returns:
        (loss [], metrics): ``loss``, ``logit_scale`` (the multiplier exp(s) used), ``temperature``
        (1 / that multiplier), ``i2t_acc`` / ``t2i_acc`` (in-batch top-1 accuracy), all float32 [].
    """
    _check_pair(img, txt)
    s = jnp.asarray(logit_scale, jnp.float32)
    if max_logit_scale is not None:
        s = jnp.minimum(s, max_logit_scale)
    scale = jnp.exp(s)
    logits = scale * _similarity(img, txt)
    labels = jnp.arange(logits.shape[0])
    loss_i2t = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    loss_t2i = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.T, labels))
    loss = 0.5 * (loss_i2t + loss_t2i)
    metrics = {"loss": loss, "logit_scale": scale, "temperature": 1.0 / scale, **_accuracies(logits)}
    return loss, metrics


def siglip_loss(img: Array, txt: Array, logit_scale: Array, logit_bias: Array) -> tuple[Array, dict[str, Array]]:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1 / Algorithm 1):

        loss = -1/B * sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)),   t = exp(logit_scale),
        z_ij = +1 if i == j else -1.

    Args:
        img, txt: [B, P] L2-normalised embeddings, row i a matching pair.
        logit_scale: [] log t (paper init log 10; not clamped, as big_vision).
        logit_bias: [] b (paper init -10).

    Returns:
        (loss [], metrics): ``loss``, ``logit_scale`` (t), ``temperature`` (1/t), ``logit_bias`` (b),
        ``i2t_acc`` / ``t2i_acc`` (in-batch top-1 accuracy), all float32 [].
    """
    _check_pair(img, txt)
    t = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    b = jnp.asarray(logit_bias, jnp.float32)
    logits = t * _similarity(img, txt) + b
    n = logits.shape[0]
    z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    loss = -jnp.sum(jax.nn.log_sigmoid(z * logits)) / n
    metrics = {"loss": loss, "logit_scale": t, "temperature": 1.0 / t, "logit_bias": b, **_accuracies(logits)}
    return loss, metrics


# ------------------------------------------------------------------------------------------------
# Matryoshka (Kusupati et al. 2022)
# ------------------------------------------------------------------------------------------------

def _mrl_weights(dims: tuple[int, ...], weights: Mapping[int, float] | Sequence[float] | None) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * len(dims)  # the paper's c_m = 1 (sec. 3)
    if isinstance(weights, Mapping):
        missing = [m for m in dims if m not in weights]
        if missing:
            raise ValueError(f"mrl_loss weights {dict(weights)} lack dims {missing}.")
        return tuple(float(weights[m]) for m in dims)
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(dims):
        raise ValueError(f"mrl_loss: {len(weights)} weights for {len(dims)} dims {dims}.")
    return weights


def mrl_loss(img_embs: Mapping[int, Array], txt_embs: Mapping[int, Array], loss_fn: LossFn,
             weights: Mapping[int, float] | Sequence[float] | None = None, *, sample_single: bool = False,
             rng: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Matryoshka loss (Kusupati et al. 2022, eq. 1) over nested embeddings.

    Args:
        img_embs, txt_embs: {m: [B, m]} L2-normalised embeddings per dim (``MatryoshkaHead`` /
            ``mrl_embeddings`` output), the same keys in both. Dims are taken largest first,
            whatever the dict order (jax pytrees sort dict keys).
        loss_fn: ``(img [B, m], txt [B, m]) -> (loss [], metrics {name: []})``, e.g.
            ``functools.partial(clip_loss, logit_scale=s)`` or
            ``lambda i, t: siglip_loss(i, t, s, b)`` (one temperature shared by all dims).
        weights: c_m per dim: None (all 1, as the paper), a {m: c_m} mapping or a sequence for the
            dims sorted largest first.
        sample_single: False: ``loss = sum_m c_m * loss_fn(img_m, txt_m)``, every dim computed.
            True: ONE dim m drawn uniformly from ``rng`` per call, ``loss = c_m * loss_fn(img_m,
            txt_m)`` (not rescaled by the number of dims); ``jax.lax.switch`` runs only the drawn
            dim's loss. Deterministic given ``rng``.
        rng: PRNG key, required when ``sample_single``; give the loss its own key (e.g.
            ``jax.random.fold_in(rng, step)`` split off for it) so the draw is not correlated with
            dropout or other randomness of the step.

    Returns:
        (loss [], metrics). All dims: ``loss``, and every metric ``k`` of ``loss_fn`` at dim m as
        ``{k}_at_{m}`` (so ``loss_at_{m}``, ``i2t_acc_at_{m}``, ...). Sampled: ``loss``, ``mrl_dim``
        (int32, the dim used this step), ``loss_sampled`` (loss_fn's loss at that dim, unweighted)
        and loss_fn's other metrics as ``{k}_sampled``; no per-dim keys, since only one dim was
        computed.
    """
    # Canonical order, largest dim first: dict order does not survive jax transformations (pytree
    # flattening sorts dict keys), so nothing here depends on it.
    dims = tuple(sorted(img_embs, reverse=True))
    if set(txt_embs) != set(dims):
        raise ValueError(f"mrl_loss: image dims {dims} and text dims {tuple(sorted(txt_embs, reverse=True))} differ.")
    if not dims:
        raise ValueError("mrl_loss needs at least one dim.")
    w = _mrl_weights(dims, weights)
    if not sample_single:
        total = jnp.zeros((), jnp.float32)
        metrics: dict[str, Array] = {}
        for m, c in zip(dims, w):
            loss_m, metrics_m = loss_fn(img_embs[m], txt_embs[m])
            total = total + c * loss_m
            metrics.update({f"{k}_at_{m}": v for k, v in metrics_m.items()})
            metrics[f"loss_at_{m}"] = loss_m
        metrics["loss"] = total
        return total, metrics

    if rng is None:
        raise ValueError("mrl_loss(sample_single=True) needs an rng to draw the dim from.")
    index = jax.random.randint(rng, (), 0, len(dims))

    def branch(m: int, c: float):
        def run():
            loss_m, metrics_m = loss_fn(img_embs[m], txt_embs[m])
            metrics_m = {k: jnp.asarray(v, jnp.float32) for k, v in metrics_m.items() if k != "loss"}
            return jnp.asarray(c * loss_m, jnp.float32), jnp.asarray(loss_m, jnp.float32), metrics_m
        return run

    loss, loss_m, metrics_m = jax.lax.switch(index, [branch(m, c) for m, c in zip(dims, w)])
    metrics = {f"{k}_sampled": v for k, v in metrics_m.items()}
    metrics.update(loss=loss, loss_sampled=loss_m, mrl_dim=jnp.asarray(dims, jnp.int32)[index])
    return loss, metrics


# ------------------------------------------------------------------------------------------------
# Evaluation helpers (NumPy)
# ------------------------------------------------------------------------------------------------

def retrieval_metrics(sim: Any, ks: Sequence[int] = (1, 5, 10), gt: Any = None) -> dict[str, float]:
    """Image->text and text->image recall@K from a similarity matrix (NumPy, float64).

    Args:
        sim: [Ni, Nt] scores, sim[i, j] = score of image i against text j.
        ks: the K of each R@K.
        gt: None (Ni == Nt, text j describes image j) or an int array [Nt]: ``gt[j]`` = the index of
            the image text j describes (several captions per image, e.g. COCO's 5). Every image must
            have at least one caption.

    Ranking, conservative on ties: the rank of a query is the number of WRONG candidates scoring
    >= its best correct candidate (a tie counts against the query), and R@K is the fraction of
    queries with rank < K. Image->text: the correct candidates are all captions of the image (a hit
    if any of them is in the top K). Text->image: the one image ``gt[j]``.

    Returns:
        {"i2t_R@K": float in [0, 1], "t2i_R@K": ..., for each K in ks}.
    """
    sim = np.asarray(sim, np.float64)
    if sim.ndim != 2:
        raise ValueError(f"retrieval_metrics takes a [Ni, Nt] similarity matrix, got shape {sim.shape}.")
    ni, nt = sim.shape
    if gt is None:
        if ni != nt:
            raise ValueError(f"sim is {ni}x{nt}: pass gt (the image index of each text) when not square.")
        gt = np.arange(nt)
    gt = np.asarray(gt)
    if gt.shape != (nt,) or not np.issubdtype(gt.dtype, np.integer) or gt.min() < 0 or gt.max() >= ni:
        raise ValueError(f"gt must be an int array of {nt} image indices in [0, {ni}); got {gt!r}.")
    if len(np.unique(gt)) != ni:
        raise ValueError(f"gt covers {len(np.unique(gt))} of {ni} images; every image needs a caption.")
    positive = gt[None, :] == np.arange(ni)[:, None]  # [Ni, Nt]: text j describes image i

    best_pos = np.where(positive, sim, -np.inf).max(axis=1)  # [Ni]
    i2t_rank = np.sum((sim >= best_pos[:, None]) & ~positive, axis=1)
    true_score = sim[gt, np.arange(nt)]  # [Nt]
    t2i_rank = np.sum((sim >= true_score[None, :]) & ~positive, axis=0)

    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(i2t_rank < k))
        out[f"t2i_R@{k}"] = float(np.mean(t2i_rank < k))
    return out


def embedding_bytes(dim: int, dtype: Any = np.float32) -> int:
    """Storage of one ``dim``-dimensional embedding in ``dtype`` (e.g. 'float16', jnp.bfloat16), bytes."""
    return int(dim) * jnp.dtype(dtype).itemsize


__all__ = ["CLIP_MAX_LOGIT_SCALE", "clip_loss", "embedding_bytes", "mrl_loss", "retrieval_metrics", "siglip_loss"]
