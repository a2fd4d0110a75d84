"""Dense Llama/Qwen-style decoder-only language model (Flax Linen).

Covers HF ``LlamaForCausalLM`` (SmolLM2), ``Qwen2ForCausalLM`` (Qwen2/2.5: ``attention_bias=True``)
and ``Qwen3ForCausalLM`` (``qk_norm=True``, explicit ``head_dim``). Config field names are the HF
``config.json`` names, so importing a checkpoint's config is a dict copy.

Parameter tree (HF name in brackets; see ``layers.py`` for the per-layer layouts):

        embed_tokens/embedding   [V, D]  [model.embed_tokens.weight]
        layers_{i}/...                   [model.layers.{i}....]
        norm/scale               [D]     [model.norm.weight]
        lm_head/kernel           [D, V]  [lm_head.weight.T]  (absent when tie_word_embeddings)

With ``lora_rank = r > 0`` each projection named in ``lora_targets`` (e.g.
``layers_{i}/self_attn/q_proj``) also holds ``lora_a [*in, r]`` and ``lora_b [r, *out]`` (no HF
tensor: ``vlmjax.models.lora.merge_lora`` folds them into ``kernel``; ``convert.save_hf`` does so).
The four flat ``lora_*`` fields are the experiment-file spelling (``config.model.lora_rank=16``);
``DecoderConfig.lora`` turns them into the one ``lora.LoraConfig`` the layers receive.

With ``load_in_4bit=True`` (QLoRA, Dettmers et al. 2023) the frozen base weights (the seven
projections of every layer, and with ``quant_embeddings`` the embedding table and an untied
lm_head) are NF4 codes + block scales in the "quant" collection instead of "params"
(``vlmjax/models/quant.py``): ``kernel`` -> ``kernel_codes`` / ``kernel_scales`` / ...; norms,
q/k/v biases and LoRA adapters stay fp params. Apply with ``{"params": ..., "quant": ...}``;
``quant.quantize_params`` makes both from fp params, ``memory_table`` reports the bytes.

``DecoderConfig`` is the one source of the defaults: ``default_config()`` (the ``config.model``
section an experiment edits) is derived from it.

Layers are a python loop of separately named modules ``layers_{i}`` (routing variants replace
individual layers), or with ``scan_layers=True`` one ``nn.scan`` over a stacked ``layers/...``
[L, ...] (compile time independent of depth; ``vlmjax.tree.stack_layers`` / ``unstack_layers``
convert between the two layouts, and the HF converter does so on load and save).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import config_util
from vlmjax.models import attention as attention_lib
from vlmjax.models import axes
from vlmjax.models import layers
from vlmjax.models import lora as lora_lib
from vlmjax.models import quant as quant_lib

Array = jax.Array

_parse_dtype = layers.parse_dtype


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static decoder hyper-parameters (hashable, so it can be a Linen attribute / jit static arg).

    Names follow HF ``config.json``. Defaults: the SmolLM2-135M shape.
    """

    vocab_size: int = 0  # 0 = take it from the tokenizer (``from_config(cd, vocab_size=)``).
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads (Qwen3 sets it explicitly).
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    # Bias on the q/k/v projections, as Qwen2/2.5 (whose config.json omits the field). o_proj never
    # has a bias: HF Llama/Qwen3 checkpoints with attention_bias=True (o_proj bias too) are not
    # supported.
    attention_bias: bool = False
    qk_norm: bool = False  # True for Qwen3 (RMSNorm on each q/k head before RoPE).
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192  # Longest sequence the checkpoint was trained for.
    dtype: Any = jnp.dtype(jnp.float32)  # Compute dtype: float32 | bfloat16 | float16.
    param_dtype: Any = jnp.dtype(jnp.float32)  # Storage dtype of the parameters.
    # What the backward pass recomputes per layer: a ``layers.REMAT_POLICIES`` name ('none', 'full',
    # 'dots_saveable', 'dots_no_batch_saveable', 'save_attention_out', 'offload_attention_out');
    # True/False mean 'full'/'none'.
    remat: Any = dataclasses.field(default="none", metadata={config_util.ANY_TYPE: True})
    # Attention backend (``attention.IMPLEMENTATIONS``): auto | xla | cudnn | splash | einsum.
    attention_impl: str = "auto"
    # Stack the layers' params on a leading "layers" axis and run them with nn.scan: one layer is
    # traced and compiled whatever the depth (MaxText's scan_layers). Params: ``layers/...`` [L, ...]
    # instead of ``layers_{i}/...``; the HF converter stacks and unstacks them.
    scan_layers: bool = False
    initializer_range: float = 0.02  # Std of the N(0, s^2) init of all matrices (HF convention).
    # LoRA (Hu et al. 2021, arXiv 2106.09685) adapters on the projections named in lora_targets:
    # W x + (lora_alpha / lora_rank) * B A dropout(x), B initialised to zero. lora_rank=0: none.
    # Train only the adapters with config.optim.trainable=("lora_",); a pretrained checkpoint loads
    # with the adapters skipped (tasks.base.load_pretrained). The layers get them as one
    # ``lora.LoraConfig`` (the ``lora`` property).
    lora_rank: int = 0
    lora_alpha: float = 0.0  # Required > 0 when lora_rank > 0 (peft's default is 8; 2 * rank is common).
    lora_dropout: float = 0.0  # Dropout on the adapter input, active when a "dropout" rng is passed.
    lora_targets: tuple[str, ...] = lora_lib.LORA_TARGETS  # any of q/k/v/o_proj, gate/up/down_proj
    # QLoRA 4-bit base (Dettmers et al. 2023, arXiv 2305.14314): the frozen decoder weights are
    # stored as NF4 codes with one absmax scale per quant_block_size values (blocks along the
    # contracted axis: hidden_size, head_dim and intermediate_size must be multiples of it), in the
    # "quant" collection (never trained; list it in the task's state_collections). quant_double:
    # the block scales are int8 too (blocks of 256, QLoRA's double quantisation: 4.127 instead of
    # 4.5 bits per weight). quant_embeddings: also the vocab matrices (embed_tokens, an untied
    # lm_head; SmolLM2-135M: 28M of its 135M params). Train LoRA adapters (lora_rank > 0) on top.
    load_in_4bit: bool = False
    quant_block_size: int = 64
    quant_double: bool = True
    quant_embeddings: bool = True

    def __post_init__(self):
        # Resolve head_dim=0 (HF default: hidden_size // num_attention_heads) once, here.
        if self.head_dim == 0 and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads == 0:
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "dtype", _parse_dtype("dtype", self.dtype))
        object.__setattr__(self, "param_dtype", _parse_dtype("param_dtype", self.param_dtype))
        object.__setattr__(self, "remat", layers.parse_remat("remat", self.remat))
        # Lists (JSON, command-line overrides) -> tuple, so the config stays hashable.
        targets = self.lora_targets
        object.__setattr__(self, "lora_targets", (targets,) if isinstance(targets, str) else tuple(targets))

    @property
    def lora(self) -> lora_lib.LoraConfig:
        """The LoRA settings as the layers take them (``rank == 0``: no adapters)."""
        return lora_lib.LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                                   targets=self.lora_targets)

    @property
    def quant(self) -> quant_lib.QuantConfig | None:
        """The 4-bit settings as the layers take them; None without ``load_in_4bit``."""
        if not self.load_in_4bit:
            return None
        return quant_lib.QuantConfig(qtype="nf4", block_size=self.quant_block_size,
                                     double_quant=self.quant_double)

    @property
    def embedding_quant(self) -> quant_lib.QuantConfig | None:
        """``quant`` for the vocab matrices (embed_tokens, an untied lm_head), None if they stay fp."""
        return self.quant if self.quant_embeddings else None

    @classmethod
    def from_config(
        cls, cd: ml_collections.ConfigDict | Mapping[str, Any], vocab_size: int | None = None
    ) -> "DecoderConfig":
        """Builds a validated config from a ConfigDict/mapping with the fields of ``default_config``.

        Missing fields take the dataclass defaults; unknown fields are an error (typo guard);
        ``init_from`` (a loading instruction for the task) is ignored. ``vocab_size`` is the
        tokenizer's size: it is used when ``cd.vocab_size == 0``; otherwise ``cd.vocab_size`` must be
        at least that large (checkpoints often pad the embedding table).
        """
        config = config_util.from_config(cls, cd, "decoder config", ignore=("init_from",))
        if config.vocab_size == 0:
            if vocab_size is None:
                raise ValueError(
                    "vocab_size=0 means 'take it from the tokenizer', but no tokenizer vocab_size "
                    "was passed to DecoderConfig.from_config(cd, vocab_size=...); set config "
                    "vocab_size > 0."
                )
            config = dataclasses.replace(config, vocab_size=int(vocab_size))
        elif vocab_size is not None and config.vocab_size < vocab_size:
            raise ValueError(
                f"vocab_size={config.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({vocab_size}); set vocab_size >= {vocab_size} or 0 to use the tokenizer's."
            )
        config.validate()
        return config

    def validate(self) -> None:
        """Raises ValueError naming the offending field and what it accepts."""
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim == 0:
            raise ValueError(
                f"head_dim=0 needs hidden_size ({self.hidden_size}) divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly."
            )
        if not isinstance(self.head_dim, int) or self.head_dim < 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even integer (RoPE), got {self.head_dim!r}.")
        for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        self.lora.validate()
        for name in ("load_in_4bit", "quant_double", "quant_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.load_in_4bit:
            self.quant.validate()
            # Block axes: embed (q/k/v/gate/up, embedding, lm_head), head_dim (o_proj), mlp (down).
            for name in ("hidden_size", "head_dim", "intermediate_size"):
                if getattr(self, name) % self.quant_block_size:
                    raise ValueError(
                        f"load_in_4bit quantises in blocks of quant_block_size={self.quant_block_size} "
                        f"along {name}={getattr(self, name)}, which it does not divide; set "
                        f"quant_block_size to a divisor of hidden_size, head_dim and intermediate_size "
                        f"(e.g. {math.gcd(self.hidden_size, self.head_dim, self.intermediate_size)}).")
        attention_lib.validate_implementation("attention_impl", self.attention_impl)
        allowed = {jnp.dtype(d) for d in layers.DTYPES.values()}
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not supported; use one of {sorted(layers.DTYPES)}."
                )


