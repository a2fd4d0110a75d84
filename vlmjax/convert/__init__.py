"""Hugging Face checkpoint directories (config.json + *.safetensors) <-> vlmjax Linen modules.

  model, params = vlmjax.convert.load_hf("/ckpt/SmolLM2-135M", dtype=jnp.bfloat16, mesh=mesh)
  vlmjax.convert.save_hf(model, params, "/tmp/export")   # transformers loads it back

One mapping table per family (``llama.py``: llama/qwen2/qwen3; ``vit.py``: clip/siglip/dinov2/dinov3 vision;
``text.py``: clip/siglip text and two-tower models) serves both directions. See ``core.py`` for the
safetensors reading, the all-at-once key/shape check and sharded placement.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from vlmjax import sharding as shd
from vlmjax import tree as tree_lib
from vlmjax.convert import core
from vlmjax.convert.core import Spec
from vlmjax.models import lora

# model_type (config.json) -> module in vlmjax.convert implementing ``spec(hf, dtype) -> Spec``.
# Families register here; the import is lazy so a missing optional family never breaks the others.
FAMILIES: dict[str, str] = {
    "llama": "llama", "qwen2": "llama", "qwen3": "llama",
    "clip_vision_model": "vit", "siglip_vision_model": "vit", "dinov2": "vit", "dinov2_with_registers": "vit",
    "dinov3_vit": "vit",
    "clip_text_model": "text", "siglip_text_model": "text", "clip": "text", "siglip": "text",
}


def register(model_type: str, module_name: str) -> None:
    FAMILIES[model_type] = module_name


def _family(model_type: str | None, path: str):
    if model_type not in FAMILIES:
        hint = difflib.get_close_matches(str(model_type), FAMILIES, n=1)
        raise ValueError(
            f"{path}/config.json has model_type={model_type!r}, which vlmjax cannot load; supported: "
            f"{sorted(FAMILIES)}" + (f" (did you mean {hint[0]!r}?)" if hint else "."))
    return importlib.import_module(f"vlmjax.convert.{FAMILIES[model_type]}")


def build(path: str, *, dtype: Any = jnp.float32) -> Spec:
    """The module (with config from ``path/config.json``) and its mapping, without reading weights."""
    return from_config(core.read_config(path), dtype=dtype, source=path)


def from_config(hf: dict[str, Any], *, dtype: Any = jnp.float32, source: str = "<dict>") -> Spec:
    """Same as ``build`` from an HF config dict (e.g. ``transformers.CLIPVisionConfig().to_dict()``),
    for random-init models of a checkpoint's shape (benchmarks, tests)."""
    return _family(hf.get("model_type"), source).spec(hf, dtype)


def vision_tower(path: str, *, dtype: Any = jnp.float32) -> Spec:
    """The vision tower of ``path``: a vision model (CLIP/SigLIP vision, DINOv2, DINOv3) or the
    ``vision_model`` half of a CLIP / SigLIP two-tower checkpoint (its text half and heads are
    ignored). Its module is a ``VisionTransformer`` whose params load with ``load_params``."""
    from vlmjax.convert import vit as vit_convert  # pylint: disable=g-import-not-at-top

    hf = core.read_config(path)
    mt = hf.get("model_type")
    if mt in vit_convert.MODEL_TYPES:
        return vit_convert.spec(hf, dtype)
    if mt in ("clip", "siglip"):
        sub = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
        module, rules = vit_convert.vision_spec(sub, mt, dtype)
        return Spec(module=module, init_args=vit_convert.init_args(module.config), rules=rules,
                    prefixes=("vision_model.",),
                    ignore=vit_convert.IGNORE + ("text_model.", "text_projection.", "logit_scale", "logit_bias"))
    raise ValueError(f"{path}/config.json has model_type={mt!r}, which has no vision tower vlmjax can load; "
                     f"use a CLIP/SigLIP (vision or two-tower), DINOv2 or DINOv3 checkpoint.")


def text_tower(path: str, *, dtype: Any = jnp.float32) -> Spec:
    """The text tower of ``path``: a CLIP / SigLIP text model, or the ``text_model`` half of a
    two-tower checkpoint (its vision half and heads are ignored). Its module is a ``TextEncoder``."""
    from vlmjax.convert import text as text_convert  # pylint: disable=g-import-not-at-top

    hf = core.read_config(path)
    mt = hf.get("model_type")
    if mt in ("clip_text_model", "siglip_text_model"):
        return text_convert.spec(hf, dtype)
    if mt in ("clip", "siglip"):
        sub = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
        text = text_convert.spec({**sub, "model_type": f"{mt}_text_model"}, dtype)
        return Spec(module=text.module, init_args=text.init_args, rules=text.rules, prefixes=("text_model.",),
                    ignore=text.ignore + ("vision_model.", "visual_projection.", "text_projection.",
                                          "logit_scale", "logit_bias"))
    raise ValueError(f"{path}/config.json has model_type={mt!r}, which has no text tower vlmjax can load; "
                     f"use a CLIP or SigLIP (text or two-tower) checkpoint.")


