"""Vision-text alignment models: a vision tower with a pooling head and a text tower, trained with a
contrastive loss into one embedding space, optionally Matryoshka-nested (``configs/pixmo_alignment.py``,
``configs/perceiver_mrl_alignment.py``; ``docs/alignment.md``).

    image [B, S, S, 3] -> vision_tower -> tokens [B, N, Dv] -> head -> z_img [B, E]
    text  [B, T]       -> text_tower   -> pooled [B, Dt]    -> text_proj -> z_txt [B, E]

The vision head is one of three (the seed's switches, checked in this order):

    use_perceiver          PerceiverResampler: tokens -> L latents [B, L, Dp] -> mean over latents
                           -> ProjectionHead -> [B, E]   (the compressed visual representation a
                           decoder later takes as its prefix)
    use_attention_pooling  AttentionPool (a learned MAP probe) over the tokens -> ProjectionHead
    neither                the tower's CLS token ('cls') or the masked token mean ('mean')
                           -> ProjectionHead

Embeddings ``z`` are returned unnormalised; ``matryoshka`` turns them into {m: [B, m]} unit vectors
at every nested dim (MRL, Kusupati et al. 2022: the first m coordinates, tied; or per-dim heads).

Parameter tree (towers keep the HF names of ``vlmjax/models/vit.py`` and ``text_encoder.py``, so
``init_from`` loads CLIP / SigLIP / DINOv2 checkpoints into them):

    vision_tower/...          VisionTransformer
    vision_token_norm/...     LayerNorm of the tokens the resampler / pool read (CLIP's last hidden
                              state is not normalised)
    vision_resampler/...      PerceiverResampler  (use_perceiver)
    vision_pool/...           AttentionPool       (use_attention_pooling, no perceiver)
    vision_proj/..., text_proj/...   ProjectionHead to E
    text_tower/...            TextEncoder
    image_mrl/head_{m}, text_mrl/head_{m}   [m, m]   (untied MRL only)
    logit_scale []            learned log-temperature (CLIP init log(1/0.07); SigLIP log(10))
    logit_bias  []            SigLIP's learned bias (init -10); unused by the CLIP loss
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import attention as attention_lib
from vlmjax.models import layers
from vlmjax.models import resampler as resampler_lib
from vlmjax.models import text_encoder as text_lib
from vlmjax.models import vit as vit_lib

Array = jax.Array

LOSSES = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class AlignmentConfig:
    """Hyper-parameters of the heads and the loss (the towers carry their own configs).

    embed_dim: E, the shared embedding size (the largest MRL dim).
    use_perceiver / perceiver_*: the resampler path. ``perceiver_dim`` 0 = the vision width;
      ``perceiver_latent_init_std``: std of the learned latents (see ``PerceiverResampler``).
    use_attention_pooling / pool_heads: the MAP-probe path (ignored when use_perceiver).
    pooling: 'cls' | 'mean' when neither head is used.
    projection_layers: 1 (linear) | 2 (MLP) for both projections.
    mrl_dims: nested Matryoshka dims, largest == embed_dim; () = only embed_dim.
    mrl_tied: True = MRL-E (prefixes of one embedding), False = a head per dim.
    loss: 'clip' (InfoNCE, learned temperature) | 'siglip' (sigmoid, learned temperature and bias).
    """

    embed_dim: int = 256
    use_perceiver: bool = False
    perceiver_num_latents: int = 64
    perceiver_num_layers: int = 3
    perceiver_num_heads: int = 4
    perceiver_dim: int = 0
    perceiver_ffn_mult: int = 4
    perceiver_latent_init_std: float = 1.0
    use_attention_pooling: bool = True
    pool_heads: int = 4
    pooling: str = "cls"
    projection_layers: int = 2
    mrl_dims: tuple[int, ...] = ()
    mrl_tied: bool = True
    loss: str = "clip"
    logit_scale_init: float = 0.0  # 0 = the loss's default (CLIP log(1/0.07), SigLIP log(10))
    logit_bias_init: float = -10.0
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "mrl_dims", tuple(int(m) for m in self.mrl_dims))
        object.__setattr__(self, "dtype", layers.parse_dtype("dtype", self.dtype))

    @property
    def dims(self) -> tuple[int, ...]:
        """The embedding dims trained and evaluated, largest first."""
        return tuple(sorted(self.mrl_dims or (self.embed_dim,), reverse=True))

    @property
    def head(self) -> str:
        if self.use_perceiver:
            return "perceiver"
        return "attention_pool" if self.use_attention_pooling else self.pooling

    def validate(self) -> None:
        """Raises ValueError naming the ``config.model`` field and what it accepts."""
        for name in ("embed_dim", "perceiver_num_latents", "perceiver_num_layers", "perceiver_num_heads",
                     "pool_heads", "perceiver_ffn_mult"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config.model.{name}={v!r} must be a positive integer.")
        if self.pooling not in resampler_lib.POOL_MODES:
            raise ValueError(f"config.model.pooling={self.pooling!r}; use one of {resampler_lib.POOL_MODES}.")
        if self.projection_layers not in (1, 2):
            raise ValueError(f"config.model.projection_layers={self.projection_layers!r}; use 1 (linear) or 2 (MLP).")
        if self.loss not in LOSSES:
            raise ValueError(f"config.model.loss={self.loss!r}; use one of {LOSSES}.")
        if self.mrl_dims:
            try:
                resampler_lib.validate_dims(self.mrl_dims, self.embed_dim)
            except ValueError as e:
                raise ValueError(f"config.model.mrl_dims: {e}") from None
        if not self.perceiver_latent_init_std > 0:
            raise ValueError(f"config.model.perceiver_latent_init_std={self.perceiver_latent_init_std!r} must be > 0.")
        attention_lib.validate_implementation("config.model.attention_impl", self.attention_impl)


class AlignmentModel(nn.Module):
    """Two towers + heads -> unnormalised embeddings ``z_img``, ``z_txt`` [B, E] (float32)."""

    vision: vit_lib.ViTConfig
    text: text_lib.TextEncoderConfig
    config: AlignmentConfig

    def setup(self):
        c, v = self.config, self.vision
        self.vision_tower = vit_lib.VisionTransformer(v)
        self.text_tower = text_lib.TextEncoder(self.text)
        common = dict(dtype=c.dtype, param_dtype=jnp.float32, attention_impl=c.attention_impl)
        if c.head != "cls":
            self.vision_token_norm = layers.LayerNorm(eps=1e-6, dtype=c.dtype, name="vision_token_norm")
        if c.use_perceiver:
            self.vision_resampler = resampler_lib.PerceiverResampler(
                num_latents=c.perceiver_num_latents, num_layers=c.perceiver_num_layers,
                num_heads=c.perceiver_num_heads, dim=c.perceiver_dim or None, ffn_mult=c.perceiver_ffn_mult,
                latent_init_std=c.perceiver_latent_init_std, remat=v.remat, **common)
        elif c.use_attention_pooling:
            self.vision_pool = resampler_lib.AttentionPool(num_heads=c.pool_heads, **common)
        proj = dict(features=c.embed_dim, num_layers=c.projection_layers, dtype=c.dtype)
        self.vision_proj = resampler_lib.ProjectionHead(**proj)
        self.text_proj = resampler_lib.ProjectionHead(**proj)
        if c.mrl_dims and not c.mrl_tied:
            self.image_mrl = resampler_lib.MatryoshkaHead(c.dims, tied=False, dtype=c.dtype)
            self.text_mrl = resampler_lib.MatryoshkaHead(c.dims, tied=False, dtype=c.dtype)
        default_scale = math.log(1 / 0.07) if c.loss == "clip" else math.log(10.0)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(c.logit_scale_init or default_scale), ()), (), jnp.float32)
        self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(
            nn.initializers.constant(c.logit_bias_init), ()), (), jnp.float32)

    def visual_tokens(self, image: Array, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
        """image [B, S, S, 3] -> (what the head reads, tower outputs): [B, N, D] tokens, or the
        pooled [B, Dv] for 'cls'. The Perceiver path returns its latents [B, L, Dp] (a decoder's
        visual prefix)."""
        c = self.config
        out, _ = self.vision_tower(image, deterministic=deterministic)
        if c.head == "cls":
            pooled = out.get("pooler_output")
            if pooled is None:
                raise ValueError(f"config.model.pooling='cls' needs a vision tower with a CLS token; this "
                                 f"{self.vision.variant} tower has none. Use pooling='mean' or attention pooling.")
            return pooled, out
        tokens = self.vision_token_norm(out["last_hidden_state"])
        if c.use_perceiver:
            return self.vision_resampler(tokens), out
        return tokens, out

    def encode_image(self, image: Array, deterministic: bool = True) -> Array:
        """image: [B, S, S, 3] normalised -> z_img [B, E] float32 (unnormalised)."""
        c = self.config
        x, _ = self.visual_tokens(image, deterministic)
        if c.use_perceiver:
            x = jnp.mean(x, axis=1)  # the latents are the representation; their mean is the embedding
        elif c.use_attention_pooling:
            x = self.vision_pool(x)
        elif c.pooling == "mean":
            x = resampler_lib.pool_tokens(x, None, "mean")
        return self.vision_proj(x).astype(jnp.float32)

    def encode_text(self, text: Array, text_valid: Array) -> Array:
        """text: [B, T] ids (BOS ... EOS pad); text_valid: [B, T] -> z_txt [B, E] float32."""
        out, _ = self.text_tower(text, attention_mask=text_valid)
        return self.text_proj(out["pooler_output"]).astype(jnp.float32)

    def matryoshka(self, z_img: Array, z_txt: Array) -> tuple[dict[int, Array], dict[int, Array]]:
        """Unit embeddings at every dim of ``config.dims``: ({m: [B, m]}, {m: [B, m]})."""
        c = self.config
        if c.mrl_dims and not c.mrl_tied:
            return self.image_mrl(z_img), self.text_mrl(z_txt)
        return (resampler_lib.mrl_embeddings(z_img, c.dims), resampler_lib.mrl_embeddings(z_txt, c.dims))

    def __call__(self, image: Array, text: Array, text_valid: Array, deterministic: bool = True
                 ) -> tuple[dict[int, Array], dict[int, Array], dict[str, Array]]:
        """-> (image embeddings {m: [B, m]}, text embeddings {m: [B, m]}, {'logit_scale', 'logit_bias'})."""
        img, txt = self.matryoshka(self.encode_image(image, deterministic), self.encode_text(text, text_valid))
        return img, txt, {"logit_scale": self.logit_scale, "logit_bias": self.logit_bias}


__all__ = ["LOSSES", "AlignmentConfig", "AlignmentModel"]
