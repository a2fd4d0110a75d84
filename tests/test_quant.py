"""NF4 (QLoRA) 4-bit frozen bases: codes equal qwix's argmin, nibble packing, the per-block error
bound with and without double quantisation, 4-bit layers / decoders equal their fp twins holding
the dequantised weights (loop and scan_layers), quantize_params, memory, LoRA gradients, decoding."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from qwix._src.core import numerics as qwix_numerics

from vlmjax import tree as tree_lib
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import layers
from vlmjax.models import quant as quant_lib
from vlmjax.models.generate import generate
from vlmjax.models.lora import LoraConfig

NF4 = quant_lib.QuantConfig()  # block 64, double quantisation
NF4_PLAIN = quant_lib.QuantConfig(double_quant=False)
# A small Llama: head_dim 64 so the default block size 64 applies to every projection.
SMALL = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 500.0,
         "max_position_embeddings": 64}


def small_config(**overrides) -> decoder_lib.DecoderConfig:
    return decoder_lib.DecoderConfig.from_config({**SMALL, **overrides})


# Jitted once per (config, axis): eager op-by-op dispatch is most of the time on 2 CPU cores.
quantize = jax.jit(quant_lib.quantize, static_argnums=(1, 2))
dequantize = jax.jit(quant_lib.dequantize, static_argnums=(1, 2))


def init(module, *args, seed=0):
    # rbg keys: XLA compiles their random bits far faster than threefry's (most of an init's time).
    return jax.jit(module.init)(jax.random.key(seed, impl="rbg"), *args)


def apply(module, variables, *args, **kwargs):
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def max_half_gap() -> float:
    """h = max over adjacent NF4 levels of half their gap ((1 - 0.7230) / 2 = 0.1385)."""
    levels = np.asarray(quant_lib.nf4_levels(), np.float64)
    return float(np.max(np.diff(levels)) / 2)


def tokens(shape=(2, 7), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, SMALL["vocab_size"], shape), jnp.int32)


# ------------------------------------------------------------------------------------------------
# One tensor
# ------------------------------------------------------------------------------------------------


def test_nf4_codes_equal_qwix_argmin_including_midpoints():
    levels = np.asarray(quant_lib.nf4_levels())
    mids = (levels[:-1] + levels[1:]) / np.float32(2)
    # Values at and one ulp around every midpoint (where a rounding slip would show), the levels,
    # the ends, and random values.
    edge = np.concatenate([mids, np.nextafter(mids, -2), np.nextafter(mids, 2), levels, [-1.0, 1.0, 0.0]])
    x = np.concatenate([edge, np.random.default_rng(0).uniform(-1, 1, 20000)]).astype(np.float32)
    ours = np.asarray(jax.jit(quant_lib.nf4_codes)(jnp.asarray(x)))
    ref = np.asarray(jax.jit(qwix_numerics.fp_to_nf4)(jnp.asarray(x))).astype(np.uint8)
    np.testing.assert_array_equal(ours, ref)


def test_quantize_equals_qwix_blockwise_nf4():
    w = jax.random.normal(jax.random.key(0), (128, 3, 8))
    q = quantize(w, NF4_PLAIN, 0)
    ref = jax.jit(lambda w: qwix.quantize(w, "nf4", tiled_axes={0: 64}, channelwise_axes=(1, 2)))(w)
    assert q[quant_lib.SCALES].shape == (2, 3, 8) == ref.scale.shape  # one scale per block per column
    np.testing.assert_array_equal(quant_lib.unpack_nibbles(q[quant_lib.CODES], 0), ref.qvalue.astype(jnp.uint8))
    np.testing.assert_array_equal(q[quant_lib.SCALES], ref.scale)
    np.testing.assert_array_equal(dequantize(q, NF4_PLAIN, 0), jax.jit(qwix.dequantize)(ref))


@pytest.mark.parametrize("axis", [0, -1])
def test_pack_unpack_round_trip(axis):
    codes = jnp.asarray(np.random.default_rng(1).integers(0, 16, (4, 6, 8)), jnp.uint8)
    packed = jax.jit(quant_lib.pack_nibbles, static_argnums=1)(codes, axis)
    shape = list(codes.shape)
    shape[axis] //= 2
    assert packed.dtype == jnp.uint8 and packed.shape == tuple(shape)
    np.testing.assert_array_equal(jax.jit(quant_lib.unpack_nibbles, static_argnums=1)(packed, axis), codes)
    # Element 2i in the low nibble, 2i + 1 in the high one.
    np.testing.assert_array_equal(quant_lib.pack_nibbles(jnp.asarray([3, 10], jnp.uint8), 0), [3 | (10 << 4)])


@pytest.mark.parametrize("config", [NF4_PLAIN, NF4], ids=["single", "double"])
def test_error_bound_per_block_is_met_and_tight(config):
    """Derivation. Block absmax s, scaled value x = w / s in [-1, 1], code q = the nearest NF4
    level: |x - q| <= h (max half-gap between adjacent levels). Without double quantisation
    w' = s q, so |w - w'| = s |x - q| <= s h. With it, w' = s' q where s' = c d + m is the scale
    back from int8 (c the code, d = absmax(s - m over its block of 256) / 127.5 the step, m the
    mean): |s - s'| <= d / 2, so |w - w'| <= |w - s q| + |q| |s - s'| <= s h + d / 2."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(512, 96)).astype(np.float32)
    w[rng.integers(0, 512, 40), rng.integers(0, 96, 40)] *= 8.0  # outliers: blocks of varied absmax
    q = quantize(jnp.asarray(w), config, 0)
    w_back = np.asarray(dequantize(q, config, 0))
    assert q[quant_lib.CODES].shape == (256, 96) and q[quant_lib.CODES].dtype == jnp.uint8
    s = np.abs(w).reshape(8, 64, 96).max(axis=1)  # [blocks, 96] true absmax per block
    bound = s * max_half_gap()
    if config.double_quant:
        assert q[quant_lib.SCALES].dtype == jnp.int8 and q[quant_lib.SCALES_SCALE].shape == (3,)  # ceil(768 / 256)
        d = np.asarray(q[quant_lib.SCALES_SCALE])[np.arange(s.size).reshape(s.shape) // 256]
        s_back = np.asarray(quant_lib._scale_values(q, config))
        assert np.all(np.abs(s - s_back) <= d / 2 * (1 + 1e-5))
        assert np.median(np.abs(s - s_back) / s) < 0.01  # 8-bit scales (outlier blocks widen the step)
        bound = bound + d / 2
    else:
        np.testing.assert_array_equal(q[quant_lib.SCALES], s)
    bound = np.repeat(bound, 64, axis=0)  # per element
    err = np.abs(w - w_back)
    assert np.all(err <= bound * (1 + 1e-5)), float(np.max(err / bound))
    # Tight: some value sits near the midpoint of the widest gap, so the bound is nearly reached.
    assert np.max(err / bound) > 0.9
    assert np.mean(err) / np.mean(np.abs(w)) < 0.1  # NF4's typical error, far below the worst case


@pytest.mark.parametrize("qtype,bound", [("int4", 7.5), ("int8", 127.5)])
def test_int_qtypes_round_trip_within_half_a_step(qtype, bound):
    config = quant_lib.QuantConfig(qtype=qtype, double_quant=False)
    w = jax.random.normal(jax.random.key(2), (64, 128))
    q = quantize(w, config, 1)
    assert q[quant_lib.CODES].shape == ((64, 64) if qtype == "int4" else (64, 128))
    step = np.abs(np.asarray(w)).reshape(64, 2, 64).max(-1) / bound  # qwix symmetric absmax
    err = np.abs(np.asarray(w) - np.asarray(dequantize(q, config, 1)))
    # (-127.5 rounds to -128: exactly half a step, up to float rounding)
    assert np.all(err <= np.repeat(step, 64, axis=1) / 2 * (1 + 1e-4))


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("o_proj", [False, True], ids=["q_proj", "o_proj"])
def test_dense_general_equals_fp_twin_with_dequantised_kernel(o_proj):
    kw = dict(dtype=jnp.bfloat16, use_bias=True, lora=LoraConfig(rank=2, alpha=4.0))
    if o_proj:  # kernel [H, Dh, D] blocked along head_dim
        kw.update(features=32, kernel_axes=("q_heads", "head_dim", "embed"), axis=(-2, -1))
        x = jax.random.normal(jax.random.key(1), (2, 3, 4, 64))
    else:  # kernel [D, H, Dh] blocked along embed
        kw.update(features=(4, 16), kernel_axes=("embed", "q_heads", "head_dim"))
        x = jax.random.normal(jax.random.key(1), (2, 3, 128))
    q_layer, fp_layer = layers.DenseGeneral(quant=NF4, **kw), layers.DenseGeneral(**kw)
    v = init(q_layer, x)
    codes = v["quant"]["kernel_codes"]
    assert isinstance(codes, nn.LogicallyPartitioned) and codes.names == kw["kernel_axes"]
    assert v["quant"]["kernel_scales"].names[1 if o_proj else 0] is None  # the scales' block axis
    v = nn.meta.unbox(v)
    assert "kernel" not in v["params"] and {"bias", "lora_a", "lora_b"} <= set(v["params"])
    params = {**v["params"], "lora_b": 0.1 * jnp.ones_like(v["params"]["lora_b"])}
    q = {k[len("kernel"):]: a for k, a in v["quant"].items()}
    kernel = dequantize(q, NF4, 1 if o_proj else 0)
    out = apply(q_layer, {"params": params, "quant": v["quant"]}, x)
    ref = apply(fp_layer, {"params": {**params, "kernel": kernel}}, x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, ref)
    # Same rng stream as the fp twin: the 4-bit init quantised exactly the fp init's kernel.
    fp_kernel = init(fp_layer, x)["params"]["kernel"].value
    assert_quant_equal(quantize(fp_kernel, NF4, 1 if o_proj else 0), q)


def test_embed_lookup_and_attend_equal_fp_twin():
    kw = dict(num_embeddings=40, features=128, dtype=jnp.bfloat16)
    q_embed = layers.Embed(quant=NF4, **kw)
    ids = jnp.asarray([[0, 39, 5, 5], [17, 2, 38, 1]], jnp.int32)
    v = nn.meta.unbox(init(q_embed, ids))
    assert "params" not in v and v["quant"]["embedding_codes"].shape == (40, 64)
    assert v["quant"]["embedding_scales"].shape == (40, 2)  # blocked along D: rows stay rows
    q = {k[len("embedding"):]: a for k, a in v["quant"].items()}
    table = dequantize(q, NF4, 1)
    rows = jax.jit(quant_lib.dequantize_rows, static_argnums=1)(q, NF4, ids)
    np.testing.assert_array_equal(rows, table[ids])
    fp_vars = {"params": {"embedding": table}}
    fp_embed = layers.Embed(**kw)
    assert_quant_equal(quantize(init(fp_embed, ids)["params"]["embedding"].value, NF4, 1), q)  # same rng
    np.testing.assert_array_equal(apply(q_embed, v, ids), apply(fp_embed, fp_vars, ids))
    x = jax.random.normal(jax.random.key(1), (2, 4, 128))
    np.testing.assert_array_equal(apply(q_embed, v, x, method="attend"), apply(fp_embed, fp_vars, x, method="attend"))


# ------------------------------------------------------------------------------------------------
# Decoder
# ------------------------------------------------------------------------------------------------


def build_decoders(fp_params=None, scan: bool = False) -> dict:
    """A random fp decoder (2 layers, untied lm_head, qkv bias, LoRA) and its 4-bit twin, with
    (params, quant) from ``quantize_params`` of the fp params (``fp_params``: given, else drawn)."""
    fp_config = small_config(scan_layers=scan, tie_word_embeddings=False, attention_bias=True,
                             lora_rank=4, lora_alpha=8.0)
    config = dataclasses.replace(fp_config, load_in_4bit=True)
    fp_model, model = decoder_lib.Decoder(fp_config), decoder_lib.Decoder(config)
    x = tokens()
    if fp_params is None:
        fp_params = nn.meta.unbox(init(fp_model, x))["params"]
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0, impl="rbg"), x))
    params, quant = quant_lib.quantize_params(fp_params, abstract, config.quant)
    fp_apply = jax.jit(lambda p, x: fp_model.apply({"params": p}, x)[0])
    q_apply = jax.jit(lambda p, q, x: model.apply({"params": p, "quant": q}, x)[0])
    return dict(config=config, fp_model=fp_model, model=model, fp_params=fp_params, params=params,
                quant=quant, abstract=abstract, scan=scan, fp_apply=fp_apply, q_apply=q_apply)


