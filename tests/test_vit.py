"""CLIP / SigLIP vision towers and DINOv2 (+ registers, SwiGLU) <-> HF transformers: parity on tiny
random models at the trained and at other image sizes (position interpolation), bf16, save_hf round
trips, loader errors, the bicubic position resize against torch, and the image processors against
the transformers PIL processors.

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
from vlmjax import sharding as shd
from vlmjax.models import vit as vit_lib
from conftest import rel_err

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=16)
ODD_HEADS = dict(hidden_size=48, num_attention_heads=3)  # head_dim 16, 3 heads
# name -> (HF config class, HF model class, config kwargs, other image size (H, W)).
CASES = {
    "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel,
             dict(TINY, intermediate_size=37), (24, 24)),
    "clip_3heads": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel,
                    dict(TINY, intermediate_size=40, hidden_act="gelu", **ODD_HEADS), (20, 28)),
    "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel,
               dict(TINY, intermediate_size=37, **ODD_HEADS), (24, 24)),
    "siglip_nohead": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel,
                      dict(TINY, intermediate_size=37, vision_use_head=False), (28, 20)),
    "dinov2": (transformers.Dinov2Config, transformers.Dinov2Model,
               dict(TINY, mlp_ratio=2, layerscale_value=0.5), (24, 24)),
    "dinov2_swiglu": (transformers.Dinov2Config, transformers.Dinov2Model,
                      dict(TINY, use_swiglu_ffn=True, qkv_bias=False, use_mask_token=False, **ODD_HEADS),
                      (20, 28)),
    "dinov2_registers": (transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel,
                         dict(TINY, num_register_tokens=3), (24, 20)),
}
PARAM_AXES = {"embed", "q_heads", "head_dim", "mlp", "norm", None}


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
            else:  # matrices, class/mask/register tokens, probe, position tables
                p.copy_(0.2 * noise)


@functools.cache
def _hf_dir(name, root):
    cfg_cls, model_cls, kw, _ = CASES[name]
    model = model_cls(cfg_cls(**kw)).eval()
    _randomize(model, seed=len(name))
    path = os.path.join(root, name)
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_vit"))


def _pixels(seed, hw, batch=2):
    """[B, 3, H, W] float32 for torch and the same [B, H, W, 3] for vlmjax."""
    x = np.random.default_rng(seed).standard_normal((batch, 3) + tuple(hw)).astype(np.float32)
    return x, x.transpose(0, 2, 3, 1)


def _hf_forward(model, x, mask=None):
    kw = {}
    if isinstance(model, (transformers.CLIPVisionModel, transformers.SiglipVisionModel)):
        kw["interpolate_pos_encoding"] = True  # DINOv2 always interpolates
    if mask is not None:
        kw["bool_masked_pos"] = torch.tensor(mask)
    with torch.no_grad():
        out = model(torch.tensor(x), **kw)
    return {k: v.numpy() for k, v in out.items() if k in ("last_hidden_state", "pooler_output") and v is not None}


@functools.cache
def _jitted(module):
    return jax.jit(lambda params, x, mask=None: module.apply({"params": params}, x, mask=mask))


# ----------------------------------------------------------------------------- parity with HF


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers_at_trained_and_other_sizes(name, hf_root):
    hf, path = _hf_dir(name, hf_root)
    model, params = convert.load_hf(path)
    cfg = model.config
    assert isinstance(model, vit_lib.VisionTransformer)
    prefix = cfg.num_prefix_tokens
    for seed, hw in enumerate([(16, 16), CASES[name][3]]):
        x_torch, x = _pixels(seed, hw)
        mask = None
        if cfg.variant == "dinov2" and cfg.use_mask_token:
            mask = np.random.default_rng(seed).random((2, (hw[0] // 4) * (hw[1] // 4))) < 0.3
        ref = _hf_forward(hf, x_torch, mask)
        out, aux = _jitted(model)(params, jnp.asarray(x), None if mask is None else jnp.asarray(mask))
        assert aux == {}
        n_tokens = prefix + (hw[0] // 4) * (hw[1] // 4)
        assert out["last_hidden_state"].shape == (2, n_tokens, cfg.hidden_size)
        assert set(ref) <= set(out)
        assert ("pooler_output" in out) == (cfg.pool != "none")
        for key in ref:
            err = rel_err(out[key], ref[key])
            print(f"{name} {hw[0]}x{hw[1]} {key}: fp32 max rel err {err:.2e}")
            assert err < 1e-4, (key, err)
        if cfg.variant == "dinov2":
            last = np.asarray(out["last_hidden_state"])
            np.testing.assert_array_equal(out["cls_token"], last[:, 0])
            np.testing.assert_array_equal(out["pooler_output"], last[:, 0])
            np.testing.assert_array_equal(out["register_tokens"], last[:, 1:prefix])
            np.testing.assert_array_equal(out["patch_tokens"], last[:, prefix:])
            assert out["register_tokens"].shape == (2, cfg.num_register_tokens, cfg.hidden_size)

    # bf16 compute (fp32 params) at the other size.
    model16, params16 = convert.load_hf(path, dtype=jnp.bfloat16)
    x_torch, x = _pixels(7, CASES[name][3])
    ref = _hf_forward(hf, x_torch)
    out16, _ = _jitted(model16)(params16, jnp.asarray(x))
    assert out16["last_hidden_state"].dtype == jnp.bfloat16
    for key in ref:
        err = rel_err(out16[key], ref[key])
        print(f"{name} {key}: bf16 max rel err {err:.2e}")
        assert err < 3e-2, (key, err)


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_hf_round_trip_is_lossless(name, hf_root, tmp_path):
    hf, path = _hf_dir(name, hf_root)
    model, params = convert.load_hf(path)
    out = str(tmp_path / "export")
    convert.save_hf(model, params, out)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    back = type(hf).from_pretrained(out).eval()
    assert type(back.config) is type(hf.config)
    x_torch, _ = _pixels(3, CASES[name][3])
    ref, got = _hf_forward(hf, x_torch), _hf_forward(back, x_torch)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])
    model2, _ = convert.load_hf(out)
    assert model2.config == model.config


def test_two_tower_and_transformers4_prefix_loads(hf_root, tmp_path):
    """A CLIP vision tower stored under ``vision_model.`` (transformers 4 / CLIPModel layout, with
    CLIPVisionModelWithProjection's projection) loads the same params."""
    _, path = _hf_dir("clip", hf_root)
    _, params = convert.load_hf(path)
    t = load_file(os.path.join(path, "model.safetensors"))
    t = {"vision_model." + k: v for k, v in t.items()}
    t["visual_projection.weight"] = np.zeros((8, 32), np.float32)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    save_file(t, str(legacy / "model.safetensors"), metadata={"format": "pt"})
    _, params2 = convert.load_hf(str(legacy))
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_missing_and_misshaped_tensors_are_reported_together(hf_root, tmp_path):
    _, path = _hf_dir("siglip", hf_root)
    t = load_file(os.path.join(path, "model.safetensors"))
    del t["encoder.layers.1.mlp.fc2.weight"]
    t["head.attention.in_proj_weight"] = t["head.attention.in_proj_weight"][:, :40]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    save_file(t, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        convert.load_hf(str(broken))
    msg = str(e.value)
    print(msg)
    assert "missing in checkpoint (1): [encoder.layers.1.mlp.fc2.weight]" in msg
    assert "wrong shape (1): [head.attention.in_proj_weight: file (144, 40) vs model (144, 48)]" in msg


# ----------------------------------------------------------------------------- position resize


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_position_resize_matches_torch(antialias):
    """Up- and down-sampling, square and not, against torch F.interpolate(bicubic, align_corners=False)."""
    rng = np.random.default_rng(0)
    grid, d = 6, 5
    table = rng.standard_normal((grid * grid, d)).astype(np.float32)
    for out_hw in [(6, 6), (9, 9), (4, 11), (3, 2), (1, 1), (13, 6)]:
        ref = torch.nn.functional.interpolate(
            torch.tensor(table).reshape(1, grid, grid, d).permute(0, 3, 1, 2), size=out_hw, mode="bicubic",
            align_corners=False, antialias=antialias)
        ref = ref.permute(0, 2, 3, 1).reshape(-1, d).numpy()
        got = vit_lib.interpolate_position_embedding(jnp.asarray(table), grid, out_hw, antialias)
        assert rel_err(got, ref) < 1e-5, (out_hw, rel_err(got, ref))
    # The two kernels really differ, so each model family is tested against its own.
    a = vit_lib.bicubic_resize_matrix(6, 9, False)
    b = vit_lib.bicubic_resize_matrix(6, 9, True)
    assert np.abs(a - b).max() > 1e-2
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)


# ----------------------------------------------------------------------------- module properties


def test_logical_axes_are_known_to_the_sharding_rules(hf_root):
    """Every param carries logical names the trainer's rules map; a mesh load places them."""
    known = {name for name, _ in shd.DEFAULT_RULES}
    for name in ("clip", "siglip", "dinov2_swiglu", "dinov2_registers"):
        spec = convert.build(_hf_dir(name, hf_root)[1])
        boxed = jax.eval_shape(lambda s=spec: s.module.init(jax.random.key(0), *s.init_args))["params"]
        specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        names = {a for s in specs for a in s}
        assert names <= PARAM_AXES and names - {None} <= known, names
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all(isinstance(x, nn.Partitioned) for x in leaves)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), shd.MESH_AXES)
    _, path = _hf_dir("siglip", hf_root)
    model, params = convert.load_hf(path, mesh=mesh)
    _, x = _pixels(0, (16, 16))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        out, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(x))
    _, ref_params = convert.load_hf(path)
    ref, _ = _jitted(model)(ref_params, jnp.asarray(x))
    np.testing.assert_allclose(out["pooler_output"], ref["pooler_output"], rtol=1e-6, atol=1e-6)


