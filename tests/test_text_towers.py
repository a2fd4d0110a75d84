"""CLIP / SigLIP text towers and two-tower models <-> HF transformers: parity on tiny random models,
both CLIP EOS-pooling conventions, padding, bf16, save_hf round trips, loader errors, tokenizers.

Every HF model here is built from a tiny random config and ``save_pretrained`` to a tmp dir; nothing
is downloaded."""

import dataclasses
import json
import os
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from vlmjax import convert
from vlmjax import sharding as shd
from vlmjax.models import text_encoder as text_lib
from vlmjax.models import two_tower as two_tower_lib
from conftest import rel_err

VOCAB, MAX_POS = 100, 16
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_POS)
ODD_HEADS = dict(hidden_size=48, intermediate_size=80, num_attention_heads=3)
EOS = 7  # a real EOS id smaller than most ids, so "first EOS" and "argmax id" pool different tokens
TEXT_CASES = {
    "clip_eos": ("clip", dict(eos_token_id=EOS)),
    "clip_legacy_eos2": ("clip", dict(eos_token_id=2)),
    "clip_eos_3heads": ("clip", dict(eos_token_id=EOS, hidden_act="gelu", **ODD_HEADS)),
    "siglip": ("siglip", dict()),
    "siglip_3heads_proj": ("siglip", dict(projection_size=24, **ODD_HEADS)),
}
HF_TEXT = {"clip": (transformers.CLIPTextConfig, transformers.CLIPTextModel),
           "siglip": (transformers.SiglipTextConfig, transformers.SiglipTextModel)}
PARAM_AXES = {"vocab", "embed", "q_heads", "head_dim", "mlp", "norm", None}
ACT_AXES = {"act_batch", "act_len", "act_embed", "act_heads", "act_head_dim", "act_mlp"}


