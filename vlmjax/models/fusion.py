"""Flamingo-style fusion for VQA: gated cross-attention blocks interleaved with a decoder's layers.

Flamingo (Alayrac et al. 2022, sec. 2.1 and fig. 4) conditions a frozen language model on visual
tokens by inserting GATED XATTN-DENSE blocks between its layers: the text tokens are the queries,
the visual tokens the keys and values, and each branch is scaled by ``tanh(alpha)`` with ``alpha``
initialised at 0, so at initialisation the model is exactly the pretrained language model.

    image [B, S, S, 3] -> vision_tower -> [B, Nv, Dv] -> vision_token_norm -> vision_proj -> [B, Nv, D]
        -> * sigmoid(vision_gate_logit)             (the PyTorch seed's vision gate, init 1.5)
    question [B, T] -> embed -> for i in range(L):
                                    if i % k == 0:  x = xattn_{i // k}(x, visual)   (k = L // N)
                                    x = layers_i(x)
                             -> norm -> hidden [B, T, D]
        head='classify': masked mean (or last real token) of hidden -> answer_head -> [B, num_answers]
        head='generate': unembed -> [B, T, V]; answers are generated as text

``GatedCrossAttentionBlock`` (one GATED XATTN-DENSE, Flamingo fig. 4):

    x = x + tanh(alpha_attn) * CrossAttn(q=LN(x), kv=visual)    padded visual keys never attended;
                                                               a row without any real visual token
                                                               gets no attention update (OpenFlamingo)
    x = x + tanh(alpha_ffn)  * FFW(x)                           FFW = LN -> Dense(mult D) -> GELU -> Dense
    padded query rows (text mask 0) get no update from either branch.

``FusionDecoder`` is a ``decoder.Decoder`` subclass: the decoder keeps its own parameter names, so a
pretrained HF Llama / Qwen decoder (``vlmjax.convert``) loads into it unchanged, and the fusion
parameters are new subtrees next to them. ``FusionVQAModel`` puts the vision tower in front with the
module names of ``vlm.VisionLanguageModel`` (``vision_tower``, ``vision_token_norm``, ``vision_proj``),
so HF CLIP / SigLIP / DINOv2 towers load through the same converter and freeze regexes carry over.

Parameter tree (``D`` decoder width, ``H`` = ``xattn_num_heads``, ``Dh`` head dim, ``F = mult * D``):

    FusionDecoder (as decoder.Decoder, plus)
        embed_tokens/..., layers_{i}/..., norm/..., lm_head/...       unchanged (HF names)
        xattn_{j}/norm/{scale,bias}                    [D]            LayerNorm of the text queries
        xattn_{j}/attn/{q,k,v}_proj/kernel             [D, H, Dh]     (resampler.CrossAttention)
        xattn_{j}/attn/out_proj/kernel                 [H, Dh, D]
        xattn_{j}/ffn/norm/{scale,bias}                [D]            (resampler.PerceiverFeedForward)
        xattn_{j}/ffn/fc1/kernel [D, F], ffn/fc2/kernel [F, D]
        xattn_{j}/alpha_attn, xattn_{j}/alpha_ffn      []             tanh gates, init 0
        vision_gate_logit                              []             use_vision_gate; init vision_gate_init
    FusionVQAModel
        vision_tower/...          VisionTransformer (HF names, ``vit.py``)
        vision_token_norm/...     LayerNorm on the tower's last hidden state
        vision_proj/...           ProjectionHead to D: proj (projector_layers=1) or fc1, fc2 (2)
        decoder/...               FusionDecoder (above)
        answer_head/fc1, fc2      ProjectionHead to num_answers        (head='classify')

Aux (flat dict, ``backbone`` / ``forward``): ``xattn_{j}/attn_gate`` and ``xattn_{j}/ffn_gate``
(tanh(alpha), scalars) and ``vision_gate`` (sigmoid(logit), scalar; absent without
``use_vision_gate``), plus the decoder layers' own ``layers_{i}/...``. Pooled image features are
returned by ``visual_features`` and ``forward`` (keys ``image_pooled`` [B, D], ``tower_pooled``
[B, Dv]), not in aux: aux holds scalars that tasks average into metrics.

Generation. The cross-attention keeps no cache (the visual tokens are fixed), so every decode step
needs the visual tokens. They travel as a read-only variable collection, ``visual_inputs``
(``visual_state(tokens, mask)``), which ``generate.generate`` passes to every call through its
``model_state`` argument; ``backbone`` and ``__call__`` read it when no ``visual=`` is given. So the
one jitted ``generate`` serves the fusion models unchanged: ``generate_with_visual`` computes the
visual tokens once (``visual_features``) and calls it. The k/v projections of the visual tokens are
recomputed at each step (B * Nv * D * 2 H Dh multiply-adds per block per step): the cache shapes come
from ``init`` without images, so they cannot hold Nv-long visual keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import config_util
from vlmjax.models import attention as attention_lib
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import generate as generate_lib
from vlmjax.models import layers
from vlmjax.models import resampler as resampler_lib
from vlmjax.models import vit as vit_lib

Array = jax.Array
Dtype = Any

HEADS = ("classify", "generate")
ANSWER_POOLS = ("mean", "last")
# The read-only collection that carries the visual tokens into decode steps (``visual_state``).
VISUAL_COLLECTION = "visual_inputs"


def fusion_layer_indices(num_hidden_layers: int, num_fusion_layers: int) -> tuple[int, ...]:
    """Decoder layer indices that get a cross-attention block in front: ``xattn_j`` runs before
    ``layers_{j * k}``, k = num_hidden_layers // num_fusion_layers (Flamingo's interleaving: a
    GATED XATTN-DENSE every k-th LM layer, fig. 4). () for num_fusion_layers = 0."""
    if num_fusion_layers == 0:
        return ()
    k = num_hidden_layers // num_fusion_layers
    return tuple(j * k for j in range(num_fusion_layers))


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """The ``config.fusion`` section (the decoder and vision tower carry their own configs).

    num_fusion_layers: N gated cross-attention blocks, one before every k-th decoder layer
      (k = num_hidden_layers // N, which N must divide); 0 = no fusion (a question-only model).
      The seed's ablation: 2 | 4 | 6.
    use_vision_gate / vision_gate_init: scale the visual tokens by sigmoid(vision_gate_logit) before
      the blocks, the logit initialised at vision_gate_init (seed: 1.5, sigmoid = 0.82).
    head: 'classify' (answer_head over num_answers answers, ViVQA practice) | 'generate' (the LM head).
    num_answers: size of the answer vocabulary (head='classify').
    answer_pool: 'mean' (masked mean over the question tokens) | 'last' (the last real token).
    answer_mlp_dim: hidden width of the 2-layer answer head; 0 = the decoder width.
    projector_layers: vision_proj: 1 (linear, the seed's 768 -> 1024) | 2 (Dense -> GELU -> Dense).
    xattn_num_heads / xattn_head_dim (0 = D / heads) / xattn_ffn_mult: the blocks' shape.
    gate_init: the initial alpha of every block's two tanh gates. 0 (Flamingo) leaves a pretrained
      language model unchanged at step 0; a question encoder trained from scratch has nothing to
      preserve, and with closed gates its from-scratch visual path gets no gradient to start from
      (configs/fusion_vqa.py's default opens them: 1.0, tanh = 0.76).
    dropout: on both residual branches of every block and on the pooled answer features (training).
    attention_impl, dtype: backend and compute dtype of the vision side, blocks and head.
    """

    num_fusion_layers: int = 4
    use_vision_gate: bool = True
    vision_gate_init: float = 1.5
    head: str = "classify"
    num_answers: int = 0
    answer_pool: str = "mean"
    answer_mlp_dim: int = 0
    projector_layers: int = 1
    xattn_num_heads: int = 8
    xattn_head_dim: int = 0
    xattn_ffn_mult: int = 4
    gate_init: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    attention_impl: str = "auto"
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "dtype", layers.parse_dtype("config.fusion.dtype", self.dtype))

    @classmethod
    def from_config(cls, cd: ml_collections.ConfigDict | Mapping[str, Any]) -> "FusionConfig":
        """``config.fusion`` -> FusionConfig; unknown fields are an error with a did-you-mean hint."""
        return config_util.from_config(cls, cd, "config.fusion")

    def layer_indices(self, num_hidden_layers: int) -> tuple[int, ...]:
        """``fusion_layer_indices(num_hidden_layers, num_fusion_layers)``."""
        return fusion_layer_indices(num_hidden_layers, self.num_fusion_layers)

    def head_dim(self, width: int) -> int:
        """Cross-attention head dim for decoder width ``width``."""
        return self.xattn_head_dim or width // self.xattn_num_heads

    def validate(self, decoder: decoder_lib.DecoderConfig | None = None, *, check_head: bool = True) -> None:
        """Raises ValueError naming the ``config.fusion`` field and what it accepts. With ``decoder``,
        also checks the fields that depend on it (divisibility of its layers and width);
        ``check_head=False`` skips the answer-head fields (``FusionDecoder`` has no head)."""
        def integer(name: str, minimum: int) -> int:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"config.fusion.{name}={v!r} must be an integer >= {minimum}.")
            return v

        n = integer("num_fusion_layers", 0)
        for name in ("xattn_num_heads", "xattn_ffn_mult"):
            integer(name, 1)
        integer("xattn_head_dim", 0)
        if not isinstance(self.use_vision_gate, bool):
            raise ValueError(f"config.fusion.use_vision_gate={self.use_vision_gate!r} must be True or False.")
        if not isinstance(self.vision_gate_init, (int, float)) or not math.isfinite(self.vision_gate_init):
            raise ValueError(f"config.fusion.vision_gate_init={self.vision_gate_init!r} must be a finite number "
                             "(the logit; the seed uses 1.5).")
        if self.projector_layers not in (1, 2):
            raise ValueError(f"config.fusion.projector_layers={self.projector_layers!r}; use 1 or 2.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.fusion.dropout={self.dropout!r} must be in [0, 1).")
        if not isinstance(self.gate_init, (int, float)) or not math.isfinite(self.gate_init):
            raise ValueError(f"config.fusion.gate_init={self.gate_init!r} must be a finite number (alpha; 0 = "
                             "Flamingo's closed gates).")
        if not self.initializer_range > 0:
            raise ValueError(f"config.fusion.initializer_range={self.initializer_range!r} must be > 0.")
        attention_lib.validate_implementation("config.fusion.attention_impl", self.attention_impl)
        if check_head:
            if self.head not in HEADS:
                raise ValueError(f"config.fusion.head={self.head!r}; use one of {HEADS}.")
            if self.head == "classify":
                if not isinstance(self.num_answers, int) or isinstance(self.num_answers, bool) or self.num_answers < 1:
                    raise ValueError(f"config.fusion.num_answers={self.num_answers!r}: head='classify' needs the "
                                     "size of the answer vocabulary (an integer >= 1).")
                if self.answer_pool not in ANSWER_POOLS:
                    raise ValueError(f"config.fusion.answer_pool={self.answer_pool!r}; use one of {ANSWER_POOLS}.")
                integer("answer_mlp_dim", 0)
        if decoder is not None:
            num_layers = decoder.num_hidden_layers
            if n > num_layers or (n and num_layers % n):
                divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
                raise ValueError(
                    f"config.fusion.num_fusion_layers={n} must divide the decoder's num_hidden_layers="
                    f"{num_layers} (a block goes before every k-th layer, k = num_hidden_layers // "
                    f"num_fusion_layers); set config.fusion.num_fusion_layers to one of {divisors} (or 0).")
            if not self.xattn_head_dim and decoder.hidden_size % self.xattn_num_heads:
                raise ValueError(
                    f"config.fusion.xattn_num_heads={self.xattn_num_heads} does not divide the decoder's "
                    f"hidden_size={decoder.hidden_size}; change it or set config.fusion.xattn_head_dim.")


def default_config() -> ml_collections.ConfigDict:
    """The ``config.fusion`` section: every ``FusionConfig`` field at its default."""
    return config_util.config_dict(FusionConfig)


# ------------------------------------------------------------------------------------------------
# The block
# ------------------------------------------------------------------------------------------------

class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE (Alayrac et al. 2022, fig. 4; OpenFlamingo
    ``GatedCrossAttentionBlock``): text queries attend to visual keys/values, tanh-gated.

        x = x + tanh(alpha_attn) * CrossAttn(LN(x), visual)
        x = x + tanh(alpha_ffn)  * FFW(x)

    ``alpha_attn`` and ``alpha_ffn`` are scalar params initialised at 0: a fresh block is the exact
    identity (``x + 0 * h`` is ``x`` bit for bit), so a pretrained LM is unchanged at step 0, and at
    first only the gates receive gradients (d/dalpha tanh = 1 at 0; everything behind a gate gets
    ``tanh(alpha) = 0`` times its gradient). The visual tokens are not normalised here: their scale
    (and so the vision gate in front of the blocks) is seen by the attention.
    """

    num_heads: int = 8
    head_dim: int = 0  # 0 = D / num_heads
    ffn_mult: int = 4
    gate_init: float = 0.0  # alpha at init (Flamingo: 0, the identity)
    dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: Array,
        visual: Array,
        visual_mask: Array | None = None,
        query_mask: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, dict[str, Array]]:
        """One gated cross-attention + dense step.

        Args:
            x: [B, T, D] text residual stream (the queries).
            visual: [B, Nv, D] visual tokens (keys and values), already at the decoder width.
            visual_mask: [B, Nv], 1 = real visual token, 0 = padding (never attended); None = all real.
                A row with no real token gets no attention update.
            query_mask: [B, T], 1 = real text token, 0 = padding (that row gets no update); None = all real.
            deterministic: False enables dropout on both branches (needs a "dropout" rng).

        Returns:
            (x [B, T, D] in x's dtype, aux {"attn_gate": tanh(alpha_attn), "ffn_gate": tanh(alpha_ffn)}).
        """
        b, t, d = x.shape
        if visual.shape[0] != b or visual.shape[-1] != d:
            raise ValueError(f"visual tokens {visual.shape} do not fit the text stream {x.shape}: same batch and "
                             "width needed (project the visual tokens to the decoder width: vision_proj).")
        dh = self.head_dim or d // self.num_heads
        if not self.head_dim and d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by xattn_num_heads={self.num_heads}; set xattn_head_dim.")
        gate = lambda name: jnp.tanh(self.param(name, nn.initializers.constant(self.gate_init), (), self.param_dtype)
                                     .astype(jnp.float32))
        attn_gate, ffn_gate = gate("alpha_attn"), gate("alpha_ffn")
        drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)

        # Rows whose update is kept: real query rows; for the attention also rows with a real visual token
        # (``attend`` gives a fully masked row the mean of the values; OpenFlamingo zeroes text without media).
        keep = jnp.ones((b, t), jnp.bool_) if query_mask is None else query_mask.astype(jnp.bool_)
        keep_attn = keep
        if visual_mask is not None:
            keep_attn = keep & jnp.any(visual_mask.astype(jnp.bool_), axis=1)[:, None]

        h = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        h = resampler_lib.CrossAttention(
            self.num_heads, dh, use_bias=False, initializer_range=self.initializer_range, dtype=self.dtype,
            param_dtype=self.param_dtype, attention_impl=self.attention_impl, name="attn",
        )(h, visual.astype(self.dtype), visual_mask)  # [B, T, D]
        h = drop(h) * keep_attn[..., None].astype(h.dtype)
        x = x + (attn_gate.astype(h.dtype) * h).astype(x.dtype)

        h = resampler_lib.PerceiverFeedForward(
            self.ffn_mult, initializer_range=self.initializer_range, dtype=self.dtype,
            param_dtype=self.param_dtype, name="ffn",
        )(x)  # LN -> Dense -> GELU -> Dense (Flamingo's FFW)
        h = drop(h) * keep[..., None].astype(h.dtype)
        x = x + (ffn_gate.astype(h.dtype) * h).astype(x.dtype)
        x = nn.with_logical_constraint(x, (layers.ACT_BATCH, layers.ACT_LEN, layers.ACT_EMBED))
        return x, {"attn_gate": attn_gate, "ffn_gate": ffn_gate}


# ------------------------------------------------------------------------------------------------
# Visual tokens for decode steps
# ------------------------------------------------------------------------------------------------

def visual_state(tokens: Array, mask: Array | None = None) -> dict[str, dict[str, Array]]:
    """The ``model_state`` entry that carries visual tokens into ``generate.generate``:
    ``{"visual_inputs": {"tokens": [B, Nv, D], "mask": [B, Nv] bool}}`` (mask default: all real).
    ``tokens`` are the projected tokens before the vision gate (``visual_features(...)["tokens"]``)."""
    if mask is None:
        mask = jnp.ones(tokens.shape[:2], jnp.bool_)
    return {VISUAL_COLLECTION: {"tokens": tokens, "mask": jnp.asarray(mask).astype(jnp.bool_)}}


def _visual_from_state(module: nn.Module, visual: Array | None, visual_mask: Array | None):
    """``visual`` / ``visual_mask`` as given, or else read from the ``visual_inputs`` collection at
    ``module``'s scope (None, None when it holds none)."""
    if visual is None and module.has_variable(VISUAL_COLLECTION, "tokens"):
        visual = module.get_variable(VISUAL_COLLECTION, "tokens")
        if visual_mask is None and module.has_variable(VISUAL_COLLECTION, "mask"):
            visual_mask = module.get_variable(VISUAL_COLLECTION, "mask")
    return visual, visual_mask


# ------------------------------------------------------------------------------------------------
# The decoder with interleaved blocks
# ------------------------------------------------------------------------------------------------

class FusionDecoder(decoder_lib.Decoder):
    """``decoder.Decoder`` with ``num_fusion_layers`` GatedCrossAttentionBlocks ``xattn_{j}`` in front
    of decoder layers ``j * k`` (k = num_hidden_layers // num_fusion_layers; Flamingo fig. 4) and the
    seed's vision gate on the visual tokens. The decoder's own params keep their names (module
    docstring), so a pretrained decoder's params are a subset of this tree. Looped layers only.

    Methods: ``embed``, ``unembed`` (inherited), ``backbone`` and ``__call__`` with ``visual=`` /
    ``visual_mask=`` (or the ``visual_inputs`` collection; see ``visual_state``), decode mode included.
    """

    fusion: FusionConfig = FusionConfig()

    def setup(self):
        c, f = self.config, self.fusion
        if c.scan_layers:
            raise ValueError("FusionDecoder interleaves cross-attention blocks between the decoder layers, which "
                             "needs the looped layers: set config.decoder.scan_layers=False.")
        f.validate(c, check_head=False)
        super().setup()
        # static_argnums counts `self` as 0: (x=1, visual=2, visual_mask=3, query_mask=4, deterministic=5).
        block = layers.remat(GatedCrossAttentionBlock, c.remat, static_argnums=(5,))
        self.xattn = [  # a list attribute in setup names the modules xattn_0, xattn_1, ...
            block(num_heads=f.xattn_num_heads, head_dim=f.head_dim(c.hidden_size), ffn_mult=f.xattn_ffn_mult,
                  gate_init=f.gate_init, dropout=f.dropout, initializer_range=f.initializer_range, dtype=f.dtype,
                  param_dtype=jnp.float32, attention_impl=f.attention_impl)
            for _ in range(f.num_fusion_layers)
        ]
        if f.use_vision_gate:
            self.vision_gate_logit = self.param(
                "vision_gate_logit", lambda *_: jnp.asarray(f.vision_gate_init, jnp.float32))

    @property
    def fusion_layers(self) -> tuple[int, ...]:
        """Decoder layer indices with a block in front (``fusion_layer_indices``)."""
        return self.fusion.layer_indices(self.config.num_hidden_layers)

    def gate_visual(self, visual: Array) -> tuple[Array, dict[str, Array]]:
        """visual [B, Nv, D] -> (visual * sigmoid(vision_gate_logit), {"vision_gate": sigmoid}) (the
        seed's vision gate); unchanged and {} without ``use_vision_gate``."""
        if not self.fusion.use_vision_gate:
            return visual, {}
        gate = jax.nn.sigmoid(self.vision_gate_logit.astype(jnp.float32))
        return visual * gate.astype(visual.dtype), {"vision_gate": gate}

    def backbone(
        self,
        inputs_embeds: Array,
        *,
        visual: Array | None = None,
        visual_mask: Array | None = None,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> tuple[Array, dict[str, Array]]:
        """Runs the layers with the cross-attention blocks interleaved, and the final norm.

        Args:
            inputs_embeds: [B, T, D] input embeddings.
            visual: [B, Nv, D] visual tokens at the decoder width, before the vision gate. None: read
                from the ``visual_inputs`` collection (``visual_state``; how ``generate`` passes them).
            visual_mask: [B, Nv], 1 = real visual token, 0 = padding; None = all real.
            positions, attention_mask, decode: as ``Decoder.backbone`` (the text mask also marks the
                query rows that get no cross-attention update). In decode mode only the
                self-attention uses the KV cache; the blocks read the same visual tokens every step.
            deterministic: False enables the blocks' dropout (needs a "dropout" rng).

        Returns:
            (hidden [B, T, D] after the final norm, aux: ``xattn_{j}/attn_gate``,
            ``xattn_{j}/ffn_gate``, ``vision_gate`` and the layers' ``layers_{i}/<name>``).
        """
        c = self.config
        b, t = inputs_embeds.shape[:2]
        x = inputs_embeds.astype(c.dtype)
        start = self.decode_position(t) if decode else 0
        if positions is None:
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, (b, t))
        positions = nn.with_logical_constraint(positions, (layers.ACT_BATCH, layers.ACT_LEN))

        visual, visual_mask = _visual_from_state(self, visual, visual_mask)
        if visual is None:
            if not self.is_initializing():
                raise ValueError(
                    "FusionDecoder needs visual tokens: pass visual= [B, Nv, D] (and visual_mask= [B, Nv]), "
                    "or for generation model_state=fusion.visual_state(tokens, mask) (fusion.generate_with_"
                    "visual does this); for a text-only pass give a visual_mask of zeros.")
            # init (e.g. decoder.init_cache): one masked dummy token creates the params; no cache depends on it.
            visual = jnp.zeros((b, 1, c.hidden_size), c.dtype)
            visual_mask = jnp.zeros((b, 1), jnp.bool_)
        if visual.shape[0] != b:
            raise ValueError(f"visual tokens have {visual.shape[0]} rows but the text has {b}.")
        visual = nn.with_logical_constraint(visual, (layers.ACT_BATCH, layers.ACT_LEN, layers.ACT_EMBED))
        visual, aux = self.gate_visual(visual)

        before = {i: j for j, i in enumerate(self.fusion_layers)}
        for i, layer in enumerate(self.layers):
            if i in before:
                j = before[i]
                x, block_aux = self.xattn[j](x, visual, visual_mask, attention_mask, deterministic)
                aux.update({f"xattn_{j}/{k}": v for k, v in block_aux.items()})
            x, layer_aux = layer(x, positions, attention_mask, decode)
            aux.update({f"layers_{i}/{k}": v for k, v in layer_aux.items()})
        return self.norm(x), aux


# ------------------------------------------------------------------------------------------------
# The VQA model
# ------------------------------------------------------------------------------------------------

def pool_question(hidden: Array, mask: Array | None, mode: str = "mean") -> Array:
    """Pools the question's final hidden states: hidden [B, T, D], mask [B, T] (1 = real) -> [B, D].

    'mean': mean over the real tokens (``resampler.pool_tokens``); 'last': the last real token (by
    index, so right and left padding both work; a row without real tokens takes position T - 1).
    """
    if mode == "mean":
        return resampler_lib.pool_tokens(hidden, mask, "mean")
    if mode != "last":
        raise ValueError(f"config.fusion.answer_pool={mode!r}; use one of {ANSWER_POOLS}.")
    t = hidden.shape[1]
    if mask is None:
        return hidden[:, -1]
    last = (t - 1) - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def answer_nll(answer_logits: Array, answers: Array) -> tuple[Array, Array]:
    """Classification loss of the answer head: logits [B, A], answers [B] int (< 0 = not scored) ->
    (nll [B] float32, 0 where not scored; correct [B] bool, argmax == answer and scored)."""
    logp = jax.nn.log_softmax(answer_logits.astype(jnp.float32), axis=-1)
    valid = answers >= 0
    picked = jnp.take_along_axis(logp, jnp.where(valid, answers, 0)[:, None], axis=-1)[:, 0]
    correct = valid & (jnp.argmax(answer_logits, axis=-1) == answers)
    return -jnp.where(valid, picked, 0.0), correct


class FusionVQAModel(nn.Module):
    """Vision tower -> vision_proj -> vision gate -> FusionDecoder over the question -> answer head.

    Attributes:
        vision: the tower's ``ViTConfig`` (DINOv2 in the seed; CLIP and SigLIP alike).
        config: the ``FusionConfig``.
        decoder_config: the ``DecoderConfig`` of the language model (pretrained or small from scratch);
            it becomes the ``decoder/`` subtree (a ``FusionDecoder``).

    Methods: ``forward`` (training / evaluation), ``visual_features`` (the visual tokens and pooled
    image features), and the decoder protocol (``embed``, ``backbone``, ``unembed``, ``__call__``) so
    that ``generate.generate`` drives it, the visual tokens coming from the ``visual_inputs``
    collection (``generate_with_visual``).
    """

    vision: vit_lib.ViTConfig
    config: FusionConfig
    decoder_config: decoder_lib.DecoderConfig

    def setup(self):
        c, d = self.config, self.decoder_config
        c.validate(d)
        self.vision_tower = vit_lib.VisionTransformer(self.vision)
        self.vision_token_norm = layers.LayerNorm(eps=1e-6, dtype=c.dtype)  # as vlm.VisionLanguageModel
        # The seed's projection of the DINOv2 features to the decoder width (768 -> 1024).
        self.vision_proj = resampler_lib.ProjectionHead(features=d.hidden_size, num_layers=c.projector_layers,
                                                        initializer_range=c.initializer_range, dtype=c.dtype)
        self.decoder = FusionDecoder(d, c)
        if c.head == "classify":
            self.answer_drop = nn.Dropout(c.dropout)
            self.answer_head = resampler_lib.ProjectionHead(
                features=c.num_answers, num_layers=2, hidden_dim=c.answer_mlp_dim or d.hidden_size,
                initializer_range=c.initializer_range, dtype=c.dtype)

    # -- the vision side -----------------------------------------------------------------------------
    def visual_features(self, image: Array, deterministic: bool = True) -> dict[str, Array]:
        """image [B, S, S, 3] (normalised) -> dict:

            tokens        [B, Nv, D]   projected visual tokens (before the vision gate), the decoder width
            mask          [B, Nv]      bool, all True (every patch token is real)
            image_pooled  [B, D]       mean of ``tokens`` (feature-diversity diagnostics)
            tower_pooled  [B, Dv]      the tower's pooler_output (CLIP/DINOv2: normed CLS; SigLIP: MAP
                                       head), else the mean of the normed tower tokens
        """
        out, _ = self.vision_tower(image, deterministic=deterministic)
        tower_tokens = self.vision_token_norm(out["last_hidden_state"])  # [B, Nv, Dv]
        tokens = self.vision_proj(tower_tokens)  # [B, Nv, D]
        tokens = nn.with_logical_constraint(tokens, (layers.ACT_BATCH, layers.ACT_LEN, layers.ACT_EMBED))
        mask = jnp.ones(tokens.shape[:2], jnp.bool_)
        tower_pooled = out.get("pooler_output")
        if tower_pooled is None:
            tower_pooled = resampler_lib.pool_tokens(tower_tokens, None, "mean")
        return dict(tokens=tokens, mask=mask, image_pooled=resampler_lib.pool_tokens(tokens, None, "mean"),
                    tower_pooled=tower_pooled)

    def visual_prefix(self, image: Array, deterministic: bool = True) -> Array:
        """Not a prefix model: refuses ``generate.generate(..., images=)`` with the way to do it."""
        del image, deterministic
        raise ValueError("FusionVQAModel reads the image through cross-attention, not as a prefix: generate with "
                         "fusion.generate_with_visual(model, params, prompt, images=...) (or pass "
                         "model_state=fusion.visual_state(tokens, mask) to generate.generate).")

    # -- the decoder protocol (generation) -----------------------------------------------------------
    def embed(self, tokens: Array) -> Array:
        """tokens [B, T] -> [B, T, D]."""
        return self.decoder.embed(tokens)

    def backbone(self, inputs_embeds: Array, *, visual: Array | None = None, visual_mask: Array | None = None,
                 **kwargs) -> tuple[Array, dict[str, Array]]:
        """``FusionDecoder.backbone``; visual tokens default to the ``visual_inputs`` collection."""
        visual, visual_mask = _visual_from_state(self, visual, visual_mask)
        return self.decoder.backbone(inputs_embeds, visual=visual, visual_mask=visual_mask, **kwargs)

    def unembed(self, hidden: Array) -> Array:
        """hidden [B, T, D] -> logits [B, T, V] float32 (the decoder's LM head)."""
        return self.decoder.unembed(hidden)

    def __call__(self, tokens: Array | None = None, *, visual: Array | None = None,
                 visual_mask: Array | None = None, **kwargs) -> tuple[Array, dict[str, Array]]:
        """The decoder's LM forward (``Decoder.__call__``) with the visual tokens (default: the
        ``visual_inputs`` collection): what KV-cache decode steps call."""
        visual, visual_mask = _visual_from_state(self, visual, visual_mask)
        return self.decoder(tokens, visual=visual, visual_mask=visual_mask, **kwargs)

    # -- training forward ----------------------------------------------------------------------------
    def forward(
        self,
        image: Array | None,
        input_ids: Array,
        attention_mask: Array,
        *,
        visual: Array | None = None,
        visual_mask: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Any]:
        """Question (and, for head='generate', answer) tokens through the fusion decoder.

        Args:
            image: [B, S, S, 3], or None: then ``visual`` if given, else a text-only pass (no visual
                token: every cross-attention update is 0, the dense branches still run).
            input_ids: [B, T] int; attention_mask: [B, T], 1 = real token (right or left padding:
                positions count real tokens only).
            visual / visual_mask: [B, Nv, D] / [B, Nv] precomputed projected tokens instead of
                ``image`` (e.g. shuffled across the batch for a vision-dependency test).
            deterministic: False enables dropout (needs a "dropout" rng).

        Returns:
            dict with ``hidden`` [B, T, D] (final norm), ``aux`` (gates, see the module docstring),
            head='classify': ``pooled`` [B, D] and ``answer_logits`` [B, num_answers] float32;
            head='generate': ``logits`` [B, T, V] float32 (position t predicts token t + 1);
            with ``image``: ``image_pooled`` [B, D] and ``tower_pooled`` [B, Dv].
        """
        c = self.config
        b = input_ids.shape[0]
        out: dict[str, Any] = {}
        if image is not None:
            if visual is not None:
                raise ValueError("Pass image [B, S, S, 3] or visual [B, Nv, D], not both.")
            feats = self.visual_features(image, deterministic=deterministic)
            visual, visual_mask = feats["tokens"], feats["mask"]
            out.update(image_pooled=feats["image_pooled"], tower_pooled=feats["tower_pooled"])
        elif visual is None:  # text only: one masked dummy token
            visual = jnp.zeros((b, 1, self.decoder_config.hidden_size), c.dtype)
            visual_mask = jnp.zeros((b, 1), jnp.bool_)
        positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
        hidden, aux = self.decoder.backbone(self.embed(input_ids), visual=visual, visual_mask=visual_mask,
                                            positions=positions, attention_mask=attention_mask,
                                            deterministic=deterministic)
        out.update(hidden=hidden, aux=aux)
        if c.head == "classify":
            pooled = pool_question(hidden, attention_mask, c.answer_pool)
            out["pooled"] = pooled
            h = self.answer_drop(pooled, deterministic=deterministic or c.dropout == 0.0)
            out["answer_logits"] = self.answer_head(h).astype(jnp.float32)
        else:
            out["logits"] = self.unembed(hidden)
        return out


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model",))
def _visual_features(model: FusionVQAModel, variables, images: Array) -> dict[str, Array]:
    return model.apply(variables, images, method="visual_features")


def generate_with_visual(
    model: FusionDecoder | FusionVQAModel,
    params,
    prompt: Array,
    *,
    images: Array | None = None,
    visual: Array | None = None,
    visual_mask: Array | None = None,
    model_state: dict | None = None,
    **kwargs,
) -> Array:
    """``generate.generate`` for the fusion models: the visual tokens are computed once and passed to
    the prefill and every decode step as the ``visual_inputs`` collection (``visual_state``).

    Args:
        model: a ``FusionVQAModel`` (with ``images``) or a ``FusionDecoder`` / ``FusionVQAModel``
            (with ``visual``).
        params: its "params" collection.
        prompt: [B, P] int (left-padded, with ``prompt_mask=`` in kwargs, for different lengths).
        images: [B, S, S, 3]: the visual tokens are ``model.visual_features(images)`` (one jitted call).
        visual / visual_mask: [B, Nv, D] / [B, Nv] projected visual tokens instead of ``images``.
        model_state: other read-only collections (e.g. ``{"quant": ...}``).
        **kwargs: ``generate.generate``'s (``max_new_tokens``, ``rng``, ``temperature``, ``top_p``,
            ``eos_id``, ``prompt_mask``).

    Returns:
        [B, P + max_new_tokens] int32: the prompt followed by the generated tokens.
    """
    if (images is None) == (visual is None):
        raise ValueError("Pass exactly one of images [B, S, S, 3] (FusionVQAModel) or visual [B, Nv, D].")
    if "prefix_embeds" in kwargs:
        raise ValueError("prefix_embeds= is a prefix-model argument; the fusion models cross-attend to visual= tokens.")
    state = dict(model_state or {})
    if images is not None:
        if not isinstance(model, FusionVQAModel):
            raise ValueError("images= needs a FusionVQAModel (it owns the vision tower); pass visual= tokens "
                             "to a FusionDecoder.")
        feats = _visual_features(model, {"params": params, **state}, images)
        visual, visual_mask = feats["tokens"], feats["mask"]
    if visual.shape[0] != prompt.shape[0]:
        raise ValueError(f"visual tokens have {visual.shape[0]} rows but the prompt has {prompt.shape[0]}.")
    state.update(visual_state(visual, visual_mask))
    return generate_lib.generate(model, params, prompt, model_state=state, **kwargs)


__all__ = ["ANSWER_POOLS", "HEADS", "VISUAL_COLLECTION", "FusionConfig", "FusionDecoder", "FusionVQAModel",
           "GatedCrossAttentionBlock", "answer_nll", "default_config", "fusion_layer_indices",
           "generate_with_visual", "pool_question", "visual_state"]
