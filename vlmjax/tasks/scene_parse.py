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

Params use the VLM's names (``vision_tower/``, ``vision_token_norm/``; the head is
``parse_head/``), so the VLM and fusion experiments start their towers from this run (their stage
'vision', ``vlm.VISION_STAGE``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlmjax.data import scene_parse as data_lib
from vlmjax.models import layers, vit as vit_lib
from vlmjax.tasks.base import Task

NUM_CELLS = data_lib.NUM_CELLS
NUM_SIZES = 3  # empty, small, large


def cell_of_token(grid: int) -> np.ndarray:
    """int32 [grid * grid]: the 3x3 cell (row-major) each patch token of a grid x grid tower lies in
    (its top-left pixel's cell: exact when 3 divides grid)."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return ((rows * 3 // grid) * 3 + cols * 3 // grid).astype(np.int32)


class SceneParser(nn.Module):
    """ViT -> LayerNorm over the tokens -> one linear head per patch token.

    ``__call__(image [B, S, S, 3])`` -> dict ``shape`` [B, Np, 1 + num_shapes], ``size`` [B, Np, 3],
    ``rgb`` [B, Np, 3] (sigmoid), ``cell`` [B, Np, 9] (float32 logits).
    """

    vision: vit_lib.ViTConfig
    num_shapes: int
    dtype: str = "float32"

    def setup(self):
        self.vision_tower = vit_lib.VisionTransformer(self.vision)
        self.vision_token_norm = layers.LayerNorm(eps=1e-6, dtype=self.dtype)  # the VLM's name and eps
        self.widths = (1 + self.num_shapes, NUM_SIZES, 3, NUM_CELLS)
        self.parse_head = layers.DenseGeneral(sum(self.widths), kernel_axes=("embed", None), use_bias=True,
                                              dtype=jnp.float32)

    def __call__(self, image, deterministic: bool = True):
        out, _ = self.vision_tower(image, deterministic=deterministic)
        tokens = self.vision_token_norm(out["last_hidden_state"])[:, self.vision.num_prefix_tokens:]
        logits = self.parse_head(tokens.astype(jnp.float32))  # [B, Np, sum(widths)]
        shape, size, rgb, cell = jnp.split(logits, np.cumsum(self.widths)[:-1], axis=-1)
        return {"shape": shape, "size": size, "rgb": jax.nn.sigmoid(rgb), "cell": cell}


class SceneParseTask(Task):
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
        self.model = SceneParser(vcfg, len(sc.shapes), m.dtype)

    # ---- data ---------------------------------------------------------------------------
    def train_dataset(self, *, global_batch_size, seed, process_index, process_count):
        return self.data.train_dataset(global_batch_size=global_batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count)

    def eval_batches(self, *, global_batch_size, process_index, process_count):
        return self.data.eval_batches(global_batch_size=global_batch_size, process_index=process_index,
                                      process_count=process_count, max_batches=self.config.eval.max_batches)

    # ---- model --------------------------------------------------------------------------
    def init_variables(self, rng):
        s = self.vision_config.image_size
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))

    def _terms(self, params, batch, rng=None):
        """Per-token losses and predictions; targets of a token = those of its cell."""
        rngs = {"dropout": rng} if rng is not None else {}
        out = self.model.apply({"params": params}, batch["image"], deterministic=rng is None, rngs=rngs)
        t = {k: jnp.take(batch[k], self.cells, axis=1) for k in ("shape", "size", "rgb", "colour", "held_out")}
        occupied = (t["shape"] > 0).astype(jnp.float32)  # [B, Np]
        cell = jnp.broadcast_to(self.cells, t["shape"].shape)
        ce = optax.softmax_cross_entropy_with_integer_labels
        terms = {"shape": ce(out["shape"], t["shape"]), "size": ce(out["size"], t["size"]),
                 "rgb": ((out["rgb"] - t["rgb"]) ** 2).sum(-1) * occupied, "cell": ce(out["cell"], cell)}
        return out, t, occupied, terms

    def loss_fn(self, params, model_state, batch, rng, step):
        del step
        out, t, occupied, terms = self._terms(params, batch, rng)
        means = {k: v.mean() if k != "rgb" else v.sum() / jnp.maximum(occupied.sum(), 1.0) for k, v in terms.items()}
        loss = sum(self.weights[k] * means[k] for k in means)
        correct = ((out["shape"].argmax(-1) == t["shape"]) * occupied).sum() / jnp.maximum(occupied.sum(), 1.0)
        metrics = {"loss": loss, "shape_acc": correct, **{f"loss_{k}": v for k, v in means.items()}}
        return loss, {"metrics": metrics, "model_state": model_state}

    def eval_fn(self, params, model_state, batch):
        del model_state
        out, t, occupied, terms = self._terms(params, batch)
        w = batch["mask"].astype(jnp.float32)[:, None]  # [B, 1]: padding rows count nothing
        occ = occupied * w
        held = occ * (t["held_out"] > 0)
        shape_ok = (out["shape"].argmax(-1) == t["shape"]).astype(jnp.float32)
        # Colour name of a palette object = the configured palette colour nearest the predicted RGB.
        dist = ((out["rgb"][..., None, :] - self.palette) ** 2).sum(-1)  # [B, Np, C]
        colour_ok = (dist.argmin(-1) + 1 == t["colour"]).astype(jnp.float32)
        return {
            "tokens": w.sum() * occupied.shape[1], "occupied": occ.sum(), "held": held.sum(),
            "shape_ok": (shape_ok * occ).sum(), "shape_ok_held": (shape_ok * held).sum(),
            "empty_ok": (((out["shape"].argmax(-1) == 0) == (t["shape"] == 0)) * w).sum(),
            "size_ok": ((out["size"].argmax(-1) == t["size"]) * occ).sum(),
            "colour_ok": (colour_ok * occ).sum(), "cell_ok": ((out["cell"].argmax(-1) == self.cells) * w).sum(),
            "rgb_se": (terms["rgb"] * w).sum(),
            "loss_sum": sum(self.weights[k] * (terms[k] * w).sum() for k in ("shape", "size", "cell")),
        }

    def finalize_eval(self, sums):
        n, occ, held = max(sums["tokens"], 1.0), max(sums["occupied"], 1.0), max(sums["held"], 1.0)
        seen = max(sums["occupied"] - sums["held"], 1.0)
        return {
            "loss": (sums["loss_sum"] + self.weights["rgb"] * sums["rgb_se"]) / n,
            "shape_acc": sums["shape_ok"] / occ, "shape_acc_held_out": sums["shape_ok_held"] / held,
            "shape_acc_seen": (sums["shape_ok"] - sums["shape_ok_held"]) / seen,
            "size_acc": sums["size_ok"] / occ, "colour_acc": sums["colour_ok"] / occ,
            "empty_acc": sums["empty_ok"] / n, "cell_acc": sums["cell_ok"] / n,
            "rgb_mse": sums["rgb_se"] / occ / 3.0, "objects": int(sums["occupied"]),
        }


__all__ = ["SceneParseTask", "SceneParser", "cell_of_token"]
