"""Frame classification on video clips: trains a ViT backbone (``task='video_cls'``; experiment:
``configs/video_cls.py``).

Every frame of a clip is one example labelled with the clip's class (the main sprite's class on the
procedural video of ``vlmjax.data.procedural_video``). ``configs/reuse.py`` runs it as its stage
'backbone': the small ViT that token reuse is then distilled against when no pretrained backbone is
given (``init_from``), so the default needs nothing downloaded. Its params are ``{'vit': <ViT params,
the names of vlmjax.models.vit.VisionTransformer>, 'head': linear classifier}``.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
import flax.linen as nn

from vlmjax import data as data_lib
from vlmjax.data import image_processing
from vlmjax.train import checkpoint
from vlmjax.models import layers, vit
from vlmjax.tasks.base import DataTask


def vit_config() -> ml_collections.ConfigDict:
    """``config.model`` of a small CLIP-style ViT (fields of ``vit.ViTConfig``)."""
    return ml_collections.ConfigDict(dict(
        variant="clip", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        patch_size=16, image_size=64, hidden_act="quick_gelu", layer_norm_eps=1e-5, dtype="float32"))


def normalize(frames, mean=image_processing.OPENAI_CLIP_MEAN, std=image_processing.OPENAI_CLIP_STD):
    """[..., 3] pixels in [0, 1] (or uint8 [0, 255]) -> the normalised input a CLIP ViT expects."""
    frames = jnp.asarray(frames)
    if frames.dtype == jnp.uint8:
        frames = frames.astype(jnp.float32) / 255.0
    return (frames.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def build_vit_config(model_cfg) -> vit.ViTConfig:
    cfg = vit.ViTConfig(**dict(model_cfg))
    cfg.validate()
    return cfg


class FrameClassifier(nn.Module):
    """ViT + linear head on the pooled embedding: frames [B, H, W, C] -> logits [B, K]."""

    config: vit.ViTConfig
    num_classes: int

    @nn.compact
    def __call__(self, pixels, deterministic: bool = True):
        out, _ = vit.VisionTransformer(self.config, name="vit")(pixels, deterministic=deterministic)
        pooled = out["pooler_output"] if "pooler_output" in out else out["last_hidden_state"].mean(1)
        return layers.DenseGeneral(self.num_classes, kernel_axes=("embed", None), use_bias=True,
                                   dtype=jnp.float32, name="head")(pooled)


class VideoClsTask(DataTask):
    units = "frames"

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        self.data = data_lib.build_video_data(config.data)
        self.vit_config = build_vit_config(config.model)
        if config.model.image_size != config.data.image_size or config.model.patch_size != config.data.patch_size:
            raise ValueError(f"config.model (image_size {config.model.image_size}, patch_size "
                             f"{config.model.patch_size}) must match config.data ({config.data.image_size}, "
                             f"{config.data.patch_size}).")
        self.model = FrameClassifier(self.vit_config, self.data.num_classes)

    @classmethod
    def needed_stages(cls, config) -> tuple[str, ...]:
        return () if config.get("init_from") else super().needed_stages(config)

    def pretrained_params(self, abstract_params, shardings):
        """Progressive stacking (Gong et al., ICML 2019, "Efficient Training of BERT by Progressively
        Stacking"): a deep ViT starts from a trained shallower one of the same width.

        The source is ``config.init_from`` or the stage 'shallow' (a video_cls workdir). Its
        embeddings, final norm and head are copied; layer i of this L-layer model starts as layer
        floor(i L_src / L) of the L_src-layer source (4 -> 12: every layer three times, in order).
        A 12-layer ViT from scratch sat at chance for 1000 steps (96 px clips with small sprites, loss
        1.39 -> 1.38, measured on a 2-core CPU); stacked from a trained 4-layer one it starts where
        that one ended (``configs/reuse.py:deep``).
        """
        source = self.config.get("init_from") or self.stage_dirs.get("shallow")
        if not source:
            return None
        loaded, step = checkpoint.load_params(source)
        src_vit, dst_vit = loaded.get("vit", {}), abstract_params["vit"]
        src_layers = sorted((k for k in src_vit if k.startswith("layers_")), key=lambda k: int(k[7:]))
        dst_layers = sorted((k for k in dst_vit if k.startswith("layers_")), key=lambda k: int(k[7:]))
        if not src_layers or "head" not in loaded:
            raise ValueError(f"init_from={source!r} (step {step}) is not a video_cls run (no vit/layers_* and head).")
        vit_params = {k: v for k, v in src_vit.items() if not k.startswith("layers_")}
        for i, name in enumerate(dst_layers):
            vit_params[name] = src_vit[src_layers[i * len(src_layers) // len(dst_layers)]]
        params = {"vit": vit_params, "head": loaded["head"]}
        shapes = lambda t: {jax.tree_util.keystr(k): tuple(v.shape)
                            for k, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(t))}
        if shapes(params) != shapes(abstract_params):
            raise ValueError(f"init_from={source!r}: its ViT (width, heads, image or patch size) differs from "
                             "config.model beyond the number of layers; stacking needs the same width.")
        print(f"Backbone: {len(dst_layers)} layers stacked from the {len(src_layers)} of {source} (step {step})",
              flush=True)
        if shardings is None:
            return jax.tree.map(jnp.asarray, params)
        return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)


    def units_per_step(self, global_batch_size):
        return global_batch_size * int(self.config.data.num_frames)

    def init_variables(self, rng):
        s = self.vit_config.image_size
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))

    def _forward(self, params, batch, rng=None):
        frames = normalize(batch["frames"])
        f = frames.shape[1]
        rngs = {"dropout": rng} if rng is not None else {}
        logits = self.model.apply({"params": params}, einops.rearrange(frames, "b f h w c -> (b f) h w c"),
                                  deterministic=rng is None, rngs=rngs)
        labels = jnp.repeat(batch["label"], f)
        weight = jnp.repeat(batch["mask"].astype(jnp.float32), f)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels) * weight
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * weight
        return nll, correct, weight

    def loss_fn(self, params, model_state, batch, rng, step):
        del step
        nll, correct, weight = self._forward(params, batch, rng)
        n = jnp.maximum(weight.sum(), 1.0)
        loss = nll.sum() / n
        return loss, {"metrics": {"loss": loss, "accuracy": correct.sum() / n}, "model_state": model_state}

    def eval_fn(self, params, model_state, batch):
        nll, correct, weight = self._forward(params, batch)
        return {"nll_sum": nll.sum(), "correct_sum": correct.sum(), "frames": weight.sum()}

    def finalize_eval(self, sums):
        n = max(sums.get("frames", 0.0), 1.0)
        return {"loss": sums["nll_sum"] / n, "accuracy": sums["correct_sum"] / n, "frames": int(n)}
