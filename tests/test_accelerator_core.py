"""The accelerator-ready core: attention backends, scanned layers, remat policies.

- every backend that runs on CPU equals the einsum reference (GQA, causal by position, padding,
  arbitrary masks, bf16); the cuDNN padding wrapper is exact (checked through the xla backend);
- 'auto' picks per platform and falls back with a log line; an explicit backend that cannot run
  the call is one clear error;
- splash attention compiles for a TPU topology on this CPU host (needs libtpu, the ``.[tpu]`` extra);
- ``scan_layers`` models equal the looped ones (outputs, gradients, KV-cache decoding) and HF
  checkpoints load into / save from the stacked params;
- every remat policy gives the gradients of no remat.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from vlmjax import convert
from vlmjax import tree as tree_lib
from vlmjax.models import attention as A
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import generate as generate_lib
from vlmjax.models import layers
from vlmjax.models import vit as vit_lib

# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


def _qkv(b=2, t=7, s=7, h=6, k=2, d=8, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda *shape: jnp.asarray(r.normal(size=shape) * 2.0, dtype)
    return mk(b, t, h, d), mk(b, s, k, d), mk(b, s, k, d)


def _structure(b=2, t=7, left_pad=(0, 3)):
    """Left-padded rows: positions count real tokens from 0, padding keys invalid."""
    valid = np.ones((b, t), bool)
    pos = np.zeros((b, t), np.int32)
    for i, p in enumerate(left_pad):
        valid[i, :p] = False
        pos[i, p:] = np.arange(t - p)
    return jnp.asarray(pos), jnp.asarray(valid)


@pytest.mark.parametrize("case", ["bidirectional", "causal_padding", "mask", "gqa_cross"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_backends_equal_the_einsum_reference(case, dtype):
    t, s = (3, 9) if case == "gqa_cross" else (7, 7)
    q, k, v = _qkv(t=t, s=s, dtype=dtype)
    kw = {}
    if case == "causal_padding":
        pos, valid = _structure()
        kw = dict(q_positions=pos, kv_positions=pos, kv_valid=valid)
    elif case == "mask":
        kw = dict(mask=jnp.asarray(np.random.default_rng(3).random((2, t, s)) > 0.4))
    elif case == "gqa_cross":  # decode-like: 3 new queries at positions 6..8 over a 9-slot cache
        qp = jnp.broadcast_to(jnp.arange(6, 9)[None], (2, 3))
        kp = jnp.broadcast_to(jnp.arange(9)[None], (2, 9))
        kw = dict(q_positions=qp, kv_positions=kp, kv_valid=jnp.asarray([[True] * 9, [False] * 2 + [True] * 7]))
    mask = A.dense_mask(2, t, s, q_positions=kw.get("q_positions"), kv_positions=kw.get("kv_positions"),
                        kv_valid=kw.get("kv_valid"), mask=kw.get("mask"))
    ref = A.reference_attention(q, k, v, mask, dtype)  # the grouped-einsum path of before
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for impl in ("xla", "einsum"):
        out = A.attend(q, k, v, dtype=dtype, implementation=impl, **kw)
        assert out.shape == q.shape and out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol,
                                   err_msg=impl)
    # 'auto' on this CPU host is the folded einsum.
    np.testing.assert_array_equal(np.asarray(A.attend(q, k, v, dtype=dtype, implementation="auto", **kw)),
                                  np.asarray(A.attend(q, k, v, dtype=dtype, implementation="einsum", **kw)))


@pytest.mark.parametrize("case", ["bidirectional", "causal_padding", "gqa_cross"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_backend_gradients_equal_autodiff_of_the_reference(case, dtype):
    """The einsum backend has a hand-written backward (normalised after the value matmul); its
    q/k/v gradients must equal autodiff through the reference softmax, masks and GQA included,
    under jit and under vmap."""
    t, s = (3, 9) if case == "gqa_cross" else (7, 7)
    q, k, v = _qkv(t=t, s=s, dtype=dtype, seed=1)
    mask = None
    if case == "causal_padding":
        pos, valid = _structure()
        mask = A.dense_mask(2, t, s, q_positions=pos, kv_positions=pos, kv_valid=valid)
    elif case == "gqa_cross":
        mask = jnp.asarray(np.random.default_rng(5).random((2, t, s)) > 0.3)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, dtype).astype(jnp.float32) * weights)

    want = jax.grad(loss(A.reference_attention), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(A._einsum), argnums=(0, 1, 2)))(q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == dtype, name
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32) / scale, np.asarray(w, np.float32) / scale,
                                   atol=tol, rtol=tol, err_msg=name)
    # Batched over a leading axis (reuse and the routers vmap attention-bearing code).
    per_example = jax.vmap(lambda q, k, v: A._einsum(q[None], k[None], v[None], None, dtype)[0])(q, k, v)
    np.testing.assert_allclose(np.asarray(per_example, np.float32),
                               np.asarray(A._einsum(q, k, v, None, dtype), np.float32), atol=tol, rtol=tol)



def test_reference_matches_a_dense_numpy_softmax_and_empty_rows_stay_finite():
    q, k, v = _qkv(b=1, t=4, s=4, h=2, k=1, d=4)
    mask = jnp.asarray([[[False] * 4, [True, True, False, False], [True] * 3 + [False], [True] * 4]])
    out = np.asarray(A.attend(q, k, v, dtype=jnp.float32, implementation="xla", mask=mask))
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    for h in range(2):
        logits = qn[0, :, h] @ kn[0, :, 0].T / 2.0
        logits = np.where(np.asarray(mask[0]), logits, -np.inf)
        for t in range(1, 4):  # row 0 sees nothing: uniform over all keys, finite
            p = np.exp(logits[t] - logits[t].max())
            np.testing.assert_allclose(out[0, t, h], (p / p.sum()) @ vn[0, :, 0], rtol=1e-5, atol=1e-5)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 0, 0], vn[0, :, 0].mean(0), rtol=1e-5)


@pytest.mark.parametrize("t", [5, 64, 197])
def test_padding_wrapper_is_exact(t):
    """cuDNN pads T to a multiple of 64 inside attend; the wrapper (run with xla) changes nothing
    beyond fp32 summation order (the padded keys get probability exactly 0)."""
    q, k, v = _qkv(b=1, t=t, s=t, h=4, k=4, d=8)
    pos, valid = _structure(b=1, t=t, left_pad=(2,))
    mask = A.dense_mask(1, t, t, q_positions=pos, kv_positions=pos, kv_valid=valid)
    xla = lambda q, k, v, m, d: A._xla(q, k, v, m, d, "xla")
    np.testing.assert_allclose(A._padded(xla, q, k, v, mask, jnp.float32, A.CUDNN_MULTIPLE),
                               xla(q, k, v, mask, jnp.float32), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(A._padded(xla, q, k, v, None, jnp.float32, A.CUDNN_MULTIPLE),
                               xla(q, k, v, None, jnp.float32), atol=1e-5, rtol=1e-5)


def test_auto_falls_back_with_one_log_line_and_explicit_backends_fail_clearly(caplog):
    q, k, v = _qkv(t=1, s=7)
    assert A.resolve("auto", q=q, k=k, mask=None, dtype=jnp.float32, platform="cpu") == "einsum"
    with caplog.at_level(logging.WARNING, logger="vlmjax"):
        assert A.resolve("auto", q=q, k=k, mask=None, dtype=jnp.float32, platform="tpu") == "xla"
    assert "splash cannot run this call" in caplog.text and "using xla" in caplog.text
    q2, k2, _ = _qkv(t=7, s=7)
    assert A.resolve("auto", q=q2, k=k2, mask=None, dtype=jnp.bfloat16, platform="tpu") == "splash"
    assert A.resolve("auto", q=q2, k=k2, mask=None, dtype=jnp.bfloat16, platform="gpu") == "cudnn"
    assert A.resolve("auto", q=q2, k=k2, mask=None, dtype=jnp.float32, platform="gpu") == "xla"  # fp32
    with pytest.raises(ValueError, match="cuDNN needs an NVIDIA GPU"):
        A.attend(q2, k2, k2, dtype=jnp.bfloat16, implementation="cudnn")
    with pytest.raises(ValueError, match="not an attention backend"):
        decoder_lib.DecoderConfig(vocab_size=8, attention_impl="flash").validate()


TPU_REASON = A.tpu_topology_available("v5e:2x2")


@pytest.mark.skipif(TPU_REASON is not None, reason=f"libtpu cannot describe a TPU topology here "
                    f"(install the extra: pip install -e '.[tpu]'): {TPU_REASON}")
def test_splash_attention_compiles_for_a_tpu_pod_slice_on_this_host():
    """A sharded decoder train step with attention_impl='splash' compiles for 4 v5e chips; the
    compiled program holds the Pallas kernel (a TPU custom call), forward and backward."""
    from jax.experimental import topologies

    from vlmjax import sharding as shd

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    mesh = jax.sharding.Mesh(np.asarray(topo.devices).reshape(2, 1, 2), shd.MESH_AXES)
    cfg = decoder_lib.DecoderConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                    dtype="bfloat16", attention_impl="splash", scan_layers=True)
    model = decoder_lib.Decoder(cfg)
    tokens = jax.ShapeDtypeStruct((4, 200), jnp.int32)  # T=200 is padded to 256 inside
    mask = jax.ShapeDtypeStruct((4, 200), jnp.int32)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the platform attention compiles for
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((4, 200), jnp.int32)))
    shardings = shd.logical_to_shardings(boxed, mesh, shd.DEFAULT_RULES)["params"]
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed)["params"], shardings)
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    def loss(params, tokens, mask):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
            logits, _ = model.apply({"params": params}, tokens, attention_mask=mask)
        return jnp.mean(logits.astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss), in_shardings=(shardings, batch_sh, batch_sh))
    compiled = step.lower(params, tokens, mask).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 3, "splash forward + backward kernels expected"
    assert compiled.memory_analysis() is not None


# ------------------------------------------------------------------------------------------------
# Scanned layers
# ------------------------------------------------------------------------------------------------

DEC = decoder_lib.DecoderConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                num_attention_heads=6, num_key_value_heads=2, qk_norm=True, attention_bias=True)
VIT = vit_lib.ViTConfig(variant="dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, patch_size=4, image_size=16, layer_norm_eps=1e-6,
                        hidden_act="gelu", num_register_tokens=2)


def _stack(params):
    return tree_lib.stack_layers(params, jnp.stack)


def _assert_trees_close(got, want, rtol=1e-4, atol=1e-6):
    got, want = tree_lib.flatten(got), tree_lib.flatten(want)
    assert set(got) == set(want)
    for path, a in want.items():
        np.testing.assert_allclose(got[path], a, rtol=rtol, atol=atol, err_msg=path)


@pytest.fixture(scope="module")
def decoders():
    looped, scanned = decoder_lib.Decoder(DEC), decoder_lib.Decoder(dataclasses.replace(DEC, scan_layers=True))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 9)))
    params = nn.meta.unbox(looped.init(jax.random.key(0), tokens))["params"]
    return looped, scanned, params, tokens


def test_scanned_decoder_equals_looped_outputs_and_gradients(decoders):
    looped, scanned, params, tokens = decoders
    stacked = _stack(params)
    assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 48, 6, 8)
    assert not any(k.startswith("layers_") for k in stacked)
    # The scanned model's own init has exactly this layout, boxed with the "layers" logical axis.
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), tokens))["params"]
    assert jax.tree.map(lambda x: x.shape, nn.meta.unbox(boxed)) == jax.tree.map(jnp.shape, stacked)
    assert boxed["layers"]["mlp"]["up_proj"]["kernel"].names == ("layers", "embed", "mlp")
    mask = jnp.asarray([[1] * 9, [0, 0] + [1] * 7])

    def loss(model, p):
        logits, _ = model.apply({"params": p}, tokens, attention_mask=mask)
        return jnp.mean(logits**2), logits

    (l_a, logits_a), g_a = jax.value_and_grad(lambda p: loss(looped, p), has_aux=True)(params)
    (l_b, logits_b), g_b = jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True)(stacked)
    np.testing.assert_allclose(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    _assert_trees_close(g_b, _stack(g_a))
    # Round trip of the layouts.
    back = tree_lib.unstack_layers(stacked)
    for path, a in tree_lib.flatten(params).items():
        np.testing.assert_array_equal(tree_lib.flatten(back)[path], a)


def test_scanned_decoder_generates_like_the_looped_one(decoders):
    looped, scanned, params, tokens = decoders
    prompt = tokens[:, :5]
    kw = dict(max_new_tokens=6, rng=jax.random.key(0), temperature=0.0)
    a = generate_lib.generate(looped, params, prompt, **kw)
    b = generate_lib.generate(scanned, _stack(params), prompt, **kw)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_scanned_vit_equals_looped_with_stochastic_depth():
    cfg = dataclasses.replace(VIT, drop_path_rate=0.2)
    looped, scanned = vit_lib.VisionTransformer(cfg), vit_lib.VisionTransformer(dataclasses.replace(cfg, scan_layers=True))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    params = nn.meta.unbox(looped.init(jax.random.key(0), x))["params"]
    stacked = _stack(params)
    out_a, _ = looped.apply({"params": params}, x)
    out_b, _ = scanned.apply({"params": stacked}, x)
    for name in out_a:
        np.testing.assert_allclose(out_b[name], out_a[name], rtol=1e-5, atol=1e-5, err_msg=name)

    def loss(model, p):
        out, _ = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(out["pooler_output"] ** 2)

    # Training mode runs (per-layer dropout rngs are split by the scan, so draws differ from the loop).
    g = jax.grad(lambda p: loss(scanned, p))(stacked)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(g))
    g_det = jax.grad(lambda p: jnp.mean(scanned.apply({"params": p}, x)[0]["pooler_output"] ** 2))(stacked)
    g_ref = jax.grad(lambda p: jnp.mean(looped.apply({"params": p}, x)[0]["pooler_output"] ** 2))(params)
    _assert_trees_close(g_det, _stack(g_ref))


def test_hf_checkpoints_load_into_and_save_from_stacked_params(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2,
                                      max_position_embeddings=64)).eval()
    path = str(tmp_path / "llama")
    hf.save_pretrained(path)
    spec = convert.build(path)
    model = decoder_lib.Decoder(dataclasses.replace(spec.module.config, scan_layers=True))
    abstract = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *spec.init_args))["params"])
    params = convert.load_params(path, spec, abstract)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (3, 48, 2, 8)
    tokens = np.random.default_rng(1).integers(0, 96, (2, 11))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    out = str(tmp_path / "export")
    convert.save_hf(model, params, out)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # A CLIP vision tower too.
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, patch_size=8, image_size=32)).eval()
    vpath = str(tmp_path / "clip")
    vision.save_pretrained(vpath)
    vspec = convert.build(vpath)
    vmodel = vit_lib.VisionTransformer(dataclasses.replace(vspec.module.config, scan_layers=True))
    vabs = nn.meta.unbox(jax.eval_shape(lambda: vmodel.init(jax.random.key(0), *vspec.init_args))["params"])
    vparams = convert.load_params(vpath, vspec, vabs)
    pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        vref = vision(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
    np.testing.assert_allclose(vmodel.apply({"params": vparams}, jnp.asarray(pixels))[0]["pooler_output"], vref,
                               rtol=1e-4, atol=1e-4)


# DTF (decision + routed layers, decoding) runs in the default suite; MoD and TDTF under -m slow.
ROUTED = [pytest.param("mod", dict(mod_causal="predictor"), marks=pytest.mark.slow), ("dtf", {}),
          pytest.param("tdtf", dict(beta="scheduled"), marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind,kw", ROUTED)
def test_scanned_routed_decoder_equals_looped(kind, kw):
    """nn.scan over (dense, routed) groups: same logits, router losses and telemetry, same gradients,
    same router-state update, in top-k training and causal inference; KV-cache decoding too."""
    from vlmjax.models import routed_decoder
    from vlmjax.models import routing

    cfg = dataclasses.replace(DEC, num_hidden_layers=4, qk_norm=False)
    rc = routing.RoutingConfig(kind=kind, capacity=0.5, **kw)
    looped = routed_decoder.RoutedDecoder(cfg, routing=rc)
    scanned = routed_decoder.RoutedDecoder(dataclasses.replace(cfg, scan_layers=True), routing=rc)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)))
    v = nn.meta.unbox(looped.init(jax.random.key(0), tokens))
    group = lambda tree: tree_lib.group_layers(tree, rc.every, jnp.stack)
    vs = {c: group(t) for c, t in v.items()}
    assert vs["params"]["groups"]["layers_1"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    assert set(vs["params"]["groups"]) == {"layers_0", "layers_1", "routers_1"}
    # The scanned model's own init has this layout.
    shapes = jax.eval_shape(lambda: nn.meta.unbox(scanned.init(jax.random.key(0), tokens)))
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(jnp.shape, vs)

    def run(model, variables, mode):
        def loss(p):
            (logits, aux), st = model.apply({**variables, "params": p}, tokens, mode=mode, progress=0.3,
                                            mutable=["router_state"])
            return jnp.mean(logits**2) + aux["router_loss"], (logits, aux, st)
        if mode == "causal":  # inference: forward only
            return (None, loss(variables["params"])[1]), None
        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    for mode in ("topk", "causal"):
        (_, (logits_a, aux_a, st_a)), g_a = jax.jit(lambda v: run(looped, v, mode))(v)
        (_, (logits_b, aux_b, st_b)), g_b = jax.jit(lambda v: run(scanned, v, mode))(vs)
        np.testing.assert_allclose(logits_b, logits_a, rtol=2e-5, atol=2e-5, err_msg=mode)
        assert set(aux_b) == set(aux_a)
        for name in aux_a:
            np.testing.assert_allclose(aux_b[name], aux_a[name], rtol=2e-5, atol=1e-6, err_msg=f"{mode} {name}")
        if g_a is not None:
            _assert_trees_close(g_b, group(g_a), rtol=2e-4, atol=1e-6)
        _assert_trees_close(st_b["router_state"], group(st_a["router_state"]), rtol=1e-5)
    if kind != "dtf":
        return
    # Decoding with the KV cache (stacked per group) in chunks gives the causal forward.
    whole = np.asarray(jax.jit(lambda v: scanned.apply(v, tokens, mode="causal")[0])(vs))
    step = jax.jit(lambda v, c, t: scanned.apply({**v, "cache": c}, t, decode=True, mutable=["cache"]))
    cache = decoder_lib.init_cache(scanned, 2, 12)
    outs = []
    for lo, hi in [(0, 6), (6, 12)]:
        (lg, _), st = step(vs, cache, tokens[:, lo:hi])
        cache = st["cache"]
        outs.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(outs, 1), whole, rtol=3e-5, atol=3e-5)


def test_models_that_need_looped_layers_say_so():
    from vlmjax.models import reuse as reuse_lib
    from vlmjax.models import routed_decoder
    from vlmjax.models import routing

    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="not a multiple of it"):
        routed_decoder.RoutedDecoder(dataclasses.replace(DEC, num_hidden_layers=3, scan_layers=True),
                                     routing=routing.RoutingConfig()).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="scan_layers=False"):
        reuse_lib.ReuseViT(dataclasses.replace(VIT, scan_layers=True)).init(
            jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


# ------------------------------------------------------------------------------------------------
# Remat policies
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_every_remat_policy_gives_the_gradients_of_no_remat(scan, decoders):
    _, _, params, tokens = decoders
    params = _stack(params) if scan else params

    def grads(policy):
        model = decoder_lib.Decoder(dataclasses.replace(DEC, remat=policy, scan_layers=scan))
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)
        return jax.jit(jax.grad(loss))(params)

    base = tree_lib.flatten(grads("none"))
    for policy in layers.REMAT_POLICIES[1:]:
        for path, g in tree_lib.flatten(grads(policy)).items():
            np.testing.assert_allclose(g, base[path], rtol=1e-5, atol=1e-7, err_msg=f"{policy}: {path}")


def test_remat_policies_change_what_the_backward_pass_keeps():
    """The policies are not all the same program: 'full' keeps less than 'none' (saved residuals)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    params = nn.meta.unbox(vit_lib.VisionTransformer(VIT).init(jax.random.key(0), x))["params"]

    def residual_bytes(policy):
        model = vit_lib.VisionTransformer(dataclasses.replace(VIT, remat=policy))
        f = lambda p: jnp.mean(model.apply({"params": p}, x)[0]["pooler_output"] ** 2)
        _, vjp = jax.vjp(f, params)
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp)
                   if hasattr(leaf, "dtype"))

    sizes = {p: residual_bytes(p) for p in ("none", "full", "dots_saveable", "save_attention_out")}
    assert sizes["full"] < sizes["save_attention_out"] < sizes["none"], sizes
    assert sizes["full"] < sizes["dots_saveable"] <= sizes["none"], sizes
    with pytest.raises(ValueError, match="not a remat policy"):
        vit_lib.ViTConfig(variant="clip", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=2, patch_size=4, image_size=8, remat="sometimes")
    assert vit_lib.ViTConfig(variant="clip", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2, patch_size=4, image_size=8, remat=True).remat == "full"