@pytest.fixture(scope="module")
def loop():
    return build_decoders()


@pytest.fixture(scope="module")
def scan(loop):
    """The scan_layers twin holding the same weights (the loop's fp params stacked; no second init)."""
    return build_decoders(tree_lib.stack_layers(loop["fp_params"], jnp.stack), scan=True)


@pytest.fixture(params=["loop", "scan"])
def decoders(request):
    return request.getfixturevalue(request.param)


def test_decoder_variables_layout(decoders):
    config, abstract = decoders["config"], decoders["abstract"]
    flat_params = tree_lib.flatten(nn.meta.unbox(abstract["params"]))
    flat_quant = tree_lib.flatten(abstract["quant"])  # still boxed: logical axis names
    assert not any(k.endswith(("/kernel", "/embedding")) for k in flat_params)
    assert {k.rsplit("/", 1)[-1] for k in flat_params} == {"scale", "bias", "lora_a", "lora_b"}
    weights = {k.rsplit("_", 1)[0] for k in flat_quant if k.endswith("_codes")}
    per_layer = {f"{m}/{p}/kernel" for m, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                 for p in (f"{n}_proj" for n in ps)}
    layer_keys = ["layers"] if decoders["scan"] else [f"layers_{i}" for i in range(config.num_hidden_layers)]
    assert weights == {"embed_tokens/embedding", "lm_head/kernel"} | {f"{l}/{w}" for l in layer_keys for w in per_layer}
    codes = flat_quant[f"{layer_keys[0]}/self_attn/q_proj/kernel_codes"]
    names = ("embed", "q_heads", "head_dim")
    assert codes.names == ((("layers",) + names) if decoders["scan"] else names)
    if decoders["scan"]:  # stacked on axis 0 like params, one double-quant offset per layer
        assert codes.value.shape == (2, 64, 2, 64)
        assert flat_quant["layers/self_attn/q_proj/kernel_scales_offset"].value.shape == (2,)


