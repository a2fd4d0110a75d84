"""Llama / SmolLM2, Qwen2 / Qwen2.5 and Qwen3 causal LMs <-> ``vlmjax.models.decoder.Decoder``.

HF names are those of ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``
(``model.layers.{i}.self_attn.q_proj.weight``, ...). The three share the layout; Qwen2 adds q/k/v
biases, Qwen3 adds per-head q/k RMSNorm and an explicit ``head_dim``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from vlmjax.convert.core import Identity, Linear, Reshape, Rule, Spec, expand
from vlmjax.models import decoder as decoder_lib

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Non-parameter buffers some exporters write.
IGNORE = ("rotary_emb.inv_freq", "position_ids")


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers v5 keeps it in rope_parameters; v4 files have a top-level rope_theta.
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta"))
    rope_type = params.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type not in (None, "default"):
        raise ValueError(f"rope_type={rope_type!r} (RoPE scaling) is not supported by vlmjax's decoder yet; "
                         "only plain RoPE (SmolLM2, Qwen2.5, Qwen3) loads.")
    return float(theta if theta is not None else 10000.0)


def decoder_config(hf: dict[str, Any], dtype: Any = jnp.float32) -> decoder_lib.DecoderConfig:
    """HF config.json dict -> DecoderConfig (rejects features the decoder does not implement)."""
    mt = hf.get("model_type")
    if hf.get("mlp_bias"):
        raise ValueError(f"{mt}: mlp_bias=True is not supported.")
    if mt in ("llama", "qwen3") and hf.get("attention_bias"):
        raise ValueError(f"{mt}: attention_bias=True (bias on q/k/v/o) is not supported.")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{mt}: use_sliding_window=True is not supported.")
    heads = int(hf["num_attention_heads"])
    return decoder_lib.DecoderConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        attention_bias=(mt == "qwen2"),       # Qwen2's q/k/v always carry biases
        qk_norm=(mt == "qwen3"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        dtype=dtype,
    )


def rules(cfg: decoder_lib.DecoderConfig) -> list[Rule]:
    layer = [
        Rule("model.layers.{i}.input_layernorm.weight", "layers_{i}/input_layernorm/scale"),
        Rule("model.layers.{i}.post_attention_layernorm.weight", "layers_{i}/post_attention_layernorm/scale"),
        Rule("model.layers.{i}.self_attn.q_proj.weight", "layers_{i}/self_attn/q_proj/kernel", Linear(1)),
        Rule("model.layers.{i}.self_attn.k_proj.weight", "layers_{i}/self_attn/k_proj/kernel", Linear(1)),
        Rule("model.layers.{i}.self_attn.v_proj.weight", "layers_{i}/self_attn/v_proj/kernel", Linear(1)),
        Rule("model.layers.{i}.self_attn.o_proj.weight", "layers_{i}/self_attn/o_proj/kernel", Linear(2)),
        Rule("model.layers.{i}.mlp.gate_proj.weight", "layers_{i}/mlp/gate_proj/kernel", Linear(1)),
        Rule("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", Linear(1)),
        Rule("model.layers.{i}.mlp.down_proj.weight", "layers_{i}/mlp/down_proj/kernel", Linear(1)),
    ]
    if cfg.attention_bias:
        layer += [Rule(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"layers_{{i}}/self_attn/{p}_proj/bias", Reshape())
                  for p in "qkv"]
    if cfg.qk_norm:
        layer += [Rule(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"layers_{{i}}/self_attn/{p}_norm/scale")
                  for p in "qk"]
    top = [Rule("model.embed_tokens.weight", "embed_tokens/embedding", Identity()),
           Rule("model.norm.weight", "norm/scale")]
    if not cfg.tie_word_embeddings:
        top.append(Rule("lm_head.weight", "lm_head/kernel", Linear(1)))
    return top + expand(layer, i=cfg.num_hidden_layers)


def hf_config(cfg: decoder_lib.DecoderConfig) -> dict[str, Any]:
    """DecoderConfig -> HF config.json dict (qk_norm -> qwen3, attention_bias -> qwen2, else llama)."""
    mt = "qwen3" if cfg.qk_norm else ("qwen2" if cfg.attention_bias else "llama")
    if cfg.qk_norm and cfg.attention_bias:
        raise ValueError("A decoder with both qk_norm and attention_bias has no HF counterpart.")
    return {
        "model_type": mt,
        "architectures": [ARCHITECTURES[mt]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False if mt != "qwen2" else None,
        "torch_dtype": "float32",
    }


def spec(hf: dict[str, Any], dtype: Any = jnp.float32) -> Spec:
    cfg = decoder_config(hf, dtype)
    return Spec(module=decoder_lib.Decoder(cfg), init_args=(jnp.zeros((1, 8), jnp.int32),),
                rules=rules(cfg), prefixes=("",), ignore=IGNORE)


def export(module: decoder_lib.Decoder):
    return hf_config(module.config), rules(module.config), ""


EXPORTERS = {decoder_lib.Decoder: export}
