"""LoRA adapters (Hu et al. 2021) on the decoder's projections: no-op init, adapter-only training,
dropout, merging / HF export, loading a pretrained checkpoint with the adapters skipped, config errors."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import rel_err
from flax import traverse_util

from vlmjax import convert
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import lora as lora_lib
from vlmjax.sharding import DEFAULT_RULES
from vlmjax.tasks.base import load_pretrained
from vlmjax.train import optimizer

TINY = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500.0, "max_position_embeddings": 64}
LORA = {"lora_rank": 4, "lora_alpha": 8.0}


def tiny_config(**overrides) -> decoder_lib.DecoderConfig:
    return decoder_lib.DecoderConfig.from_config({**TINY, **overrides})


@functools.cache
def forward(model: decoder_lib.Decoder):
    """Jitted logits; ``rng`` (or None) is the "dropout" stream."""

    @jax.jit
    def fn(params, tokens, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        return model.apply({"params": params}, tokens, rngs=rngs)[0]

    return fn


def init_params(model, seed=0):
    return nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))["params"]


def flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def without_lora(params):
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat(params).items() if not k.endswith(lora_lib.LORA_PARAMS)}, sep="/")


def with_random_b(params, seed=1, scale=0.2):
    """The adapters after some training: every lora_b drawn from N(0, scale^2) instead of zeros."""
    f = flat(params)
    keys = jax.random.split(jax.random.key(seed), len(f))
    return traverse_util.unflatten_dict(
        {k: (scale * jax.random.normal(r, v.shape, v.dtype) if k.endswith("lora_b") else v)
         for r, (k, v) in zip(keys, f.items())}, sep="/")


def tokens(seed=0, shape=(2, 9)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], shape), jnp.int32)


def test_fresh_adapters_are_an_exact_noop_and_only_on_targets():
    base_cfg = tiny_config(attention_bias=True, tie_word_embeddings=False)
    lora_cfg = dataclasses.replace(base_cfg, **LORA)
    params = init_params(decoder_lib.Decoder(lora_cfg))
    ref = forward(decoder_lib.Decoder(base_cfg))(without_lora(params), tokens())
    out = forward(decoder_lib.Decoder(lora_cfg))(params, tokens())
    np.testing.assert_array_equal(out, ref)   # B = 0: bit-identical logits

    f = flat(params)
    adapters = sorted(k for k in f if k.endswith(lora_lib.LORA_PARAMS))
    assert len(adapters) == 2 * 7 * lora_cfg.num_hidden_layers   # A and B on all 7 projections
    assert not any("lm_head" in k or "embed" in k for k in adapters)
    assert f["layers_0/self_attn/q_proj/lora_a"].shape == (32, 4)        # [D, r]
    assert f["layers_0/self_attn/q_proj/lora_b"].shape == (4, 4, 8)      # [r, H, Dh]
    assert f["layers_0/self_attn/o_proj/lora_a"].shape == (4, 8, 4)      # [H, Dh, r]
    assert f["layers_0/self_attn/o_proj/lora_b"].shape == (4, 32)        # [r, D]
    assert all(not np.any(f[k]) for k in adapters if k.endswith("lora_b"))
    # peft's kaiming_uniform(a=sqrt(5)) on A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    a = np.asarray(f["layers_0/mlp/down_proj/lora_a"])
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(48)

    # Logical axes: the kernel's in axes + None (rank), None + the kernel's out axes.
    boxed = jax.eval_shape(decoder_lib.Decoder(lora_cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    specs = flat(nn.get_partition_spec(boxed)["params"])
    assert specs["layers_0/self_attn/q_proj/lora_a"] == jax.sharding.PartitionSpec("embed", None)
    assert specs["layers_0/self_attn/q_proj/lora_b"] == jax.sharding.PartitionSpec(None, "q_heads", "head_dim")
    assert specs["layers_0/mlp/down_proj/lora_b"] == jax.sharding.PartitionSpec(None, "embed")

    only_qv = init_params(decoder_lib.Decoder(dataclasses.replace(lora_cfg, lora_targets=("q_proj", "v_proj"))))
    assert sorted({k.split("/")[-2] for k in flat(only_qv) if "lora_" in k}) == ["q_proj", "v_proj"]


def test_one_step_with_trainable_lora_moves_only_the_adapters():
    cfg = tiny_config(**LORA)
    model = decoder_lib.Decoder(cfg)
    params = init_params(model)
    x, y = tokens(0), tokens(1)

    @jax.jit
    def loss_fn(p):
        logits = model.apply({"params": p}, x)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    ocfg = optimizer.default_config()
    # No weight decay here: AdamW would shrink A on step 1 even with a zero gradient.
    ocfg.update({"trainable": ("lora_",), "lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                 "weight_decay": 0.0})
    tx, _ = optimizer.make_optimizer(ocfg, params, total_steps=10)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    p1, state = step(params, state)
    p2, state = step(p1, state)
    f0, f1, f2 = flat(params), flat(p1), flat(p2)
    for k in f0:
        if k.endswith("lora_b"):
            assert np.all(np.any(np.asarray(f1[k]) != 0, axis=0)), f"{k} did not move on step 1"
        elif k.endswith("lora_a"):
            # dL/dA is proportional to B = 0 on step 1, so A moves only from step 2.
            np.testing.assert_array_equal(f1[k], f0[k], err_msg=k)
            assert not np.array_equal(f2[k], f0[k]), f"{k} did not move on step 2"
        else:
            np.testing.assert_array_equal(f2[k], f0[k], err_msg=f"frozen {k} changed")
    assert float(loss_fn(p2)) < float(loss_fn(params))

    labels = flat(optimizer.param_labels(params, ocfg))
    assert {k for k, v in labels.items() if v != optimizer.FROZEN} == {k for k in f0 if "lora_" in k}


def test_dropout_only_with_a_dropout_rng():
    cfg = tiny_config(**LORA, lora_dropout=0.5)
    model = decoder_lib.Decoder(cfg)
    fresh = init_params(model)
    fn, x, key = forward(model), tokens(), jax.random.key(7)
    # Dropout acts on the adapter input only: fresh adapters stay a no-op even with an rng.
    np.testing.assert_array_equal(fn(fresh, x, key), fn(fresh, x))
    params = with_random_b(fresh)
    det = fn(params, x)
    np.testing.assert_array_equal(fn(params, x), det)                 # no rng: deterministic
    dropped = fn(params, x, key)
    assert not np.allclose(dropped, det, atol=1e-4)
    np.testing.assert_array_equal(fn(params, x, key), dropped)         # same rng, same mask
    assert not np.allclose(fn(params, x, jax.random.key(8)), dropped, atol=1e-4)


def test_merge_lora_gives_the_dense_model():
    cfg = tiny_config(**LORA, lora_targets=("q_proj", "o_proj", "up_proj", "down_proj"))
    params = with_random_b(init_params(decoder_lib.Decoder(cfg)))
    out = forward(decoder_lib.Decoder(cfg))(params, tokens())
    merged = lora_lib.merge_lora(params, cfg.lora_alpha)
    assert not lora_lib.has_lora(merged) and lora_lib.has_lora(params)
    dense = decoder_lib.Decoder(dataclasses.replace(cfg, lora_rank=0))
    assert jax.tree.structure(merged) == jax.tree.structure(init_params(dense))
    ref = forward(dense)(merged, tokens())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert not np.allclose(ref, forward(dense)(without_lora(params), tokens()), atol=1e-3)  # B matters
    with pytest.raises(ValueError, match="lora_alpha"):
        lora_lib.merge_lora(params, 0.0)


# ----------------------------------------------------------------------------- HF checkpoints

def _qwen2_checkpoint(tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**{**TINY, "rope_theta": 10000.0}, tie_word_embeddings=False)).eval()
    with torch.no_grad():   # larger than the 0.02 init, so logits are far from zero
        for p in hf.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0)
    path = str(tmp_path / "qwen2")
    hf.save_pretrained(path)
    return hf, path


def _torch_logits(hf, x):
    import torch
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(x))).logits.numpy()


def test_load_pretrained_skips_adapters_and_save_hf_merges_them(tmp_path):
    hf, path = _qwen2_checkpoint(tmp_path)
    x = tokens(3, (2, 11))
    ref = _torch_logits(hf, x)

    cfg = dataclasses.replace(convert.build(path).module.config, **LORA, lora_dropout=0.1)
    model = decoder_lib.Decoder(cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    abstract = nn.meta.unbox(boxed)["params"]
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, DEFAULT_RULES)["params"]

    loaded = load_pretrained([("", path)], abstract, shardings, skip=("lora_",))
    assert not lora_lib.has_lora(loaded)
    assert set(flat(loaded)) == {k for k in flat(abstract) if "lora_" not in k}
    # What the trainer does: the partial tree overrides the random init; adapters keep theirs (B = 0).
    params = traverse_util.unflatten_dict({**flat(init_params(model)), **flat(loaded)}, sep="/")
    err = rel_err(forward(model)(params, x), ref)
    print(f"qwen2 + fresh LoRA vs transformers: fp32 max rel err {err:.2e}")
    assert err < 1e-4

    # A subtree path: skip regexes see the full path, as config.optim.frozen does.
    nested = load_pretrained([("decoder", path)], {"decoder": abstract}, None, skip=(r"^decoder/.*/lora_[ab]$",))
    assert set(flat(nested)) == {"decoder/" + k for k in flat(loaded)}

    with pytest.raises(ValueError) as e:
        load_pretrained([("", path)], abstract, shardings)
    msg = str(e.value)
    assert "model params with no tensor (14)" in msg and "layers_0/mlp/down_proj/lora_a" in msg
    assert "skip=" in msg

    # save_hf merges the (trained) adapters: transformers reproduces the LoRA model's logits.
    tuned = with_random_b(params)
    out = forward(model)(tuned, x)
    export = str(tmp_path / "export")
    convert.save_hf(model, tuned, export)
    back = type(hf).from_pretrained(export).eval()
    err = rel_err(_torch_logits(back, x), out)
    print(f"merged LoRA export vs vlmjax LoRA model: fp32 max rel err {err:.2e}")
    assert err < 1e-4
    assert not np.allclose(out, ref, atol=1e-2 * np.abs(ref).max())   # the adapters did change it


# ----------------------------------------------------------------------------- config errors

def test_config_validation_names_the_field():
    cd = decoder_lib.default_config()
    cd.update({**TINY, "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": ("q_proj", "v_proj")})
    cfg = decoder_lib.DecoderConfig.from_config(cd)
    assert cfg.lora_targets == ("q_proj", "v_proj") and hash(cfg) == hash(dataclasses.replace(cfg))
    assert tiny_config(**LORA, lora_targets=["k_proj"]).lora_targets == ("k_proj",)  # JSON lists -> tuple
    with pytest.raises(ValueError, match="lora_alpha"):
        tiny_config(lora_rank=4)
    with pytest.raises(ValueError, match=r"lora_targets .*'qkv_proj'.*valid names: \['q_proj'"):
        tiny_config(**LORA, lora_targets=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match="lora_rank"):
        tiny_config(lora_rank=-1, lora_alpha=1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        tiny_config(**LORA, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_targets"):
        tiny_config(**LORA, lora_targets=())
    with pytest.raises(ValueError, match="did you mean 'lora_rank'"):
        tiny_config(lora_rnak=4)

    params = init_params(decoder_lib.Decoder(tiny_config()))
    ocfg = optimizer.default_config()
    ocfg.trainable = ("lora_",)
    with pytest.raises(ValueError, match=r"config.optim.trainable: 'lora_' matches no parameter.*lora_rank > 0"):
        optimizer.param_labels(params, ocfg)
    ocfg = ml_collections.ConfigDict({**ocfg.to_dict(), "trainable": "lora_"})  # a str, not a tuple
    with pytest.raises(TypeError, match=r"config.optim.trainable='lora_' must be a tuple"):
        optimizer.param_labels(params, ocfg)
    ocfg = optimizer.default_config()
    ocfg.trainable = ("(",)
    with pytest.raises(ValueError, match="config.optim.trainable: '\\(' is not a valid regular expression"):
        optimizer.param_labels(params, ocfg)
