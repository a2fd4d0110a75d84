"""HF Llama / SmolLM2, Qwen2 and Qwen3 checkpoints <-> vlmjax Decoder: parity, round trip, errors,
and fine-tuning from a checkpoint through the trainer (``config.model.init_from``)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from conftest import smoke_config, rel_err
from vlmjax import convert
from vlmjax import run as runner

SMALL = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
CASES = {
    "llama_tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama_untied_mha": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, num_key_value_heads=6)),
    "qwen2_bias": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3_qknorm": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=12, num_attention_heads=3,
                                                         num_key_value_heads=1, tie_word_embeddings=True)),
}


def _hf_model(name, tmp_path, **extra):
    cfg_cls, model_cls, kw = CASES[name]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**SMALL, **kw, **extra})).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so logits are far from zero
        for p in model.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0)
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers_and_round_trip(name, tmp_path):
    hf, path = _hf_model(name, tmp_path)
    tokens = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()

    model, params = convert.load_hf(path)
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
    err = rel_err(logits, ref)
    print(f"{name}: fp32 max rel err {err:.2e}")
    assert err < 1e-4

    model16, params16 = convert.load_hf(path, dtype=jnp.bfloat16)
    err16 = rel_err(model16.apply({"params": params16}, jnp.asarray(tokens))[0], ref)
    print(f"{name}: bf16 max rel err {err16:.2e}")
    assert err16 < 5e-2

    out = str(tmp_path / "export")
    convert.save_hf(model, params, out)
    back = type(hf).from_pretrained(out).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(torch.tensor(tokens)).logits.numpy(), ref)
    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_and_misshaped_tensors_are_reported_together(tmp_path):
    _, path = _hf_model("qwen2_bias", tmp_path)
    f = os.path.join(path, "model.safetensors")
    t = load_file(f)
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:, :40]
    t["model.extra_head.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        convert.load_hf(path)
    msg = str(e.value)
    assert "missing in checkpoint (1): [model.layers.1.mlp.up_proj.weight]" in msg
    assert "model.layers.0.self_attn.k_proj.weight: file (16, 40) vs model (16, 48)" in msg
    assert "unexpected in checkpoint (1): [model.extra_head.weight]" in msg


def test_pickles_are_refused_and_unknown_families_named(tmp_path):
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="never unpickles.*safetensors"):
        convert.load_hf(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    with pytest.raises(ValueError, match="model_type='qwen', which vlmjax cannot load; supported: .*did you mean 'qwen[23]'"):
        convert.build(str(d))


def _with_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 20,
                             "Return the value of the attribute."],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)


def test_finetune_from_checkpoint_starts_at_the_checkpoints_loss(tmp_path):
    hf, path = _hf_model("llama_tied", tmp_path, vocab_size=320, bos_token_id=1, eos_token_id=2)
    _with_tokenizer(path)
    cfg = smoke_config(**{"model.init_from": path, "data.tokenizer": "hf", "total_steps": 2,
                          "model.dtype": "float32", "optim.warmup_steps": 0})
    wd = str(tmp_path / "wd")
    summary = runner.run(cfg, wd)
    # The step-0 validation loss is the HF model's own loss on the same batches.
    from vlmjax import tasks
    task = tasks.build(cfg, wd)
    nll, count = 0.0, 0.0
    for b in task.eval_batches(global_batch_size=cfg.batch_size, process_index=0, process_count=1):
        with torch.no_grad():
            logits = hf(torch.tensor(b["inputs"], dtype=torch.long)).logits
        lp = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(b["targets"], dtype=torch.long)[..., None])[..., 0]
        nll += float(-(lp.numpy() * b["loss_mask"]).sum())
        count += float(b["loss_mask"].sum())
    np.testing.assert_allclose(summary["eval_start"]["loss"], nll / count, rtol=1e-4)
    assert summary["step"] == 2 and np.isfinite(summary["eval_end"]["loss"])
    with pytest.raises(ValueError, match="config.data.tokenizer='hf'"):
        runner.run(smoke_config(**{"model.init_from": path}), str(tmp_path / "wd2"))