def test_dropout_drop_path_and_remat():
    """Training mode is stochastic (dropout + stochastic depth), eval is not; remat changes nothing."""
    cfg = vit_lib.ViTConfig(variant="dinov2", intermediate_size=40, hidden_act="gelu", layer_norm_eps=1e-6,
                            dropout_rate=0.1, drop_path_rate=0.3, **dict(TINY, hidden_size=16))
    model = vit_lib.VisionTransformer(cfg)
    remat = vit_lib.VisionTransformer(dataclasses.replace(cfg, remat=True))
    x = jnp.asarray(_pixels(0, (16, 16))[1])
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]  # no init compile
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), abstract)

    def loss(p, m, rng, train=True):
        out, _ = m.apply({"params": p}, x, deterministic=not train, rngs={"dropout": rng})
        return jnp.mean(out["pooler_output"] ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1,))
    (l0, g0), (l1, g1) = grad(params, model, jax.random.key(1)), grad(params, remat, jax.random.key(1))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)
    l2, _ = grad(params, model, jax.random.key(2))
    evaluate = jax.jit(functools.partial(loss, m=model, train=False))
    evals = [evaluate(params, rng=jax.random.key(k)) for k in (1, 2)]
    assert float(evals[0]) == float(evals[1])
    assert len({float(l0), float(l2), float(evals[0])}) == 3 and np.isfinite(float(l0))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="variant='vit'"):
        vit_lib.ViTConfig(variant="vit", intermediate_size=8, **TINY).validate()
    with pytest.raises(ValueError, match="pool='map' does not exist for variant='clip'"):
        vit_lib.ViTConfig(variant="clip", intermediate_size=8, pool="map", **TINY).validate()
    with pytest.raises(ValueError, match="num_register_tokens=2 exists only for variant='dinov2'"):
        vit_lib.ViTConfig(variant="siglip", intermediate_size=8, num_register_tokens=2, **TINY).validate()
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        vit_lib.ViTConfig(variant="clip", intermediate_size=8, **dict(TINY, num_attention_heads=5)).validate()
    model = vit_lib.VisionTransformer(vit_lib.ViTConfig(variant="clip", intermediate_size=8, **TINY))
    with pytest.raises(ValueError, match="mask= needs a \\[MASK\\] embedding"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), mask=jnp.zeros((1, 16), bool))
    with pytest.raises(ValueError, match="NHWC with 3 channels"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)))


