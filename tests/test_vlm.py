"""The vision-language model: the seed's prefix interface, prefix positions, the text-only loss slice,
and generation with the visual prefix prefilled into the KV cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.models import generate as gen_lib
from vlmjax.models import vlm as vlm_lib
from vlmjax.models.decoder import Decoder, DecoderConfig
from vlmjax.models.vit import ViTConfig

IGNORE = vlm_lib.IGNORE

DEC = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    max_position_embeddings=128, attention_impl="xla")
VIT = ViTConfig(variant="clip", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, patch_size=8, image_size=16, attention_impl="xla")


def test_concat_prefix_against_hand_built_batch():
    b, n, l, d = 2, 3, 4, 5
    prefix = jnp.arange(b * n * d, dtype=jnp.float32).reshape(b, n, d) + 1000
    text = -jnp.arange(b * l * d, dtype=jnp.float32).reshape(b, l, d)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32)  # right padding
    labels = jnp.array([[IGNORE, 7, 8, IGNORE], [IGNORE, 9, IGNORE, IGNORE]], jnp.int32)
    embeds, ext_mask, ext_labels, positions = vlm_lib.concat_prefix(prefix, text, mask, labels)
    np.testing.assert_array_equal(embeds[:, :n], prefix)
    np.testing.assert_array_equal(embeds[:, n:], text)
    np.testing.assert_array_equal(ext_mask, [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(ext_labels, [[IGNORE] * 3 + [IGNORE, 7, 8, IGNORE],
                                               [IGNORE] * 3 + [IGNORE, 9, IGNORE, IGNORE]])
    # Positions continue after the prefix: 0..N-1, then N, N+1, ... for real text tokens.
    np.testing.assert_array_equal(positions[:, :6], [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 4]])


def test_concat_prefix_left_padded_prompt_positions():
    prefix = jnp.zeros((1, 2, 3))
    text = jnp.zeros((1, 4, 3))
    mask = jnp.array([[0, 0, 1, 1]])
    _, ext_mask, labels, positions = vlm_lib.concat_prefix(prefix, text, mask)
    assert labels is None
    np.testing.assert_array_equal(ext_mask, [[1, 1, 0, 0, 1, 1]])
    np.testing.assert_array_equal(positions[0, [0, 1, 4, 5]], [0, 1, 2, 3])


def test_concat_prefix_rejects_width_mismatch():
    with pytest.raises(ValueError, match="hidden size"):
        vlm_lib.concat_prefix(jnp.zeros((1, 2, 4)), jnp.zeros((1, 3, 5)), jnp.ones((1, 3)))


def test_next_token_nll_matches_manual():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 6))
    labels = jnp.array([[IGNORE, 2, IGNORE, 5]])
    nll, count = vlm_lib.next_token_nll(logits, labels)
    logp = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(nll, -(logp[0, 0, 2] + logp[0, 2, 5])[None], rtol=1e-6)
    np.testing.assert_array_equal(count, [2.0])


def _model(connector):
    cfg = vlm_lib.VLMConfig(connector=connector, num_latents=4, perceiver_num_layers=1,
                            perceiver_num_heads=2, pool_probes=3, pool_heads=2, attention_impl="xla")
    return vlm_lib.VisionLanguageModel(VIT, cfg, Decoder(DEC))


@pytest.fixture(scope="module")
def model_and_params():
    model = _model("perceiver")
    image = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    ids = jnp.array([[1, 5, 6, 7, 0], [1, 8, 9, 0, 0]], jnp.int32)
    mask = (jnp.arange(5)[None] < jnp.array([[4], [3]])).astype(jnp.int32)
    variables = jax.jit(lambda: model.init(jax.random.key(0), image, ids, mask, method="forward"))()
    return model, variables["params"], image, ids, mask


@pytest.mark.parametrize("connector,n,tree", [("perceiver", 4, "vision_resampler"), ("mlp", 5, None),
                                              ("attention_pool", 3, "vision_pool")])
def test_prefix_lengths_and_param_tree(connector, n, tree):
    model = _model(connector)
    image = jnp.zeros((2, 16, 16, 3))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), image, method="visual_prefix"))["params"]
    prefix = jax.eval_shape(lambda p: model.apply({"params": p}, image, method="visual_prefix"), params)
    assert prefix.shape == (2, n, DEC.hidden_size)  # mlp: one prefix token per patch (4) + CLS
    want = {"vision_tower", "vision_token_norm", "vision_proj"} | ({tree} if tree else set())
    assert set(params) == want  # the decoder is not touched by visual_prefix


def test_forward_text_logits_equal_full_sequence_loss(model_and_params):
    model, params, image, ids, mask = model_and_params
    labels = jnp.where(mask > 0, ids, IGNORE).at[:, :2].set(IGNORE)
    out = model.apply({"params": params}, image, ids, mask, labels, full_logits=True, method="forward")
    n = out["prefix_len"]
    assert out["labels"].shape == (2, n + 5) and bool(jnp.all(out["labels"][:, :n] == IGNORE))
    np.testing.assert_allclose(out["logits"], out["all_logits"][:, n:], rtol=1e-6, atol=1e-6)
    full_nll, full_count = vlm_lib.next_token_nll(out["all_logits"], out["labels"])
    text_nll, text_count = vlm_lib.next_token_nll(out["logits"], labels)
    np.testing.assert_allclose(full_nll, text_nll, rtol=1e-5)
    np.testing.assert_array_equal(full_count, text_count)
    # The image matters: another image changes the text logits.
    other = model.apply({"params": params}, image[::-1], ids, mask, labels, method="forward")
    assert float(jnp.max(jnp.abs(other["logits"] - out["logits"]))) > 1e-4


def test_text_only_forward_is_the_plain_decoder(model_and_params):
    model, params, _, ids, mask = model_and_params
    out = model.apply({"params": params}, None, ids, mask, method="forward")
    logits, _ = Decoder(DEC).apply({"params": params["decoder"]}, ids, attention_mask=mask)
    real = np.asarray(mask, bool)  # padding positions get other (unused) position ids
    np.testing.assert_allclose(np.asarray(out["logits"])[real], np.asarray(logits)[real], rtol=1e-5, atol=1e-5)


def test_empty_prefix_generation_equals_decoder_generation(model_and_params):
    _, params, _, ids, _ = model_and_params
    dec = Decoder(DEC)
    prompt = ids[:, :3]
    kw = dict(max_new_tokens=6, rng=jax.random.key(3), temperature=0.0)
    plain = gen_lib.generate(dec, params["decoder"], prompt, **kw)
    empty = gen_lib.generate(dec, params["decoder"], prompt, prefix_embeds=jnp.zeros((2, 0, DEC.hidden_size)), **kw)
    np.testing.assert_array_equal(plain, empty)
    # Sampling too (same rng stream), with top-p.
    kw = dict(max_new_tokens=5, rng=jax.random.key(4), temperature=0.9, top_p=0.8)
    np.testing.assert_array_equal(
        gen_lib.generate(dec, params["decoder"], prompt, **kw),
        gen_lib.generate(dec, params["decoder"], prompt, prefix_embeds=jnp.zeros((2, 0, DEC.hidden_size)), **kw))


def test_image_generation_prefills_the_prefix(model_and_params):
    """generate(vlm, images=...) == the greedy argmax rollout of the full forward, and == generate on
    the decoder with the prefix embeddings passed in; batched with a left-padded prompt and EOS."""
    model, params, image, _, _ = model_and_params
    prompt = jnp.array([[0, 0, 1, 5], [1, 8, 9, 4]], jnp.int32)
    pmask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]], jnp.int32)
    steps = 5
    got = gen_lib.generate(model, params, prompt, prompt_mask=pmask, images=image, max_new_tokens=steps,
                           rng=jax.random.key(0))
    prefix = model.apply({"params": params}, image, method="visual_prefix")
    via_embeds = gen_lib.generate(Decoder(DEC), params["decoder"], prompt, prompt_mask=pmask,
                                  prefix_embeds=prefix, max_new_tokens=steps, rng=jax.random.key(0))
    np.testing.assert_array_equal(got, via_embeds)
    # Reference: recompute the whole sequence each step (no cache).
    seq, mask = prompt, pmask
    forward = jax.jit(lambda s, m: model.apply({"params": params}, image, s, m, method="forward"))
    for _ in range(steps):
        out = forward(seq, mask)
        nxt = jnp.argmax(out["logits"][:, -1], axis=-1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
        mask = jnp.concatenate([mask, jnp.ones((2, 1), jnp.int32)], axis=1)
    np.testing.assert_array_equal(got, seq)
    # EOS: once emitted, the row is EOS to the end.
    eos = int(got[0, 4])
    stopped = gen_lib.generate(model, params, prompt, prompt_mask=pmask, images=image, max_new_tokens=steps,
                               rng=jax.random.key(0), eos_id=eos)
    assert bool(jnp.all(stopped[0, 4:] == eos))


def test_vlm_config_validation():
    with pytest.raises(ValueError, match="connector"):
        vlm_lib.VLMConfig(connector="qformer").validate()
    with pytest.raises(ValueError, match="num_latents"):
        dataclasses.replace(vlm_lib.VLMConfig(), num_latents=0).validate()
