"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

One jitted program: prefill the prompt (``decode=True``, T = P), then a ``jax.lax.while_loop`` that
feeds one token per step (T = 1) and stops early once every row has emitted ``eos_id``.

A visual prefix (``prefix_embeds`` [B, N, D], or ``images`` that the model's ``visual_prefix``
method turns into one inside the same program) is prefilled into the KV cache before the prompt:
the prefill sequence is ``[prefix_embeds, embed(prompt)]`` with the mask ``[1] * N + prompt_mask``,
so positions continue after the prefix (``vlmjax.models.vlm``). N = 0 is exactly the plain path.
Any module with the decoder protocol works: ``embed``, ``backbone(..., decode=True)``, ``unembed``
and ``__call__(tokens, positions=, decode=)`` (``Decoder``, routed decoders, ``TRMDecoder``,
``VisionLanguageModel``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlmjax.models.decoder import Decoder, init_cache

Array = jax.Array


def top_p_filter(logits: Array, top_p: float | Array) -> Array:
    """Keeps the nucleus (Holtzman et al. 2020): the smallest set of most-likely tokens whose
    probability mass is >= ``top_p``; the top token is always kept. Others get ``-inf``.

    Args:
        logits: [B, V] (already divided by the temperature).
        top_p: scalar in (0, 1]; values >= 1 keep every token.

    Returns:
        [B, V] logits with the tokens outside the nucleus set to -inf.
    """
    order = jnp.argsort(-logits, axis=-1)  # [B, V] token ids by decreasing logit
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    # Token r is in the nucleus iff the mass strictly before it is < p: then the kept prefix is the
    # shortest one whose mass reaches p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p) | (jnp.arange(logits.shape[-1]) == 0) | (top_p >= 1.0)
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample_logits(
    logits: Array, rng: Array, temperature: float | Array = 0.0, top_p: float | Array = 1.0
) -> Array:
    """Picks the next token per row.

    Args:
        logits: [B, V] float.
        rng: PRNG key.
        temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
        top_p: nucleus mass for sampling (ignored when greedy).

    Returns:
        [B] int32 token ids.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def sample(logits):
        scaled = logits / temperature
        # The vocabulary sort of top_p_filter only runs when a nucleus is asked for.
        scaled = jax.lax.cond(top_p < 1.0, top_p_filter, lambda x, _: x, scaled, top_p)
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate(model, variables, prompt, prompt_mask, rng, temperature, top_p, eos_id, prefix_embeds,
              images, *, max_new_tokens):
    # eos_id is traced (-1 = none) so changing it does not recompile.
    b, p = prompt.shape
    fill = jnp.maximum(eos_id, 0)
    tokens = jnp.concatenate(
        [prompt.astype(jnp.int32), jnp.full((b, max_new_tokens), fill, jnp.int32)], axis=1
    )
    if images is not None:  # the model's own visual prefix, computed inside this program
        prefix_embeds = model.apply(variables, images, method="visual_prefix")
    n = 0 if prefix_embeds is None else prefix_embeds.shape[1]
    total = n + p + max_new_tokens
    mask = prompt_mask
    if n:
        mask = jnp.concatenate([jnp.ones((b, n), prompt_mask.dtype), prompt_mask], axis=1)
    # Left padding: real tokens get positions 0, 1, ...; padding keys are masked via the cache. A
    # prefix takes positions 0..N-1 and the prompt continues from N.
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    next_position = positions[:, -1] + 1  # [B]

    def prefill(module: Decoder):
        x = module.embed(prompt)
        if n:
            x = jnp.concatenate([prefix_embeds.astype(x.dtype), x], axis=1)
        # Unembed the last position only: [B, 1, V] instead of [B, N + P, V] logits.
        hidden, _ = module.backbone(x, positions=positions, attention_mask=mask, decode=True)
        return module.unembed(hidden[:, -1:])

    cache = init_cache(model, b, total)
    logits, state = model.apply({**variables, "cache": cache}, method=prefill, mutable=["cache"])
    last_logits = logits[:, -1]

    def pick(step, last_logits, done):
        token = sample_logits(last_logits, jax.random.fold_in(rng, step), temperature, top_p)
        token = jnp.where(done, eos_id, token)
        return token, done | (token == eos_id)

    done = jnp.zeros((b,), jnp.bool_)
    token, done = pick(0, last_logits, done)
    tokens = tokens.at[:, p].set(token)

    def cond(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, token, cache, done = carry
        (logits, _), state = model.apply(
            {**variables, "cache": cache},
            token[:, None],
            positions=(next_position + step - 1)[:, None],
            decode=True,
            mutable=["cache"],
        )
        token, done = pick(step, logits[:, -1], done)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, p + step))
        return step + 1, tokens, token, state["cache"], done

    carry = (jnp.asarray(1, jnp.int32), tokens, token, state["cache"], done)
    _, tokens, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens


def generate(
    model: Decoder,
    params,
    prompt: Array,
    *,
    max_new_tokens: int,
    rng: Array,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    prompt_mask: Array | None = None,
    model_state: dict | None = None,
    prefix_embeds: Array | None = None,
    images: Array | None = None,
) -> Array:
    """Generates ``max_new_tokens`` tokens after ``prompt`` (jitted; recompiles per shape/model).

    Args:
        model: the ``Decoder`` (static: hashed into the jit cache).
        params: its "params" collection.
        prompt: [B, P] int token ids; with different lengths, LEFT-pad and pass ``prompt_mask``.
        max_new_tokens: number of tokens to generate (>= 1).
        rng: PRNG key (step s uses ``fold_in(rng, s)``).
        temperature: 0 = greedy; > 0 = sample from softmax(logits / temperature).
        top_p: nucleus sampling mass in (0, 1]; 1 = plain sampling.
        eos_id: once a row emits it, the rest of the row is ``eos_id``; the loop stops when all rows
            have. None: always generate ``max_new_tokens``.
        prompt_mask: [B, P], 1 = real token, 0 = left padding. Default: all real.
        model_state: other read-only variable collections, e.g. ``{"router_state": ...}`` of a
            routed decoder or ``{"quant": ...}`` of a 4-bit base (``TrainState.model_state``).
        prefix_embeds: [B, N, D] embeddings prefilled before the prompt (a visual prefix), N >= 0.
        images: [B, S, S, 3] instead of ``prefix_embeds``: the model's ``visual_prefix(images)``
            (``VisionLanguageModel``) is computed in the same jitted program.

    Returns:
        [B, P + max_new_tokens] int32: the prompt followed by the generated tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if eos_id is not None and eos_id < 0:
        raise ValueError(f"eos_id must be a token id >= 0 or None, got {eos_id}.")
    if prefix_embeds is not None and images is not None:
        raise ValueError("Pass prefix_embeds [B, N, D] or images [B, S, S, 3], not both.")
    prompt = jnp.asarray(prompt, jnp.int32)
    for name, x in (("prefix_embeds", prefix_embeds), ("images", images)):
        if x is not None and x.shape[0] != prompt.shape[0]:
            raise ValueError(f"{name} has {x.shape[0]} rows but the prompt has {prompt.shape[0]}.")
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompt.shape, jnp.int32)
    return _generate(
        model,
        {"params": params, **(model_state or {})},
        prompt,
        jnp.asarray(prompt_mask, jnp.int32),
        rng,
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_p, jnp.float32),
        jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
        prefix_embeds,
        images,
        max_new_tokens=max_new_tokens,
    )
