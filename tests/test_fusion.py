"""Flamingo-style gated cross-attention fusion (vlmjax/models/fusion.py): identity at gate 0 (bit for
bit against the plain decoder, in forward and in greedy generation), interleaving, masks, the
classification and generative heads, gradients through the gates, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from vlmjax.models import fusion as fusion_lib
from vlmjax.models import generate as gen_lib
from vlmjax.models import layers
from vlmjax.models.decoder import Decoder, DecoderConfig
from vlmjax.models.vit import ViTConfig

DEC = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    max_position_embeddings=128)
FUSION = fusion_lib.FusionConfig(num_fusion_layers=2, xattn_num_heads=4, xattn_ffn_mult=2, head="generate")
VIT = ViTConfig(variant="dinov2", hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, patch_size=8, image_size=16, hidden_act="gelu")
B, T, NV = 2, 6, 4


def set_gates(params, attn, ffn=None):
    """Copy of ``params`` with every block's alpha_attn / alpha_ffn set (ffn default: attn)."""
    ffn = attn if ffn is None else ffn
    out = dict(params)
    for name in params:
        if name.startswith("xattn_"):
            out[name] = {**params[name], "alpha_attn": jnp.float32(attn), "alpha_ffn": jnp.float32(ffn)}
    return out


def decoder_part(params):
    """The plain decoder's subtree of a FusionDecoder's params."""
    return {k: v for k, v in params.items() if not k.startswith("xattn_") and k != "vision_gate_logit"}


@pytest.fixture(scope="module")
def dec():
    """FusionDecoder whose decoder weights come from a separately initialised Decoder (a pretrained LM
    loaded into it), batches with right-padded text and a padded visual token."""
    fd = fusion_lib.FusionDecoder(DEC, FUSION)
    ids = jnp.array([[1, 5, 6, 7, 8, 9], [1, 8, 9, 4, 0, 0]], jnp.int32)
    mask = jnp.array([[1] * 6, [1, 1, 1, 1, 0, 0]], jnp.int32)
    visual = jax.random.normal(jax.random.key(2), (B, NV, DEC.hidden_size))
    vmask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]], jnp.bool_)
    fparams = nn.meta.unbox(jax.jit(lambda: fd.init(jax.random.key(0), ids, visual=visual))())["params"]
    pretrained = nn.meta.unbox(jax.jit(lambda: Decoder(DEC).init(jax.random.key(1), ids))())["params"]
    params = {**fparams, **pretrained}
    apply = jax.jit(lambda p, ids, mask, v, vm: fd.apply({"params": p}, ids, attention_mask=mask, visual=v,
                                                          visual_mask=vm))
    plain = jax.jit(lambda p, ids, mask: Decoder(DEC).apply({"params": p}, ids, attention_mask=mask)[0])
    return dict(fd=fd, params=params, pretrained=pretrained, fparams=fparams, ids=ids, mask=mask,
                visual=visual, vmask=vmask, apply=apply, plain=plain)


def test_param_tree_keeps_decoder_names_and_adds_blocks(dec):
    params, pretrained = dec["fparams"], dec["pretrained"]
    assert set(params) == set(pretrained) | {"xattn_0", "xattn_1", "vision_gate_logit"}
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shapes(decoder_part(params)) == shapes(pretrained)  # an HF decoder loads unchanged
    assert float(params["xattn_0"]["alpha_attn"]) == 0.0 and float(params["xattn_1"]["alpha_ffn"]) == 0.0
    np.testing.assert_allclose(params["vision_gate_logit"], 1.5)
    assert set(params["xattn_0"]) == {"norm", "attn", "ffn", "alpha_attn", "alpha_ffn"}
    # num_fusion_layers=2 over 4 layers: blocks before layers 0 and 2.
    assert dec["fd"].fusion_layers == (0, 2)
    assert fusion_lib.fusion_layer_indices(4, 4) == (0, 1, 2, 3)
    assert fusion_lib.fusion_layer_indices(6, 3) == (0, 2, 4)
    assert fusion_lib.fusion_layer_indices(4, 1) == (0,)


def test_gates_at_zero_are_bit_identical_to_the_plain_decoder(dec):
    logits, aux = dec["apply"](dec["params"], dec["ids"], dec["mask"], dec["visual"], dec["vmask"])
    want = dec["plain"](dec["pretrained"], dec["ids"], dec["mask"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))
    assert float(aux["xattn_0/attn_gate"]) == 0.0 and float(aux["xattn_1/ffn_gate"]) == 0.0
    np.testing.assert_allclose(aux["vision_gate"], jax.nn.sigmoid(1.5), rtol=1e-6)
    # Whatever the image, and with the vision gate moved.
    params = {**dec["params"], "vision_gate_logit": jnp.float32(-3.0)}
    other, _ = dec["apply"](params, dec["ids"], dec["mask"], 10 * dec["visual"][::-1], dec["vmask"])
    np.testing.assert_array_equal(np.asarray(other), np.asarray(want))


