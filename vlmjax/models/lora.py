"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685): merging them into the base kernels.

A ``layers.DenseGeneral`` with ``lora_rank = r > 0`` holds, next to ``kernel [*in, *out]``,
``lora_a [*in, r]`` and ``lora_b [r, *out]`` and computes ``x W + (alpha / r) x A B``. Merging
(``W' = W + (alpha / r) A B``, as HF peft ``merge_and_unload``) gives a plain dense model with the
same outputs, e.g. to export the fine-tuned model (``vlmjax.convert.save_hf`` does it) or to serve
it without the extra matmuls.

    merged = merge_lora(params, lora_alpha=config.lora_alpha)
    logits, _ = Decoder(dataclasses.replace(config, lora_rank=0)).apply({"params": merged}, tokens)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

LORA_PARAMS = ("lora_a", "lora_b")
# optim.trainable / load_pretrained(skip=...) pattern matching exactly the adapter params.
LORA_REGEX = r"(^|/)lora_[ab]$"


def has_lora(params: Mapping[str, Any]) -> bool:
    """True if any module in the (nested dict) ``params`` tree holds ``lora_a`` / ``lora_b``."""
    for k, v in params.items():
        if k in LORA_PARAMS and not isinstance(v, Mapping):
            return True
        if isinstance(v, Mapping) and has_lora(v):
            return True
    return False


def merge_lora(params: Mapping[str, Any], lora_alpha: float) -> dict[str, Any]:
    """Folds every adapter into its kernel: ``kernel + (lora_alpha / r) * lora_a @ lora_b``.

    Args:
        params: nested dict of (unboxed) params; a module dict with ``lora_a [*in, r]`` and
            ``lora_b [r, *out]`` must also hold ``kernel [*in, *out]``.
        lora_alpha: the model's ``lora_alpha``; the rank ``r`` is read from each ``lora_a``'s last axis
            (so alpha / r is exactly the scale the layer used).

    Returns:
        A new nested dict without ``lora_a`` / ``lora_b``: the tree of the same model with
        ``lora_rank=0``. The product is computed in fp32 and the kernel keeps its dtype.
    """
    if not lora_alpha > 0:
        raise ValueError(f"merge_lora needs the model's lora_alpha > 0, got {lora_alpha!r}.")

    def merge(tree: Mapping[str, Any], path: str) -> dict[str, Any]:
        out = {k: merge(v, f"{path}/{k}" if path else k) if isinstance(v, Mapping) else v
               for k, v in tree.items() if k not in LORA_PARAMS}
        present = [k for k in LORA_PARAMS if k in tree]
        if not present:
            return out
        if len(present) != 2 or "kernel" not in tree:
            raise ValueError(f"{path or '<root>'}: LoRA needs kernel, lora_a and lora_b together; found "
                             f"{sorted(tree)}.")
        kernel, a, b = tree["kernel"], tree["lora_a"], tree["lora_b"]
        n_in = a.ndim - 1
        if a.shape[:n_in] + b.shape[1:] != kernel.shape or a.shape[-1] != b.shape[0]:
            raise ValueError(f"{path}: lora_a {a.shape} @ lora_b {b.shape} does not match kernel "
                             f"{kernel.shape}.")
        scale = float(lora_alpha) / a.shape[-1]
        delta = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1,
                              precision=jax.lax.Precision.HIGHEST)
        out["kernel"] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
        return out

    return merge(params, "")
