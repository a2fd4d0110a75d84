"""Unit and parity tests of the dense decoder (vlmjax/models): tiny configs, CPU, float32."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlmjax.models import decoder as decoder_lib
from vlmjax.models import generate as generate_lib
from vlmjax.models import layers
from vlmjax.sharding import DEFAULT_RULES

PARAM_AXES = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm"}
ACT_AXES = {
    "act_batch",
    "act_len",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_head_dim",
    "act_mlp",
    "act_vocab",
}
# The rules the trainer uses, so this test checks the names the real mesh mapping knows.
RULES = DEFAULT_RULES


def tiny_config(**overrides) -> decoder_lib.DecoderConfig:
    fields = dict(
        vocab_size=97,  # odd, so a transposed [V, D] / [D, V] cannot pass by accident
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=0,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    fields.update(overrides)
    return decoder_lib.DecoderConfig.from_config(fields)


@functools.cache
def forward(model: decoder_lib.Decoder):
    """Jitted ``model.apply`` (eager Linen compiles every op separately: far slower on CPU)."""

    def fn(params, tokens=None, positions=None, attention_mask=None, inputs_embeds=None):
        return model.apply(
            {"params": params},
            tokens,
            positions=positions,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
        )

    return jax.jit(fn)


def random_params(module: nn.Module, *init_args, seed: int = 0, std: float = 0.1):
    """Random unboxed fp32 params with the tree of ``module.init(key, *init_args)``.

    Shapes come from ``jax.eval_shape`` (tracing only: compiling init costs seconds on CPU).
    Matrices ~ N(0, std^2) (larger than the 0.02 init, so logits are far from uniform), biases
    ~ N(0, std^2), norm scales ~ 1 + N(0, 0.1^2).
    """
    if not init_args:
        init_args = (jnp.zeros((1, 4), jnp.int32),)
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *init_args))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1.0 + 0.1 * noise)
        return jnp.asarray(std * noise)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def random_tokens(seed: int, shape, vocab: int = 97) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


# ----------------------------------------------------------------------------- shapes / masking


def test_output_shapes_and_embeds_path():
    cfg = tiny_config(tie_word_embeddings=False)
    model = decoder_lib.Decoder(cfg)
    params = random_params(model)
    tokens = random_tokens(0, (2, 7))
    logits, aux = forward(model)(params, tokens)
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == jnp.float32
    assert aux == {}
    embeds = model.apply({"params": params}, tokens, method=decoder_lib.Decoder.embed)
    assert embeds.shape == (2, 7, cfg.hidden_size)
    logits_e, _ = forward(model)(params, inputs_embeds=embeds)
    np.testing.assert_allclose(logits_e, logits, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model.apply({"params": params}, tokens, inputs_embeds=embeds)


def test_causal_future_tokens_do_not_change_past_logits():
    model = decoder_lib.Decoder(tiny_config())
    params = random_params(model)
    a = random_tokens(1, (2, 8))
    b = a.at[:, 5:].set(random_tokens(2, (2, 3)))
    la, _ = forward(model)(params, a)
    lb, _ = forward(model)(params, b)
    np.testing.assert_allclose(la[:, :5], lb[:, :5], atol=1e-6)
    assert not np.allclose(la[:, 5:], lb[:, 5:], atol=1e-3)


def test_padding_keys_are_ignored():
    """Left padding with explicit positions gives the unpadded logits on the real tokens."""
    model = decoder_lib.Decoder(tiny_config())
    params = random_params(model)
    real = random_tokens(3, (1, 5))
    padded = jnp.concatenate([random_tokens(4, (1, 3)), real], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    ref, _ = forward(model)(params, real)
    out, _ = forward(model)(params, padded, positions, mask)
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)


def test_block_on_gathered_subset_keeps_original_positions():
    """MoD contract: a block on gathered tokens [B, k, D] with their original positions equals the
    block on the full sequence where only those tokens are visible as keys."""
    cfg = tiny_config()
    block = layers.DecoderBlock(dataclasses.replace(cfg, rms_norm_eps=1e-6))
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    params = {"params": random_params(block, x, positions)}
    chosen = jnp.array([[0, 2, 3, 7], [1, 4, 5, 8]])  # sorted, as routing does
    take = lambda a: jnp.take_along_axis(a, chosen if a.ndim == 2 else chosen[..., None], axis=1)
    apply = jax.jit(block.apply)
    sub, aux = apply(params, take(x), take(positions))
    assert aux == {}
    visible = jnp.zeros((2, 9), jnp.int32).at[jnp.arange(2)[:, None], chosen].set(1)
    full, _ = apply(params, x, positions, visible)
    np.testing.assert_allclose(sub, take(full), atol=1e-5)


# ----------------------------------------------------------------------------- RoPE


def _rope_reference(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Explicit 2x2 rotations of the feature pairs (i, i + Dh/2), angle pos * theta^(-2i/Dh)."""
    dh = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for i in range(dh // 2):
        angle = positions[..., None].astype(np.float64) * theta ** (-2.0 * i / dh)  # [B, T, 1]
        a, b = x[..., i].astype(np.float64), x[..., i + dh // 2].astype(np.float64)
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + dh // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def test_rope_matches_reference_and_hf():
    import torch
    from transformers.models.llama import modeling_llama

    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, 16)))
    positions = np.array([[0, 1, 2, 3, 4], [7, 3, 100, 11, 50]])
    out = np.asarray(layers.apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0))
    np.testing.assert_allclose(out, _rope_reference(x, positions, 10000.0), atol=1e-5)
    np.testing.assert_allclose(out[0, 0], x[0, 0], atol=1e-7)  # position 0 is the identity

    # HF: cos/sin [B, T, Dh] from inv_freq; apply_rotary_pos_emb on [B, H, T, Dh].
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    freqs = torch.tensor(positions, dtype=torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    xt = torch.tensor(x).transpose(1, 2)
    hf, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, emb.cos(), emb.sin())
    np.testing.assert_allclose(out, hf.transpose(1, 2).numpy(), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 32))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 32))

    def score(m, n):
        qm = layers.apply_rope(q, jnp.array([[m]]), 10000.0)
        kn = layers.apply_rope(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(qm * kn))

    for m, n in [(5, 2), (9, 9), (3, 12)]:
        base = score(m, n)
        for shift in (1, 17, 250):
            assert score(m + shift, n + shift) == pytest.approx(base, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


# ----------------------------------------------------------------------------- attention


def test_gqa_equals_mha_with_repeated_kv_heads():
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    gqa = layers.Attention(num_heads=4, num_kv_heads=2, head_dim=8, use_bias=True)
    mha = layers.Attention(num_heads=4, num_kv_heads=4, head_dim=8, use_bias=True)
    p_gqa = random_params(gqa, x, positions)
    # Query head h reads kv head h // 2 (HF repeat_kv): repeat each kv head twice on the head axis.
    rep = lambda a, axis: jnp.repeat(a, 2, axis=axis)
    p_mha = {
        "q_proj": p_gqa["q_proj"],
        "o_proj": p_gqa["o_proj"],
        **{
            name: {"kernel": rep(p_gqa[name]["kernel"], 1), "bias": rep(p_gqa[name]["bias"], 0)}
            for name in ("k_proj", "v_proj")
        },
    }
    out_gqa = jax.jit(gqa.apply)({"params": p_gqa}, x, positions)
    out_mha = jax.jit(mha.apply)({"params": p_mha}, x, positions)
    np.testing.assert_allclose(out_gqa, out_mha, atol=1e-5)


def test_remat_with_qkv_bias_and_qk_norm_matches_plain_with_grads():
    """The Qwen2 (qkv bias) and Qwen3 (q/k norm) variants train, and nn.remat changes no number."""
    cfg = tiny_config(attention_bias=True, qk_norm=True, head_dim=16, num_hidden_layers=1)
    plain, remat = decoder_lib.Decoder(cfg), decoder_lib.Decoder(dataclasses.replace(cfg, remat=True))
    params = random_params(plain)
    assert params["layers_0"]["self_attn"]["q_proj"]["bias"].shape == (4, 16)
    assert params["layers_0"]["self_attn"]["k_norm"]["scale"].shape == (16,)
    tokens = random_tokens(5, (2, 6))

    def loss_and_grads(model):
        def loss(p):
            logits, _ = model.apply({"params": p}, tokens)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_p, grads_p), (loss_r, grads_r) = loss_and_grads(plain), loss_and_grads(remat)
    assert np.isfinite(loss_p) and loss_p == pytest.approx(float(loss_r), abs=1e-6)
    for gp, gr in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_r)):
        assert np.isfinite(gp).all()
        np.testing.assert_allclose(gp, gr, atol=1e-6)


