"""Vision-language model: a vision tower, a connector, and a decoder that reads the visual prefix.

    image [B, S, S, 3] -> vision_tower -> tokens [B, Np, Dv] -> vision_token_norm -> connector
        -> vision_proj -> prefix [B, N, D]                         (D = the decoder's hidden size)
    [prefix, embed(input_ids)] [B, N + L, D] -> decoder backbone -> unembed -> logits

The prefix interface is the PyTorch seed's (``QwenDecoder.forward(input_ids, attention_mask,
prefix_embeds, labels)``, seed 001 sec. 3.1), as the pure function ``concat_prefix``:

1. text embeddings from ``input_ids``, concatenated as ``[prefix_embeds, text_embeds]`` along the
   sequence;
2. ``attention_mask`` extended with ones for the prefix;
3. ``labels`` prefixed with ``IGNORE`` (-100, HF's ignore index), so the image positions are never
   scored;
4. positions continue after the prefix (``cumsum(mask) - 1``: prefix 0..N-1, text from N), which also
   holds for a left-padded prompt in generation (``vlmjax.models.generate``).

Connectors (``VLMConfig.connector``):

    perceiver       Flamingo's Perceiver resampler: N = ``num_latents`` learned latents
                    (``resampler.PerceiverResampler``), then a projector to D
    mlp             LLaVA-1.5's 2-layer MLP projector over every patch token: N = Np
    attention_pool  a MAP head with N = ``pool_probes`` learned probes (``resampler.AttentionPool``)

Parameter tree (the vision side uses the names of ``alignment.AlignmentModel``, so the towers and
heads of an alignment run, or an HF CLIP / SigLIP / DINOv2 checkpoint, load into it):

    vision_tower/...        VisionTransformer (HF names, ``vlmjax/models/vit.py``)
    vision_token_norm/...   LayerNorm on the tower's last hidden state (CLIP leaves it unnormalised)
    vision_resampler/...    PerceiverResampler        (connector='perceiver')
    vision_pool/...         AttentionPool             (connector='attention_pool')
    vision_proj/...         ProjectionHead to D: fc1, fc2 (projector_layers=2) or proj (1)
    decoder/...             the decoder (``Decoder``, ``TRMDecoder``, ``RefinedDecoder``: any module
                            with the decoder protocol embed / backbone / unembed / __call__)

The decoder protocol is re-exported (``embed``, ``backbone``, ``unembed``, ``__call__``), so the one
jitted ``generate`` serves the VLM with ``images=`` (the prefix is computed and prefilled into the
KV cache in the same program) and plain text generation alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import attention as attention_lib
from vlmjax.models import layers
from vlmjax.models import resampler as resampler_lib
from vlmjax.models import vit as vit_lib

Array = jax.Array

IGNORE = -100  # HF's label ignore index (torch CrossEntropyLoss ignore_index)
CONNECTORS = ("perceiver", "mlp", "attention_pool")


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """The connector between the towers (the vision tower and decoder carry their own configs).

    connector: 'perceiver' | 'mlp' | 'attention_pool' (module docstring).
    num_latents: N for 'perceiver' (the seed's ``perceiver_num_latents``, 64 in its VLM profile).
    perceiver_*: depth, heads, width (0 = the vision width), FFN multiplier, latent init std, and
      whether the latents are keys too (``attend_latents``: True = Flamingo, False = media keys only).
    pool_probes / pool_heads: N and heads for 'attention_pool'.
    projector_layers: 1 (linear) | 2 (Linear -> GELU -> Linear, LLaVA-1.5) to the decoder width.
    prefix_dropout: dropout on the prefix embeddings while training (the seed's VLM profile uses 0.2
      dropout against over-fitting a small QA set).
    """

    connector: str = "perceiver"
    num_latents: int = 64
    perceiver_num_layers: int = 2
    perceiver_num_heads: int = 4
    perceiver_dim: int = 0
    perceiver_ffn_mult: int = 4
    perceiver_latent_init_std: float = 1.0
    perceiver_attend_latents: bool = True
    pool_probes: int = 16
    pool_heads: int = 4
    projector_layers: int = 2
    prefix_dropout: float = 0.0
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "dtype", layers.parse_dtype("dtype", self.dtype))

    @property
    def prefix_len(self) -> int | None:
        """N, or None for 'mlp' (one prefix token per patch: the tower decides)."""
        return {"perceiver": self.num_latents, "attention_pool": self.pool_probes}.get(self.connector)

    def validate(self) -> None:
        """Raises ValueError naming the ``config.connector`` field and what it accepts."""
        if self.connector not in CONNECTORS:
            raise ValueError(f"config.connector.type={self.connector!r}; use one of {CONNECTORS}.")
        for name in ("num_latents", "perceiver_num_layers", "perceiver_num_heads", "perceiver_ffn_mult",
                     "pool_probes", "pool_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config.connector.{name}={v!r} must be a positive integer.")
        if self.projector_layers not in (1, 2):
            raise ValueError(f"config.connector.projector_layers={self.projector_layers!r}; use 1 or 2.")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"config.connector.prefix_dropout={self.prefix_dropout!r} must be in [0, 1).")
        attention_lib.validate_implementation("config.connector.attention_impl", self.attention_impl)


def concat_prefix(
    prefix_embeds: Array, text_embeds: Array, attention_mask: Array, labels: Array | None = None
) -> tuple[Array, Array, Array | None, Array]:
    """The seed's prefix injection (sec. 3.1), as one pure function.

    Args:
        prefix_embeds: [B, N, D] visual tokens (N may be 0).
        text_embeds: [B, L, D] ``embed(input_ids)``.
        attention_mask: [B, L], 1 = real token, 0 = padding (right padding in training; left in
            generation).
        labels: [B, L] int, ``IGNORE`` where not scored, or None.

    Returns:
        (embeds [B, N + L, D] in text_embeds' dtype, mask [B, N + L] (ones for the prefix),
        labels [B, N + L] (``IGNORE`` for the prefix) or None, positions [B, N + L] int32: the prefix
        takes 0..N-1 and the text continues from N, counting only real tokens).
    """
    b, n = prefix_embeds.shape[:2]
    if text_embeds.shape[0] != b or prefix_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(f"prefix_embeds {prefix_embeds.shape} does not fit text_embeds {text_embeds.shape}: "
                         "same batch and width needed (the connector projects to the decoder's hidden size).")
    embeds = jnp.concatenate([prefix_embeds.astype(text_embeds.dtype), text_embeds], axis=1)
    mask = jnp.concatenate([jnp.ones((b, n), attention_mask.dtype), attention_mask], axis=1)
    if labels is not None:
        labels = jnp.concatenate([jnp.full((b, n), IGNORE, labels.dtype), labels], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    return embeds, mask, labels, positions


def token_nll(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Next-token NLL per position (HF convention: position t predicts labels[t + 1]).

    Args:
        logits: [B, T, V] float.
        labels: [B, T] int; ``IGNORE`` entries are not scored.

    Returns:
        (nll [B, T - 1], 0 where not scored; valid [B, T - 1] bool), float32 nll: entry t scores
        labels[t + 1].
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.where(valid, picked, 0.0), valid


def next_token_nll(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Summed next-token NLL of ``labels`` (``token_nll`` summed over positions).

    Args:
        logits: [B, T, V] float.
        labels: [B, T] int; ``IGNORE`` entries are not scored.

    Returns:
        (nll [B] summed over scored tokens, count [B] scored tokens), float32.
    """
    nll, valid = token_nll(logits, labels)
    return jnp.sum(nll, axis=1), jnp.sum(valid, axis=1).astype(jnp.float32)


class VisionLanguageModel(nn.Module):
    """Vision tower -> connector -> visual prefix -> decoder (module docstring).

    Attributes:
        vision: the tower's ``ViTConfig`` (CLIP, SigLIP or DINOv2 variant).
        config: the connector's ``VLMConfig``.
        decoder: an unbound decoder module (``Decoder(cfg)``, ``trm.TRMDecoder(cfg)``, ...); it
            becomes the ``decoder/`` subtree.
    """

    vision: vit_lib.ViTConfig
    config: VLMConfig
    decoder: nn.Module

    def setup(self):
        c, v = self.config, self.vision
        c.validate()
        common = dict(dtype=c.dtype, param_dtype=jnp.float32, attention_impl=c.attention_impl)
        self.vision_tower = vit_lib.VisionTransformer(v)
        self.vision_token_norm = layers.LayerNorm(eps=1e-6, dtype=c.dtype)
        if c.connector == "perceiver":
            self.vision_resampler = resampler_lib.PerceiverResampler(
                num_latents=c.num_latents, num_layers=c.perceiver_num_layers, num_heads=c.perceiver_num_heads,
                dim=c.perceiver_dim or None, ffn_mult=c.perceiver_ffn_mult,
                latent_init_std=c.perceiver_latent_init_std, attend_latents=c.perceiver_attend_latents,
                remat=v.remat, **common)
        elif c.connector == "attention_pool":
            self.vision_pool = resampler_lib.AttentionPool(num_heads=c.pool_heads, num_probes=c.pool_probes,
                                                           **common)
        dec = self.decoder.config
        width = getattr(dec, "hidden_size", None) or dec.decoder.hidden_size  # Decoder | TRMDecoder config
        self.vision_proj = resampler_lib.ProjectionHead(features=width, num_layers=c.projector_layers,
                                                        dtype=c.dtype)
        self.prefix_drop = nn.Dropout(rate=c.prefix_dropout)

    # -- the visual prefix ---------------------------------------------------------------------------
    def visual_prefix(self, image: Array, deterministic: bool = True) -> Array:
        """image [B, S, S, 3] (normalised) -> prefix embeddings [B, N, D] in the compute dtype."""
        c = self.config
        out, _ = self.vision_tower(image, deterministic=deterministic)
        tokens = self.vision_token_norm(out["last_hidden_state"])  # [B, Np, Dv]
        if c.connector == "perceiver":
            tokens = self.vision_resampler(tokens)  # [B, N, Dp]
        elif c.connector == "attention_pool":
            tokens = self.vision_pool(tokens)
            tokens = tokens[:, None] if tokens.ndim == 2 else tokens  # one probe -> [B, 1, Dv]
        prefix = self.vision_proj(tokens)
        prefix = self.prefix_drop(prefix, deterministic=deterministic or c.prefix_dropout == 0.0)
        return nn.with_logical_constraint(prefix, (layers.ACT_BATCH, layers.ACT_LEN, layers.ACT_EMBED))

    # -- the decoder protocol (generation, text-only use) --------------------------------------------
    def embed(self, tokens: Array) -> Array:
        """tokens [B, T] -> [B, T, D]."""
        return self.decoder.embed(tokens)

    def backbone(self, inputs_embeds: Array, **kwargs) -> tuple[Array, dict[str, Array]]:
        """The decoder's layers + final norm (``Decoder.backbone``)."""
        return self.decoder.backbone(inputs_embeds, **kwargs)

    def unembed(self, hidden: Array) -> Array:
        """hidden [B, T, D] -> logits [B, T, V] float32."""
        return self.decoder.unembed(hidden)

    def __call__(self, tokens: Array | None = None, **kwargs) -> tuple[Array, dict[str, Array]]:
        """The decoder's own forward (text only; ``Decoder.__call__``): used by KV-cache decoding."""
        return self.decoder(tokens, **kwargs)

    # -- training forward ----------------------------------------------------------------------------
    def forward(
        self,
        image: Array | None,
        input_ids: Array,
        attention_mask: Array,
        labels: Array | None = None,
        *,
        deterministic: bool = True,
        full_logits: bool = False,
    ) -> dict[str, Any]:
        """Prefix + text through the decoder (seed sec. 3.1).

        Args:
            image: [B, S, S, 3], or None for a text-only pass (N = 0: the plain decoder).
            input_ids: [B, L] (right-padded), attention_mask: [B, L], labels: [B, L] with ``IGNORE``.
            deterministic: False enables dropout (needs a "dropout" rng).
            full_logits: also return the logits of every position [B, N + L, V]; by default only the
                text positions are unembedded: prefix positions only predict ``IGNORE`` labels
                (``concat_prefix``), so the loss is the same and the [B, N, V] logits are never built.

        Returns:
            dict with ``logits`` [B, L, V] (text positions; position t predicts token t + 1),
            ``labels`` [B, N + L], ``mask`` [B, N + L], ``prefix_len`` N, ``aux`` (the decoder's),
            ``hidden`` [B, L, D] (the text positions' final hidden states), and with
            ``full_logits`` ``all_logits`` [B, N + L, V].
        """
        text = self.embed(input_ids)
        if image is None:
            prefix = jnp.zeros((input_ids.shape[0], 0, text.shape[-1]), text.dtype)
        else:
            prefix = self.visual_prefix(image, deterministic=deterministic)
        n = prefix.shape[1]
        embeds, mask, ext_labels, positions = concat_prefix(prefix, text, attention_mask, labels)
        hidden, aux = self.backbone(embeds, positions=positions, attention_mask=mask)
        out = dict(labels=ext_labels, mask=mask, prefix_len=n, aux=aux, hidden=hidden[:, n:])
        # Position N - 1 (the last prefix token) would predict input_ids[0], which is never scored
        # (BOS or prompt), so scoring text positions only equals scoring the full sequence.
        out["logits"] = self.unembed(hidden[:, n:])
        if full_logits:
            out["all_logits"] = self.unembed(hidden)
        return out


__all__ = ["CONNECTORS", "IGNORE", "VLMConfig", "VisionLanguageModel", "concat_prefix", "next_token_nll", "token_nll"]