def assert_quant_equal(ours, theirs):
    ours, theirs = tree_lib.flatten(ours), tree_lib.flatten(theirs)
    assert ours.keys() == theirs.keys()
    for k, a in ours.items():
        assert a.dtype == theirs[k].dtype and a.shape == theirs[k].shape, k
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(a, theirs[k], err_msg=k)
        else:  # the mean's reduction order may differ by an ulp between two programs
            np.testing.assert_allclose(a, theirs[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_scan_quantises_each_layer_like_the_loop(loop, scan):
    """quantize_params vmaps over the stacked [L] axis: per-layer codes, scales and double-quant
    parts, the loop's stacked; and the scanned 4-bit model gives the loop's logits."""
    assert_quant_equal(scan["quant"], tree_lib.stack_layers(loop["quant"], jnp.stack))
    x = tokens(seed=6)
    np.testing.assert_allclose(scan["q_apply"](scan["params"], scan["quant"], x),
                               loop["q_apply"](loop["params"], loop["quant"], x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_quantize_params_reproduces_the_random_4bit_init(loop):
    """Same seed: the 4-bit decoder's init quantises the very weights the fp init draws."""
    init_vars = nn.meta.unbox(init(loop["model"], tokens()))
    assert_quant_equal(loop["quant"], init_vars["quant"])
    jax.tree.map(np.testing.assert_array_equal, loop["params"], init_vars["params"])


def test_4bit_decoder_equals_fp_decoder_with_dequantised_params(decoders):
    d = decoders
    params = _trained_lora(d["params"])
    x = tokens(seed=3)
    out = d["q_apply"](params, d["quant"], x)
    fp_params = quant_lib.dequantize_params(params, d["quant"], d["config"].quant)
    assert jax.tree.structure(fp_params) == jax.tree.structure(d["fp_params"])
    ref = d["fp_apply"](fp_params, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # And near the unquantised model (random N(0, 0.02^2) weights, each off by ~10% of its block's
    # absmax: a loose check of the error's size, not of quality).
    orig = d["fp_apply"](_trained_lora(d["fp_params"]), x)
    assert float(jnp.linalg.norm(out - orig) / jnp.linalg.norm(orig)) < 0.3


def _trained_lora(params):
    """The params with every lora_b nonzero (a fresh adapter is a no-op and would test nothing)."""
    flat = tree_lib.flatten(params)
    return tree_lib.unflatten({k: (0.05 * jnp.ones_like(v) if k.endswith("lora_b") else v) for k, v in flat.items()})


def test_lora_gradients_flow_and_quant_is_not_a_param(scan):
    """jax.grad over "params" of the 4-bit decoder: traced (shapes only: no compile), the gradient
    has exactly the params' structure, so nothing of "quant" is differentiated. The values are
    checked on one layer in test_lora_gradients_of_4bit_layer_equal_fp_twin."""
    d = scan

    def loss(params):
        logits = d["model"].apply({"params": params, "quant": d["quant"]}, tokens(seed=4))[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.eval_shape(jax.grad(loss), d["params"])
    assert jax.tree.structure(grads) == jax.tree.structure(d["params"])
    assert not any("_codes" in k or "_scales" in k for k in tree_lib.flatten(grads))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_lora_gradients_of_4bit_layer_equal_fp_twin():
    kw = dict(features=(2, 64), kernel_axes=("embed", "q_heads", "head_dim"), use_bias=True,
              lora=LoraConfig(rank=2, alpha=4.0))
    q_layer, fp_layer = layers.DenseGeneral(quant=NF4, **kw), layers.DenseGeneral(**kw)
    x = jax.random.normal(jax.random.key(1), (2, 3, 128))
    v = nn.meta.unbox(init(q_layer, x))
    params = {**v["params"], "lora_b": 0.1 * jnp.ones_like(v["params"]["lora_b"])}
    kernel = dequantize({k[len("kernel"):]: a for k, a in v["quant"].items()}, NF4, 0)
    loss = lambda layer, extra: jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply({**extra, "params": p}, x))))
    g = jax.jit(loss(q_layer, {"quant": v["quant"]}))(params)
    g_fp = jax.jit(lambda p: {k: a for k, a in loss(fp_layer, {})(p).items() if k != "kernel"})(
        {**params, "kernel": kernel})
    assert set(g) == {"bias", "lora_a", "lora_b"}  # no kernel: the frozen base gets no gradient
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_fp)
    assert all(float(jnp.max(jnp.abs(a))) > 0 for a in g.values())


def test_generate_with_kv_cache_on_4bit_decoder(scan):
    d = scan  # scanned: one layer to compile, the KV cache stacked like "quant"
    prompt = tokens((2, 4), seed=5)
    out = generate(d["model"], d["params"], prompt, max_new_tokens=4, rng=jax.random.key(0),
                   model_state={"quant": d["quant"]})
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[:, :4], prompt)
    # Greedy decoding through the KV cache picks what full forward passes pick (the same program
    # as test_4bit_decoder_equals_fp_decoder_with_dequantised_params checks against the fp model).
    full = d["q_apply"](d["params"], d["quant"], out[:, :-1])  # [2, 7]: the shape compiled already
    np.testing.assert_array_equal(jnp.argmax(full[:, 3:], -1), out[:, 4:])


def test_apply_without_quant_collection_says_how_to_pass_it(loop):
    with pytest.raises(ValueError, match="'quant' collection"):
        jax.eval_shape(lambda: loop["model"].apply({"params": loop["params"]}, tokens()))


def test_quantize_params_reports_missing_and_misshaped_weights(loop):
    decoders = loop
    flat = tree_lib.flatten(decoders["fp_params"])
    del flat["lm_head/kernel"]
    key = next(k for k in flat if k.endswith("q_proj/kernel"))
    flat[key] = flat[key][..., :-1]
    with pytest.raises(ValueError) as e:
        quant_lib.quantize_params(tree_lib.unflatten(flat), decoders["abstract"], decoders["config"].quant)
    assert "lm_head/kernel: missing" in str(e.value) and f"{key}: shape" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Memory and config
# ------------------------------------------------------------------------------------------------


def test_memory_table_nf4_under_0_3x_bf16():
    table = decoder_lib.memory_table(small_config())
    n = table["num_params"]
    norms = 2 * 2 * 128 + 128
    # tied embedding; per layer q, o [128, 128], k, v [128, 64], three MLP [128, 256], two norms
    assert n == 512 * 128 + 2 * (128 * (128 + 64 + 64 + 128) + 3 * 128 * 256) + norms
    assert table["fp32"] == 4 * n and table["bf16"] == 2 * n
    assert table["nf4"] == table["nf4_quant"] + table["nf4_other"]
    assert table["nf4_other"] == 2 * norms  # only the norms stay fp (bf16)
    # 4 bits + int8 scale per 64 + fp32 per 256 scales: ~4.127 bits per quantised weight.
    bits = 8 * table["nf4_quant"] / (n - norms)
    assert 4.125 < bits < 4.2
    assert table["nf4_over_bf16"] <= 0.3
    plain = decoder_lib.memory_table(small_config(quant_double=False))
    assert table["nf4"] < plain["nf4"] and plain["nf4_over_bf16"] <= 0.3  # 4.5 bits: 0.281
    fp_vocab = decoder_lib.memory_table(small_config(quant_embeddings=False))
    assert fp_vocab["nf4_other"] == table["nf4_other"] + 2 * 512 * 128


def test_config_fields_and_validation():
    cd = decoder_lib.default_config()
    assert cd.load_in_4bit is False and cd.quant_block_size == 64 and cd.quant_double and cd.quant_embeddings
    assert small_config().quant is None
    c = small_config(load_in_4bit=True, quant_double=False, quant_embeddings=False)
    assert c.quant == quant_lib.QuantConfig(qtype="nf4", block_size=64, double_quant=False)
    assert c.embedding_quant is None
    with pytest.raises(ValueError, match="quant_block_size=64 along head_dim=32"):
        small_config(load_in_4bit=True, hidden_size=64)
    with pytest.raises(ValueError, match="quant_block_size must be an even integer"):
        small_config(load_in_4bit=True, quant_block_size=2)
    with pytest.raises(ValueError, match="load_in_4bit must be True or False"):
        small_config(load_in_4bit="yes")
    with pytest.raises(ValueError, match="qtype"):
        quant_lib.QuantConfig(qtype="fp4").validate()
