"""LoRA adapters (Hu et al. 2021, arXiv 2106.09685): their settings, init, and merging them away.

``LoraConfig`` is the one place the adapter settings live: a decoder builds it from its flat
``lora_*`` config fields (``DecoderConfig.lora``) and passes it down, unchanged, to every
``layers.DenseGeneral`` named in ``targets``. Such a layer holds, next to ``kernel [*in, *out]``,
``lora_a [*in, r]`` and ``lora_b [r, *out]`` and computes ``x W + (alpha / r) x A B``. Merging
(``W' = W + (alpha / r) A B``, as HF peft ``merge_and_unload``) gives a plain dense model with the
same outputs, e.g. to export the fine-tuned model (``vlmjax.convert.save_hf`` does it) or to serve
it without the extra matmuls.

    merged = merge_lora(params, lora_alpha=config.lora_alpha)
    logits, _ = Decoder(dataclasses.replace(config, lora_rank=0)).apply({"params": merged}, tokens)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vlmjax import tree as tree_lib

LORA_PARAMS = ("lora_a", "lora_b")
# optim.trainable / load_pretrained(skip=...) pattern matching exactly the adapter params.
LORA_REGEX = r"(^|/)lora_[ab]$"
# Projections of a decoder layer that can carry LoRA adapters (HF peft ``target_modules`` names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings (hashable: a Linen attribute). Errors name the user-facing
    ``config.model.lora_*`` fields (``rank`` is ``lora_rank``, ...).

    rank: r, the adapters' inner size (0 = no adapters).
    alpha: the adapter output is scaled by ``alpha / rank`` (peft's ``lora_alpha``).
    dropout: dropout on the adapter input, active only when ``apply`` gets a "dropout" rng.
    targets: the projections that get adapters (``LORA_TARGETS`` names).
    """

    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        # Lists (JSON, command-line overrides) -> tuple, so the config stays hashable.
        t = self.targets
        object.__setattr__(self, "targets", (t,) if isinstance(t, str) else tuple(t))

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on the low-rank term."""
        return self.alpha / self.rank

    def for_target(self, name: str) -> LoraConfig | None:
        """This config if projection ``name`` gets an adapter, else None."""
        return self if self.rank and name in self.targets else None

    def validate(self) -> None:
        """Raises ValueError naming the offending ``lora_*`` field and what it accepts."""
        r = self.rank
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"lora_rank must be a non-negative integer (0 = no LoRA), got {r!r}.")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"lora_targets has unknown projection(s) {unknown}; valid names: "
                             f"{list(LORA_TARGETS)}.")
        if r > 0:
            if not self.alpha > 0:
                raise ValueError(
                    f"lora_rank={r} needs lora_alpha > 0 (adapters are scaled by lora_alpha / lora_rank), "
                    f"got lora_alpha={self.alpha!r}; e.g. set lora_alpha={2 * r}.")
            if not self.targets:
                raise ValueError(f"lora_rank={r} with empty lora_targets adds no adapter; "
                                 f"name projections from {list(LORA_TARGETS)} or set lora_rank=0.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout!r}.")


def lora_a_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """HF peft's default ``lora_A`` init (``init_lora_weights=True``): ``kaiming_uniform_(a=sqrt(5))``.

    For a torch weight ``[r, fan_in]`` that is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); here ``shape`` is
    ``[*in_dims, r]`` and ``fan_in = prod(in_dims)``.
    """
    fan_in = 1
    for d in shape[:-1]:
        fan_in *= d
    bound = 1.0 / fan_in**0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _leaf(path: str) -> str:
    return path.rpartition(tree_lib.SEP)[2]


def has_lora(params: Mapping[str, Any]) -> bool:
    """True if any module in the (nested dict) ``params`` tree holds ``lora_a`` / ``lora_b``."""
    return any(_leaf(k) in LORA_PARAMS for k in tree_lib.flatten(params))


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
    flat = tree_lib.flatten(params)
    modules: dict[str, dict[str, Any]] = {}  # module path -> {param name: array}
    for k, v in flat.items():
        module, _, name = k.rpartition(tree_lib.SEP)
        modules.setdefault(module, {})[name] = v
    out = {k: v for k, v in flat.items() if _leaf(k) not in LORA_PARAMS}
    for module, tree in modules.items():
        present = [k for k in LORA_PARAMS if k in tree]
        if not present:
            continue
        if len(present) != 2 or "kernel" not in tree:
            raise ValueError(f"{module or '<root>'}: LoRA needs kernel, lora_a and lora_b together; found "
                             f"{sorted(tree)}.")
        kernel, a, b = tree["kernel"], tree["lora_a"], tree["lora_b"]
        n_in = a.ndim - 1
        if a.shape[:n_in] + b.shape[1:] != kernel.shape or a.shape[-1] != b.shape[0]:
            raise ValueError(f"{module}: lora_a {a.shape} @ lora_b {b.shape} does not match kernel "
                             f"{kernel.shape}.")
        scale = float(lora_alpha) / a.shape[-1]
        delta = jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=1,
                              precision=jax.lax.Precision.HIGHEST)
        kernel_path = f"{module}{tree_lib.SEP}kernel" if module else "kernel"
        out[kernel_path] = (jnp.asarray(kernel, jnp.float32) + scale * delta).astype(kernel.dtype)
    return tree_lib.unflatten(out)