def default_config() -> ml_collections.ConfigDict:
    """The ``config.model`` section: every ``DecoderConfig`` field at its default, plus ``init_from``.

    ``init_from``: a local HF checkpoint directory (llama / qwen2 / qwen3). When set, the
    architecture fields are taken from its config.json and the weights are loaded from it (the task
    reads this field; it is not part of DecoderConfig). dtype still applies.
    """
    cd = config_util.config_dict(DecoderConfig)
    cd.init_from = ""
    return cd


class _DecodePosition(nn.Module):
    """Counts the tokens fed in decode mode ("cache"/"index"), the default position of the next one."""

    @nn.compact
    def __call__(self, length: int) -> Array:
        is_initialized = self.has_variable("cache", "index")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start = index.value
        if is_initialized:
            index.value = start + length
        return start


class Decoder(nn.Module):
    """Decoder-only LM: embed -> N x DecoderBlock -> RMSNorm -> logits.

    Methods (all usable with ``model.apply(..., method=...)``): ``__call__``, ``embed``, ``backbone``,
    ``unembed``. Decoding: see ``init_cache`` and ``vlmjax.models.generate``.
    """

    config: DecoderConfig

    def setup(self):
        c = self.config
        c.validate()
        self.embed_tokens = layers.Embed(
            num_embeddings=c.vocab_size,
            features=c.hidden_size,
            initializer_range=c.initializer_range,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            quant=c.embedding_quant,
        )
        self.layers = self.make_layers()
        self.norm = layers.RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if not c.tie_word_embeddings:
            # HF lm_head.weight [V, D] -> kernel [D, V]; fp32 accumulation gives fp32 logits in bf16.
            self.lm_head = layers.DenseGeneral(
                c.vocab_size,
                kernel_axes=("embed", "vocab"),
                initializer_range=c.initializer_range,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                preferred_element_type=jnp.float32,
                quant=c.embedding_quant,
            )
        self.decode_position = _DecodePosition()

    def make_layers(self):
        """The decoder layers (called in ``setup``): a list ``layers_{i}`` or, with ``scan_layers``,
        one scanned module; routed decoders override it."""
        c = self.config
        # static_argnums counts `self` as 0: (x=1, positions=2, attention_mask=3, decode=4).
        block = layers.remat(layers.DecoderBlock, c.remat, static_argnums=(4,))
        if c.scan_layers:
            # One module "layers" whose params carry a leading [L] axis (logical name "layers"); the
            # carry is the residual stream, positions / mask / decode are the same for every layer.
            # The "cache" collection (KV cache) and the 4-bit weights ("quant") are stacked the same way.
            return nn.scan(
                block, variable_axes={"params": 0, "cache": 0, quant_lib.COLLECTION: 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            )(**self.block_kwargs(0))
        # A list attribute in setup names its modules layers_0, layers_1, ... (HF model.layers.{i}).
        return [block(**self.block_kwargs(i)) for i in range(c.num_hidden_layers)]

    def block_kwargs(self, index: int) -> dict[str, Any]:
        """Constructor arguments of ``layers.DecoderBlock`` for layer ``index`` (routed decoders
        subclass ``Decoder`` and add to them, e.g. ``return_update=True``)."""
        del index  # every layer has the same shape
        return dict(config=self.config)

    def embed(self, tokens: Array) -> Array:
        """tokens: [B, T] int -> embeddings [B, T, D] in the compute dtype."""
        return self.embed_tokens(tokens)

    def backbone(
        self,
        inputs_embeds: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        decode: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """Runs the layers and the final norm.

        Args:
            inputs_embeds: [B, T, D] input embeddings.
            positions: [B, T] int position ids; default ``arange(T)``, or in decode mode the number of
                tokens already in the cache + ``arange(T)``. Left-padded batches must pass them.
            attention_mask: [B, T], 1 = real token, 0 = padding (padding keys are never attended).
            decode: use and update the KV cache ("cache" collection must be mutable).

        Returns:
            (hidden [B, T, D] after the final norm, aux dict with keys ``layers_{i}/<name>``).
        """
        c = self.config
        b, t = inputs_embeds.shape[:2]
        x = inputs_embeds.astype(c.dtype)
        start = self.decode_position(t) if decode else 0
        if positions is None:
            positions = start + jnp.arange(t, dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, (b, t))
        positions = nn.with_logical_constraint(positions, (layers.ACT_BATCH, layers.ACT_LEN))
        aux: dict[str, Array] = {}
        if c.scan_layers:
            x, _ = self.layers(x, positions, attention_mask, decode)  # dense blocks have no aux
            return self.norm(x), aux
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, positions, attention_mask, decode)
            aux.update({f"layers_{i}/{k}": v for k, v in layer_aux.items()})
        return self.norm(x), aux

    def unembed(self, hidden: Array) -> Array:
        """hidden: [B, T, D] -> logits [B, T, V] float32."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(logits, (layers.ACT_BATCH, layers.ACT_LEN, layers.ACT_VOCAB))

    def __call__(
        self,
        tokens: Array | None = None,
        *,
        positions: Array | None = None,
        inputs_embeds: Array | None = None,
        attention_mask: Array | None = None,
        decode: bool = False,
        **backbone_kwargs,
    ) -> tuple[Array, dict[str, Array]]:
        """Causal LM forward.

        Args:
            tokens: [B, T] int token ids; exactly one of ``tokens`` / ``inputs_embeds``.
            positions: [B, T] int position ids (see ``backbone``).
            inputs_embeds: [B, T, D] embeddings (e.g. visual prefix + ``embed(text)`` concatenated).
            attention_mask: [B, T], 1 = real token, 0 = padding.
            decode: KV-cache mode: T > 1 prefills, T = 1 appends one token.
            **backbone_kwargs: passed on to ``backbone`` (routed decoders: ``mode``, ``progress``).

        LoRA dropout (``lora_dropout > 0``) is applied only when ``apply`` gets a "dropout" rng.

        Returns:
            (logits [B, T, V] float32, aux flat dict of named intermediates; empty for the dense model).
        """
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of tokens [B, T] or inputs_embeds [B, T, D].")
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds
        hidden, aux = self.backbone(
            x, positions=positions, attention_mask=attention_mask, decode=decode, **backbone_kwargs
        )
        return self.unembed(hidden), aux


def init_cache(model: Decoder, batch_size: int, max_len: int) -> dict[str, Any]:
    """An empty KV cache (the "cache" collection) for ``batch_size`` rows of up to ``max_len`` tokens.

    Shapes come from ``jax.eval_shape`` of ``init(decode=True)``, so no parameters are materialised.
    Every cache variable starts at zero (index 0, no valid slot).
    """
    dummy = jnp.zeros((batch_size, max_len), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), dummy, decode=True)
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def memory_table(config: DecoderConfig) -> dict[str, int | float]:
    """Parameter bytes of ``config``'s decoder base (no LoRA adapters) stored three ways.

    ``fp32`` / ``bf16``: every param in that dtype; ``nf4``: the "quant" collection of the
    ``load_in_4bit`` model (with ``config``'s block size, double quantisation and
    ``quant_embeddings``) plus its remaining params (norms, biases; fp vocab matrices when
    ``quant_embeddings=False``) at bf16. Shapes from ``jax.eval_shape`` of ``init``: nothing is
    materialised. Also ``num_params``, ``nf4_quant``, ``nf4_other`` and ``nf4_over_bf16``.
    """
    base = dataclasses.replace(config, lora_rank=0, load_in_4bit=False)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = lambda c: nn.meta.unbox(jax.eval_shape(lambda: Decoder(c).init(jax.random.key(0), tokens)))
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes(base)["params"]))
    q = shapes(dataclasses.replace(base, load_in_4bit=True))
    other = sum(math.prod(x.shape) for x in jax.tree.leaves(q["params"]))
    nf4_quant = quant_lib.param_bytes(q[quant_lib.COLLECTION])
    out = {"num_params": num_params, "fp32": 4 * num_params, "bf16": 2 * num_params,
           "nf4": nf4_quant + 2 * other, "nf4_quant": nf4_quant, "nf4_other": 2 * other}
    out["nf4_over_bf16"] = out["nf4"] / out["bf16"]
    return out
