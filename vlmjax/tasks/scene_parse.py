"""Scene parsing: pretrains a vision tower on what each cell of a procedural scene holds
(``task='scene_parse'``; experiment ``configs/scene_parse.py``; data ``vlmjax.data.scene_parse``).

Every patch token predicts, with one linear head on the normalised last hidden state, the contents
of the grid cell it lies in (empty or the object's shape; its size; its RGB colour) and which cell it
is. Training scenes are painted in random colours away from the palette, so the tower's shape
features cannot lean on colour; evaluation uses the palette scenes of the eval split, whose every
scene holds a held-out (colour, shape) pair, and reports shape accuracy on held-out and on seen
pairs separately (``shape_acc_held_out`` is what this stage is for).

The cell target keeps each token's position in its features after the last layer (the Perceiver
resampler downstream attends to the tokens as a set: location reaches it only through the tokens'
content). The colour target keeps colour (regression to RGB, so no colour name is ever taught).

With ``config.model.resampler.num_latents > 0`` the stage also pretrains the VLM's Perceiver
resampler (``vision_resampler/``), BLIP-2 style (Li et al. 2023 pretrain their Q-Former before the
LLM sees it): the latents it makes from the tokens must let a Perceiver IO read-out (Jaegle et al.
2021: one learned output query per patch position cross-attends to the latents, ``latent_readout/``,
then ``latent_parse_head/``) predict every cell's contents again. A resampler trained from scratch
inside the VLM starts image-independent (the latents are most of its keys and its residual) and
mixes the cells; this target asks the latents to keep each cell's attributes before the VLM starts.
Measured (docs/vlm.md): in 800 steps the read-out recovers colour, size and cell but not shape
(0.29, chance 0.25), so no experiment uses it by default; it is the check of what a Perceiver carries.

Params use the VLM's names (``vision_tower/``, ``vision_token_norm/``, ``vision_resampler/``; the
heads are ``parse_head/``, ``latent_readout/``, ``latent_parse_head/``), so the VLM and fusion
experiments start their towers (and the VLM its resampler) from this run (their stage 'vision',
``vlm.VISION_STAGE``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlmjax.data import scene_parse as data_lib
from vlmjax.models import layers, resampler as resampler_lib, vit as vit_lib
from vlmjax.tasks.base import DataTask

NUM_CELLS = data_lib.NUM_CELLS
NUM_SIZES = 3  # empty, small, large


def cell_of_token(grid: int) -> np.ndarray:
    """int32 [grid * grid]: the 3x3 cell (row-major) each patch token of a grid x grid tower lies in
    (its top-left pixel's cell: exact when 3 divides grid)."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return ((rows * 3 // grid) * 3 + cols * 3 // grid).astype(np.int32)


def resampler_config() -> dict:
    """``config.model.resampler``: the VLM connector's Perceiver fields (``vlm.VLMConfig``);
    ``num_latents=0`` = no resampler (the tower alone)."""
    return dict(num_latents=0, perceiver_num_layers=2, perceiver_num_heads=4, perceiver_dim=0, perceiver_ffn_mult=4,
                perceiver_latent_init_std=1.0, perceiver_attend_latents=True, readout_heads=4)


class SceneParser(nn.Module):
    """ViT -> LayerNorm over the tokens -> one linear head per patch token; with a resampler, also
    tokens -> Perceiver latents -> per-position read-out -> the same targets.

    ``__call__(image [B, S, S, 3])`` -> dict ``shape`` [B, Np, 1 + num_shapes], ``size`` [B, Np, 3],
    ``rgb`` [B, Np, 3] (sigmoid), ``cell`` [B, Np, 9] (float32 logits), and with a resampler the same
    four under ``latent/`` (the read-out's predictions for every patch position).
    """

    vision: vit_lib.ViTConfig
    num_shapes: int
    dtype: str = "float32"
    resampler: tuple = ()  # sorted items of resampler_config() (hashable), () = none

    def setup(self):
        self.vision_tower = vit_lib.VisionTransformer(self.vision)
        self.vision_token_norm = layers.LayerNorm(eps=1e-6, dtype=self.dtype)  # the VLM's name and eps
        self.widths = (1 + self.num_shapes, NUM_SIZES, 3, NUM_CELLS)
        self.parse_head = layers.DenseGeneral(sum(self.widths), kernel_axes=("embed", None), use_bias=True,
                                              dtype=jnp.float32)
        r = dict(self.resampler)
        if r.get("num_latents", 0):
            # The VLM's construction (models/vlm.py VisionLanguageModel.setup), so the params load there.
            self.vision_resampler = resampler_lib.PerceiverResampler(
                num_latents=r["num_latents"], num_layers=r["perceiver_num_layers"],
                num_heads=r["perceiver_num_heads"], dim=r["perceiver_dim"] or None, ffn_mult=r["perceiver_ffn_mult"],
                latent_init_std=r["perceiver_latent_init_std"], attend_latents=r["perceiver_attend_latents"],
                remat=self.vision.remat, dtype=self.dtype, param_dtype=jnp.float32,
                attention_impl=self.vision.attention_impl)
            num_patches = (self.vision.image_size // self.vision.patch_size) ** 2
            self.latent_readout = resampler_lib.AttentionPool(
                num_heads=r["readout_heads"], num_probes=num_patches, dtype=self.dtype,
                attention_impl=self.vision.attention_impl)
            self.latent_norm = layers.LayerNorm(eps=1e-6, dtype=self.dtype)
            self.latent_parse_head = layers.DenseGeneral(sum(self.widths), kernel_axes=("embed", None),
                                                         use_bias=True, dtype=jnp.float32)

    def _split(self, logits, prefix=""):
        shape, size, rgb, cell = jnp.split(logits, np.cumsum(self.widths)[:-1], axis=-1)
        return {f"{prefix}shape": shape, f"{prefix}size": size, f"{prefix}rgb": jax.nn.sigmoid(rgb),
                f"{prefix}cell": cell}

    def __call__(self, image, deterministic: bool = True):
        out, _ = self.vision_tower(image, deterministic=deterministic)
        tokens = self.vision_token_norm(out["last_hidden_state"])  # the VLM's connector input (all tokens)
        patches = tokens[:, self.vision.num_prefix_tokens:]
        result = self._split(self.parse_head(patches.astype(jnp.float32)))  # [B, Np, sum(widths)] split
        if dict(self.resampler).get("num_latents", 0):
            # The tower learns from its own head only (BLIP-2 stage 1 freezes the image encoder too): trained
            # through the read-out as well, its held-out shape accuracy fell from 0.98 to 0.76 (800 steps).
            latents = self.vision_resampler(jax.lax.stop_gradient(tokens))  # [B, L, Dp]
            read = self.latent_norm(self.latent_readout(latents))  # [B, Np, Dp]: one query per patch position
            result |= self._split(self.latent_parse_head(read.astype(jnp.float32)), "latent/")
        return result


class SceneParseTask(DataTask):
    units = "images"

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        self.data = data_lib.build(config.data)
        m = config.model
        vcfg = vit_lib.ViTConfig(**{**dict(m.tower), "dtype": m.dtype, "attention_impl": m.attention_impl})
        vcfg.validate()
        if vcfg.image_size != int(config.data.image_size):
            raise ValueError(f"config.model.tower.image_size={vcfg.image_size} differs from config.data.image_size="
                             f"{config.data.image_size}: set both.")
        grid = vcfg.image_size // vcfg.patch_size
        if grid % 3:
            raise ValueError(f"config.model.tower: {vcfg.image_size} px / patch {vcfg.patch_size} = a {grid}x{grid} "
                             "patch grid; the scenes' 3x3 cells need a grid that 3 divides (e.g. 96 px, patch 32).")
        self.vision_config = vcfg
        self.cells = jnp.asarray(cell_of_token(grid))
        sc = config.data.scenes
        self.palette = jnp.asarray([data_lib.scenes.PALETTE[c] for c in sc.colours], jnp.float32) / 255.0
        self.weights = dict(config.loss)
        r = dict(m.resampler)
        if not isinstance(r["num_latents"], int) or r["num_latents"] < 0:
            raise ValueError(f"config.model.resampler.num_latents={r['num_latents']!r} must be an integer >= 0 "
                             "(0 = no resampler).")
        self.with_latents = r["num_latents"] > 0
        self.model = SceneParser(vcfg, len(sc.shapes), m.dtype, tuple(sorted(r.items())) if self.with_latents else ())

    # ---- model --------------------------------------------------------------------------
    def init_variables(self, rng):
        s = self.vision_config.image_size
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))

    def _terms(self, params, batch, rng=None):
        """Per-token losses and predictions; targets of a token = those of its cell. With a resampler
        the read-out's terms are under ``latent/`` (the same targets, position by position)."""
        rngs = {"dropout": rng} if rng is not None else {}
        out = self.model.apply({"params": params}, batch["image"], deterministic=rng is None, rngs=rngs)
        t = {k: jnp.take(batch[k], self.cells, axis=1) for k in ("shape", "size", "rgb", "colour", "held_out")}
        occupied = (t["shape"] > 0).astype(jnp.float32)  # [B, Np]
        cell = jnp.broadcast_to(self.cells, t["shape"].shape)
        ce = optax.softmax_cross_entropy_with_integer_labels
        terms = {}
        for p in ("", "latent/") if self.with_latents else ("",):
            terms |= {f"{p}shape": ce(out[f"{p}shape"], t["shape"]), f"{p}size": ce(out[f"{p}size"], t["size"]),
                      f"{p}rgb": ((out[f"{p}rgb"] - t["rgb"]) ** 2).sum(-1) * occupied,
                      f"{p}cell": ce(out[f"{p}cell"], cell)}
        return out, t, occupied, terms

    def _weight(self, term: str) -> float:
        """config.loss weight of a term; a read-out term (``latent/x``) weighs ``latent`` x that of ``x``."""
        if term.startswith("latent/"):
            return self.weights["latent"] * self.weights[term.split("/", 1)[1]]
        return self.weights[term]

    def loss_fn(self, params, model_state, batch, rng, step):
        del step
        out, t, occupied, terms = self._terms(params, batch, rng)
        means = {k: v.mean() if not k.endswith("rgb") else v.sum() / jnp.maximum(occupied.sum(), 1.0)
                 for k, v in terms.items()}
        loss = sum(self._weight(k) * means[k] for k in means)
        correct = ((out["shape"].argmax(-1) == t["shape"]) * occupied).sum() / jnp.maximum(occupied.sum(), 1.0)
        metrics = {"loss": loss, "shape_acc": correct, **{f"loss_{k}": v for k, v in means.items()}}
        return loss, {"metrics": metrics, "model_state": model_state}

    def eval_fn(self, params, model_state, batch):
        del model_state
        out, t, occupied, terms = self._terms(params, batch)
        w = batch["mask"].astype(jnp.float32)[:, None]  # [B, 1]: padding rows count nothing
        occ = occupied * w
        held = occ * (t["held_out"] > 0)
        sums = {"tokens": w.sum() * occupied.shape[1], "occupied": occ.sum(), "held": held.sum(),
                "loss_sum": sum(self._weight(k) * (v * w).sum() for k, v in terms.items())}
        for p in ("", "latent/") if self.with_latents else ("",):
            shape_ok = (out[f"{p}shape"].argmax(-1) == t["shape"]).astype(jnp.float32)
            # Colour name of a palette object = the configured palette colour nearest the predicted RGB.
            dist = ((out[f"{p}rgb"][..., None, :] - self.palette) ** 2).sum(-1)  # [B, Np, C]
            colour_ok = (dist.argmin(-1) + 1 == t["colour"]).astype(jnp.float32)
            sums |= {
                f"{p}shape_ok": (shape_ok * occ).sum(), f"{p}shape_ok_held": (shape_ok * held).sum(),
                f"{p}empty_ok": (((out[f"{p}shape"].argmax(-1) == 0) == (t["shape"] == 0)) * w).sum(),
                f"{p}size_ok": ((out[f"{p}size"].argmax(-1) == t["size"]) * occ).sum(),
                f"{p}colour_ok": (colour_ok * occ).sum(),
                f"{p}cell_ok": ((out[f"{p}cell"].argmax(-1) == self.cells) * w).sum(),
                f"{p}rgb_se": (terms[f"{p}rgb"] * w).sum()}
        return sums

    def finalize_eval(self, sums):
        n, occ, held = max(sums["tokens"], 1.0), max(sums["occupied"], 1.0), max(sums["held"], 1.0)
        seen = max(sums["occupied"] - sums["held"], 1.0)
        metrics = {"loss": sums["loss_sum"] / n, "objects": int(sums["occupied"])}
        for p in ("", "latent/") if self.with_latents else ("",):
            metrics |= {
                f"{p}shape_acc": sums[f"{p}shape_ok"] / occ, f"{p}shape_acc_held_out": sums[f"{p}shape_ok_held"] / held,
                f"{p}shape_acc_seen": (sums[f"{p}shape_ok"] - sums[f"{p}shape_ok_held"]) / seen,
                f"{p}size_acc": sums[f"{p}size_ok"] / occ, f"{p}colour_acc": sums[f"{p}colour_ok"] / occ,
                f"{p}empty_acc": sums[f"{p}empty_ok"] / n, f"{p}cell_acc": sums[f"{p}cell_ok"] / n,
                f"{p}rgb_mse": sums[f"{p}rgb_se"] / occ / 3.0}
        return metrics


__all__ = ["SceneParseTask", "SceneParser", "cell_of_token"]