def _randomize(model, seed=0):
    """Weights well away from their init (biases and norm scales too, so every mapping is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias") and p.ndim == 1 and "logit" not in name:
                p.copy_(0.2 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim > 1:
                p.mul_(2.0)
    return model


def _hf_text(kind, tmp_path, name, **kw):
    cfg_cls, model_cls = HF_TEXT[kind]
    torch.manual_seed(0)
    model = _randomize(model_cls(cfg_cls(**{**TEXT, **kw})).eval())
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return model, path


def _text_batch(eos=EOS):
    """[3, 12] ids in [8, VOCAB) with EOS and right padding; row 2 has no padding.

    Row 0: EOS at 5, then padding that reuses the EOS id (CLIP tokenizers pad with EOS), and a
    larger id after the first EOS, so first-EOS and argmax pooling differ. Row 1: EOS at 9 with ids
    after it larger than everything before. Row 2: EOS at the end, no padding.
    """
    rng = np.random.default_rng(1)
    ids = rng.integers(8, VOCAB - 1, (3, 12))
    mask = np.ones_like(ids)
    ids[0, 5], ids[0, 6:] = eos, eos
    ids[0, 3] = VOCAB - 1
    mask[0, 6:] = 0
    ids[1, 9] = eos
    ids[1, 10:] = VOCAB - 1
    mask[1, 10:] = 0
    ids[2, 11] = eos
    return ids, mask


def _hf_text_out(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids),
                    attention_mask=None if mask is None else torch.tensor(mask))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _apply(model, params, *args):
    return jax.jit(model.apply)({"params": params}, *map(jnp.asarray, args))


# ----------------------------------------------------------------------------- text towers vs HF


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_text_tower_matches_transformers_and_round_trips(case, tmp_path):
    kind, kw = TEXT_CASES[case]
    hf, path = _hf_text(kind, tmp_path, case, **kw)
    ids, mask = _text_batch()
    model, params = convert.load_hf(path)
    assert isinstance(model, text_lib.TextEncoder) and model.config.variant == kind

    errs = {}
    for with_mask in (True, False):
        m = mask if with_mask else None
        ref_h, ref_p = _hf_text_out(hf, ids, m)
        out, aux = _apply(model, params, ids, *([m] if with_mask else []))
        assert out["last_hidden_state"].shape == ref_h.shape and out["pooler_output"].shape == ref_p.shape
        assert out["pooler_output"].dtype == jnp.float32 and aux == {}
        errs[f"hidden{'_pad' if with_mask else ''}"] = rel_err(out["last_hidden_state"], ref_h)
        errs[f"pooled{'_pad' if with_mask else ''}"] = rel_err(out["pooler_output"], ref_p)

    ref_h, ref_p = _hf_text_out(hf, ids, mask)
    model16, params16 = convert.load_hf(path, dtype=jnp.bfloat16)
    out16, _ = _apply(model16, params16, ids, mask)
    assert out16["last_hidden_state"].dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
    errs["bf16_hidden"] = rel_err(out16["last_hidden_state"], ref_h)
    errs["bf16_pooled"] = rel_err(out16["pooler_output"], ref_p)
    print(f"{case}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(v for k, v in errs.items() if not k.startswith("bf16")) < 1e-4, errs
    assert max(v for k, v in errs.items() if k.startswith("bf16")) < 5e-2, errs

    out_dir = str(tmp_path / "export")
    convert.save_hf(model, params, out_dir)
    back = type(hf).from_pretrained(out_dir).eval()
    back_h, back_p = _hf_text_out(back, ids, mask)
    np.testing.assert_array_equal(back_h, ref_h)
    np.testing.assert_array_equal(back_p, ref_p)
    a = load_file(os.path.join(path, "model.safetensors"))
    b = load_file(os.path.join(out_dir, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_clip_pooling_conventions_match_hf_definition():
    ids, _ = _text_batch()
    first_eos = text_lib.clip_eos_positions(jnp.asarray(ids), EOS)
    np.testing.assert_array_equal(first_eos, [5, 9, 11])
    legacy = text_lib.clip_eos_positions(jnp.asarray(ids), 2)
    np.testing.assert_array_equal(legacy, np.argmax(ids, -1))
    assert legacy[0] == 3 and legacy[1] == 10  # the larger ids, not the EOS: the legacy quirk
    no_eos = text_lib.clip_eos_positions(jnp.asarray(np.full((1, 4), 9)), EOS)
    np.testing.assert_array_equal(no_eos, [0])  # HF argmax over all-False picks position 0


def test_transformers4_text_model_prefix_loads(tmp_path):
    """transformers 4 saved CLIPTextModel / SiglipTextModel weights under ``text_model.``."""
    hf, path = _hf_text("clip", tmp_path, "v4", eos_token_id=EOS)
    f = os.path.join(path, "model.safetensors")
    save_file({"text_model." + k: v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    ids, mask = _text_batch()
    model, params = convert.load_hf(path)
    out, _ = _apply(model, params, ids, mask)
    ref_h, ref_p = _hf_text_out(hf, ids, mask)
    assert rel_err(out["pooler_output"], ref_p) < 1e-4


def test_missing_and_misshaped_tensors_are_one_clear_error(tmp_path):
    _, path = _hf_text("siglip", tmp_path, "broken")
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    del t["encoder.layers.1.mlp.fc1.bias"]
    t["encoder.layers.0.self_attn.q_proj.weight"] = t["encoder.layers.0.self_attn.q_proj.weight"][:, :30]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        convert.load_hf(path)
    msg = str(e.value)
    assert "missing in checkpoint (1): [encoder.layers.1.mlp.fc1.bias]" in msg
    assert "encoder.layers.0.self_attn.q_proj.weight: file (32, 30) vs model (32, 32)" in msg
    assert "unexpected in checkpoint (0)" in msg


def test_with_projection_checkpoint_names_the_fix(tmp_path):
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(projection_dim=16, eos_token_id=EOS, **TEXT))
    model.save_pretrained(str(tmp_path / "wp"))
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection.*model_type 'clip'"):
        convert.load_hf(str(tmp_path / "wp"))


# ----------------------------------------------------------------------------- module properties


def _tiny(variant, **kw):
    return text_lib.TextEncoderConfig(variant=variant, **{**TEXT, "eos_token_id": EOS, **kw})


def _random_params(module, *args, seed=0):
    """N(0, 0.3^2) params (norm scales 1 + N(0, 0.1^2)) shaped by an abstract init: nothing compiles."""
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        base, std = (1.0, 0.1) if jax.tree_util.keystr(path).endswith("['scale']") else (0.0, 0.3)
        return jnp.asarray(base + std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("variant", ["clip", "siglip"])
def test_causal_only_for_clip_and_padding_keys_ignored(variant):
    model = text_lib.TextEncoder(_tiny(variant))
    ids = jnp.asarray(np.random.default_rng(0).integers(8, VOCAB, (2, 10)))
    params = _random_params(model, ids)
    hidden = jax.jit(lambda t, m: model.apply({"params": params}, t, m)[0]["last_hidden_state"])
    changed = ids.at[:, 7:].set(3)
    full = jnp.ones_like(ids)
    prefix_same = np.allclose(hidden(ids, full)[:, :7], hidden(changed, full)[:, :7], atol=1e-6)
    assert prefix_same == (variant == "clip")
    # Whatever sits in padding positions is invisible to the real tokens.
    mask = full.at[:, 7:].set(0)
    np.testing.assert_allclose(hidden(ids, mask)[:, :7], hidden(changed, mask)[:, :7], atol=1e-6)


def test_every_param_has_logical_axes_and_sharded_apply(monkeypatch):
    model = text_lib.TextEncoder(_tiny("siglip"))
    ids = jnp.asarray(np.random.default_rng(0).integers(8, VOCAB, (2, 6)))
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"], is_leaf=is_box)
    # token + position embeddings, final norm (2), head (2); per layer 2 norms (4), q/k/v/out (8), mlp (4).
    assert len(leaves) == 6 + 16 * TEXT["num_hidden_layers"]
    for path, leaf in leaves:
        assert is_box(leaf), f"{jax.tree_util.keystr(path)} has no logical partitioning"
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= PARAM_AXES, leaf.names
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["layers_0"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", "q_heads", "head_dim")

    params = _random_params(model, ids)
    seen = set()
    original = nn.with_logical_constraint

    def record(x, axes, *args, **kwargs):
        seen.update(a for a in axes if a is not None)
        return original(x, axes, *args, **kwargs)

    monkeypatch.setattr(nn, "with_logical_constraint", record)
    expected, _ = model.apply({"params": params}, ids)
    assert seen == ACT_AXES
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, shd.DEFAULT_RULES)
    sharded = jax.device_put(params, shardings["params"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        out, _ = jax.jit(lambda p, t: model.apply({"params": p}, t))(sharded, ids)
    np.testing.assert_allclose(out["pooler_output"], expected["pooler_output"], atol=1e-5)


def test_remat_matches_plain_with_grads():
    cfg = _tiny("clip")
    ids = jnp.asarray(np.random.default_rng(0).integers(8, VOCAB, (2, 6)))
    plain, remat = text_lib.TextEncoder(cfg), text_lib.TextEncoder(dataclasses.replace(cfg, remat=True))
    params = _random_params(plain, ids)
    loss = lambda m: jax.jit(jax.grad(
        lambda p: jnp.sum(m.apply({"params": p}, ids)[0]["pooler_output"] ** 2)))
    ga, gb = loss(plain)(params), loss(remat)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ga, gb)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="variant='bert'"):
        _tiny("bert").validate()
    with pytest.raises(ValueError, match="num_attention_heads"):
        _tiny("clip", num_attention_heads=5).validate()
    with pytest.raises(ValueError, match="hidden_act='relu2'"):
        _tiny("clip", hidden_act="relu2").validate()
    model = text_lib.TextEncoder(_tiny("clip"))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, MAX_POS + 1), jnp.int32))
    with pytest.raises(ValueError, match="eos_token_id"):
        from vlmjax.convert import text as text_convert
        text_convert.text_config_from_hf({**TEXT, "eos_token_id": [1, 2]}, "clip")


# ----------------------------------------------------------------------------- tokenizers


def _clip_tokenizer(path):
    """A tiny CLIP BPE (letters, a few merges); like CLIP, <|startoftext|>/<|endoftext|> are the two
    largest ids and padding reuses <|endoftext|>."""
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"), ("o", "t"),
              ("ph", "ot"), ("phot", "o</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    return len(vocab)


def _siglip_tokenizer(path):
    """A word-level tokenizer.json with an appended </s> (as SigLIP's), padded to max length."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "two"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)
    return len(words)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tokenizer_loads_from_the_checkpoint_dir_and_feeds_the_model(kind, tmp_path):
    path = str(tmp_path / kind)
    os.makedirs(path)
    n = (_clip_tokenizer if kind == "clip" else _siglip_tokenizer)(path)
    tok = convert.load_tokenizer(path)
    extra = dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                 pad_token_id=tok.pad_token_id) if kind == "clip" else {}
    cfg_cls, model_cls = HF_TEXT[kind]
    torch.manual_seed(0)
    hf = _randomize(model_cls(cfg_cls(**{**TEXT, "vocab_size": n, **extra})).eval())
    hf.save_pretrained(path)
    texts = ["a photo of a cat", "a dog"]
    padding = dict(padding=True) if kind == "clip" else dict(padding="max_length", max_length=MAX_POS)
    enc = tok(texts, return_tensors="np", **padding)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if kind == "clip":
        assert tok.convert_ids_to_tokens(ids[0].tolist())[-1] == "<|endoftext|>"
        assert ids[1, -1] == tok.eos_token_id == tok.pad_token_id and mask[1, -1] == 0
    else:
        assert ids.shape == (2, MAX_POS) and ids[0, 5] == tok.eos_token_id
    model, params = convert.load_hf(path)
    out, _ = _apply(model, params, ids, mask)
    ref_h, ref_p = _hf_text_out(hf, ids, mask)
    err = rel_err(out["pooler_output"], ref_p)
    print(f"tokenized {kind}: pooled rel err {err:.1e}")
    assert err < 1e-4 and rel_err(out["last_hidden_state"], ref_h) < 1e-4