def load_hf(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, mesh=None,
            rules=None) -> tuple[nn.Module, dict[str, Any]]:
    """Loads an HF checkpoint directory into ``(module, params)``.

    dtype: compute dtype of the returned module; param_dtype: storage dtype of ``params``.
    mesh: place each tensor with its logical sharding (``rules``: default ``sharding.DEFAULT_RULES``)
      directly on the devices; None puts params on the default device.
    Errors: unknown model_type, pickle-only directories, and every missing / unexpected / mis-shaped
    tensor listed together.
    """
    path = os.fspath(path)
    core.safetensors_files(path)  # refuse pickle-only directories before anything else
    spec = build(path, dtype=dtype)
    boxed = jax.eval_shape(lambda: spec.module.init(jax.random.PRNGKey(0), *spec.init_args))
    abstract = nn.meta.unbox(boxed)["params"]
    shardings = None
    if mesh is not None:
        shardings = shd.logical_to_shardings(boxed, mesh, rules or shd.DEFAULT_RULES)["params"]
    return spec.module, load_params(path, spec, abstract, shardings=shardings, param_dtype=param_dtype)


def load_params(path: str, spec: Spec, abstract_params, *, shardings=None,
                param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """Reads ``path``'s weights into a tree shaped like ``abstract_params`` (e.g. the trainer's
    already-sharded state: ``shardings`` places each tensor directly)."""
    index = core.TensorIndex(path)
    prefix = core.strip_prefix(index, spec.rules, spec.prefixes)
    load = functools.partial(core.load_params, index, spec.rules, dtype=param_dtype, ignore=spec.ignore,
                             prefix=prefix, source=path)
    if tree_lib.is_stacked(abstract_params):
        # Scanned layers (model.scan_layers): the rules name layers_{i}/...; read those on the host,
        # stack them on a leading [L] axis, then place each stacked array with its sharding.
        host = tree_lib.stack_layers(load(tree_lib.unstack_layers(abstract_params), host=True), np.stack)
    elif tree_lib.is_stacked(abstract_params, tree_lib.GROUP_KEY):
        # A scanned routed decoder: groups/layers_{j} [G] holds layer g * every + j.
        every = len([k for k in abstract_params[tree_lib.GROUP_KEY] if k.startswith(tree_lib.SCAN_KEY + "_")])
        host = tree_lib.group_layers(load(tree_lib.ungroup_layers(abstract_params), host=True), every, np.stack)
    else:
        return load(abstract_params, shardings=shardings)
    sh = tree_lib.flatten(shardings) if shardings is not None else {}
    return tree_lib.unflatten({k: core.place(v, sh.get(k)) for k, v in tree_lib.flatten(host).items()})


def save_hf(model: nn.Module, params, path: str) -> None:
    """Writes ``path/config.json`` + ``path/model.safetensors`` that transformers loads.

    LoRA adapters (``lora_a`` / ``lora_b`` params) are merged into their kernels first
    (``W + (lora_alpha / r) A B`` in fp32, ``lora_alpha`` from ``model.config``), so the checkpoint is
    the fine-tuned model as a plain HF model.
    """
    # Scanned layers: back to layers_{i} (and a scanned routed decoder's groups too).
    params = tree_lib.ungroup_layers(tree_lib.unstack_layers(nn.meta.unbox(params)))
    if lora.has_lora(params):
        alpha = getattr(getattr(model, "config", None), "lora_alpha", None)
        if alpha is None:
            raise ValueError(f"params hold LoRA adapters but {type(model).__name__} has no "
                             "config.lora_alpha to merge them with; merge first with "
                             "vlmjax.models.lora.merge_lora(params, lora_alpha).")
        params = lora.merge_lora(params, alpha)
    exporters = _exporters()
    for cls, fn in exporters.items():
        if isinstance(model, cls):
            hf_config, rules, prefix = fn(model)
            break
    else:
        raise ValueError(f"save_hf does not know {type(model).__name__}; known: "
                         f"{sorted(c.__name__ for c in exporters)}.")
    tensors = core.hf_tensors(params, rules, prefix=prefix)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _exporters():
    """Module class -> ``export(module) -> (hf_config dict, rules, name prefix)``."""
    out = {}
    for name in sorted(set(FAMILIES.values())):
        mod = importlib.import_module(f"vlmjax.convert.{name}")
        out.update(getattr(mod, "EXPORTERS", {}))
    return out


def load_tokenizer(path: str):
    """The checkpoint's tokenizer from the same local directory (never the hub, never remote code)."""
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


__all__ = ["FAMILIES", "Spec", "build", "from_config", "load_hf", "load_params", "load_tokenizer", "register", "save_hf", "vision_tower"]