def test_open_gates_change_the_output_and_depend_on_the_image(dec):
    params = set_gates(dec["params"], 0.5)
    logits, aux = dec["apply"](params, dec["ids"], dec["mask"], dec["visual"], dec["vmask"])
    plain = dec["plain"](dec["pretrained"], dec["ids"], dec["mask"])
    assert float(jnp.max(jnp.abs(logits - plain))) > 1e-3
    np.testing.assert_allclose(aux["xattn_1/attn_gate"], np.tanh(0.5), rtol=1e-6)
    other, _ = dec["apply"](params, dec["ids"], dec["mask"], dec["visual"][::-1], dec["vmask"])
    assert float(jnp.max(jnp.abs(other[0] - logits[0]))) > 1e-4  # another image, other logits
    # Only the dense branches open: the output no longer depends on the image.
    ffn_only = set_gates(dec["params"], 0.0, 0.5)
    a, _ = dec["apply"](ffn_only, dec["ids"], dec["mask"], dec["visual"], dec["vmask"])
    b, _ = dec["apply"](ffn_only, dec["ids"], dec["mask"], dec["visual"][::-1], dec["vmask"])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_interleaving_matches_a_hand_built_stack(dec):
    """xattn_0 before layers_0, xattn_1 before layers_2, with the vision gate on the visual tokens."""
    params = set_gates(dec["params"], 0.7, -0.4)
    ids, mask, visual, vmask = dec["ids"], dec["mask"], dec["visual"], dec["vmask"]
    got, _ = dec["apply"](params, ids, mask, visual, vmask)
    block = fusion_lib.GatedCrossAttentionBlock(num_heads=4, ffn_mult=2)
    gated = visual * jax.nn.sigmoid(params["vision_gate_logit"])
    positions = jnp.broadcast_to(jnp.arange(T)[None], (B, T))

    def stack(before):
        x = Decoder(DEC).apply({"params": decoder_part(params)}, ids, method="embed")
        for i in range(DEC.num_hidden_layers):
            if i in before:
                x, _ = block.apply({"params": params[f"xattn_{before.index(i)}"]}, x, gated, vmask, mask)
            x, _ = layers.DecoderBlock(DEC).apply({"params": params[f"layers_{i}"]}, x, positions, mask)
        x = layers.RMSNorm(eps=DEC.rms_norm_eps).apply({"params": params["norm"]}, x)
        return Decoder(DEC).apply({"params": decoder_part(params)}, x, method="unembed")

    np.testing.assert_allclose(got, stack([0, 2]), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got - stack([1, 3])))) > 1e-3  # the test tells the placements apart


def test_padded_visual_tokens_and_padded_text_do_not_leak(dec):
    params = set_gates(dec["params"], 0.8)
    ids, mask, visual, vmask = dec["ids"], dec["mask"], dec["visual"], dec["vmask"]
    base, _ = dec["apply"](params, ids, mask, visual, vmask)
    # Row 1's last visual token is padding: any value there changes nothing.
    moved = visual.at[1, 3].set(100.0)
    out, _ = dec["apply"](params, ids, mask, moved, vmask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
    # ...while changing a real visual token does change row 1.
    out, _ = dec["apply"](params, ids, mask, visual.at[1, 2].set(100.0), vmask)
    assert float(jnp.max(jnp.abs(out[1] - base[1]))) > 1e-4
    # Row 1's text positions 4, 5 are padding: other token ids there leave the real positions as they were.
    out, _ = dec["apply"](params, ids.at[1, 4:].set(33), mask, visual, vmask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(base)[real], rtol=1e-6, atol=1e-6)


def test_block_gives_no_update_to_padded_queries_or_rows_without_an_image():
    block = fusion_lib.GatedCrossAttentionBlock(num_heads=4)
    x = jax.random.normal(jax.random.key(3), (B, 5, 32))
    visual = jax.random.normal(jax.random.key(4), (B, NV, 32))
    qmask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    params = block.init(jax.random.key(5), x, visual)["params"]
    run = jax.jit(lambda p, vm: block.apply({"params": p}, x, visual, vm, qmask)[0])
    out = run(params, None)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))  # alphas at 0: the exact identity
    both = {**params, "alpha_attn": jnp.float32(1.0), "alpha_ffn": jnp.float32(1.0)}
    out = run(both, None)
    np.testing.assert_array_equal(np.asarray(out[0, 3:]), np.asarray(x[0, 3:]))  # padded query rows
    assert float(jnp.min(jnp.max(jnp.abs(out[0, :3] - x[0, :3]), axis=-1))) > 1e-3  # real rows move
    # Attention only, row 1 with no real visual token: no update there, row 0 still attends.
    attn_only = {**params, "alpha_attn": jnp.float32(1.0)}
    out = run(attn_only, jnp.array([[1, 1, 0, 0], [0, 0, 0, 0]], jnp.bool_))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(x[1]))
    assert float(jnp.max(jnp.abs(out[0, :3] - x[0, :3]))) > 1e-3


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

