"""DINOv3 (HF ``DINOv3ViTModel``, ``variant='dinov3'``) <-> transformers: parity on tiny random models
(with and without registers, plain and gated MLP, bias switches) at the trained size and on a
non-square 48x64 image (the 2-D RoPE grid), the RoPE tables against HF's, scanned layers, the public
layer split with ``rope=``, the training-time coordinate augmentation, save_hf round trips and config
errors.

Every HF model is built from a tiny random config and ``save_pretrained`` to a tmp dir; nothing is
downloaded."""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from vlmjax import convert
from vlmjax.models import vit as vit_lib
from conftest import rel_err

TINY = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
            image_size=16, layerscale_value=0.5)
# name -> DINOv3ViTConfig kwargs. HF defaults: key_bias=False, plain MLP, no registers.
CASES = {
    "plain": dict(TINY),
    "registers_gated": dict(TINY, num_register_tokens=3, use_gated_mlp=True, hidden_act="silu", key_bias=True,
                            proj_bias=False, mlp_bias=False),
    "registers_3heads": dict(TINY, hidden_size=48, num_attention_heads=3, num_register_tokens=1, query_bias=False,
                             value_bias=False, rope_theta=10.0),
}
SIZES = ((16, 16), (48, 64))  # trained size, a non-square grid (12 x 16 patches)


