"""Hugging Face checkpoint directories <-> Flax params, driven by one mapping table per family.

A family module (``llama.py``, ``clip.py``, ...) lists ``Rule``s: an HF tensor name, the Flax param
path it becomes, and a ``Transform`` that knows both directions (``to_flax`` / ``to_hf``), so the
same table loads and saves. This module does the rest:

- reads safetensors tensor by tensor (``safe_open(framework="numpy")``), never pickles;
- checks names and shapes BEFORE reading any data, and reports missing, unexpected and mis-shaped
  tensors together in one error;
- places each converted array directly with its sharding when a mesh is given
  (``jax.make_array_from_callback``: every device receives only its shard, on every process), so the
  whole model never sits on one device first.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from safetensors import safe_open

from vlmjax import tree as tree_lib

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ------------------------------------------------------------------------------------------------
# Transforms (both directions)
# ------------------------------------------------------------------------------------------------

class Transform(abc.ABC):
    """HF array <-> Flax array. ``flax_shape`` is the target param's shape (from the module)."""

    @abc.abstractmethod
    def to_flax(self, x: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor -> Flax param of ``flax_shape``."""

    @abc.abstractmethod
    def to_hf(self, y: np.ndarray) -> np.ndarray:
        """Flax param -> HF tensor (exact inverse of ``to_flax``)."""

    @abc.abstractmethod
    def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape that ``to_flax`` turns into ``flax_shape`` (checked before reading)."""


class Identity(Transform):
    """Same array (norm scales, embeddings, position tables)."""

    def to_flax(self, x, flax_shape):
        return x.reshape(flax_shape)

    def to_hf(self, y):
        return y

    def hf_shape(self, flax_shape):
        return tuple(flax_shape)


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """Same data, HF keeps it flat (e.g. q_proj.bias [H*Dh] -> [H, Dh])."""

    hf_ndim: int = 1

    def to_flax(self, x, flax_shape):
        return x.reshape(flax_shape)

    def to_hf(self, y):
        return y.reshape(self.hf_shape(y.shape))

    def hf_shape(self, flax_shape):
        if self.hf_ndim == 1:
            return (int(np.prod(flax_shape)),)
        raise ValueError(f"Reshape to {self.hf_ndim}-D is ambiguous; use a custom Transform.")


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
    """torch ``nn.Linear.weight [out, in]`` <-> Flax kernel ``[*in_dims, *out_dims]``.

    ``n_in`` = how many leading Flax kernel axes are input axes (q_proj ``[D, H, Dh]``: 1;
    o_proj ``[H, Dh, D]``: 2).
    """

    n_in: int = 1

    def to_flax(self, x, flax_shape):
        return x.T.reshape(flax_shape)

    def to_hf(self, y):
        return np.ascontiguousarray(y.reshape(int(np.prod(y.shape[:self.n_in])), -1).T)

    def hf_shape(self, flax_shape):
        return (int(np.prod(flax_shape[self.n_in:])), int(np.prod(flax_shape[:self.n_in])))


class Conv2D(Transform):
    """torch ``Conv2d.weight [out, in, kh, kw]`` <-> Flax ``nn.Conv`` kernel ``[kh, kw, in, out]``."""

    def to_flax(self, x, flax_shape):
        return np.ascontiguousarray(rearrange(x, "o i kh kw -> kh kw i o")).reshape(flax_shape)

    def to_hf(self, y):
        return np.ascontiguousarray(rearrange(y, "kh kw i o -> o i kh kw"))

    def hf_shape(self, flax_shape):
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)


@dataclasses.dataclass
class Spec:
    """What a family builds from an HF config.json: the module and how its params map.

    init_args: example inputs for ``module.init`` (only shapes matter: it runs under eval_shape).
    prefixes: candidate prefixes of HF names (a vision tower saved alone vs inside a two-tower model:
      '' or 'vision_model.'); the one matching most rules is used.
    ignore: substrings of HF names that may be present and are not loaded (buffers, unused heads).
    """

    module: Any
    init_args: tuple
    rules: list
    prefixes: tuple[str, ...] = ("",)
    ignore: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: HF name, Flax path ('a/b/kernel'), transform. ``optional``: may be absent."""

    hf: str
    flax: str
    transform: Transform = Identity()
    optional: bool = False


def expand(rules: Iterable[Rule], **ranges: int) -> list[Rule]:
    """Expands ``{i}`` (or any ``{name}``) in both names for ``name`` in ``range(n)``.

    ``expand([Rule("model.layers.{i}.mlp.up_proj.weight", "layers_{i}/mlp/up_proj/kernel", Linear())], i=2)``
    """
    out = []
    for r in rules:
        keys = [k for k in ranges if "{" + k + "}" in r.hf]
        if not keys:
            out.append(r)
            continue
        (k,) = keys
        for j in range(ranges[k]):
            out.append(dataclasses.replace(r, hf=r.hf.replace("{%s}" % k, str(j)),
                                           flax=r.flax.replace("{%s}" % k, str(j))))
    return out


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint directory
# ------------------------------------------------------------------------------------------------

def read_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"{path} has no config.json. Point init_from/load_hf at a Hugging Face checkpoint directory "
            "(as written by save_pretrained: config.json + *.safetensors).")
    with open(cfg_path) as f:
        return json.load(f)


def safetensors_files(path: str) -> list[str]:
    """The directory's safetensors shards; refuses pickle-based checkpoints with what to do instead."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{path} holds only pickle-based weights ({', '.join(pickles)}). vlmjax never unpickles "
            "(it can run arbitrary code). Convert once to safetensors in a trusted environment, e.g. "
            "`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`.")
    raise FileNotFoundError(f"No *.safetensors files in {path}.")