PROMPT = jnp.array([[0, 1, 5, 6], [1, 8, 9, 4]], jnp.int32)  # row 0 left-padded
PROMPT_MASK = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], jnp.int32)
NEW = 5


def test_generation_with_closed_gates_equals_the_plain_decoder(dec):
    got = fusion_lib.generate_with_visual(dec["fd"], dec["params"], PROMPT, visual=dec["visual"],
                                          visual_mask=dec["vmask"], prompt_mask=PROMPT_MASK,
                                          max_new_tokens=NEW, rng=jax.random.key(0))
    want = gen_lib.generate(Decoder(DEC), dec["pretrained"], PROMPT, prompt_mask=PROMPT_MASK,
                            max_new_tokens=NEW, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_generation_with_open_gates_reads_the_image_at_every_step(dec):
    fd, params = dec["fd"], set_gates(dec["params"], 2.0)
    params = {**params, "vision_gate_logit": jnp.float32(4.0)}
    visual = 4.0 * dec["visual"]
    run = lambda v: fusion_lib.generate_with_visual(fd, params, PROMPT, visual=v, visual_mask=dec["vmask"],
                                                    prompt_mask=PROMPT_MASK, max_new_tokens=NEW,
                                                    rng=jax.random.key(0))
    tokens = run(visual)
    assert not np.array_equal(np.asarray(tokens), np.asarray(run(visual[::-1])))  # the image decides
    # KV-cache decoding equals teacher forcing of the whole sequence with the same visual tokens.
    seq_mask = jnp.concatenate([PROMPT_MASK, jnp.ones((B, NEW), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(seq_mask, axis=1) - 1, 0)
    logits, _ = fd.apply({"params": params}, tokens, positions=positions, attention_mask=seq_mask,
                         visual=visual, visual_mask=dec["vmask"])
    p = PROMPT.shape[1]
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, p - 1:-1], -1)), np.asarray(tokens[:, p:]))


def test_decode_without_visual_tokens_is_an_error(dec):
    with pytest.raises(ValueError, match="visual_state"):
        gen_lib.generate(dec["fd"], dec["params"], PROMPT, max_new_tokens=2, rng=jax.random.key(0))


# ------------------------------------------------------------------------------------------------
# The VQA model: both heads
# ------------------------------------------------------------------------------------------------

IMAGES = jax.random.normal(jax.random.key(7), (B, 16, 16, 3))
Q_IDS = jnp.array([[1, 5, 6, 7, 8, 9], [1, 8, 9, 4, 0, 0]], jnp.int32)
Q_MASK = (jnp.arange(T)[None] < jnp.array([[6], [4]])).astype(jnp.int32)
DEC2 = dataclasses.replace(DEC, num_hidden_layers=2)


@pytest.fixture(scope="module")
def classifier():
    cfg = fusion_lib.FusionConfig(num_fusion_layers=2, xattn_num_heads=4, xattn_ffn_mult=2, head="classify",
                                  num_answers=7)
    model = fusion_lib.FusionVQAModel(VIT, cfg, DEC2)
    variables = jax.jit(lambda: model.init(jax.random.key(0), IMAGES, Q_IDS, Q_MASK, method="forward"))()
    params = nn.meta.unbox(variables)["params"]
    answers = jnp.array([3, 5], jnp.int32)

    def loss_fn(p):
        out = model.apply({"params": p}, IMAGES, Q_IDS, Q_MASK, method="forward")
        return jnp.mean(fusion_lib.answer_nll(out["answer_logits"], answers)[0]), out

    return model, params, jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_classifier_shapes_tree_and_aux(classifier):
    model, params, loss_and_grad = classifier
    assert set(params) == {"vision_tower", "vision_token_norm", "vision_proj", "decoder", "answer_head"}
    assert {"xattn_0", "xattn_1", "vision_gate_logit", "layers_0", "layers_1"} <= set(params["decoder"])
    (_, out), _ = loss_and_grad(params)
    assert out["answer_logits"].shape == (B, 7) and out["answer_logits"].dtype == jnp.float32
    assert out["pooled"].shape == (B, 32) and out["hidden"].shape == (B, T, 32)
    assert out["image_pooled"].shape == (B, 32) and out["tower_pooled"].shape == (B, 24)
    assert set(out["aux"]) == {"vision_gate", "xattn_0/attn_gate", "xattn_0/ffn_gate", "xattn_1/attn_gate",
                               "xattn_1/ffn_gate"}
    # The pooled question feature is the mean over the real tokens only.
    np.testing.assert_allclose(out["pooled"][1], jnp.mean(out["hidden"][1, :4], axis=0), rtol=1e-5, atol=1e-6)


