"""Two-pass foveated video model: a static query sees every frame coarsely, the LLM chooses where
the second pass looks (``task='foveated'``, ``configs/foveated.py``, docs/foveated.md).

The design (the PyTorch seed's proposal) in one picture, for a clip of T frames:

    frames [B, T, H, W, 3] --ViT, once per frame--> patch cache (query-independent)
    pass 1 (coarse): z°_t = Q(q_static, cache_t)               for every t, in parallel
                     h°   = LLM(proj(z°_1..T))                  causal over frames
                     q_t  = q_static + query_head(h°_t)         the LLM's choice of where to look next
                     pred°_{t+1} = FiLM(h°_t, latent_t)
    pass 2 (fine):   z_t  = Q([q_init, q_1, ..., q_{T-1}]_t, cache_t)   (shifted: frame t is read with
                                                                         the query chosen after t-1)
                     h    = LLM(proj(z_1..T));  pred_{t+1} = FiLM(h_t, latent_t)
    loss = MSE(pred, latent_{t+1}) + lambda_coarse * MSE(pred°, latent_{t+1})   (task side)

Two query mechanisms ``Q`` (``FoveatedConfig.query_mode``):

  shallow  the seed's proof of concept: the query, projected into the encoder width, cross-attends
           (one multi-head attention, ``QueryCrossAttention``) to the final patch features; the
           patch keys/values are computed once per frame and reused by both passes.
  deep     the seed's spec: the query is one extra token inside EVERY encoder block with an
           asymmetric mask (the query attends to all tokens, no token attends to the query), so the
           patch stream, and with it every layer's patch keys/values, does not depend on the query:
           ``FoveatedEncoder.patch_cache`` runs the patches once per frame and keeps K/V per layer;
           ``FoveatedEncoder.deep_query`` runs only the query token's path (one token per layer
           attending to the cached K/V plus itself). ``deep_query_uncached`` is the same computation
           as one masked self-attention over [tokens, query] (the reference the tests and the
           benchmark compare against).

Parameter tree:

    encoder/...             the ViT (``vit.VisionTransformer``, HF names: a DINOv2 / DINOv3 / CLIP /
                            SigLIP checkpoint loads here)
    query_static [D]        q_static (pass 1)       query_init [D]  q_init (pass 2, frame 0)
    query_in/kernel [D, Dv] the query, from the LLM width into the encoder width
    query_xattn/...         shallow only: q/k/v/out projections of the cross-attention (and key_pos
                            [N, H, Dh] with key_position)
    feature_proj/kernel [Dv, D]   z_t -> the LLM input embedding
    feature_norm/...        LayerNorm on it (``input_norm``)
    where_proj/kernel [4H, D]     read_position: [centroids_t, centroids_t - centroids_{t-1}] -> added
    motion_proj/kernel [Dv, D]    read_motion: z_t - z_{t-1} -> added
    map_proj/kernel [2 g² Dv, D]  read_map: [map_t, map_t - map_{t-1}] (the g x g pooled patch tokens) -> added
    change_proj/kernel [g², D]    read_change: how much each of g x g regions changed since frame t-1 -> added
    llm/...                 the decoder (``decoder.Decoder``, HF names: SmolLM2 / Llama / Qwen load here)
    query_head/...          h°_t -> q_t - q_static (Dense D -> D, zero-initialised)
    where_head/...          query_where: h°_t -> a bias over the Np patches for pass 2's attention (zero-init)
    head/...                ``FiLMHead``: h_t and latent_t -> latent_{t+1} (film_where / film_what with
                            film_spatial)

Non-obvious choices (and why):
  * FiLM is ``feat * (1 + gamma) + beta`` with the (gamma, beta) layer zero-initialised: zero
    modulation is the identity (the seed writes ``gamma * feat + beta``; the offset keeps a fresh head
    from zeroing its features).
  * ``residual=True``: the head predicts latent_{t+1} - latent_t (added back), so at init the model
    is the copy-last-frame baseline and the loss measures what motion it predicts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange, reduce

from vlmjax.models import decoder as decoder_lib
from vlmjax.models import layers
from vlmjax.models import vit as vit_lib

Array = jax.Array

QUERY_MODES = ("shallow", "deep")
# What pass 2 reads the frames with (``FoveatedModel.__call__(fine_queries=...)``): the LLM's queries
# (the model), the static query (control: pass 2 = pass 1 exactly) or another clip's queries (the
# batch rolled by one: control for "any non-static query helps").
FINE_QUERIES = ("predicted", "static", "shuffled")


@dataclasses.dataclass(frozen=True)
class FoveatedConfig:
    """The parts between the encoder and the decoder (each carries its own config).

    query_mode: 'shallow' | 'deep' (module docstring).
    query_heads: heads of the shallow cross-attention (0 = the encoder's).
    query_attn_init: init std of its q/k/v/out projections.
    key_position: shallow only: init std of a learned per-token, per-head offset added to the cross-
        attention's keys (``QueryCrossAttention.key_pos``), so a query can address a place, not only a
        content (0 = off: the keys carry position only through the encoder's position embeddings).
    latent_channels: C of the target latents (4: SD-VAE and the pixel encoder).
    film_channels: widths of the FiLM head's conv encoder (the decoder mirrors it); the last one is
      the modulated width F.
    residual: predict the change latent_{t+1} - latent_t (module docstring).
    film_coords: coordinate channels into the FiLM head's conv encoder (``FiLMHead.coords``).
    read_motion: the LLM input of frame t also gets the change of the read-out's features since frame
      t-1 (``motion_proj``; 0 at frame 0).
    film_init: init std of the (gamma, beta) layer. 0 = zero modulation at init (the output ignores h
      until the layer grows); with ``residual`` the head still starts as copy-last either way (its
      last conv is zero), and a non-zero value lets the loss reach the LLM from step 0.
    input_norm: LayerNorm on the projected frame features before the LLM (``feature_norm``): unit-scale
      inputs whose per-clip variation the LLM's residual stream keeps (measured: without it, a
      from-scratch LLM's output varied 0.4-3.5% across clips and the head ignored it).
    query_head_init: init std of the query head (h°_t -> q_t - q_static). 0 = pass 2 starts as pass 1
        exactly; but then no gradient reaches the LLM through the queries until the head has grown,
        and the LLM's state across clips may collapse before it does (docs/foveated.md).
    read_map: g > 0: the LLM input of every frame (both passes) also gets a coarse spatial map, the
        final patch tokens average-pooled to a g x g grid, and its change since the previous frame
        (``map_proj``): query-independent peripheral vision, so a change has a place (0 = off).
    read_change: g > 0: the LLM input of every frame (both passes) also gets a g x g map of how much
        each region of the frame changed since the previous one (RMS difference of the frames seen at
        ``change_acuity``, average-pooled; ``FoveatedModel.change_map``, through ``change_proj``):
        parameter-free peripheral motion
        vision that says WHERE something moved but not what it looks like (0 = off). Unlike
        ``read_map`` it carries no patch features, so a detail at the mover (say its heading mark)
        reaches the LLM only through a read.
    change_acuity: p >= 1: ``read_change`` differences the frames after averaging p x p pixel cells
        (peripheral vision is coarse): a detail finer than p pixels that changes (a 2 x 2-pixel
        checkerboard's phase, ``data.heading_marks``) does not show in the map, a moving object does
        (1 = full resolution).
    query_where: the LLM also says WHERE pass 2 looks: ``where_head`` (zero-initialised) maps h°_t to a
        bias over the patch grid added to the query's attention logits (every head; deep: every
        layer), shifted between the passes like the queries (none at frame 0, none in pass 1). A
        query vector can address a place only through the keys' position content; this is the
        direct pointer (measured: docs/foveated.md).
    film_spatial: R > 0: the FiLM modulation also varies over the latent grid, gamma/beta(x, y, c) =
        global(c) + sum_r where_r(x, y) what_r(c), both affine in h (``FiLMHead``): the LLM can say
        "change THIS place this way"; a per-channel FiLM on translation-equivariant convolutions can
        only say it through the coordinate channels (0 = off: the FiLM paper's per-channel form).
    read_position: the read-out also says WHERE it looked: each head's attention centroid over the
      patch grid (x, y in patches from the grid centre, 2 x heads numbers; ``FoveatedModel.read``) and
      how far it moved since the previous frame, through their own embedding added to the LLM input
      (``where_proj``). A fovea knows where it points; without this the position of what was read
      reaches the LLM only through the encoder's position embedding, a few percent of each
      (layer-normalised) token (docs/foveated.md, Measured).
    """

    query_mode: str = "shallow"
    query_heads: int = 0
    latent_channels: int = 4
    film_channels: tuple[int, ...] = (64, 128)
    residual: bool = True
    film_coords: bool = True
    input_norm: bool = True
    query_attn_init: float = 0.02
    key_position: float = 0.0
    query_head_init: float = 0.0
    read_position: bool = False
    read_map: int = 0
    read_change: int = 0
    change_acuity: int = 1
    query_where: bool = False
    film_spatial: int = 0
    read_motion: bool = False
    film_init: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "dtype", layers.parse_dtype("dtype", self.dtype))
        object.__setattr__(self, "film_channels", tuple(int(c) for c in self.film_channels))

    def validate(self) -> None:
        """Raises ValueError naming the ``config.foveated`` field and what it accepts."""
        if self.query_mode not in QUERY_MODES:
            raise ValueError(f"config.foveated.query_mode={self.query_mode!r}; use one of {QUERY_MODES}.")
        if not isinstance(self.query_heads, int) or self.query_heads < 0:
            raise ValueError(f"config.foveated.query_heads={self.query_heads!r} must be an int >= 0 "
                             "(0 = the encoder's heads).")
        if not isinstance(self.latent_channels, int) or self.latent_channels < 1:
            raise ValueError(f"config.foveated.latent_channels={self.latent_channels!r} must be an int >= 1.")
        if not self.query_head_init >= 0:
            raise ValueError(f"config.foveated.query_head_init={self.query_head_init!r} must be >= 0.")
        for name in ("read_map", "read_change", "film_spatial"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"config.foveated.{name}={value!r} must be an int >= 0 (0 = off).")
        if not isinstance(self.change_acuity, int) or self.change_acuity < 1:
            raise ValueError(f"config.foveated.change_acuity={self.change_acuity!r} must be an int >= 1 "
                             "(pixels averaged per side before differencing; 1 = full resolution).")
        if not self.key_position >= 0:
            raise ValueError(f"config.foveated.key_position={self.key_position!r} must be >= 0 (0 = off).")
        if self.key_position and self.query_mode != "shallow":
            raise ValueError("config.foveated.key_position applies to query_mode='shallow' only (the deep query "
                             "attends inside the encoder, whose tokens carry their positions); set it to 0.")
        if not self.film_channels or min(self.film_channels) < 1:
            raise ValueError(f"config.foveated.film_channels={self.film_channels!r} must be one or more "
                             "positive widths, e.g. (64, 128).")


# ------------------------------------------------------------------------------------------------
# The encoder: a ViT that can also run one query token against cached patch keys/values.
# ------------------------------------------------------------------------------------------------


def _query_attention(q: Array, k: Array, v: Array, dtype, bias: Array | None = None) -> tuple[Array, Array]:
    """One query token per row over S keys, softmax in fp32.

    q: [B, 1, H, Dh]; k/v: [B, S, H, Dh]; bias: [B, S] added to every head's logits, or None
    -> (out [B, 1, H, Dh] in ``dtype``, probs [B, H, S] fp32).
    Written out (not ``attention.attend``) because the caller needs the probabilities (the attention
    pictures) and one query row is a matrix-vector product that no fused kernel speeds up.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bshd->bhqs", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)[:, None, None, :]
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqs,bshd->bqhd", probs.astype(dtype), v.astype(dtype))
    return out, probs[:, :, 0]


class FoveatedEncoder(vit_lib.VisionTransformer):
    """``VisionTransformer`` (same params, HF names) plus the deep-query methods.

    Deep query (the spec's asymmetric mask): with tokens X (prefix + patches, N of them) and one query
    token u, layer l computes for the tokens exactly the plain ViT layer (they never see u), and for
    u: ``u' = finish(u, attn(q(u), [K_l(X), k(u)], [V_l(X), v(u)]))``. So ``patch_cache`` (the plain
    forward, keeping K_l(X), V_l(X)) runs once per frame and ``deep_query`` costs one token per layer.
    The query token carries no position (identity RoPE for DINOv3, no position embedding added), like
    the CLS token's attention role.
    """

    def _check_loop(self):
        if self.config.scan_layers:
            raise ValueError("config.encoder scan_layers=True runs the layers as one scanned module; the deep "
                             "query visits them one by one: set scan_layers=False (or query_mode='shallow').")

    def _rope(self, grid: tuple[int, int], deterministic: bool):
        """(cos, sin) of the tokens of a (gh, gw) patch grid for RoPE families (DINOv3), else None."""
        return self.rope_tables(*grid, deterministic=deterministic)

    def _layer_qkv(self, layer, x, rope):
        return layer.qkv(x) if rope is None else layer.qkv(x, rope=rope)

    def patch_cache(self, pixel_values: Array, *, deterministic: bool = True) -> dict[str, Any]:
        """The query-independent part of a frame: [B, H, W, C] ->
        ``{"k": [L x [B, N, H, Dh]], "v": [...], "outputs": the plain ViT outputs dict}``."""
        self._check_loop()
        c = self.config
        grid = (pixel_values.shape[1] // c.patch_size, pixel_values.shape[2] // c.patch_size)
        x = self.embed(pixel_values, deterministic=deterministic)
        rope = self._rope(grid, deterministic)
        ks, vs = [], []
        for layer in self.layers:
            q, k, v = self._layer_qkv(layer, x, rope)
            ks.append(k)
            vs.append(v)
            x = layer.finish(x, layer.attend(q, k, v), deterministic)
        return {"k": ks, "v": vs, "outputs": self.outputs(x)}

    def deep_query(self, u: Array, cache: dict[str, Any], bias: Array | None = None, *,
                   deterministic: bool = True) -> tuple[Array, Array]:
        """Runs query tokens through every layer against the cached keys/values.

        Args:
            u: [B, D] query token (encoder width), one per frame.
            cache: ``patch_cache`` of the same B frames.
            bias: [B, N] added to the query's attention logits over the N cached tokens in every layer
                (``FoveatedConfig.query_where``), or None.
        Returns:
            (z [B, D] the query token after the final layer norm, probs [B, H, N] the last layer's
            attention of the query over the N cached tokens, renormalised without its self-weight).
        """
        self._check_loop()
        x = u[:, None].astype(self.config.dtype)
        probs = None
        if bias is not None:
            bias = jnp.concatenate([bias, jnp.zeros_like(bias[:, :1])], 1)  # none on its own key
        for layer, k_c, v_c in zip(self.layers, cache["k"], cache["v"]):
            q, k, v = layer.qkv(x)  # no RoPE for the query token
            out, probs = _query_attention(q, jnp.concatenate([k_c, k], 1), jnp.concatenate([v_c, v], 1),
                                          self.config.dtype, bias)
            x = layer.finish(x, out, deterministic)
        patches = probs[..., :-1]
        patches = patches / jnp.maximum(patches.sum(-1, keepdims=True), 1e-9)
        return self.post_layernorm(x)[:, 0], patches

    def deep_query_uncached(self, pixel_values: Array, u: Array, *, deterministic: bool = True
                            ) -> tuple[Array, dict[str, Array]]:
        """The reference: [tokens, query] through every layer as ONE masked self-attention.

        pixel_values: [B, H, W, C]; u: [B, D] -> (z [B, D], the plain outputs dict of the tokens).
        The mask is the spec's: rows of the tokens see only the tokens, the query's row sees all.
        """
        self._check_loop()
        c = self.config
        grid = (pixel_values.shape[1] // c.patch_size, pixel_values.shape[2] // c.patch_size)
        x = self.embed(pixel_values, deterministic=deterministic)
        b, n = x.shape[:2]
        rope = self._rope(grid, deterministic)
        if rope is not None:  # identity rotation for the query row
            cos, sin = rope
            rope = (jnp.concatenate([cos, jnp.ones_like(cos[:1])], 0),
                    jnp.concatenate([sin, jnp.zeros_like(sin[:1])], 0))
        x = jnp.concatenate([x, u[:, None].astype(x.dtype)], axis=1)
        allowed = jnp.ones((n + 1, n + 1), bool).at[:n, n].set(False)
        mask = jnp.broadcast_to(allowed, (b, n + 1, n + 1))
        for layer in self.layers:
            q, k, v = self._layer_qkv(layer, x, rope)
            x = layer.finish(x, layer.self_attn.attend(q, k, v, mask=mask), deterministic)
        return self.post_layernorm(x[:, -1]), self.outputs(x[:, :n])


class QueryCrossAttention(nn.Module):
    """Shallow query: one multi-head cross-attention of a query vector over final patch features.

    ``keys_values`` is query-independent (computed once per frame, shared by both passes).
    """

    hidden_size: int
    num_heads: int
    initializer_range: float = 0.02
    key_position: float = 0.0  # init std of key_pos [N, H, Dh] (FoveatedConfig.key_position; 0 = none)
    num_tokens: int = 0        # N, the tokens the keys come from (needed with key_position)
    dtype: Any = jnp.float32

    def setup(self):
        h, dh = self.num_heads, self.hidden_size // self.num_heads
        if self.key_position:
            self.key_pos = self.param("key_pos", nn.with_logical_partitioning(
                nn.initializers.normal(self.key_position), (None, "kv_heads", "head_dim")),
                (self.num_tokens, h, dh), jnp.float32)
        dense = functools.partial(layers.DenseGeneral, use_bias=True, initializer_range=self.initializer_range,
                                  dtype=self.dtype)
        self.q_proj = dense((h, dh), kernel_axes=("embed", "q_heads", "head_dim"))
        self.k_proj = dense((h, dh), kernel_axes=("embed", "kv_heads", "head_dim"))
        self.v_proj = dense((h, dh), kernel_axes=("embed", "kv_heads", "head_dim"))
        self.out_proj = dense(self.hidden_size, kernel_axes=("q_heads", "head_dim", "embed"), axis=(-2, -1))

    def keys_values(self, tokens: Array) -> tuple[Array, Array]:
        """tokens [B, N, D] -> k, v [B, N, H, Dh] (k + key_pos with ``key_position``)."""
        k = self.k_proj(tokens)
        if self.key_position:
            if tokens.shape[1] != self.num_tokens:
                raise ValueError(f"key_position: built for {self.num_tokens} tokens, got {tokens.shape[1]}.")
            k = k + self.key_pos.astype(k.dtype)
        return k, self.v_proj(tokens)

    def __call__(self, u: Array, k: Array, v: Array, bias: Array | None = None) -> tuple[Array, Array]:
        """u [B, D] (encoder width), k/v [B, N, H, Dh], bias [B, N] or None -> (z [B, D], probs [B, H, N])."""
        out, probs = _query_attention(self.q_proj(u)[:, None], k, v, self.dtype, bias)
        return self.out_proj(out)[:, 0], probs


class FiLMHead(nn.Module):
    """Next-latent prediction (the seed's ``PredictionHead``): a conv encoder of latent_t whose
    features are modulated by the LLM state (FiLM, Perez et al. 2018), then a conv decoder.

    ``__call__(h [B, D], prev [B, h, w, C]) -> [B, h, w, C]``; ``coords`` adds coordinate channels to
    the encoder's input (CoordConv); ``film`` is zero-initialised, so a
    fresh head's modulation is the identity; with ``residual`` the decoder's last conv is zero too
    (the output starts as ``prev``).
    """

    channels: tuple[int, ...]
    latent_channels: int
    residual: bool = True
    coords: bool = True
    film_init: float = 0.0
    spatial: int = 0          # FoveatedConfig.film_spatial (rank R; 0 = per-channel FiLM only)
    grid: tuple[int, ...] = ()  # (h, w) of the latents, needed with ``spatial``
    dtype: Any = jnp.float32

    def setup(self):
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME", dtype=self.dtype,
                                 kernel_init=nn.with_logical_partitioning(
                                     nn.initializers.lecun_normal(), (None, None, None, None)),
                                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))
        self.encoder = [conv(c, name=f"encoder_{i}") for i, c in enumerate(self.channels)]
        width = self.channels[-1]
        # (gamma, beta) affine in h, as in FiLM (Perez et al. 2018), zero-initialised: identity modulation
        # at step 0. Not an MLP: measured here, a GELU hidden layer between h and (gamma, beta) died while
        # h was still uninformative (87% of its pre-activations below -2 after 500 steps), which cut every
        # gradient to the LLM and the encoder (1e-6 of the head's) for good.
        self.film = layers.DenseGeneral((2, width), kernel_axes=("embed", None, None), use_bias=True,
                                        initializer_range=self.film_init, dtype=self.dtype)
        if self.spatial:
            if len(self.grid) != 2:
                raise ValueError(f"film_spatial needs the latent grid (h, w), got grid={self.grid!r}.")
            # Spatially varying FiLM of rank R: where_r(x, y) [R, h, w] and what_r [R, 2, F], both affine
            # in h (like SPADE's per-location gamma/beta, but from a vector, not a map): one term can say
            # "at the mover, shift this way". Both start small and non-zero (film_init, or 0.02 when it is
            # 0) so each gets a gradient through the other.
            std = self.film_init or 0.02
            self.film_where = layers.DenseGeneral((self.spatial, *self.grid), kernel_axes=("embed", None, None, None),
                                                  use_bias=True, initializer_range=std, dtype=self.dtype)
            self.film_what = layers.DenseGeneral((self.spatial, 2, width), kernel_axes=("embed", None, None, None),
                                                 use_bias=True, initializer_range=std, dtype=self.dtype)
        self.decoder = [conv(c, name=f"decoder_{i}") for i, c in enumerate(reversed(self.channels))]
        last_init = nn.initializers.zeros_init() if self.residual else nn.initializers.lecun_normal()
        self.out = nn.Conv(self.latent_channels, kernel_size=(3, 3), padding="SAME", dtype=self.dtype,
                           kernel_init=nn.with_logical_partitioning(last_init, (None, None, None, None)),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))

    def features(self, prev: Array) -> Array:
        """prev [B, h, w, C] -> [B, h, w, F] (the modulated features)."""
        f = prev.astype(self.dtype)
        if self.coords:
            # CoordConv (Liu et al. 2018): two channels of cell coordinates in [-1, 1], so that a global
            # (gamma, beta) can address a place ("move the sprite at x, y"); convolutions alone are
            # translation-equivariant and a per-channel modulation could not single one sprite out.
            b, h, w, _ = f.shape
            ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
            grid = jnp.broadcast_to(jnp.stack([ys, xs], -1).astype(f.dtype), (b, h, w, 2))
            f = jnp.concatenate([f, grid], axis=-1)
        for i, conv in enumerate(self.encoder):
            f = conv(f)
            if i < len(self.encoder) - 1:
                f = nn.gelu(f)
        return f

    def modulation(self, h: Array) -> tuple[Array, Array]:
        """h [B, D] -> gamma, beta [B, 1, 1, F] (per channel), or [B, h, w, F] with ``spatial``."""
        gb = self.film(h)[:, :, None, None, :]  # [B, 2, 1, 1, F]
        if self.spatial:
            where, what = self.film_where(h), self.film_what(h)  # [B, R, h, w], [B, R, 2, F]
            gb = gb + jnp.einsum("brxy,brgf->bgxyf", where, what)
        return gb[:, 0], gb[:, 1]

    def decode(self, f: Array, prev: Array) -> Array:
        """Modulated features [B, h, w, F] -> the predicted latent [B, h, w, C] (fp32)."""
        for conv in self.decoder:
            f = nn.gelu(conv(f))
        out = self.out(f).astype(jnp.float32)
        return prev.astype(jnp.float32) + out if self.residual else out

    def __call__(self, h: Array, prev: Array) -> Array:
        gamma, beta = self.modulation(h)
        f = self.features(prev)
        f = f * (1.0 + gamma.astype(f.dtype)) + beta.astype(f.dtype)
        return self.decode(f, prev)


class FoveatedModel(nn.Module):
    """Encoder + query mechanism + LLM + FiLM head (module docstring).

    ``__call__(frames, latents)``: frames [B, T, H, W, 3] (normalised for the encoder), latents
    [B, T, h, w, C] -> dict:
        pred_coarse, pred_fine  [B, T-1, h, w, C]  predictions of latents[:, 1:]
        attn_coarse, attn_fine  [B, T, Np]         each pass's attention over the patches (mean over
                                                   heads; deep: the last layer's)
        queries                 [B, T, D]          the queries pass 2 used (shifted)
    """

    vit_config: vit_lib.ViTConfig
    decoder_config: decoder_lib.DecoderConfig
    config: FoveatedConfig
    latent_grid: tuple[int, ...] = ()  # (h, w) of the target latents: needed with film_spatial

    def setup(self):
        c, v, d = self.config, self.vit_config, self.decoder_config
        c.validate()
        self.encoder = FoveatedEncoder(v)
        self.llm = decoder_lib.Decoder(d)
        dim, width = d.hidden_size, v.hidden_size
        vec = lambda: nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",))
        self.query_static = self.param("query_static", vec(), (dim,), jnp.float32)
        self.query_init = self.param("query_init", vec(), (dim,), jnp.float32)
        self.query_in = layers.DenseGeneral(width, kernel_axes=("embed", None), use_bias=True,
                                            initializer_range=dim ** -0.5, dtype=c.dtype)
        if c.query_mode == "shallow":
            heads = c.query_heads or v.num_attention_heads
            if width % heads:
                raise ValueError(f"config.foveated.query_heads={heads} must divide the encoder width {width}.")
            self.query_xattn = QueryCrossAttention(width, heads, initializer_range=c.query_attn_init,
                                                   key_position=c.key_position,
                                                   num_tokens=v.num_prefix_tokens + v.grid_size ** 2, dtype=c.dtype)
        self.feature_proj = layers.DenseGeneral(dim, kernel_axes=(None, "embed"), use_bias=True, dtype=c.dtype)
        if c.read_motion:
            # How the read-out changed since the previous frame (an RGB-difference-like input, as in
            # TSN): a moving sprite changes its patch tokens, and that change carries its colour.
            self.motion_proj = layers.DenseGeneral(dim, kernel_axes=(None, "embed"), use_bias=False,
                                                   initializer_range=width ** -0.5 * 4.0, dtype=c.dtype)
        if c.read_position:
            # The centroids and their move since the previous frame (4 x heads numbers, patch units)
            # get their own embedding added after the feature LayerNorm: concatenated into z they were
            # 2H of Dv + 2H inputs of one projection and drowned in the content features' variation
            # (measured: state_use 1.000); the move (a velocity) is what made the head use h.
            heads = c.query_heads or v.num_attention_heads
            self.where_proj = layers.DenseGeneral(dim, kernel_axes=(None, "embed"), use_bias=False,
                                                  initializer_range=(4 * heads) ** -0.5 * 2.0, dtype=c.dtype)
        if c.read_map:
            self.map_proj = layers.DenseGeneral(dim, kernel_axes=(None, "embed"), use_bias=False,
                                                initializer_range=(2 * c.read_map ** 2 * width) ** -0.5 * 2.0,
                                                dtype=c.dtype)
        if c.read_change:
            self.change_proj = layers.DenseGeneral(dim, kernel_axes=(None, "embed"), use_bias=False,
                                                   initializer_range=c.read_change ** -1 * 2.0, dtype=c.dtype)
        if c.input_norm:
            self.feature_norm = layers.LayerNorm(dtype=c.dtype)
        # q_t = q_static + query_head(h°_t), query_head zero-initialised (query_head_init = 0, the
        # default; > 0 trades this for gradients into the LLM from step 0): at step 0 pass 2 reads exactly
        # what pass 1 read (fine = coarse, ratio 1), and the LLM moves each query away from the static
        # one only as far as that lowers loss_fine. (A random head would start pass 2 from arbitrary,
        # near-uniform attention, a worse starting point than pass 1's.)
        self.query_head = layers.DenseGeneral(dim, kernel_axes=("embed", None), use_bias=True,
                                              initializer_range=c.query_head_init, dtype=c.dtype)
        if c.query_where:
            self.where_head = layers.DenseGeneral(v.grid_size ** 2, kernel_axes=("embed", None), use_bias=True,
                                                  initializer_range=0.0, dtype=c.dtype)
        self.head = FiLMHead(c.film_channels, c.latent_channels, residual=c.residual, coords=c.film_coords,
                             film_init=c.film_init, spatial=c.film_spatial, grid=tuple(self.latent_grid),
                             dtype=c.dtype)

    # ---- pieces (public for tests and the benchmark) ------------------------------------------
    def frame_cache(self, frames: Array, *, deterministic: bool = True) -> dict[str, Any]:
        """frames [B*T, H, W, 3] -> what both passes read: the deep per-layer K/V, or the shallow
        cross-attention's K/V of the final patch tokens."""
        if self.config.query_mode == "deep":
            cache = self.encoder.patch_cache(frames, deterministic=deterministic)
        else:
            out, _ = self.encoder(frames, deterministic=deterministic)
            k, v = self.query_xattn.keys_values(out["last_hidden_state"])
            cache = {"k": k, "v": v, "outputs": out}
        if self.config.read_map:
            cache["map"] = self.coarse_map(cache["outputs"]["last_hidden_state"])
        return cache

    def coarse_map(self, tokens: Array) -> Array:
        """tokens [B, Np_prefix + Np, Dv] (final) -> the patch tokens average-pooled to a g x g grid,
        flattened [B, g * g * Dv] (``FoveatedConfig.read_map``)."""
        g = self.config.read_map
        patches = tokens[:, self.vit_config.num_prefix_tokens:]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1] or side % g:
            raise ValueError(f"config.foveated.read_map={g} must divide the patch grid's side ({side}).")
        grid = rearrange(patches, "b (gy y gx x) d -> b gy gx (y x) d", gy=g, gx=g, y=side // g, x=side // g)
        return rearrange(grid.mean(3), "b gy gx d -> b (gy gx d)")

    def change_map(self, frames: Array) -> Array:
        """frames [B, T, H, W, 3] -> [B*T, g²]: per region of a g x g grid, the RMS change since the
        previous frame of the frame averaged over p x p pixel cells (0 at frame 0;
        ``FoveatedConfig.read_change``, ``change_acuity`` p). Parameter-free and query-independent:
        where something moved, not what it looks like."""
        g, p = self.config.read_change, self.config.change_acuity
        h, w = frames.shape[2:4]
        if h % p or w % p or (h // p) % g or (w // p) % g:
            raise ValueError(f"config.foveated.read_change={g} x change_acuity={p} must divide the frame size "
                             f"{h}x{w}.")
        f = reduce(frames.astype(jnp.float32), "b t (h p) (w q) c -> b t h w c", "mean", p=p, q=p)
        diff = jnp.concatenate([jnp.zeros_like(f[:, :1]), f[:, 1:] - f[:, :-1]], axis=1)
        cells = rearrange(jnp.square(diff), "b t (gy y) (gx x) c -> (b t) (gy gx) (y x c)", gy=g, gx=g)
        return jnp.sqrt(cells.mean(-1))

    def read(self, queries: Array, cache: dict[str, Any], where: Array | None = None, *,
             deterministic: bool = True) -> tuple[Array, Array]:
        """queries [B*T, D] (LLM width) and, with query_where, a bias over the patches [B*T, Np] (pass 2)
        -> (z [B*T, Dv (+ 2H with read_position)], attention over the patches [B*T, Np] (mean over
        heads))."""
        u = self.query_in(queries.astype(self.config.dtype))
        n_prefix = self.vit_config.num_prefix_tokens
        bias = None
        if where is not None:  # no bias on the prefix tokens (CLS, registers)
            bias = jnp.concatenate([jnp.zeros((where.shape[0], n_prefix), where.dtype), where], 1)
        if self.config.query_mode == "deep":
            z, probs = self.encoder.deep_query(u, cache, bias, deterministic=deterministic)
        else:
            z, probs = self.query_xattn(u, cache["k"], cache["v"], bias)
        per_head = probs[..., n_prefix:]  # [B*T, H, Np]: patches only
        per_head = per_head / jnp.maximum(per_head.sum(-1, keepdims=True), 1e-9)
        if self.config.read_position:
            z = jnp.concatenate([z, self.centroids(per_head).astype(z.dtype)], axis=-1)
        patches = per_head.mean(1)  # mean over heads
        return z, patches

    def centroids(self, attn: Array) -> Array:
        """attn [B, H, Np] (each head's attention over the patch grid, rows sum to 1) -> [B, 2H]: each
        head's attention-weighted mean patch centre (x, y) in patches from the grid centre
        (``FoveatedConfig.read_position``)."""
        side = int(round(attn.shape[-1] ** 0.5))
        if side * side != attn.shape[-1]:
            raise ValueError(f"read_position needs a square patch grid, got {attn.shape[-1]} patches.")
        axis = jnp.arange(side, dtype=jnp.float32) - (side - 1) / 2.0  # patch units, centred
        ys, xs = jnp.meshgrid(axis, axis, indexing="ij")
        grid = jnp.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # [Np, 2], row-major like the patches
        return rearrange(jnp.einsum("bhn,nc->bhc", attn.astype(jnp.float32), grid), "b h c -> b (h c)")

    def think(self, z: Array, b: int, coarse_map: Array | None = None, change: Array | None = None, *,
              deterministic: bool = True) -> Array:
        """z [B*T, Dv (+ 2H with read_position)] (``read``) and, with read_map, the frames' coarse maps
        [B*T, g² Dv] (``coarse_map``), with read_change their change maps [B*T, g²] (``change_map``)
        -> the LLM's hidden states [B, T, D] (causal over the frames: the motion inputs look one frame
        back)."""
        c = self.config
        dv = self.vit_config.hidden_size
        feats, where = (z[:, :dv], z[:, dv:]) if c.read_position else (z, None)
        x = self.feature_proj(feats)
        if c.input_norm:
            x = self.feature_norm(x)
        if where is not None:
            # Where it looked, and how far that moved since the previous frame.
            x = x + self.where_proj(jnp.concatenate([where, _since_previous(where, b)], -1).astype(x.dtype))
        if c.read_motion:
            x = x + self.motion_proj(_since_previous(feats, b).astype(x.dtype))
        if coarse_map is not None:
            m = coarse_map.astype(jnp.float32)
            x = x + self.map_proj(jnp.concatenate([m, _since_previous(m, b)], -1).astype(x.dtype))
        if change is not None:
            x = x + self.change_proj(change.astype(x.dtype))
        x = rearrange(x, "(b t) d -> b t d", b=b)
        hidden, _ = self.llm.backbone(x.astype(self.decoder_config.dtype))
        return hidden

    def predict(self, hidden: Array, latents: Array) -> Array:
        """hidden [B, T, D], latents [B, T, h, w, C] -> predictions of latents[:, 1:] [B, T-1, h, w, C]."""
        b = hidden.shape[0]
        h = rearrange(hidden[:, :-1], "b t d -> (b t) d")
        prev = rearrange(latents[:, :-1], "b t x y c -> (b t) x y c")
        return rearrange(self.head(h, prev), "(b t) x y c -> b t x y c", b=b)

    def __call__(self, frames: Array, latents: Array, *, fine_queries: str = "predicted",
                 shuffle_state: bool = False, deterministic: bool = True) -> dict[str, Array]:
        """See the class docstring. ``fine_queries``: ``FINE_QUERIES``. ``shuffle_state``: both heads
        get another clip's LLM states (the batch rolled by one; a diagnostic: if the predictions do not
        get worse, the model does not use what it saw)."""
        if fine_queries not in FINE_QUERIES:
            raise ValueError(f"fine_queries={fine_queries!r}; use one of {FINE_QUERIES}.")
        b, t = frames.shape[:2]
        if latents.shape[:2] != (b, t):
            raise ValueError(f"latents {latents.shape} must have the frames' leading [B, T] = {(b, t)}.")
        if t < 2:
            raise ValueError(f"a clip needs at least 2 frames to predict the next one, got T={t}.")
        cache = self.frame_cache(rearrange(frames, "b t h w c -> (b t) h w c"), deterministic=deterministic)
        dim = self.decoder_config.hidden_size

        # Pass 1: the static query on every frame.
        static = jnp.broadcast_to(self.query_static, (b * t, dim))
        z0, attn0 = self.read(static, cache, deterministic=deterministic)
        change = self.change_map(frames) if self.config.read_change else None
        h0 = self.think(z0, b, cache.get("map"), change, deterministic=deterministic)
        predicted = self.query_static + self.query_head(h0)  # [B, T, D]: q_t, chosen after frames <= t
        where = self.where_head(h0) if self.config.query_where else None  # [B, T, Np]

        # Pass 2: frame t read with q_{t-1} (q_init for frame 0).
        if fine_queries == "static":
            queries = jnp.broadcast_to(self.query_static, (b, t, dim))
            where = None
        else:
            if fine_queries == "shuffled":
                predicted = jnp.roll(predicted, 1, axis=0)
                where = None if where is None else jnp.roll(where, 1, axis=0)
            queries = shift_queries(self.query_init, predicted)
            if where is not None:  # the same shift: frame 0 gets no bias
                where = rearrange(shift_queries(jnp.zeros_like(where[0, 0]), where), "b t n -> (b t) n")
        z1, attn1 = self.read(rearrange(queries, "b t d -> (b t) d"), cache, where, deterministic=deterministic)
        h1 = self.think(z1, b, cache.get("map"), change, deterministic=deterministic)
        if shuffle_state:
            h0, h1 = jnp.roll(h0, 1, axis=0), jnp.roll(h1, 1, axis=0)
        grid = lambda a: rearrange(a, "(b t) n -> b t n", b=b)
        return {"pred_coarse": self.predict(h0, latents), "pred_fine": self.predict(h1, latents),
                "attn_coarse": grid(attn0), "attn_fine": grid(attn1), "queries": queries}


def _since_previous(a: Array, b: int) -> Array:
    """a [B*T, C] (frames of B clips, in order) -> a_t - a_{t-1} [B*T, C], 0 at each clip's frame 0."""
    a = rearrange(a, "(b t) c -> b t c", b=b)
    moved = jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, 1:] - a[:, :-1]], axis=1)
    return rearrange(moved, "b t c -> (b t) c")


def shift_queries(q_init: Array, predicted: Array) -> Array:
    """The spec's shift between the passes: [q_init, q_1, ..., q_{T-1}].

    q_init: [D]; predicted: [B, T, D] (q_t from pass 1's state after frame t) -> [B, T, D].
    """
    first = jnp.broadcast_to(q_init.astype(predicted.dtype), (predicted.shape[0], 1, predicted.shape[-1]))
    return jnp.concatenate([first, predicted[:, :-1]], axis=1)


__all__ = ["FINE_QUERIES", "FiLMHead", "FoveatedConfig", "FoveatedEncoder", "FoveatedModel", "QUERY_MODES",
           "QueryCrossAttention", "shift_queries"]