def _randomize(model, seed=0):
    """Weights far from the HF init (biases, norm and layer scales too), so every mapping matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ("norm" in name and name.endswith("weight")) or name.endswith("lambda1"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1 and name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # matrices, class/mask/register tokens
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_dinov3"))


@functools.cache
def _hf_dir(name, root):
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**CASES[name])).eval()
    _randomize(model, seed=len(name))
    path = os.path.join(root, name)
    model.save_pretrained(path)
    return model, path


@functools.cache
def _loaded(name, root):
    return convert.load_hf(_hf_dir(name, root)[1])


def _pixels(seed, hw, batch=2):
    """[B, 3, H, W] float32 for torch and the same [B, H, W, 3] for vlmjax."""
    x = np.random.default_rng(seed).standard_normal((batch, 3) + tuple(hw)).astype(np.float32)
    return x, x.transpose(0, 2, 3, 1)


def _mask(seed, hw, patch=4, batch=2):
    return np.random.default_rng(seed).random((batch, (hw[0] // patch) * (hw[1] // patch))) < 0.3


def _hf_forward(model, x, mask=None):
    kw = {} if mask is None else {"bool_masked_pos": torch.tensor(mask)}
    with torch.no_grad():
        out = model(torch.tensor(x), **kw)
    return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy()}


@functools.cache
def _jitted(module):
    return jax.jit(lambda params, x, mask=None: module.apply({"params": params}, x, mask=mask))


# ----------------------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers(name, hf_root):
    hf, _ = _hf_dir(name, hf_root)
    model, params = _loaded(name, hf_root)
    cfg = model.config
    assert isinstance(model, vit_lib.VisionTransformer) and cfg.variant == "dinov3"
    assert cfg.num_prefix_tokens == 1 + CASES[name].get("num_register_tokens", 0)
    assert "position_embedding" not in params["embeddings"]
    for seed, hw in enumerate(SIZES):
        x_torch, x = _pixels(seed, hw)
        for mask in (None, _mask(seed, hw)):
            ref = _hf_forward(hf, x_torch, mask)
            out, aux = _jitted(model)(params, jnp.asarray(x), None if mask is None else jnp.asarray(mask))
            assert aux == {}
            assert out["last_hidden_state"].shape == (2, cfg.num_prefix_tokens + (hw[0] // 4) * (hw[1] // 4),
                                                      cfg.hidden_size)
            for key in ref:
                err = float(np.max(np.abs(np.asarray(out[key]) - ref[key])))
                print(f"{name} {hw[0]}x{hw[1]} mask={mask is not None} {key}: fp32 max abs err {err:.2e}")
                np.testing.assert_allclose(out[key], ref[key], atol=1e-5, rtol=1e-5, err_msg=key)
        last = np.asarray(out["last_hidden_state"])
        p = cfg.num_prefix_tokens
        np.testing.assert_array_equal(out["cls_token"], last[:, 0])
        np.testing.assert_array_equal(out["pooler_output"], last[:, 0])
        np.testing.assert_array_equal(out["register_tokens"], last[:, 1:p])
        np.testing.assert_array_equal(out["patch_tokens"], last[:, p:])


def test_bf16_compute(hf_root):
    hf, path = _hf_dir("registers_gated", hf_root)
    model16, params16 = convert.load_hf(path, dtype=jnp.bfloat16)
    x_torch, x = _pixels(7, SIZES[1])
    ref = _hf_forward(hf, x_torch)
    out16, _ = _jitted(model16)(params16, jnp.asarray(x))
    assert out16["last_hidden_state"].dtype == jnp.bfloat16
    for key in ref:
        err = rel_err(out16[key], ref[key])
        print(f"bf16 {key}: max rel err {err:.2e}")
        assert err < 3e-2, (key, err)


def test_rope_tables_match_transformers(hf_root):
    """Patch rows equal HF DINOv3ViTRopePositionEmbedding on a non-square grid; prefix rows are identity."""
    hf, _ = _hf_dir("registers_3heads", hf_root)
    model, _ = _loaded("registers_3heads", hf_root)
    cfg = model.config
    for gh, gw in ((4, 4), (12, 16), (5, 3)):
        with torch.no_grad():
            ref_cos, ref_sin = hf.rope_embeddings(torch.zeros(1, 3, gh * 4, gw * 4))
        cos, sin = model.rope_tables(gh, gw)  # no params needed: the module may be unbound
        p = cfg.num_prefix_tokens
        assert cos.shape == sin.shape == (p + gh * gw, cfg.head_dim) and cos.dtype == jnp.float32
        np.testing.assert_array_equal(cos[:p], 1.0)
        np.testing.assert_array_equal(sin[:p], 0.0)
        np.testing.assert_allclose(cos[p:], ref_cos.numpy(), atol=1e-6)
        np.testing.assert_allclose(sin[p:], ref_sin.numpy(), atol=1e-6)
    clip = vit_lib.VisionTransformer(vit_lib.ViTConfig(variant="clip", intermediate_size=8, hidden_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       patch_size=4, image_size=16))
    assert clip.rope_tables(4, 4) is None


def test_layer_split_with_rope_and_an_extra_token(hf_root):
    """embed -> layer(x, det, rope) by hand == __call__; qkv(rope=) leaves the prefix untouched and
    rotates the patches; an extra token with an identity rope row runs through the layers."""
    model, params = _loaded("registers_gated", hf_root)
    cfg = model.config
    _, x = _pixels(1, SIZES[1])
    gh, gw = SIZES[1][0] // 4, SIZES[1][1] // 4
    p = cfg.num_prefix_tokens

    def by_hand(m, pixels, extra):
        h = m.embed(pixels)
        cos, sin = m.rope_tables(gh, gw)
        qs = [m.layers[0].qkv(h, rope=(cos, sin)), m.layers[0].qkv(h)]
        h = jnp.concatenate([h, extra[:, None]], axis=1)
        rope = (jnp.concatenate([cos, jnp.ones_like(cos[:1])]), jnp.concatenate([sin, jnp.zeros_like(sin[:1])]))
        for layer in m.layers:
            h, _ = layer(h, True, rope)
        return m.outputs(h), qs

    extra = jnp.asarray(np.random.default_rng(2).standard_normal((2, cfg.hidden_size)), jnp.float32)
    (out, (rotated, plain)), ref = jax.jit(lambda prm: (
        model.apply({"params": prm}, jnp.asarray(x), extra, method=by_hand),
        model.apply({"params": prm}, jnp.asarray(x))[0]))(params)
    for a, b in zip(rotated[:2], plain[:2]):  # q, k
        np.testing.assert_array_equal(a[:, :p], b[:, :p])
        assert float(jnp.max(jnp.abs(a[:, p:] - b[:, p:]))) > 1e-3
    np.testing.assert_array_equal(rotated[2], plain[2])  # v is never rotated
    assert out["last_hidden_state"].shape[1] == ref["last_hidden_state"].shape[1] + 1
    # The extra token changes the others (full attention), so only the shapes and the finite values.
    assert bool(jnp.all(jnp.isfinite(out["last_hidden_state"])))
    with pytest.raises(ValueError, match="rope tables must be"):
        model.apply({"params": params}, jnp.asarray(x), method=lambda m, px: m.layers[0].qkv(
            m.embed(px), rope=m.rope_tables(gh, gw + 1)))


def test_layer_loop_equals_call(hf_root):
    model, params = _loaded("plain", hf_root)
    _, x = _pixels(4, SIZES[1])

    def loop(m, pixels):
        h = m.embed(pixels)
        rope = m.rope_tables(pixels.shape[1] // 4, pixels.shape[2] // 4)
        for layer in m.layers:
            h, _ = layer(h, True, rope)
        return m.outputs(h)

    got = jax.jit(lambda prm: model.apply({"params": prm}, jnp.asarray(x), method=loop))(params)
    ref, _ = _jitted(model)(params, jnp.asarray(x))
    np.testing.assert_allclose(got["last_hidden_state"], ref["last_hidden_state"], atol=1e-6, rtol=0)


def test_scan_layers_and_remat_match_the_loop(hf_root):
    model, params = _loaded("registers_gated", hf_root)
    path = _hf_dir("registers_gated", hf_root)[1]
    spec = convert.build(path)
    _, x = _pixels(5, SIZES[1])
    ref, _ = _jitted(model)(params, jnp.asarray(x))
    scanned = vit_lib.VisionTransformer(dataclasses.replace(model.config, scan_layers=True, remat="full"))
    abstract = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), jnp.asarray(x)))["params"]
    params_s = convert.load_params(path, spec, abstract)
    assert params_s["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == model.config.num_hidden_layers
    out, _ = _jitted(scanned)(params_s, jnp.asarray(x))
    for key in ("last_hidden_state", "pooler_output"):
        np.testing.assert_allclose(out[key], ref[key], atol=1e-5, rtol=1e-5)


def test_training_augments_the_rope_coordinates(hf_root):
    """deterministic=False draws one shift / jitter / rescale of the coordinates per call (HF in
    training mode); eval and a config without them are deterministic."""
    model, params = _loaded("plain", hf_root)
    assert model.config.pos_embed_rescale == 2.0  # HF's default, copied from config.json
    _, x = _pixels(6, SIZES[0])
    run = jax.jit(lambda m, prm, rng, det: m.apply({"params": prm}, jnp.asarray(x), deterministic=det,
                                                   rngs={"dropout": rng})[0]["pooler_output"],
                  static_argnums=(0, 3))
    ev = run(model, params, jax.random.key(0), True)
    t1, t1b, t2 = (run(model, params, jax.random.key(k), False) for k in (1, 1, 2))
    np.testing.assert_array_equal(t1, t1b)
    assert float(jnp.max(jnp.abs(t1 - ev))) > 1e-4 and float(jnp.max(jnp.abs(t1 - t2))) > 1e-4
    off = vit_lib.VisionTransformer(dataclasses.replace(model.config, pos_embed_rescale=None))
    np.testing.assert_array_equal(run(off, params, jax.random.key(1), False), ev)
    coords = vit_lib.patch_coordinates(3, 4)
    shifted = vit_lib.augment_patch_coordinates(coords, jax.random.key(0), shift=0.5)
    delta = np.asarray(shifted - coords)
    np.testing.assert_allclose(delta, np.broadcast_to(delta[:1], delta.shape), atol=1e-6)  # one draw per call
    assert np.all(np.abs(delta) <= 0.5)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["plain", "registers_gated"])
def test_save_hf_round_trip_is_lossless(name, hf_root, tmp_path):
    hf, path = _hf_dir(name, hf_root)
    model, params = _loaded(name, hf_root)
    out = str(tmp_path / "export")
    convert.save_hf(model, params, out)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)  # the empty register_tokens [1, 0, D] of a model without registers too
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    back, info = transformers.DINOv3ViTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for field in ("key_bias", "use_gated_mlp", "num_register_tokens", "pos_embed_rescale", "rope_theta"):
        assert getattr(back.config, field) == getattr(hf.config, field), field
    x_torch, _ = _pixels(3, SIZES[1])
    ref, got = _hf_forward(hf, x_torch), _hf_forward(back.eval(), x_torch)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    model2, _ = convert.load_hf(out)
    assert model2.config == model.config


def test_vision_tower_and_missing_tensors(hf_root, tmp_path):
    _, path = _hf_dir("registers_gated", hf_root)
    assert convert.vision_tower(path).module.config.variant == "dinov3"
    t = load_file(os.path.join(path, "model.safetensors"))
    del t["layer.1.mlp.gate_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    save_file(t, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing in checkpoint \(1\): \[layer.1.mlp.gate_proj.weight\]"):
        convert.load_hf(str(broken))


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_errors():
    base = dict(hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                image_size=16)
    assert vit_lib.ViTConfig(variant="dinov3", **base).key_bias is False  # HF DINOv3 default
    assert vit_lib.ViTConfig(variant="clip", **base).key_bias is True
    assert vit_lib.ViTConfig(variant="dinov3", **base).num_positions == 0
    with pytest.raises(ValueError, match="rope_theta=10.0 exists only for variant='dinov3'"):
        vit_lib.ViTConfig(variant="clip", rope_theta=10.0, **base).validate()
    with pytest.raises(ValueError, match="key_bias=False exists only for variant='dinov3'"):
        vit_lib.ViTConfig(variant="siglip", key_bias=False, **base).validate()
    with pytest.raises(ValueError, match="num_register_tokens=2 exists only for variant='dinov2' or 'dinov3'"):
        vit_lib.ViTConfig(variant="siglip", num_register_tokens=2, **base).validate()
    with pytest.raises(ValueError, match="use_swiglu_ffn=True exists only for variant='dinov2'"):
        vit_lib.ViTConfig(variant="dinov3", use_swiglu_ffn=True, **base).validate()
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        vit_lib.ViTConfig(variant="dinov3", **dict(base, hidden_size=24, num_attention_heads=4)).validate()
    with pytest.raises(ValueError, match="pos_embed_jitter must be None"):
        vit_lib.ViTConfig(variant="dinov3", pos_embed_jitter=0.5, **base).validate()
    with pytest.raises(ValueError, match="always has a mask token"):
        convert.save_hf(vit_lib.VisionTransformer(vit_lib.ViTConfig(variant="dinov3", use_mask_token=False, **base)),
                        {}, "/nonexistent")