def test_classifier_gradients_pass_the_gates_and_the_loss_falls(classifier):
    _, params, loss_and_grad = classifier
    (loss0, _), grads = loss_and_grad(params)
    norm = lambda t: float(optax.tree.norm(t))
    g = grads["decoder"]["xattn_0"]
    # Flamingo at init: the gates get gradients, what sits behind a closed gate gets exactly none.
    assert abs(float(g["alpha_attn"])) > 0 and abs(float(g["alpha_ffn"])) > 0
    assert norm(g["attn"]) == 0.0 and norm(grads["vision_tower"]) == 0.0 and norm(grads["vision_proj"]) == 0.0
    assert norm(grads["answer_head"]) > 0 and norm(grads["decoder"]["layers_0"]) > 0
    opt = optax.adam(1e-2)
    state = opt.init(params)
    losses = [float(loss0)]
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        (loss, _), grads = loss_and_grad(params)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1e-3, losses
    # Once the gates are open, the gradient reaches the cross-attention and the vision tower.
    assert norm(grads["decoder"]["xattn_0"]["attn"]) > 0 and norm(grads["vision_tower"]) > 0


def test_question_pooling_and_answer_loss():
    hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]])  # right- and left-padded rows
    np.testing.assert_array_equal(fusion_lib.pool_question(hidden, mask, "last"), hidden[[0, 1], [2, 3]])
    np.testing.assert_allclose(fusion_lib.pool_question(hidden, mask, "mean"),
                               [hidden[0, :3].mean(0), hidden[1, 1:].mean(0)], rtol=1e-6)
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    nll, correct = fusion_lib.answer_nll(logits, jnp.array([0, 2, -1]))
    logp = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(nll, [-logp[0, 0], -logp[1, 2], 0.0], rtol=1e-6)
    np.testing.assert_array_equal(correct, [True, False, False])


@pytest.fixture(scope="module")
def generator():
    cfg = fusion_lib.FusionConfig(num_fusion_layers=1, xattn_num_heads=4, xattn_ffn_mult=2, head="generate")
    model = fusion_lib.FusionVQAModel(VIT, cfg, DEC2)
    variables = jax.jit(lambda: model.init(jax.random.key(0), IMAGES, Q_IDS, Q_MASK, method="forward"))()
    return model, nn.meta.unbox(variables)["params"]


def test_generative_head_forward_and_generation(generator):
    model, params = generator
    out = model.apply({"params": params}, IMAGES, Q_IDS, Q_MASK, method="forward")
    assert out["logits"].shape == (B, T, DEC2.vocab_size) and "answer_logits" not in out
    gen = lambda p, images: fusion_lib.generate_with_visual(model, p, PROMPT, images=images, prompt_mask=PROMPT_MASK,
                                                            max_new_tokens=NEW, rng=jax.random.key(0))
    # Closed gates: token for token the plain decoder's generation.
    plain = decoder_part(params["decoder"])
    want = gen_lib.generate(Decoder(DEC2), plain, PROMPT, prompt_mask=PROMPT_MASK, max_new_tokens=NEW,
                            rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(gen(params, IMAGES)), np.asarray(want))
    # Open gates: the answer depends on the image.
    opened = {**params, "decoder": {**set_gates(params["decoder"], 3.0),
                                    "vision_gate_logit": jnp.float32(4.0)}}
    # A random tied-embedding LM strongly repeats its last token: make the image loud enough to outvote it.
    xattn = opened["decoder"]["xattn_0"]
    opened["decoder"]["xattn_0"] = {**xattn, "attn": {**xattn["attn"], "out_proj": jax.tree.map(
        lambda w: 50.0 * w, xattn["attn"]["out_proj"])}}
    opened["vision_proj"] = jax.tree.map(lambda w: 10.0 * w, params["vision_proj"])
    a = gen(opened, IMAGES)
    b = gen(opened, -IMAGES[::-1])
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    # The prefix path of generate.generate is refused with the way to do it.
    with pytest.raises(ValueError, match="generate_with_visual"):
        gen_lib.generate(model, params, PROMPT, images=IMAGES, max_new_tokens=2, rng=jax.random.key(0))