# ----------------------------------------------------------------------------- KV cache / generate


def test_kv_cache_decode_matches_full_forward():
    model = decoder_lib.Decoder(tiny_config(tie_word_embeddings=False))
    params = random_params(model)
    tokens = random_tokens(6, (2, 10))
    full, _ = forward(model)(params, tokens)

    cache = decoder_lib.init_cache(model, batch_size=2, max_len=12)
    step = jax.jit(
        lambda cache, t: model.apply(
            {"params": params, "cache": cache}, t, decode=True, mutable=["cache"]
        )
    )
    # Prefill 4, a second chunk of 2, then token by token: positions come from the cache index.
    outs = []
    for start, stop in [(0, 4), (4, 6)] + [(i, i + 1) for i in range(6, 10)]:
        (logits, _), state = step(cache, tokens[:, start:stop])
        cache = state["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-4)
    assert int(cache["layers_0"]["self_attn"]["cache_index"]) == 10
    assert int(cache["decode_position"]["index"]) == 10


def _argmax_rollout(model, params, prompt, steps):
    """Greedy decoding with a full forward per step, no cache. The sequence lives in a fixed-size
    buffer (one compilation); causality makes the junk after the current token irrelevant."""
    p = prompt.shape[1]
    seq = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], steps), prompt.dtype)], 1)
    for i in range(steps):
        logits, _ = forward(model)(params, seq)
        seq = seq.at[:, p + i].set(jnp.argmax(logits[:, p + i - 1], -1).astype(seq.dtype))
    return seq