# ----------------------------------------------------------------------------- two-tower models


IMAGE = 16
VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
              image_size=IMAGE, patch_size=4)
TWO_TOWER_CASES = {
    # CLIP with the legacy eos_token_id=2 config (argmax pooling), projections to 24.
    "clip": (transformers.CLIPConfig, transformers.CLIPModel,
             dict(text_config={**TEXT, "eos_token_id": 2}, vision_config=VISION, projection_dim=24)),
    # SigLIP: the text head maps 32 -> 48 = the vision width (no projections in SiglipModel).
    "siglip": (transformers.SiglipConfig, transformers.SiglipModel,
               dict(text_config={**TEXT, "projection_size": 48}, vision_config=VISION)),
}


def _hf_two_tower(kind, tmp_path):
    cfg_cls, model_cls, kw = TWO_TOWER_CASES[kind]
    torch.manual_seed(0)
    model = _randomize(model_cls(cfg_cls(**kw)).eval())
    with torch.no_grad():  # away from the inits (log 1/0.07; 0 and 0 in HF SigLIP)
        model.logit_scale.fill_(1.3)
        if kind == "siglip":
            model.logit_bias.fill_(-2.5)
    path = str(tmp_path / kind)
    model.save_pretrained(path)
    return model, path


def _two_tower_batch():
    rng = np.random.default_rng(2)
    pixels = rng.standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)  # NHWC
    ids, mask = _text_batch(eos=2)
    return pixels, ids, mask