class TensorIndex:
    """name -> file for every tensor in the directory; shapes read from headers only."""

    def __init__(self, path: str):
        self.files = safetensors_files(path)
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            with safe_open(f, framework="numpy") as sf:
                for name in sf.keys():
                    self.where[name] = f
                    self.shapes[name] = tuple(sf.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        with safe_open(self.where[name], framework="numpy") as sf:
            return sf.get_tensor(name)


def strip_prefix(index: TensorIndex, rules: Sequence[Rule], prefixes: Sequence[str]) -> str:
    """Finds which of ``prefixes`` ('' , 'model.', 'vision_model.', ...) the file's names use."""
    names = set(index.where)
    best, hits = "", -1
    for p in prefixes:
        n = sum((p + r.hf) in names for r in rules)
        if n > hits:
            best, hits = p, n
    return best


def load_params(
    index: TensorIndex,
    rules: Sequence[Rule],
    abstract_params,
    *,
    dtype=jnp.float32,
    shardings=None,
    ignore: Sequence[str] = (),
    prefix: str = "",
    source: str = "",
    host: bool = False,
) -> dict[str, Any]:
    """Converts the tensors named by ``rules`` into a Flax param tree shaped like ``abstract_params``.

    abstract_params: tree of ShapeDtypeStructs (``jax.eval_shape(model.init, ...)["params"]``).
    shardings: matching tree of NamedShardings, or None (default device).
    ignore: regex-free substrings of HF names that may be present and are skipped (buffers such as
      ``rotary_emb.inv_freq``, ``position_ids``, heads the module doesn't have).
    host: return host numpy arrays (``shardings`` unused), e.g. to stack layers before placing them.
    Raises one ValueError listing every missing, unexpected and mis-shaped tensor.
    """
    want = tree_lib.flatten(abstract_params)
    sh = tree_lib.flatten(shardings) if shardings is not None else {}
    rules = list(rules)
    by_flax = {r.flax: r for r in rules}
    missing, mis_shaped, no_param = [], [], []
    for r in rules:
        if r.flax not in want:
            no_param.append(f"{r.flax} (for {prefix + r.hf})")
            continue
        name = prefix + r.hf
        if name not in index.shapes:
            if not r.optional:
                missing.append(name)
            continue
        expect = r.transform.hf_shape(tuple(want[r.flax].shape))
        if tuple(index.shapes[name]) != tuple(expect):
            mis_shaped.append(f"{name}: file {index.shapes[name]} vs model {expect}")
    used = {prefix + r.hf for r in rules}
    unexpected = sorted(n for n in index.where if n not in used and not any(s in n for s in ignore))
    unmapped = sorted(p for p in want if p not in by_flax or
                      (by_flax[p].optional and prefix + by_flax[p].hf not in index.shapes))
    if missing or mis_shaped or unexpected or no_param or unmapped:
        def show(items):
            items = list(items)
            return ", ".join(items[:12]) + (f" (+{len(items) - 12} more)" if len(items) > 12 else "")
        raise ValueError(
            f"Checkpoint {source or index.files[0]} does not match the model built from its config.json:\n"
            f"  missing in checkpoint ({len(missing)}): [{show(missing)}]\n"
            f"  wrong shape ({len(mis_shaped)}): [{show(mis_shaped)}]\n"
            f"  unexpected in checkpoint ({len(unexpected)}): [{show(unexpected)}]\n"
            f"  model params with no tensor ({len(unmapped)}): [{show(unmapped)}]"
            + (f"\n  mapping rules naming no model param: [{show(no_param)}]" if no_param else "")
            + ("\n  (params the checkpoint cannot have, such as LoRA adapters or routers, keep their init "
               "when skipped: vlmjax.tasks.base.load_pretrained(..., skip=(regex, ...)))" if unmapped else ""))

    out = {}
    for r in rules:
        name = prefix + r.hf
        if name not in index.shapes:
            continue
        target = want[r.flax]
        arr = r.transform.to_flax(index.read(name), tuple(target.shape)).astype(dtype)
        out[r.flax] = arr if host else place(arr, sh.get(r.flax))
    return tree_lib.unflatten(out)


def place(arr: np.ndarray, sharding=None) -> jax.Array:
    """A host array on the devices: with ``sharding`` each device receives only its slice (on every
    process of a multi-host job, so the whole array never sits on one device); else the default device."""
    if sharding is None:
        return jnp.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def hf_tensors(params, rules: Sequence[Rule], *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> {HF name: numpy array} with the same table (for ``save_hf``)."""
    flat = tree_lib.flatten(jax.device_get(params))
    out = {}
    for r in rules:
        if r.flax in flat:
            hf = r.transform.to_hf(np.asarray(flat[r.flax], np.float32))
            # ascontiguousarray makes 0-d arrays 1-d; HF scalars (CLIP logit_scale) must stay 0-d.
            out[prefix + r.hf] = np.ascontiguousarray(hf).reshape(np.shape(hf))
    missing = sorted(set(flat) - {r.flax for r in rules})
    if missing:
        raise ValueError(f"Params with no HF mapping (the table is incomplete): {missing[:12]}")
    return out


def map_tree(fn: Callable[[str, Any], Any], tree) -> dict[str, Any]:
    """Applies ``fn(path, leaf)`` over a nested dict with 'a/b/c' paths."""
    return tree_lib.unflatten({k: fn(k, v) for k, v in tree_lib.flatten(tree).items()})