def test_greedy_generate_equals_argmax_rollout():
    model = decoder_lib.Decoder(tiny_config())
    params = random_params(model)
    prompt = random_tokens(7, (2, 5))
    out = generate_lib.generate(model, params, prompt, max_new_tokens=6, rng=jax.random.key(0))
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, _argmax_rollout(model, params, prompt, 6))
    # Nucleus with p -> 0 keeps only the top token: sampling degenerates to greedy.
    sampled = generate_lib.generate(
        model, params, prompt, max_new_tokens=6, rng=jax.random.key(3), temperature=1.0, top_p=1e-6
    )
    np.testing.assert_array_equal(sampled, out)


def test_generate_left_padded_prompt_and_eos():
    model = decoder_lib.Decoder(tiny_config())
    params = random_params(model)
    long, short = random_tokens(8, (1, 5)), random_tokens(9, (1, 3))
    batch = jnp.concatenate([long, jnp.concatenate([jnp.zeros((1, 2), jnp.int32), short], 1)], 0)
    mask = jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    gen = lambda p, m=None, eos=None: generate_lib.generate(
        model, params, p, max_new_tokens=6, rng=jax.random.key(0), prompt_mask=m, eos_id=eos
    )
    out = gen(batch, mask)
    # Same shapes as in the greedy test above: both programs come from the jit cache.
    np.testing.assert_array_equal(out[0], _argmax_rollout(model, params, batch.at[1].set(long[0]), 6)[0])
    np.testing.assert_array_equal(out[1, 5:], gen(short)[0, 3:])

    # With eos = the second generated token of row 0: row 0 is eos from there on; row 1 is
    # unchanged up to its own first eos.
    eos = int(out[0, 6])
    out_eos = gen(batch, mask, eos)
    np.testing.assert_array_equal(out_eos[0, :7], out[0, :7])
    assert (out_eos[0, 7:] == eos).all()
    row1 = np.asarray(out[1, 5:])
    stop = 5 + (int(np.argmax(row1 == eos)) + 1 if (row1 == eos).any() else row1.size)
    np.testing.assert_array_equal(out_eos[1, :stop], out[1, :stop])
    assert (out_eos[1, stop:] == eos).all()


def _nucleus_reference(logits: np.ndarray, p: float) -> set[int]:
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    kept, mass = [], 0.0
    for token in order:
        kept.append(int(token))
        mass += probs[token]
        if mass >= p:
            break
    return set(kept)