def _hf_two_tower_out(model, pixels, ids, mask):
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                    input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        img = model.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
        txt = model.get_text_features(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ref = {k: getattr(out, k).numpy() for k in
           ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text")}
    pooled = lambda o: (o if isinstance(o, torch.Tensor) else o.pooler_output).numpy()
    return ref, pooled(img), pooled(txt)


@pytest.mark.parametrize("kind", sorted(TWO_TOWER_CASES))
def test_two_tower_matches_transformers_and_round_trips(kind, tmp_path):
    hf, path = _hf_two_tower(kind, tmp_path)
    pixels, ids, mask = _two_tower_batch()
    ref, ref_img, ref_txt = _hf_two_tower_out(hf, pixels, ids, mask)

    model, params = convert.load_hf(path)
    assert isinstance(model, two_tower_lib.TwoTower) and model.config.variant == kind
    out, aux = _apply(model, params, pixels, ids, mask)
    errs = {k: rel_err(out[k], ref[k]) for k in ref}
    np.testing.assert_allclose(out["logits_per_image"], np.asarray(out["logits_per_text"]).T)
    np.testing.assert_allclose(out["logit_scale"], np.exp(1.3), rtol=1e-6)
    assert all(k.startswith(("vision_model/", "text_model/")) for k in aux)
    img, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))(params, pixels)
    txt, _ = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method="encode_text"))(
        params, ids, mask)
    errs["image_features"], errs["text_features"] = rel_err(img, ref_img), rel_err(txt, ref_txt)

    model16, params16 = convert.load_hf(path, dtype=jnp.bfloat16)
    out16, _ = _apply(model16, params16, pixels, ids, mask)
    assert out16["logits_per_image"].dtype == jnp.float32
    errs["bf16_logits"] = rel_err(out16["logits_per_image"], ref["logits_per_image"])
    print(f"two-tower {kind}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(v for k, v in errs.items() if not k.startswith("bf16")) < 1e-4, errs
    assert errs["bf16_logits"] < 5e-2, errs

    out_dir = str(tmp_path / "export")
    convert.save_hf(model, params, out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        assert json.load(f)["model_type"] == kind
    back = type(hf).from_pretrained(out_dir).eval()
    back_ref, _, _ = _hf_two_tower_out(back, pixels, ids, mask)
    for k in ref:
        np.testing.assert_array_equal(back_ref[k], ref[k], err_msg=k)
    a = load_file(os.path.join(path, "model.safetensors"))
    b = load_file(os.path.join(out_dir, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_tower_checkpoint_errors_and_width_mismatch(tmp_path):
    _, path = _hf_two_tower("siglip", tmp_path)
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    del t["logit_bias"]
    t["text_model.head.weight"] = t["text_model.head.weight"][:40]
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        convert.load_hf(path)
    msg = str(e.value)
    assert "missing in checkpoint (1): [logit_bias]" in msg
    assert "text_model.head.weight: file (40, 32) vs model (48, 32)" in msg

    # A SigLIP text head narrower than the vision width cannot score pairs: named at trace time.
    from vlmjax.convert import vit as vit_convert
    vision, _ = vit_convert.vision_spec(VISION, "siglip")
    model = two_tower_lib.TwoTower(vision_model=vision, config=two_tower_lib.siglip_config(),
                                   text_model=text_lib.TextEncoder(_tiny("siglip")))
    pixels, ids, _ = _two_tower_batch()
    with pytest.raises(ValueError, match="projection_size must equal the vision tower's hidden_size"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(pixels), jnp.asarray(ids))
    with pytest.raises(ValueError, match="needs a clip text tower"):
        clip_head = two_tower_lib.TwoTowerConfig(variant="clip", projection_dim=8)
        jax.eval_shape(dataclasses.replace(model, config=clip_head).init, jax.random.key(0),
                       jnp.asarray(pixels), jnp.asarray(ids))