# ----------------------------------------------------------------------------- image processors


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (37, 29, 3), dtype=np.uint8),
            rng.integers(0, 256, (29, 41, 3), dtype=np.uint8),
            rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)]  # RGBA: composited onto white


PROCESSORS = {
    "clip": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 20},
                                                       crop_size={"height": 16, "width": 16}),
    "siglip": lambda: transformers.SiglipImageProcessorPil(size={"height": 24, "width": 20}),
    "dinov2_bit": lambda: transformers.BitImageProcessorPil(
        size={"shortest_edge": 24}, crop_size={"height": 16, "width": 16},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "clip_crop_pads": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 12},
                                                                 crop_size={"height": 16, "width": 14}),
    "vit_bilinear": lambda: transformers.ViTImageProcessorPil(size={"height": 12, "width": 12},
                                                              do_convert_rgb=True),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_image_processor_matches_transformers(name, tmp_path):
    pytest.importorskip("PIL")
    from vlmjax.data.image_processing import ImageProcessor

    hf = PROCESSORS[name]()
    hf.save_pretrained(str(tmp_path))
    proc = ImageProcessor.from_pretrained(str(tmp_path))
    images = _images()
    got = proc(images)
    ref = hf(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert got.dtype == np.float32 and got.shape == ref.shape and got.shape[1:3] == proc.output_size
    err = float(np.abs(got - ref).max())
    print(f"{name} processor: max abs diff {err:.2e}")
    assert err < 1e-5


def test_image_processor_errors(tmp_path):
    pytest.importorskip("PIL")
    from vlmjax.data.image_processing import ImageProcessor

    with pytest.raises(ValueError, match="image_processor_type='Siglip2ImageProcessor' is not supported"):
        ImageProcessor.from_dict({"image_processor_type": "Siglip2ImageProcessor"})
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(str(tmp_path))
    proc = ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", "size": 20,
                                     "do_center_crop": False})
    with pytest.raises(ValueError, match="different shapes"):
        proc(_images()[:2])
    with pytest.raises(ValueError, match="must be uint8"):
        proc([np.zeros((8, 8, 3), np.float32)])