def test_top_p_keeps_smallest_nucleus_and_samples_inside_it():
    logits = 3.0 * jax.random.normal(jax.random.key(0), (3, 16))
    for p in (0.3, 0.7, 0.95):
        kept = np.isfinite(np.asarray(generate_lib.top_p_filter(logits, p)))
        for row in range(3):
            assert set(np.flatnonzero(kept[row])) == _nucleus_reference(np.asarray(logits[row]), p)
    keys = jax.random.split(jax.random.key(1), 400)
    samples = jax.vmap(lambda k: generate_lib.sample_logits(logits, k, 1.0, 0.7))(keys)  # [400, 3]
    for row in range(3):
        nucleus = _nucleus_reference(np.asarray(logits[row]), 0.7)
        drawn = set(np.asarray(samples[:, row]).tolist())
        assert drawn <= nucleus and len(drawn) > 1
    # top_p = 1 samples from the whole distribution, outside the 0.7 nucleus too.
    unfiltered = jax.vmap(lambda k: generate_lib.sample_logits(logits, k, 1.0, 1.0))(keys)
    nucleus = _nucleus_reference(np.asarray(logits[0]), 0.7)
    assert not set(np.asarray(unfiltered[:, 0]).tolist()) <= nucleus
    # The top token is always kept, even for a tiny p; p = 1 keeps everything.
    top = np.asarray(jnp.isfinite(generate_lib.top_p_filter(logits, 1e-9)))
    np.testing.assert_array_equal(np.flatnonzero(top[0]), [int(jnp.argmax(logits[0]))])
    assert jnp.isfinite(generate_lib.top_p_filter(logits, 1.0)).all()


# ----------------------------------------------------------------------------- sharding metadata


def test_every_param_has_logical_axes():
    cfg = tiny_config(attention_bias=True, qk_norm=True, tie_word_embeddings=False)
    model = decoder_lib.Decoder(cfg)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"], is_leaf=is_box)
    # embed, final norm, lm_head; per layer: q/k/v kernel+bias, o, q/k norm, 3 mlp, 2 norms.
    assert len(leaves) == 3 + cfg.num_hidden_layers * 14
    for path, leaf in leaves:
        assert is_box(leaf), f"{jax.tree_util.keystr(path)} has no logical partitioning"
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
        assert set(leaf.names) <= PARAM_AXES, (jax.tree_util.keystr(path), leaf.names)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["layers_0"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", "q_heads", "head_dim"
    )
    assert specs["lm_head"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")


def test_activation_axes_and_sharded_apply(monkeypatch):
    cfg = tiny_config(tie_word_embeddings=False)
    model = decoder_lib.Decoder(cfg)
    params = random_params(model)
    tokens = random_tokens(0, (2, 6))
    seen = set()
    original = nn.with_logical_constraint

    def record(x, axes, *args, **kwargs):
        seen.update(a for a in axes if a is not None)
        return original(x, axes, *args, **kwargs)

    monkeypatch.setattr(nn, "with_logical_constraint", record)
    expected, _ = forward(model)(params, tokens)
    assert seen == ACT_AXES

    # Under a (1-device) mesh and the trainer's rules, params placed by their logical specs (abstract
    # init -> shardings from logical axes -> placed params, DESIGN example 3).
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=auto)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    sharded = jax.device_put(params, shardings["params"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        # Init traced under the mesh too: every initializer sees its full kernel shape (a flattened
        # 2-D init with 3 logical names, as flax's own DenseGeneral does, fails here).
        variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
        logits, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, tokens)
    assert jax.tree.structure(nn.unbox(variables)["params"]) == jax.tree.structure(params)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


# ----------------------------------------------------------------------------- dtypes / config


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg32 = tiny_config(tie_word_embeddings=False)
    cfg16 = dataclasses.replace(cfg32, dtype=jnp.bfloat16)
    model16 = decoder_lib.Decoder(cfg16)
    variables = jax.eval_shape(model16.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
    params = random_params(model16)
    tokens = random_tokens(0, (2, 6))
    logits16, _ = forward(model16)(params, tokens)
    logits32, _ = forward(decoder_lib.Decoder(cfg32))(params, tokens)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))
    cache = decoder_lib.init_cache(model16, 2, 8)
    assert cache["layers_0"]["self_attn"]["cached_key"].dtype == jnp.bfloat16


