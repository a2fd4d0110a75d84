"""CLIP / SigLIP text towers and two-tower models <-> ``TextEncoder`` / ``TwoTower``.

model_type (config.json)  HF class          vlmjax module
clip_text_model           CLIPTextModel     TextEncoder(variant="clip")
siglip_text_model         SiglipTextModel   TextEncoder(variant="siglip")
clip                      CLIPModel         TwoTower(VisionTransformer, TextEncoder, variant="clip")
siglip                    SiglipModel       TwoTower(VisionTransformer, TextEncoder, variant="siglip")

HF names of a text tower are those of ``CLIPTextModel`` in transformers 5 (``embeddings...``,
``encoder.layers.{i}...``, ``final_layer_norm...``); transformers 4 wrote the same under
``text_model.``, and both load (``Spec.prefixes``). Inside a two-tower checkpoint the towers live under
``text_model.`` / ``vision_model.``; the vision half's table comes from ``vlmjax.convert.vit``.
``save_hf`` writes the transformers 5 layout.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlmjax.convert.core import Identity, Linear, Reshape, Rule, Spec, Transform, expand
from vlmjax.models import text_encoder as text_lib
from vlmjax.models import two_tower as two_tower_lib

MODEL_TYPES = ("clip_text_model", "siglip_text_model", "clip", "siglip")
TEXT_MODEL_TYPES = {"clip": "clip_text_model", "siglip": "siglip_text_model"}
TEXT_ARCHITECTURES = {"clip": "CLIPTextModel", "siglip": "SiglipTextModel"}
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# Non-parameter buffers (HF ``embeddings.position_ids``; old exports persisted it).
IGNORE = ("position_ids",)

# HF ``CLIPTextConfig`` / ``SiglipTextConfig`` class defaults, for config.json files that omit fields.
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, eos_token_id=49407, initializer_range=0.02),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, eos_token_id=49407, projection_size=None,
                   initializer_range=0.02),
}
CLIP_PROJECTION_DIM = 512  # HF CLIPConfig.projection_dim default
CLIP_LOGIT_SCALE_INIT = 2.6592  # HF CLIPConfig.logit_scale_init_value default


@dataclasses.dataclass(frozen=True)
class Scalar(Transform):
    """A Flax scalar param ``[]`` <-> an HF tensor of ``shape`` holding its one value.

    CLIP's ``logit_scale`` is ``[]``, SigLIP's ``logit_scale`` / ``logit_bias`` are ``[1]``.
    """

    shape: tuple[int, ...] = ()

    def to_flax(self, x, flax_shape):
        return x.reshape(flax_shape)

    def to_hf(self, y):
        return np.asarray(y).reshape(self.shape)

    def hf_shape(self, flax_shape):
        if int(np.prod(flax_shape)) != 1:
            raise ValueError(f"Scalar transform on a param of shape {flax_shape}.")
        return self.shape


# ------------------------------------------------------------------------------------------------
# Text tower
# ------------------------------------------------------------------------------------------------

def text_config_from_hf(d: dict[str, Any], variant: str, dtype: Any = jnp.float32
                        ) -> text_lib.TextEncoderConfig:
    """HF text config dict (a ``clip_text_model`` / ``siglip_text_model`` config.json or a two-tower
    ``text_config``) -> validated TextEncoderConfig."""
    if variant not in TEXT_DEFAULTS:
        raise ValueError(f"variant={variant!r}; text towers are {sorted(TEXT_DEFAULTS)}.")
    v = {**TEXT_DEFAULTS[variant], **{k: d[k] for k in TEXT_DEFAULTS[variant] if d.get(k) is not None}}
    eos = v["eos_token_id"]
    if variant == "siglip":
        eos = TEXT_DEFAULTS["siglip"]["eos_token_id"]  # SigLIP pools the last position, not EOS
    elif isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"text config eos_token_id={eos!r}: CLIP pools at one EOS id; give one.")
        eos = eos[0]
    cfg = text_lib.TextEncoderConfig(
        variant=variant,
        vocab_size=int(v["vocab_size"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_hidden_layers=int(v["num_hidden_layers"]),
        num_attention_heads=int(v["num_attention_heads"]),
        max_position_embeddings=int(v["max_position_embeddings"]),
        hidden_act=str(v["hidden_act"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
        eos_token_id=int(eos),
        projection_size=int(v.get("projection_size") or 0),
        initializer_range=float(v["initializer_range"]),
        dtype=dtype,
    )
    cfg.validate()
    return cfg


def text_rules(cfg: text_lib.TextEncoderConfig) -> list[Rule]:
    """HF names relative to the text model (no ``text_model.``) -> TextEncoder param paths."""
    layer = [
        Rule("encoder.layers.{i}.layer_norm1.weight", "layers_{i}/layer_norm1/scale"),
        Rule("encoder.layers.{i}.layer_norm1.bias", "layers_{i}/layer_norm1/bias"),
        Rule("encoder.layers.{i}.layer_norm2.weight", "layers_{i}/layer_norm2/scale"),
        Rule("encoder.layers.{i}.layer_norm2.bias", "layers_{i}/layer_norm2/bias"),
        Rule("encoder.layers.{i}.self_attn.out_proj.weight", "layers_{i}/self_attn/out_proj/kernel",
             Linear(2)),
        Rule("encoder.layers.{i}.self_attn.out_proj.bias", "layers_{i}/self_attn/out_proj/bias"),
        Rule("encoder.layers.{i}.mlp.fc1.weight", "layers_{i}/mlp/fc1/kernel", Linear(1)),
        Rule("encoder.layers.{i}.mlp.fc1.bias", "layers_{i}/mlp/fc1/bias"),
        Rule("encoder.layers.{i}.mlp.fc2.weight", "layers_{i}/mlp/fc2/kernel", Linear(1)),
        Rule("encoder.layers.{i}.mlp.fc2.bias", "layers_{i}/mlp/fc2/bias"),
    ]
    for p in "qkv":
        layer += [
            Rule(f"encoder.layers.{{i}}.self_attn.{p}_proj.weight",
                 f"layers_{{i}}/self_attn/{p}_proj/kernel", Linear(1)),
            Rule(f"encoder.layers.{{i}}.self_attn.{p}_proj.bias",
                 f"layers_{{i}}/self_attn/{p}_proj/bias", Reshape()),
        ]
    top = [
        Rule("embeddings.token_embedding.weight", "token_embedding/embedding", Identity()),
        Rule("embeddings.position_embedding.weight", "position_embedding", Identity()),
        Rule("final_layer_norm.weight", "final_layer_norm/scale"),
        Rule("final_layer_norm.bias", "final_layer_norm/bias"),
    ]
    if cfg.variant == "siglip":
        top += [Rule("head.weight", "head/kernel", Linear(1)), Rule("head.bias", "head/bias")]
    return top + expand(layer, i=cfg.num_hidden_layers)


def text_hf_config(cfg: text_lib.TextEncoderConfig) -> dict[str, Any]:
    """TextEncoderConfig -> HF ``CLIPTextConfig`` / ``SiglipTextConfig`` dict."""
    out = {
        "model_type": TEXT_MODEL_TYPES[cfg.variant],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "eos_token_id": cfg.eos_token_id,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
    }
    if cfg.variant == "siglip":
        out["projection_size"] = cfg.projection_size
    return out


def _init_args_text(cfg: text_lib.TextEncoderConfig) -> tuple:
    return (jnp.zeros((1, min(8, cfg.max_position_embeddings)), jnp.int32),)


def _text_spec(hf: dict[str, Any], variant: str, dtype: Any) -> Spec:
    archs = hf.get("architectures") or []
    if any(a.endswith("WithProjection") for a in archs):
        raise ValueError(
            f"{archs[0]} checkpoints carry a text_projection that TextEncoder does not have; load the "
            f"full two-tower checkpoint (model_type {variant!r}) to get the projection.")
    cfg = text_config_from_hf(hf, variant, dtype)
    return Spec(module=text_lib.TextEncoder(cfg), init_args=_init_args_text(cfg),
                rules=text_rules(cfg), prefixes=("", "text_model."), ignore=IGNORE)


# ------------------------------------------------------------------------------------------------
# Two-tower models
# ------------------------------------------------------------------------------------------------

def _vit_convert():
    # Imported on use, so the standalone text towers never depend on the vision family.
    return importlib.import_module("vlmjax.convert.vit")


def _nest(rules: list[Rule], hf_prefix: str, flax_prefix: str) -> list[Rule]:
    return [dataclasses.replace(r, hf=hf_prefix + r.hf, flax=flax_prefix + r.flax) for r in rules]


def _sub_config(hf: dict[str, Any], key: str) -> dict[str, Any]:
    # Old CLIP config.json files also carry ``<key>_dict``, whose values win (as in HF CLIPConfig).
    return {**(hf.get(key) or {}), **(hf.get(key + "_dict") or {})}


def head_rules(config: two_tower_lib.TwoTowerConfig) -> list[Rule]:
    """The contrastive head: CLIP projections + temperature, SigLIP temperature + bias."""
    if config.variant == "clip":
        return [Rule("visual_projection.weight", "visual_projection/kernel", Linear(1)),
                Rule("text_projection.weight", "text_projection/kernel", Linear(1)),
                Rule("logit_scale", "logit_scale", Scalar(()))]
    return [Rule("logit_scale", "logit_scale", Scalar((1,))),
            Rule("logit_bias", "logit_bias", Scalar((1,)))]


def _two_tower_spec(hf: dict[str, Any], variant: str, dtype: Any) -> Spec:
    text_cfg = text_config_from_hf(_sub_config(hf, "text_config"), variant, dtype)
    vision, vision_rules = _vit_convert().vision_spec(_sub_config(hf, "vision_config"), variant, dtype)
    if variant == "clip":
        head = two_tower_lib.TwoTowerConfig(
            variant="clip",
            projection_dim=int(hf.get("projection_dim") or CLIP_PROJECTION_DIM),
            logit_scale_init_value=float(hf.get("logit_scale_init_value", CLIP_LOGIT_SCALE_INIT)),
        )
    else:
        head = two_tower_lib.siglip_config()
    module = two_tower_lib.TwoTower(vision_model=vision, text_model=text_lib.TextEncoder(text_cfg),
                                    config=head)
    image, = _vit_convert().init_args(vision.config)
    rules = (_nest(vision_rules, "vision_model.", "vision_model/")
             + _nest(text_rules(text_cfg), "text_model.", "text_model/") + head_rules(head))
    return Spec(module=module, init_args=(image,) + _init_args_text(text_cfg), rules=rules,
                prefixes=("",), ignore=IGNORE)


def spec(hf: dict[str, Any], dtype: Any = jnp.float32) -> Spec:
    mt = hf.get("model_type")
    if mt == "clip_text_model":
        return _text_spec(hf, "clip", dtype)
    if mt == "siglip_text_model":
        return _text_spec(hf, "siglip", dtype)
    if mt in ("clip", "siglip"):
        return _two_tower_spec(hf, mt, dtype)
    raise ValueError(f"model_type={mt!r} is not handled by vlmjax.convert.text; it handles {MODEL_TYPES}.")


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

def export_text(module: text_lib.TextEncoder):
    cfg = module.config
    hf = {"architectures": [TEXT_ARCHITECTURES[cfg.variant]], **text_hf_config(cfg),
          "torch_dtype": "float32"}
    return hf, text_rules(cfg), ""


def export_two_tower(module: two_tower_lib.TwoTower):
    c = module.config
    text_cfg = module.text_model.config
    vision_exporters = _vit_convert().EXPORTERS
    vision_exporter = next((fn for cls, fn in vision_exporters.items()
                            if isinstance(module.vision_model, cls)), None)
    if vision_exporter is None:
        raise ValueError(f"save_hf cannot export a {type(module.vision_model).__name__} vision tower; "
                         f"known: {sorted(cls.__name__ for cls in vision_exporters)}.")
    vision_variant = getattr(getattr(module.vision_model, "config", None), "variant", None)
    if vision_variant != c.variant:
        raise ValueError(f"A {ARCHITECTURES[c.variant]} needs a {c.variant} vision tower, got "
                         f"variant={vision_variant!r}; HF has no such two-tower class.")
    vision_hf, vision_rules, _ = vision_exporter(module.vision_model)
    vision_hf = {k: v for k, v in vision_hf.items() if k not in ("architectures", "torch_dtype", "dtype")}
    text_hf = text_hf_config(text_cfg)
    hf: dict[str, Any] = {"model_type": c.variant, "architectures": [ARCHITECTURES[c.variant]],
                          "text_config": text_hf, "vision_config": vision_hf, "torch_dtype": "float32"}
    if c.variant == "clip":
        hf["projection_dim"] = c.projection_dim
        hf["logit_scale_init_value"] = c.logit_scale_init_value
        text_hf["projection_dim"] = c.projection_dim
        vision_hf["projection_dim"] = c.projection_dim
    rules = (_nest(vision_rules, "vision_model.", "vision_model/")
             + _nest(text_rules(text_cfg), "text_model.", "text_model/") + head_rules(c))
    return hf, rules, ""


EXPORTERS = {text_lib.TextEncoder: export_text, two_tower_lib.TwoTower: export_two_tower}

__all__ = ["EXPORTERS", "MODEL_TYPES", "Scalar", "export_text", "export_two_tower", "head_rules",
           "spec", "text_config_from_hf", "text_hf_config", "text_rules"]