def test_load_pretrained_into_a_subtree_of_a_bigger_model(tmp_path):
    """tasks.load_pretrained puts a vision checkpoint at params['vision'] of a composite model."""
    import transformers
    from vlmjax import convert, tasks

    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
        image_size=16)).eval()
    hf.save_pretrained(tmp_path / "siglip")
    spec = convert.build(str(tmp_path / "siglip"))
    abstract = {"vision": jax.eval_shape(lambda: spec.module.init(jax.random.PRNGKey(0), *spec.init_args))["params"],
                "projector": {"kernel": jax.ShapeDtypeStruct((32, 8), jnp.float32)}}
    abstract = nn.meta.unbox(abstract)
    shardings = jax.tree.map(lambda _: None, abstract)
    loaded = tasks.load_pretrained([("vision", str(tmp_path / "siglip"))], abstract, shardings)
    assert set(loaded) == {"vision"}
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
    out, _ = spec.module.apply({"params": loaded["vision"]}, jnp.asarray(x))
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x).permute(0, 3, 1, 2)).pooler_output.numpy()
    assert float(np.max(np.abs(np.asarray(out["pooler_output"]) - ref))) < 1e-4
    with pytest.raises(ValueError, match="init_from path 'vison'"):
        tasks.load_pretrained([("vison", str(tmp_path / "siglip"))], abstract, shardings)
