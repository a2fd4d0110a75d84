"""Two-tower image-text contrastive models: CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023).

    img = normalize(visual_projection(vision_model(pixels).pooler_output))   (SigLIP: no projection)
    txt = normalize(text_projection(text_model(ids).pooler_output))          (SigLIP: no projection)
    logits_per_text  = exp(logit_scale) * txt @ img.T  (+ logit_bias for SigLIP)    [Bt, Bi]
    logits_per_image = logits_per_text.T                                            [Bi, Bt]

CLIP trains these logits with a softmax cross-entropy in both directions, SigLIP with a pairwise
sigmoid loss (hence its learned bias); the module only produces them.

Parameter tree (HF ``CLIPModel`` / ``SiglipModel`` names in brackets):

    vision_model/...                    [vision_model....]   (see vlmjax/models/vit.py)
    text_model/...                      [text_model....]     (see vlmjax/models/text_encoder.py)
    visual_projection/kernel  [Dv, P]   [visual_projection.weight.T]   (CLIP only, no bias)
    text_projection/kernel    [Dt, P]   [text_projection.weight.T]     (CLIP only, no bias)
    logit_scale               []        [logit_scale]  (SigLIP: [1] in HF)
    logit_bias                []        [logit_bias]   (SigLIP only; [1] in HF)

The towers are passed in as modules (``TwoTower(vision_model=VisionTransformer(...),
text_model=TextEncoder(...), config=...)``), so any vision tower returning
``({"pooler_output": [B, Dv], ...}, aux)`` and taking ``deterministic=`` fits. Embeddings, norms and logits are float32 whatever
the towers' compute dtype.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import layers
from vlmjax.models.text_encoder import TextEncoder

Array = jax.Array

VARIANTS = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    """Head hyper-parameters of a two-tower model (the towers carry their own configs).

    variant: "clip" (projections, learned temperature) | "siglip" (no projections, temperature and
      bias).
    projection_dim: CLIP's shared embedding size P (HF ``projection_dim``); unused by SigLIP.
    logit_scale_init_value: initial log-temperature: CLIP ``log(1/0.07) = 2.6592`` (HF default);
      SigLIP ``log(10)`` (paper, section 3.1).
    logit_bias_init_value: SigLIP's initial bias, ``-10`` (paper); unused by CLIP.
    """

    variant: str = "clip"
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float = -10.0
    initializer_range: float = 0.02

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not a two-tower model; use one of {VARIANTS}.")
        if self.variant == "clip" and (not isinstance(self.projection_dim, int)
                                       or self.projection_dim <= 0):
            raise ValueError(f"projection_dim must be a positive integer, got {self.projection_dim!r}.")


def siglip_config(**overrides) -> TwoTowerConfig:
    """SigLIP head defaults from the paper: temperature init log(10), bias init -10."""
    values = dict(variant="siglip", projection_dim=0, logit_scale_init_value=math.log(10.0),
                  logit_bias_init_value=-10.0)
    values.update(overrides)
    return TwoTowerConfig(**values)


def l2_normalize(x: Array) -> Array:
    """x: [B, P] -> x / ||x||_2 in float32 (HF divides by the norm, no epsilon)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class TwoTower(nn.Module):
    """Image and text towers with a contrastive head; see the module docstring.

    Methods (all usable with ``model.apply(..., method=...)``): ``__call__``, ``encode_image``,
    ``encode_text``.
    """

    vision_model: nn.Module
    text_model: TextEncoder
    config: TwoTowerConfig

    def setup(self):
        c = self.config
        c.validate()
        text_variant = self.text_model.config.variant
        if text_variant != c.variant:
            raise ValueError(f"TwoTower variant={c.variant!r} needs a {c.variant} text tower, got "
                             f"TextEncoder variant={text_variant!r}.")
        if c.variant == "clip":
            # HF visual_projection.weight [P, Dv] / text_projection.weight [P, Dt] -> kernel [D, P].
            proj = lambda: layers.DenseGeneral(c.projection_dim, kernel_axes=("embed", None),
                                               initializer_range=c.initializer_range,
                                               preferred_element_type=jnp.float32)
            self.visual_projection = proj()
            self.text_projection = proj()
        scalar = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())
        self.logit_scale = self.param("logit_scale", scalar(c.logit_scale_init_value), (), jnp.float32)
        if c.variant == "siglip":
            self.logit_bias = self.param("logit_bias", scalar(c.logit_bias_init_value), (),
                                         jnp.float32)

    def encode_image(self, pixel_values: Array, *, normalize: bool = False,
                     deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
        """pixel_values: [B, H, W, 3] NHWC float -> (image embedding [B, P] float32, aux).

        Unnormalized unless ``normalize`` (HF ``get_image_features``); aux keys ``vision_model/...``.
        ``deterministic=False`` enables the vision tower's dropout / stochastic depth ("dropout" rng).
        """
        out, aux = self.vision_model(pixel_values, deterministic=deterministic)
        if "pooler_output" not in out:
            raise ValueError("The vision tower returns no pooler_output (a SigLIP tower with pool='none', "
                             "HF vision_use_head=False); a two-tower model needs a pooled image embedding.")
        x = out["pooler_output"].astype(jnp.float32)
        if self.config.variant == "clip":
            x = self.visual_projection(x)
        x = l2_normalize(x) if normalize else x
        return x, {f"vision_model/{k}": v for k, v in aux.items()}

    def encode_text(self, input_ids: Array, attention_mask: Array | None = None, *,
                    normalize: bool = False) -> tuple[Array, dict[str, Array]]:
        """input_ids: [B, T] int; attention_mask: [B, T] or None -> (text embedding [B, P] f32, aux).

        Unnormalized unless ``normalize`` (HF ``get_text_features``); aux keys ``text_model/...``.
        """
        out, aux = self.text_model(input_ids, attention_mask)
        x = out["pooler_output"].astype(jnp.float32)
        if self.config.variant == "clip":
            x = self.text_projection(x)
        x = l2_normalize(x) if normalize else x
        return x, {f"text_model/{k}": v for k, v in aux.items()}

    def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None, *,
                 deterministic: bool = True) -> tuple[dict[str, Array], dict[str, Array]]:
        """Embeds both modalities and scores every image against every text.

        Args:
            pixel_values: [Bi, H, W, 3] NHWC float images (already normalised for the tower).
            input_ids: [Bt, T] int token ids.
            attention_mask: [Bt, T], 1 = real token, 0 = padding; None = no padding.
            deterministic: False enables the vision tower's dropout (needs a "dropout" rng).

        Returns:
            ({"image_embeds": [Bi, P] unit-norm, "text_embeds": [Bt, P] unit-norm,
              "logits_per_image": [Bi, Bt], "logits_per_text": [Bt, Bi],
              "logit_scale": [] the multiplier exp(logit_scale), "logit_bias": [] (0 for CLIP)},
             aux with ``vision_model/...`` and ``text_model/...`` keys); all float32.
        """
        img, img_aux = self.encode_image(pixel_values, normalize=True, deterministic=deterministic)
        txt, txt_aux = self.encode_text(input_ids, attention_mask, normalize=True)
        if txt.shape[-1] != img.shape[-1]:
            raise ValueError(
                f"Text embeddings have size {txt.shape[-1]} but image embeddings {img.shape[-1]}: a "
                "SigLIP text tower's projection_size must equal the vision tower's hidden_size.")
        scale = jnp.exp(self.logit_scale)
        bias = self.logit_bias if self.config.variant == "siglip" else jnp.zeros((), jnp.float32)
        # Full fp32 precision: on TPU a default-precision fp32 matmul rounds operands to bf16.
        cos = jnp.einsum("tp,ip->ti", txt, img, precision=jax.lax.Precision.HIGHEST)
        logits_per_text = cos * scale + bias
        out = {
            "image_embeds": img,
            "text_embeds": txt,
            "logits_per_image": logits_per_text.T,
            "logits_per_text": logits_per_text,
            "logit_scale": scale,
            "logit_bias": bias,
        }
        return out, {**img_aux, **txt_aux}
