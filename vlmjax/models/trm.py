"""Tiny Recursive Models (TRM) as a decoder, and a recursive refinement loop for a pretrained decoder.

TRM (Jolicoeur-Martineau 2025, "Less is More: Recursive Reasoning with Tiny Networks", arXiv
2510.04871) replaces a deep stack of N layers by a *shallow* stack ``net`` (e.g. 2 layers) applied
many times. It keeps two states next to the input ``x``: the current answer ``y`` and a latent
reasoning state ``z``. One cycle (the paper's ``latent_recursion``, Fig. 3) is

        for i in range(n):  z = net(x + y + z)      # n latent updates (the input is injected by addition)
        y = net(y + z)                              # one answer update, without x

and the model runs T cycles; the LM output is ``unembed(norm(y))`` after the last one. Here ``net``
is the causal decoder stack of ``decoder.Decoder`` (``layers.DecoderBlock``: RoPE, GQA, SwiGLU, the
causal + padding mask built from position ids exactly as ``Decoder.backbone`` does), so
``TRMDecoder`` keeps the ``Decoder`` protocol (``embed`` / ``backbone`` / ``unembed`` /
``__call__``, KV-cache decoding) and the LM task, a visual prefix (``inputs_embeds``) and
``vlmjax.models.generate`` work with it unchanged. Everything inside is causal (token t's states
depend on tokens <= t only), so one cached decode step equals the full recompute.

Deviations from the paper, and why:

- ``net`` ends with an RMSNorm (``net/norm``). TRM's layers are post-norm, so its states keep unit
  scale however often they are fed back; our pre-norm ``DecoderBlock`` returns ``u + Block(u)``, and
  feeding that back (``y = net(y + z)`` with ``z ~ n (x + y)``) would grow the states ~(n+1)-fold per
  cycle until the blocks' O(1) updates no longer move them.
- ``x = RMSNorm(inputs_embeds)`` (``input_norm``): text embeddings (std 0.02 at init) and a visual
  prefix get the unit scale of ``y`` and ``z`` (TRM multiplies its embeddings by sqrt(D) instead).
- ``y0 = x`` and ``z0`` = a learned vector ``z_init`` [D] broadcast over [B, T] (TRM: two fixed random
  vectors). With ``y0 = x`` the answer starts as the token itself (the residual stream of a plain
  decoder), and the smallest TRM (T = 1, n = 0) is exactly a plain L-layer decoder on ``x + z0``; with
  a learned ``y0`` the input would never reach the output when n = 0.
- "Deep supervision" (``deep_supervision``) here supervises every *cycle* of one forward:
  ``aux["trm/cycle_hidden"]`` holds the normed ``y`` after each cycle and the LM loss is averaged over
  them (``cycle_logits``). The paper's deep supervision repeats the whole T-cycle recursion up to 16
  times per example with the states detached in between (plus a halting head); that outer loop
  belongs to a training task, not to the model.
- ``grad_last_cycle_only``: the paper's default (T - 1 cycles without gradient, the last one with).
  The state after cycle T - 1 passes through ``stop_gradient``; the params are the same ones in
  every cycle and get their gradient from the last cycle only. Off by default here (full
  backpropagation through all T (n + 1) applications, the exact gradient).

Applications and the KV cache. ``net`` is applied A = T (n + 1) times per forward, as ONE ``nn.scan``
(``recursion``) over the application index with ``variable_broadcast="params"`` (one set of params,
``recursion/net/layers_{l}/...`` and ``recursion/net/norm/scale``) and ``variable_axes={"cache": 0}``:
every application has its own KV-cache slot (the keys of cycle c, layer l differ from those of any
other application), stacked on a leading [A] axis. Compile time is independent of T and n. With
``grad_last_cycle_only`` the same scanned module is called twice (applications 0 .. A - n - 2, then
the last cycle's n + 1) with the ``stop_gradient`` between, so the backward pass really skips the
first T - 1 cycles; decoding (no gradient) always runs one call over all A applications.

``RecursiveRefiner`` / ``RefinedDecoder`` are the ``use_trm_recursion`` loop: K steps of a small
per-token recursive block on a (pretrained) decoder's final hidden states, zero-initialised so that
the refined model equals the decoder exactly until it is trained (see ``RecursiveRefiner``).

Param tree of ``TRMDecoder`` (D hidden, V vocab):

        embed_tokens/embedding        [V, D]
        input_norm/scale              [D]
        z_init                        [D]      the latent's initial value z0
        recursion/net/layers_{l}/...           the shared shallow stack (``layers.DecoderBlock``)
        recursion/net/norm/scale      [D]      the net's output norm
        norm/scale                    [D]      final norm
        lm_head/kernel                [D, V]   (absent when tie_word_embeddings)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import config_util
from vlmjax import flops as flops_lib
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import layers

Array = jax.Array

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TRMConfig:
    """Static TRM hyper-parameters (hashable: a Linen attribute and jit static argument).

    ``decoder`` gives the shape of the shared shallow stack ``net`` and everything around it (hidden
    size, heads, vocab, RoPE, norms, dtypes, ``attention_impl``, ``remat``, ``lora_*``); its
    ``num_hidden_layers`` is the depth L of ``net`` (the paper: 2). The recursion applies ``net``
    ``num_cycles * (latent_steps + 1)`` times.
    """

    decoder: decoder_lib.DecoderConfig = decoder_lib.DecoderConfig(num_hidden_layers=2)
    num_cycles: int = 3  # T: outer cycles (paper: T = 3)
    latent_steps: int = 6  # n: latent updates z = net(x + y + z) per cycle (paper: n = 6)
    # Gradient through the last cycle only (the paper's default): the state after the first T - 1
    # cycles passes through stop_gradient. False: backpropagate through every application.
    grad_last_cycle_only: bool = False
    # Normed hidden state after every cycle in aux["trm/cycle_hidden"] [T, B, T_seq, D], for an LM
    # loss averaged over cycles (``TRMDecoder.cycle_logits``).
    deep_supervision: bool = False

    @property
    def applications_per_cycle(self) -> int:
        """n latent updates + 1 answer update."""
        return self.latent_steps + 1

    @property
    def num_applications(self) -> int:
        """A = T (n + 1): how many times ``net`` runs in one forward."""
        return self.num_cycles * self.applications_per_cycle

    @classmethod
    def from_config(
        cls,
        model_cd: ml_collections.ConfigDict | Mapping[str, Any],
        trm_cd: ml_collections.ConfigDict | Mapping[str, Any],
        vocab_size: int | None = None,
    ) -> "TRMConfig":
        """``config.model`` (a ``decoder.default_config()`` section: the net's shape, its
        ``num_hidden_layers`` = L) + ``config.trm`` (``default_config()``) -> a validated TRMConfig."""
        decoder = decoder_lib.DecoderConfig.from_config(model_cd, vocab_size=vocab_size)
        config = config_util.from_config(cls, trm_cd, "config.trm", decoder=decoder)
        config.validate()
        return config

    def validate(self) -> None:
        """Raises ValueError naming the offending ``config.trm`` / ``config.model`` field and the fix."""
        if not isinstance(self.decoder, decoder_lib.DecoderConfig):
            raise ValueError(f"TRMConfig.decoder must be a decoder.DecoderConfig, got {type(self.decoder)}.")
        self.decoder.validate()
        if self.decoder.scan_layers:
            raise ValueError(
                "config.model.scan_layers=True is not supported by the TRM decoder: its shallow stack is "
                "unrolled and the recursion itself is one nn.scan over net applications; set "
                "--config.model.scan_layers=False.")
        for name, low in (("num_cycles", 1), ("latent_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"config.trm.{name} must be an integer >= {low}, got {value!r}.")
        for name in ("grad_last_cycle_only", "deep_supervision"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.trm.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.deep_supervision and self.grad_last_cycle_only and self.num_cycles > 1:
            raise ValueError(
                "config.trm.deep_supervision=True with grad_last_cycle_only=True: the losses of cycles "
                "1 .. T-1 would sit behind the stop_gradient and train nothing; set one of them False.")


def default_config() -> ml_collections.ConfigDict:
    """The ``config.trm`` section: the recursion fields of ``TRMConfig`` at their defaults (the net's
    shape is the ``config.model`` section, ``decoder.default_config()``)."""
    values = config_util.field_defaults(TRMConfig)
    del values["decoder"]
    return ml_collections.ConfigDict(values)


# ------------------------------------------------------------------------------------------------
# TRM decoder
# ------------------------------------------------------------------------------------------------


class TRMNet(nn.Module):
    """The shared shallow stack ``net``: L pre-norm ``DecoderBlock``s, then RMSNorm.

    The closing norm keeps the recursive states at unit RMS (TRM's post-norm layers do the same; see
    the module docstring). Usable on its own (the tests compose the recursion by hand from it).
    """

    config: decoder_lib.DecoderConfig

    def setup(self):
        c = self.config
        # static_argnums counts `self` as 0: (x=1, positions=2, attention_mask=3, decode=4).
        block = layers.remat(layers.DecoderBlock, c.remat, static_argnums=(4,))
        self.layers = [block(config=c) for _ in range(c.num_hidden_layers)]
        self.norm = layers.RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)

    def __call__(self, u: Array, positions: Array, attention_mask: Array | None = None,
                 decode: bool = False) -> Array:
        """u: [B, T, D]; positions: [B, T] int; attention_mask: [B, T] (1 real, 0 pad) -> [B, T, D]."""
        for layer in self.layers:
            u, _ = layer(u, positions, attention_mask, decode)
        return self.norm(u)


class _RecursionStep(nn.Module):
    """One application of ``net`` (the body of the ``recursion`` scan).

    Application k of a cycle is a latent update ``z = net(x + y + z)`` for k mod (n + 1) < n and the
    answer update ``y = net(y + z)`` for the last one. Choosing with ``jnp.where`` (instead of two
    scans) keeps ONE scanned module, hence one set of params and one stacked cache.
    """

    config: TRMConfig

    def setup(self):
        self.net = TRMNet(self.config.decoder)

    def __call__(self, carry, step: Array, x: Array, positions: Array, attention_mask: Array | None,
                 decode: bool):
        """carry: (y [B, T, D], z [B, T, D], applications int32 scalar); step: int32 scalar, the
        application index in [0, A). Returns (carry, y [B, T, D] with deep supervision else None)."""
        y, z, count = carry
        is_latent = step % self.config.applications_per_cycle < self.config.latent_steps
        out = self.net(jnp.where(is_latent, x + y + z, y + z), positions, attention_mask, decode)
        z = jnp.where(is_latent, out, z)
        y = jnp.where(is_latent, y, out)
        return (y, z, count + 1), (y if self.config.deep_supervision else None)


class TRMDecoder(nn.Module):
    """Tiny recursive decoder (``decoder.type="trm"``; the task switch that builds it from
    ``TRMConfig.from_config`` lives in the task, not here) with the ``decoder.Decoder`` protocol.

    Methods (all usable with ``model.apply(..., method=...)``): ``__call__``, ``embed``,
    ``backbone``, ``unembed``, ``cycle_logits``. Decoding: ``decoder.init_cache(model, b, max_len)``
    and ``vlmjax.models.generate.generate`` work unchanged.
    """

    config: TRMConfig

    def setup(self):
        t = self.config
        t.validate()
        c = t.decoder
        self.embed_tokens = layers.Embed(
            num_embeddings=c.vocab_size, features=c.hidden_size, initializer_range=c.initializer_range,
            dtype=c.dtype, param_dtype=c.param_dtype)
        self.input_norm = layers.RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        # z0 ~ N(0, 1): the unit scale of the normed states (TRM's fixed L_init: trunc_normal, std 1).
        self.z_init = self.param(
            "z_init", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("norm",)),
            (c.hidden_size,), c.param_dtype)
        # One scanned body over the application index: params broadcast (shared by every application),
        # cache stacked on a leading [A] axis (each application its own KV-cache slot). in_axes: the
        # step index is scanned; x / positions / mask / decode are the same for every application.
        self.recursion = nn.scan(
            _RecursionStep, variable_broadcast="params", variable_axes={"cache": 0, "intermediates": 0},
            split_rngs={"params": False, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        )(t)
        self.norm = layers.RMSNorm(eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = layers.DenseGeneral(
                c.vocab_size, kernel_axes=("embed", "vocab"), initializer_range=c.initializer_range,
                dtype=c.dtype, param_dtype=c.param_dtype, preferred_element_type=jnp.float32)
        # The same "cache"/"index" counter as Decoder (default positions of decode steps).
        self.decode_position = decoder_lib._DecodePosition()  # pylint: disable=protected-access

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
        """Runs the recursion and the final norm.

        Args:
            inputs_embeds: [B, T, D] input embeddings (x before ``input_norm``).
            positions: [B, T] int position ids; default ``arange(T)``, or in decode mode the number of
                tokens already in the cache + ``arange(T)``. Left-padded batches must pass them.
            attention_mask: [B, T], 1 = real token, 0 = padding (padding keys are never attended).
            decode: use and update the KV cache ("cache" collection must be mutable).

        Returns:
            (hidden [B, T, D] = norm(y) after the last cycle, aux) with aux
            ``trm/applications`` (int32 scalar: net applications run, T (n + 1)) and, with
            ``deep_supervision``, ``trm/cycle_hidden`` [T_cycles, B, T, D] (norm(y) after each cycle;
            the last equals ``hidden``).
        """
        t = self.config
        c = t.decoder
        b, length = inputs_embeds.shape[:2]
        x = self.input_norm(inputs_embeds.astype(c.dtype))
        start = self.decode_position(length) if decode else 0
        if positions is None:
            positions = start + jnp.arange(length, dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, (b, length))
        positions = nn.with_logical_constraint(positions, (layers.ACT_BATCH, layers.ACT_LEN))
        z0 = jnp.broadcast_to(self.z_init.astype(c.dtype), x.shape)
        carry = (x, z0, jnp.zeros((), jnp.int32))  # y0 = x (module docstring)
        steps = jnp.arange(t.num_applications, dtype=jnp.int32)
        if t.grad_last_cycle_only and t.num_cycles > 1 and not decode:
            # Same scanned module (same params) called twice: the first T - 1 cycles, then the last one
            # behind a stop_gradient, so autodiff has nothing to do in the first call.
            cut = t.num_applications - t.applications_per_cycle
            carry, ys_early = self.recursion(carry, steps[:cut], x, positions, attention_mask, decode)
            carry = jax.lax.stop_gradient(carry)
            carry, ys_last = self.recursion(carry, steps[cut:], x, positions, attention_mask, decode)
            ys = None if ys_last is None else jnp.concatenate([ys_early, ys_last], axis=0)
        else:
            carry, ys = self.recursion(carry, steps, x, positions, attention_mask, decode)
        y, _, count = carry
        aux: dict[str, Array] = {"trm/applications": count}
        if t.deep_supervision:
            # y after the answer update of each cycle: applications n, 2n + 1, ... ([T_cycles, B, T, D]).
            aux["trm/cycle_hidden"] = self.norm(ys[t.latent_steps::t.applications_per_cycle])
        return self.norm(y), aux

    def unembed(self, hidden: Array) -> Array:
        """hidden: [B, T, D] -> logits [B, T, V] float32."""
        if self.config.decoder.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(logits, (layers.ACT_BATCH, layers.ACT_LEN, layers.ACT_VOCAB))

    def cycle_logits(self, cycle_hidden: Array) -> Array:
        """aux["trm/cycle_hidden"] [C, B, T, D] -> logits [C, B, T, V] float32 (deep supervision: the
        LM loss is the mean over C of each cycle's loss). Costs C times the LM head."""
        n_cycles, b = cycle_hidden.shape[:2]
        logits = self.unembed(cycle_hidden.reshape((n_cycles * b,) + cycle_hidden.shape[2:]))
        return logits.reshape((n_cycles, b) + logits.shape[1:])

    def __call__(
        self,
        tokens: Array | None = None,
        *,
        positions: Array | None = None,
        inputs_embeds: Array | None = None,
        attention_mask: Array | None = None,
        decode: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """Causal LM forward, as ``Decoder.__call__``.

        Args:
            tokens: [B, T] int token ids; exactly one of ``tokens`` / ``inputs_embeds``.
            positions: [B, T] int position ids (see ``backbone``).
            inputs_embeds: [B, T, D] embeddings (e.g. visual prefix + ``embed(text)`` concatenated).
            attention_mask: [B, T], 1 = real token, 0 = padding.
            decode: KV-cache mode: T > 1 prefills, T = 1 appends one token.

        Returns:
            (logits [B, T, V] float32, aux: see ``backbone``).
        """
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of tokens [B, T] or inputs_embeds [B, T, D].")
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds
        hidden, aux = self.backbone(x, positions=positions, attention_mask=attention_mask, decode=decode)
        return self.unembed(hidden), aux


# ------------------------------------------------------------------------------------------------
# use_trm_recursion: recursive refinement of a (pretrained) decoder's final hidden states
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """``config.trm_refiner``: the recursive refinement loop added by ``use_trm_recursion``."""

    steps: int = 4  # K refinement steps
    latent_size: int = 64  # r: size of the latent z (the block works in r dims, per token)
    intermediate_size: int = 128  # F: SwiGLU width of the block (r -> F -> r)
    # Gradient through the last step only: the refinement (z and the update of h) after the first
    # K - 1 steps passes through stop_gradient; the decoder's h keeps its gradient path.
    grad_last_step_only: bool = False

    def validate(self) -> None:
        """Raises ValueError naming the ``config.trm_refiner`` field and what it accepts."""
        for name in ("steps", "latent_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.trm_refiner.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.grad_last_step_only, bool):
            raise ValueError(
                f"config.trm_refiner.grad_last_step_only must be True or False, got {self.grad_last_step_only!r}.")

    @classmethod
    def from_config(cls, cd: ml_collections.ConfigDict | Mapping[str, Any]) -> "RefinerConfig":
        """``config.trm_refiner`` -> a validated RefinerConfig (unknown fields: did-you-mean error)."""
        config = config_util.from_config(cls, cd, "config.trm_refiner")
        config.validate()
        return config


def refiner_default_config() -> ml_collections.ConfigDict:
    """The ``config.trm_refiner`` section (``RefinerConfig`` defaults)."""
    return config_util.config_dict(RefinerConfig)


class RecursiveRefiner(nn.Module):
    """K steps of a small recursive block on the final hidden states h0 [B, T, D] (after the decoder's
    final norm, before the LM head), TRM-style with a latent z [B, T, r] (z0 = 0):

            z = z + mlp(norm(in_proj(h) + z))     # latent update from the current answer h
            h = h + out_proj(z)                   # answer update; out_proj [r, D] zero-initialised

    ``out_proj`` starts at exactly zero (the ControlNet / LoRA-B trick), so every update is 0 and the
    refined h is h0 bit for bit: a frozen pretrained decoder keeps its outputs until the refiner is
    trained, and the first gradient step moves ``out_proj`` (whose gradient z^T dL/dh is non-zero)
    before anything else.

    The block is per token (no attention): the decoder below has already mixed the sequence, and a
    per-token block needs no KV cache, so decoding with the refiner is the decoder's cache plus
    K (2 D r + 6 r F + 2 r D) FLOPs per token. (A sequence-mixing block would need its own cache slot
    per step, as ``TRMDecoder``'s recursion has.)

    ``grad_last_step_only``: h = h0 + delta is carried as the decoder's h0 plus the accumulated update
    delta; after K - 1 steps (delta, z) pass through stop_gradient, h0 does not, so a decoder trained
    underneath (e.g. LoRA) still gets its gradient.
    """

    config: RefinerConfig
    hidden_size: int  # D of the decoder's hidden states
    rms_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        rc = self.config
        rc.validate()
        # Fan-in scaled init, N(0, 1 / fan_in) (LeCun): the latent z is O(1) from the first step, so
        # out_proj's gradient z^T dL/dh is O(dL/dh) and the refiner starts learning at once. (The
        # decoder's initializer_range, 0.02, suits fan-ins near 1000: at r = 64 it would leave
        # z ~ 1e-3 and the zero-initialised loop nearly stuck.)
        def dense(features, kernel_axes, fan_in):
            return layers.DenseGeneral(features, kernel_axes=kernel_axes, initializer_range=fan_in ** -0.5,
                                       dtype=self.dtype, param_dtype=self.param_dtype)

        r, f = rc.latent_size, rc.intermediate_size
        # The latent axis (r) is small and replicated (None); D and F shard as in the decoder.
        self.in_proj = dense(r, ("embed", None), self.hidden_size)
        self.gate_proj = dense(f, (None, "mlp"), r)
        self.up_proj = dense(f, (None, "mlp"), r)
        self.down_proj = dense(r, ("mlp", None), f)
        self.norm = layers.RMSNorm(eps=self.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        # [r, D], zeros: the refined h equals h0 exactly until out_proj is trained.
        self.out_proj = _ZeroInitDense(self.hidden_size, kernel_axes=(None, "embed"), dtype=self.dtype,
                                       param_dtype=self.param_dtype)

    def __call__(self, h0: Array) -> tuple[Array, dict[str, Array]]:
        """h0: [B, T, D] final hidden states -> (refined [B, T, D] in the compute dtype, aux) with aux
        ``trm_refiner/update_rms`` (RMS of the total update h - h0; exactly 0 at init)."""
        rc = self.config
        h0 = h0.astype(self.dtype)
        z = jnp.zeros(h0.shape[:-1] + (rc.latent_size,), self.dtype)
        delta = jnp.zeros_like(h0)
        for k in range(rc.steps):
            if rc.grad_last_step_only and k == rc.steps - 1 and k > 0:
                z, delta = jax.lax.stop_gradient((z, delta))
            u = self.in_proj(h0 + delta) + z
            u = self.norm(u)
            z = z + self.down_proj(nn.silu(self.gate_proj(u)) * self.up_proj(u))
            delta = delta + self.out_proj(z)
        rms = jnp.sqrt(jnp.mean(jnp.square(delta.astype(jnp.float32))))
        return h0 + delta, {"trm_refiner/update_rms": rms}


class _ZeroInitDense(nn.Module):
    """``x @ kernel``, kernel [r, features] initialised to exact zeros (``RecursiveRefiner.out_proj``;
    ``layers.DenseGeneral`` always draws N(0, initializer_range^2))."""

    features: int
    kernel_axes: tuple[str | None, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., r] -> [..., features] in ``dtype``."""
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes),
                            (x.shape[-1], self.features), self.param_dtype)
        return jnp.einsum("...r,rd->...d", x.astype(self.dtype), kernel.astype(self.dtype))


class RefinedDecoder(decoder_lib.Decoder):
    """A ``Decoder`` (e.g. pretrained Qwen) with ``RecursiveRefiner`` between its final norm and the
    LM head (``use_trm_recursion``). Same protocol and param tree as ``Decoder`` plus
    ``trm_refiner/...``, so an HF checkpoint loads into it unchanged (the refiner is not in it) and
    ``optim.trainable=("^trm_refiner/",)`` trains the refiner alone on a frozen decoder. The refiner
    is per token, so KV-cache decoding and ``generate`` work as for the plain decoder.
    """

    refiner: RefinerConfig = RefinerConfig()

    def setup(self):
        super().setup()
        c = self.config
        self.trm_refiner = RecursiveRefiner(
            self.refiner, hidden_size=c.hidden_size, rms_norm_eps=c.rms_norm_eps, dtype=c.dtype,
            param_dtype=c.param_dtype)

    def backbone(
        self,
        inputs_embeds: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        decode: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """``Decoder.backbone`` (layers + final norm), then the refinement loop.

        Returns (hidden [B, T, D], aux with ``layers_{i}/...`` and ``trm_refiner/update_rms``)."""
        hidden, aux = super().backbone(inputs_embeds, positions=positions, attention_mask=attention_mask,
                                       decode=decode)
        hidden, refiner_aux = self.trm_refiner(hidden)
        return hidden, {**aux, **refiner_aux}


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


def trm_flops_per_token(config: TRMConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token of ``TRMDecoder`` on sequences of ``seq_len`` (multiply-add = 2).

    A = T (n + 1) applications of the L-layer net, each layer counted by
    ``flops.decoder_layer_forward_flops`` (projections, SwiGLU, full T x T attention), plus the LM head
    2 T D V; divided by T. Not counted (elementwise): norms, RoPE, softmax, the x + y + z sums.
    With T = 1, n = 0 it equals ``flops.decoder_forward_flops`` of the L-layer decoder per token, so
    a TRM and a deep decoder can be compared at equal FLOPs (``trm_train_flops_per_token`` for the
    training step).
    """
    c = config.decoder
    net = c.num_hidden_layers * flops_lib.decoder_layer_forward_flops(c, seq_len)
    head = 2.0 * seq_len * c.hidden_size * c.vocab_size
    return (config.num_applications * net + head) / seq_len


def trm_train_flops_per_token(config: TRMConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token of one training step (no remat): the forward of all A
    applications, and the backward (2x forward) of the applications that get a gradient: all of them,
    or with ``grad_last_cycle_only`` the last cycle's n + 1 only (the first call of the recursion
    sits behind the stop_gradient and has no backward). The LM head: 3x. Deep supervision adds
    3 (T - 1) LM heads."""
    c = config.decoder
    net = c.num_hidden_layers * flops_lib.decoder_layer_forward_flops(c, seq_len) / seq_len
    head = 2.0 * c.hidden_size * c.vocab_size
    with_grad = config.applications_per_cycle if config.grad_last_cycle_only else config.num_applications
    heads = config.num_cycles if config.deep_supervision else 1
    return config.num_applications * net + 2.0 * with_grad * net + 3.0 * heads * head


def refiner_flops_per_token(config: RefinerConfig, hidden_size: int) -> float:
    """Forward matmul FLOPs per token of ``RecursiveRefiner``: K steps of in_proj 2 D r, the SwiGLU
    block 6 r F and out_proj 2 r D (add ``flops.decoder_forward_flops / T`` for the whole model)."""
    d, r, f = hidden_size, config.latent_size, config.intermediate_size
    return float(config.steps * (2 * d * r + 6 * r * f + 2 * r * d))