def test_from_config_and_validation_errors_name_the_field():
    cd = decoder_lib.default_config()
    assert decoder_lib.DecoderConfig.from_config(cd, vocab_size=500).vocab_size == 500
    cfg = decoder_lib.DecoderConfig.from_config(cd, vocab_size=500)
    assert cfg.head_dim == cd.hidden_size // cd.num_attention_heads
    assert cfg.dtype == jnp.float32
    with pytest.raises(ValueError, match="vocab_size"):
        decoder_lib.DecoderConfig.from_config(cd)
    with pytest.raises(ValueError, match="vocab_size"):
        decoder_lib.DecoderConfig.from_config(dict(vocab_size=100), vocab_size=200)
    with pytest.raises(ValueError, match="did you mean 'hidden_size'"):
        decoder_lib.DecoderConfig.from_config(dict(vocab_size=10, hiden_size=32))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config(hidden_size=30, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config(head_dim=7)
    with pytest.raises(ValueError, match="dtype"):
        tiny_config(dtype="float8")
    with pytest.raises(ValueError, match="intermediate_size"):
        tiny_config(intermediate_size=0)
    cd_locked = ml_collections.ConfigDict(cd.to_dict())
    cd_locked.vocab_size = 64
    assert decoder_lib.DecoderConfig.from_config(cd_locked).vocab_size == 64


# ----------------------------------------------------------------------------- HF parity


def _randomize_hf(model, seed: int):
    """Larger-than-init random weights (and non-unit norms) so parity is not trivially ~0 == ~0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)


def _params_from_hf(state_dict, cfg: decoder_lib.DecoderConfig):
    """The HF -> vlmjax mapping documented in layers.py (the real converter lives in vlmjax/convert)."""
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    d, h, kv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    params = {
        "embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
        "norm": {"scale": sd["model.norm.weight"]},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        attn = {}
        for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            attn[name] = {"kernel": sd[pre + f"self_attn.{name}.weight"].T.reshape(d, heads, dh)}
            if cfg.attention_bias:
                attn[name]["bias"] = sd[pre + f"self_attn.{name}.bias"].reshape(heads, dh)
        attn["o_proj"] = {"kernel": sd[pre + "self_attn.o_proj.weight"].T.reshape(h, dh, d)}
        if cfg.qk_norm:
            attn["q_norm"] = {"scale": sd[pre + "self_attn.q_norm.weight"]}
            attn["k_norm"] = {"scale": sd[pre + "self_attn.k_norm.weight"]}
        params[f"layers_{i}"] = {
            "self_attn": attn,
            "mlp": {
                n: {"kernel": sd[pre + f"mlp.{n}.weight"].T}
                for n in ("gate_proj", "up_proj", "down_proj")
            },
            "input_layernorm": {"scale": sd[pre + "input_layernorm.weight"]},
            "post_attention_layernorm": {"scale": sd[pre + "post_attention_layernorm.weight"]},
        }
    return jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", dict(tie_word_embeddings=True)),
        ("llama", dict(tie_word_embeddings=False)),
        ("qwen2", dict(attention_bias=True, tie_word_embeddings=False)),
        ("qwen3", dict(qk_norm=True, head_dim=16, tie_word_embeddings=True)),
    ],
    ids=["llama_tied", "llama_untied", "qwen2", "qwen3"],
)
def test_parity_with_hf_transformers(family, overrides):
    import torch
    import transformers

    cfg = tiny_config(**overrides)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    if family == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=cfg.head_dim, **common))
    hf.eval()
    _randomize_hf(hf, seed=0)

    model = decoder_lib.Decoder(cfg)
    params = _params_from_hf(hf.state_dict(), cfg)
    assert jax.tree.structure(params) == jax.tree.structure(random_params(model))

    tokens = np.asarray(random_tokens(0, (2, 9)))
    # Row 1 is left-padded by 2: HF masks padding keys, positions passed explicitly to both.
    mask = np.ones((2, 9), np.int64)
    mask[1, :2] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    logits, _ = forward(model)(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits
    np.testing.assert_allclose(logits[0], ref[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits[1, 2:], ref[1, 2:], atol=1e-4, rtol=1e-4)
