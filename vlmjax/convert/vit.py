"""CLIP / SigLIP vision towers, DINOv2 (+ registers) and DINOv3 <-> ``vlmjax.models.vit.VisionTransformer``.

model_type (config.json) -> HF class -> variant:

    clip_vision_model       CLIPVisionModel           clip
    siglip_vision_model     SiglipVisionModel         siglip
    dinov2                  Dinov2Model               dinov2
    dinov2_with_registers   Dinov2WithRegistersModel  dinov2 (num_register_tokens, antialiased positions)
    dinov3_vit              DINOv3ViTModel            dinov3 (RoPE, registers, optional gated MLP)

HF names are those written by ``save_pretrained`` (the hub layout): a vision tower saved alone has
no prefix (transformers >= 5) or ``vision_model.`` (transformers 4, and inside ``CLIPModel`` /
``SiglipModel``); DINOv2 uses the legacy ``attention.attention.query`` / ``mlp.weights_in`` names
and ``dinov2.`` inside ``Dinov2ForImageClassification``. DINOv3 files name the layers ``layer.{i}.``
(transformers 5 renames them to ``model.layer.{i}.`` in memory only; ``DINOv3ViTBackbone`` saves the
same names). The two-tower converter builds the vision half of a full 'clip' / 'siglip' checkpoint
with ``vision_spec`` and its own ``vision_model.`` prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlmjax.convert.core import Conv2D, Identity, Linear, Reshape, Rule, Spec, Transform, expand
from vlmjax.models import vit as vit_lib

MODEL_TYPES = {
    "clip_vision_model": "clip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
    "dinov3_vit": "dinov3",
}
ARCHITECTURES = {
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "dinov3_vit": "DINOv3ViTModel",
}
# Prefixes of a vision model's names in the files each model_type can come in.
PREFIXES = {
    "clip_vision_model": ("", "vision_model."),
    "siglip_vision_model": ("", "vision_model."),
    "dinov2": ("", "dinov2."),
    "dinov2_with_registers": ("", "dinov2_with_registers."),
    "dinov3_vit": ("",),
}
# Non-parameter buffers, and heads on top of the backbone that the ViT does not have:
# CLIPVisionModelWithProjection's projection, Dinov2ForImageClassification's classifier.
IGNORE = ("position_ids", "visual_projection.", "classifier.", "rope_embeddings.inv_freq")
# HF DINOv3 keeps ``embeddings.register_tokens`` [1, 0, D] even without registers (an empty tensor).
EMPTY_REGISTERS = "embeddings.register_tokens"


@dataclasses.dataclass(frozen=True)
class LeadingOnes(Transform):
    """HF keeps ``n`` leading singleton axes (``cls_token [1, 1, D]``, ``position_embeddings [1, P, D]``)."""

    n: int = 1

    def to_flax(self, x, flax_shape):
        return x.reshape(flax_shape)

    def to_hf(self, y):
        return y.reshape(self.hf_shape(y.shape))

    def hf_shape(self, flax_shape):
        return (1,) * self.n + tuple(flax_shape)


class EmptyRegisters(Transform):
    """Export only: the empty ``embeddings.register_tokens [1, 0, D]`` of a DINOv3 model without
    registers, written from any [D] param (the class token) so that transformers finds every tensor."""

    def to_flax(self, x, flax_shape):
        raise ValueError("EmptyRegisters is an export-only rule; the empty HF tensor loads into nothing.")

    def to_hf(self, y):
        return np.zeros(self.hf_shape(y.shape), np.float32)

    def hf_shape(self, flax_shape):
        return (1, 0, flax_shape[-1])


# ------------------------------------------------------------------------------------------------
# config.json <-> ViTConfig
# ------------------------------------------------------------------------------------------------

def _dinov2_intermediate(hidden: int, mlp_ratio: float, swiglu: bool) -> int:
    """HF Dinov2MLP / Dinov2SwiGLUFFN hidden width from ``mlp_ratio`` (DINOv2 configs have no
    intermediate_size)."""
    f = int(hidden * mlp_ratio)
    return (int(f * 2 / 3) + 7) // 8 * 8 if swiglu else f


def _dinov2_mlp_ratio(cfg: vit_lib.ViTConfig) -> int:
    """The integer ``mlp_ratio`` (transformers 5 requires an int) that makes HF rebuild
    ``cfg.intermediate_size`` (inverse of ``_dinov2_intermediate``)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    for ratio in range(1, 4 * (f // d + 2)):
        if _dinov2_intermediate(d, ratio, cfg.use_swiglu_ffn) == f:
            return ratio
    raise ValueError(
        f"intermediate_size={f} is not produced by any integer mlp_ratio of HF DINOv2 for hidden_size={d} "
        + ("(SwiGLU width: int(hidden * mlp_ratio * 2 / 3) rounded up to a multiple of 8)." if cfg.use_swiglu_ffn
           else "(MLP width: hidden * mlp_ratio)."))


def vit_config_from_hf(d: dict[str, Any], variant: str, dtype: Any = jnp.float32) -> vit_lib.ViTConfig:
    """A vision config.json dict (or a two-tower ``vision_config``) -> ViTConfig.

    variant: 'clip' | 'siglip' | 'dinov2' | 'dinov3'. For DINOv2 pass the full dict: ``model_type``
    tells 'dinov2_with_registers' (antialiased position interpolation, always a mask token) apart.
    Rejects settings the module does not implement, naming the field. Dropout probabilities of the
    HF configs (attention_dropout, hidden_dropout_prob, ...) are training settings that vlmjax
    configures itself (``ViTConfig.dropout_rate``) and are not read; DINOv2/3's drop_path_rate and
    DINOv3's RoPE augmentation (pos_embed_shift / _jitter / _rescale, training only) are.
    """
    if variant not in vit_lib.VARIANTS:
        raise ValueError(f"variant={variant!r}; use one of {vit_lib.VARIANTS}.")
    for key in ("image_size", "patch_size"):
        if isinstance(d.get(key), (list, tuple)):
            sizes = tuple(d[key])
            if len(set(sizes)) != 1:
                raise ValueError(f"{key}={sizes}: only square images/patches are supported.")
    square = lambda key, default: int(d[key][0] if isinstance(d.get(key), (list, tuple)) else d.get(key, default))
    dinov3 = variant == "dinov3"
    hidden = int(d.get("hidden_size", 384 if dinov3 else 768))  # HF defaults: ViT-S/16 | ViT-B
    common = dict(
        variant=variant,
        hidden_size=hidden,
        num_hidden_layers=int(d.get("num_hidden_layers", 12)),
        num_attention_heads=int(d.get("num_attention_heads", 6 if dinov3 else 12)),
        num_channels=int(d.get("num_channels", 3)),
        dtype=dtype,
    )
    if variant in ("clip", "siglip"):
        clip = variant == "clip"
        if not clip and d.get("model_type") == "siglip2_vision_model":
            raise ValueError("siglip2_vision_model (NaFlex patches) is not supported; SigLIP (v1) only.")
        cfg = vit_lib.ViTConfig(
            **common,
            intermediate_size=int(d.get("intermediate_size", 3072)),
            patch_size=square("patch_size", 32 if clip else 16),
            image_size=square("image_size", 224),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5 if clip else 1e-6)),
            hidden_act=d.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh"),
            pool="cls" if clip else ("map" if d.get("vision_use_head", True) else "none"),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
    elif dinov3:
        optional = lambda key, default: None if d.get(key, default) is None else float(d.get(key, default))
        cfg = vit_lib.ViTConfig(
            **common,
            intermediate_size=int(d.get("intermediate_size", 1536)),
            patch_size=square("patch_size", 16),
            image_size=square("image_size", 224),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            hidden_act=d.get("hidden_act", "gelu"),
            layerscale_value=float(d.get("layerscale_value", 1.0)),
            use_mask_token=True,  # DINOv3ViTEmbeddings always has one
            num_register_tokens=int(d.get("num_register_tokens", 0)),
            rope_theta=float(d.get("rope_theta", 100.0)),
            query_bias=bool(d.get("query_bias", True)),
            key_bias=bool(d.get("key_bias", False)),
            value_bias=bool(d.get("value_bias", True)),
            proj_bias=bool(d.get("proj_bias", True)),
            mlp_bias=bool(d.get("mlp_bias", True)),
            use_gated_mlp=bool(d.get("use_gated_mlp", False)),
            pos_embed_shift=optional("pos_embed_shift", None),
            pos_embed_jitter=optional("pos_embed_jitter", None),
            pos_embed_rescale=optional("pos_embed_rescale", 2.0),
            drop_path_rate=float(d.get("drop_path_rate", 0.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
    else:
        registers = d.get("model_type") == "dinov2_with_registers"
        swiglu = bool(d.get("use_swiglu_ffn", False))
        if d.get("head_dim") not in (None, hidden // common["num_attention_heads"]):
            raise ValueError(f"head_dim={d['head_dim']} != hidden_size // num_attention_heads is not supported.")
        cfg = vit_lib.ViTConfig(
            **common,
            intermediate_size=_dinov2_intermediate(hidden, float(d.get("mlp_ratio", 4)), swiglu),
            patch_size=square("patch_size", 14),
            image_size=square("image_size", 518),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            hidden_act=d.get("hidden_act", "gelu"),
            qkv_bias=bool(d.get("qkv_bias", True)),
            layerscale_value=float(d.get("layerscale_value", 1.0)),
            use_mask_token=True if registers else bool(d.get("use_mask_token", True)),
            num_register_tokens=int(d.get("num_register_tokens", 4 if registers else 0)),
            use_swiglu_ffn=swiglu,
            pos_antialias=registers,
            drop_path_rate=float(d.get("drop_path_rate", 0.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
    cfg.validate()
    return cfg


def hf_config(cfg: vit_lib.ViTConfig) -> dict[str, Any]:
    """ViTConfig -> the config.json of the HF class that loads it (see the module docstring)."""
    cfg.validate()
    common = {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": "float32",
    }
    if cfg.variant == "clip":
        mt, extra = "clip_vision_model", {"intermediate_size": cfg.intermediate_size}
    elif cfg.variant == "siglip":
        mt, extra = "siglip_vision_model", {"intermediate_size": cfg.intermediate_size,
                                            "vision_use_head": cfg.pool == "map"}
    elif cfg.variant == "dinov3":
        if not cfg.use_mask_token:
            raise ValueError("DINOv3ViTModel always has a mask token; set use_mask_token=True to export.")
        mt = "dinov3_vit"
        extra = {name: getattr(cfg, name) for name in (
            "intermediate_size", "layerscale_value", "num_register_tokens", "rope_theta", "query_bias", "key_bias",
            "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp", "pos_embed_shift", "pos_embed_jitter",
            "pos_embed_rescale", "drop_path_rate")}
    else:
        registers = cfg.num_register_tokens > 0 or cfg.pos_antialias
        if registers and not cfg.use_mask_token:
            raise ValueError("Dinov2WithRegistersModel always has a mask token; set use_mask_token=True.")
        if registers and not cfg.pos_antialias:
            raise ValueError("HF Dinov2WithRegistersModel interpolates positions with antialiasing; a "
                             "num_register_tokens > 0 model needs pos_antialias=True to be exported.")
        mt = "dinov2_with_registers" if registers else "dinov2"
        extra = {
            "mlp_ratio": _dinov2_mlp_ratio(cfg),
            "qkv_bias": cfg.qkv_bias,
            "layerscale_value": cfg.layerscale_value,
            "use_swiglu_ffn": cfg.use_swiglu_ffn,
            "drop_path_rate": cfg.drop_path_rate,
        }
        if registers:
            extra["num_register_tokens"] = cfg.num_register_tokens
        else:
            extra["use_mask_token"] = cfg.use_mask_token
    return {"model_type": mt, "architectures": [ARCHITECTURES[mt]], **common, **extra}


# ------------------------------------------------------------------------------------------------
# Mapping tables
# ------------------------------------------------------------------------------------------------

def _norm(hf: str, flax: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{flax}/scale"), Rule(f"{hf}.bias", f"{flax}/bias")]


def _dense(hf: str, flax: str, n_in: int = 1, bias: bool = True, bias_transform: Transform = Reshape()) -> list[Rule]:
    out = [Rule(f"{hf}.weight", f"{flax}/kernel", Linear(n_in))]
    return out + ([Rule(f"{hf}.bias", f"{flax}/bias", bias_transform)] if bias else [])


def rules(cfg: vit_lib.ViTConfig) -> list[Rule]:
    """HF names (relative to the vision model) <-> param paths for ``cfg``."""
    emb = "embeddings/"
    if cfg.variant == "dinov3":
        top = [
            Rule("embeddings.patch_embeddings.weight", emb + "patch_embedding/kernel", Conv2D()),
            Rule("embeddings.patch_embeddings.bias", emb + "patch_embedding/bias"),
            Rule("embeddings.cls_token", emb + "class_embedding", LeadingOnes(2)),
            Rule("embeddings.mask_token", emb + "mask_token", LeadingOnes(2)),
        ]
        if cfg.num_register_tokens:
            top.append(Rule("embeddings.register_tokens", emb + "register_tokens", LeadingOnes(1)))
        top += _norm("norm", "post_layernorm")
        L = "layer.{i}."
        attn = "layers_{i}/self_attn/"
        mlp = "layers_{i}/mlp/"
        layer = (
            _norm(L + "norm1", "layers_{i}/layer_norm1") + _norm(L + "norm2", "layers_{i}/layer_norm2")
            + _dense(L + "attention.q_proj", attn + "q_proj", bias=cfg.query_bias)
            + _dense(L + "attention.k_proj", attn + "k_proj", bias=cfg.key_bias)
            + _dense(L + "attention.v_proj", attn + "v_proj", bias=cfg.value_bias)
            + _dense(L + "attention.o_proj", attn + "out_proj", n_in=2, bias=cfg.proj_bias, bias_transform=Identity())
            + [Rule(L + "layer_scale1.lambda1", "layers_{i}/layer_scale1"),
               Rule(L + "layer_scale2.lambda1", "layers_{i}/layer_scale2")]
            + _dense(L + "mlp.up_proj", mlp + "up_proj", bias=cfg.mlp_bias, bias_transform=Identity())
            + _dense(L + "mlp.down_proj", mlp + "down_proj", bias=cfg.mlp_bias, bias_transform=Identity())
        )
        if cfg.use_gated_mlp:
            layer += _dense(L + "mlp.gate_proj", mlp + "gate_proj", bias=cfg.mlp_bias, bias_transform=Identity())
        return top + expand(layer, i=cfg.num_hidden_layers)
    if cfg.variant == "dinov2":
        top = [
            Rule("embeddings.patch_embeddings.projection.weight", emb + "patch_embedding/kernel", Conv2D()),
            Rule("embeddings.patch_embeddings.projection.bias", emb + "patch_embedding/bias"),
            Rule("embeddings.cls_token", emb + "class_embedding", LeadingOnes(2)),
            Rule("embeddings.position_embeddings", emb + "position_embedding", LeadingOnes(1)),
        ]
        if cfg.use_mask_token:
            top.append(Rule("embeddings.mask_token", emb + "mask_token", LeadingOnes(1)))
        if cfg.num_register_tokens:
            top.append(Rule("embeddings.register_tokens", emb + "register_tokens", LeadingOnes(1)))
        top += _norm("layernorm", "post_layernorm")
        L = "encoder.layer.{i}."
        attn = "layers_{i}/self_attn/"
        layer = (
            _norm(L + "norm1", "layers_{i}/layer_norm1") + _norm(L + "norm2", "layers_{i}/layer_norm2")
            + _dense(L + "attention.attention.query", attn + "q_proj", bias=cfg.qkv_bias)
            + _dense(L + "attention.attention.key", attn + "k_proj", bias=cfg.qkv_bias)
            + _dense(L + "attention.attention.value", attn + "v_proj", bias=cfg.qkv_bias)
            + _dense(L + "attention.output.dense", attn + "out_proj", n_in=2, bias_transform=Identity())
            + [Rule(L + "layer_scale1.lambda1", "layers_{i}/layer_scale1"),
               Rule(L + "layer_scale2.lambda1", "layers_{i}/layer_scale2")]
        )
        if cfg.use_swiglu_ffn:
            layer += (_dense(L + "mlp.weights_in", "layers_{i}/mlp/weights_in")
                      + _dense(L + "mlp.weights_out", "layers_{i}/mlp/weights_out", bias_transform=Identity()))
        else:
            layer += (_dense(L + "mlp.fc1", "layers_{i}/mlp/fc1", bias_transform=Identity())
                      + _dense(L + "mlp.fc2", "layers_{i}/mlp/fc2", bias_transform=Identity()))
        return top + expand(layer, i=cfg.num_hidden_layers)

    # CLIP / SigLIP share the layer names.
    top = [Rule("embeddings.patch_embedding.weight", emb + "patch_embedding/kernel", Conv2D()),
           Rule("embeddings.position_embedding.weight", emb + "position_embedding")]
    if cfg.variant == "clip":
        top += [Rule("embeddings.class_embedding", emb + "class_embedding")] + _norm("pre_layrnorm", "pre_layrnorm")
    else:
        top.append(Rule("embeddings.patch_embedding.bias", emb + "patch_embedding/bias"))
    top += _norm("post_layernorm", "post_layernorm")
    if cfg.pool == "map":
        top += (
            [Rule("head.probe", "head/probe", LeadingOnes(2)),
             Rule("head.attention.in_proj_weight", "head/attention/in_proj_kernel", Linear(1)),
             Rule("head.attention.in_proj_bias", "head/attention/in_proj_bias", Reshape())]
            + _dense("head.attention.out_proj", "head/attention/out_proj", n_in=2, bias_transform=Identity())
            + _norm("head.layernorm", "head/layernorm")
            + _dense("head.mlp.fc1", "head/mlp/fc1", bias_transform=Identity())
            + _dense("head.mlp.fc2", "head/mlp/fc2", bias_transform=Identity())
        )
    L = "encoder.layers.{i}."
    attn = "layers_{i}/self_attn/"
    layer = (
        _norm(L + "layer_norm1", "layers_{i}/layer_norm1") + _norm(L + "layer_norm2", "layers_{i}/layer_norm2")
        + _dense(L + "self_attn.q_proj", attn + "q_proj") + _dense(L + "self_attn.k_proj", attn + "k_proj")
        + _dense(L + "self_attn.v_proj", attn + "v_proj")
        + _dense(L + "self_attn.out_proj", attn + "out_proj", n_in=2, bias_transform=Identity())
        + _dense(L + "mlp.fc1", "layers_{i}/mlp/fc1", bias_transform=Identity())
        + _dense(L + "mlp.fc2", "layers_{i}/mlp/fc2", bias_transform=Identity())
    )
    return top + expand(layer, i=cfg.num_hidden_layers)


def init_args(cfg: vit_lib.ViTConfig) -> tuple:
    """Example inputs for ``module.init`` (shapes only)."""
    return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)


def vision_spec(d: dict[str, Any], variant: str, dtype: Any = jnp.float32
                ) -> tuple[vit_lib.VisionTransformer, list[Rule]]:
    """(module, rules) of a vision tower config dict; the rules' HF names carry no prefix.

    For the vision half of a two-tower checkpoint, prepend ``vision_model.`` to each rule's ``hf``
    (``dataclasses.replace(r, hf="vision_model." + r.hf)``) and ``vision_model/`` (or the composite
    module's attribute name) to each ``flax`` path.
    """
    cfg = vit_config_from_hf(d, variant, dtype)
    return vit_lib.VisionTransformer(cfg), rules(cfg)


def spec(hf: dict[str, Any], dtype: Any = jnp.float32) -> Spec:
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"vlmjax.convert.vit handles model_type {sorted(MODEL_TYPES)}, got {mt!r}.")
    module, table = vision_spec(hf, MODEL_TYPES[mt], dtype)
    ignore = IGNORE
    if module.config.variant == "dinov3" and not module.config.num_register_tokens:
        ignore += (EMPTY_REGISTERS,)
    return Spec(module=module, init_args=init_args(module.config), rules=table, prefixes=PREFIXES[mt],
                ignore=ignore)


def export(module: vit_lib.VisionTransformer):
    cfg = module.config
    table = rules(cfg)
    if cfg.variant == "dinov3" and not cfg.num_register_tokens:
        table.append(Rule(EMPTY_REGISTERS, "embeddings/class_embedding", EmptyRegisters()))
    return hf_config(cfg), table, ""


EXPORTERS = {vit_lib.VisionTransformer: export}