def test_text_only_forward_has_no_attention_update(generator):
    model, params = generator
    opened = {**params, "decoder": set_gates(params["decoder"], 1.0, 0.0)}  # attention branch only
    text_only = model.apply({"params": opened}, None, Q_IDS, Q_MASK, method="forward")["logits"]
    with_image = model.apply({"params": opened}, IMAGES, Q_IDS, Q_MASK, method="forward")["logits"]
    closed = model.apply({"params": params}, IMAGES, Q_IDS, Q_MASK, method="forward")["logits"]
    np.testing.assert_array_equal(np.asarray(text_only), np.asarray(closed))
    assert float(jnp.max(jnp.abs(with_image - closed))) > 1e-4


# ------------------------------------------------------------------------------------------------
# Config errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,match", [
    (dict(num_fusion_layers=3), r"num_fusion_layers=3 must divide .* one of \[1, 2, 4\]"),
    (dict(num_fusion_layers=8), "num_fusion_layers=8"),
    (dict(num_fusion_layers=-1), "num_fusion_layers"),
    (dict(head="span"), "config.fusion.head"),
    (dict(head="classify", num_answers=0), "config.fusion.num_answers"),
    (dict(head="classify", num_answers=3, answer_pool="max"), "config.fusion.answer_pool"),
    (dict(xattn_num_heads=5), "config.fusion.xattn_num_heads"),
    (dict(dropout=1.0), "config.fusion.dropout"),
    (dict(projector_layers=3), "config.fusion.projector_layers"),
    (dict(vision_gate_init=float("nan")), "config.fusion.vision_gate_init"),
    (dict(attention_impl="flash"), "config.fusion.attention_impl"),
])
def test_invalid_config_names_the_field(fields, match):
    cfg = fusion_lib.FusionConfig(**{**dict(head="generate"), **fields})
    with pytest.raises(ValueError, match=match):
        cfg.validate(DEC)


def test_config_section_and_decoder_errors():
    with pytest.raises(ValueError, match="did you mean 'num_fusion_layers'"):
        fusion_lib.FusionConfig.from_config({"num_fusion_layer": 2})
    assert fusion_lib.FusionConfig.from_config(fusion_lib.default_config()) == fusion_lib.FusionConfig()
    fusion_lib.FusionConfig(num_fusion_layers=0, head="generate").validate(DEC)  # question-only model is fine
    ids = jnp.zeros((1, 3), jnp.int32)
    scanned = dataclasses.replace(DEC, scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers=False"):
        jax.eval_shape(lambda: fusion_lib.FusionDecoder(scanned, FUSION).init(jax.random.key(0), ids))
    with pytest.raises(ValueError, match="num_fusion_layers=3"):
        jax.eval_shape(lambda: fusion_lib.FusionDecoder(DEC, fusion_lib.FusionConfig(num_fusion_layers=3))
                       .init(jax.random.key(0), ids))


def test_analytic_block_flops_match_xla():
    """``flops.gated_xattn_block_forward_flops`` vs XLA's count of one block's jitted forward (the
    matmuls dominate at these shapes; norms, softmax and gates are the small remainder)."""
    from vlmjax import flops as flops_lib  # pylint: disable=g-import-not-at-top
    d, heads, mult, t, nv = 256, 4, 4, 64, 50
    block = fusion_lib.GatedCrossAttentionBlock(num_heads=heads, ffn_mult=mult)
    x, v = jax.ShapeDtypeStruct((1, t, d), jnp.float32), jax.ShapeDtypeStruct((1, nv, d), jnp.float32)
    variables = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros((1, t, d)), jnp.zeros((1, nv, d))))
    compiled = jax.jit(lambda p, a, b: block.apply(p, a, b)[0]).lower(variables, x, v).compile()
    cost = compiled.cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = flops_lib.gated_xattn_block_forward_flops(hidden_size=d, num_heads=heads, head_dim=d // heads,
                                                         ffn_mult=mult, text_tokens=t, visual_tokens=nv)
    assert 0.95 < analytic / xla <= 1.0, (analytic, xla)
