"""Per-frame latents of video clips, encoded once and cached: the regression targets of the
two-pass foveated video model (it predicts frame t+1's latent, `vlmjax.models.foveated`).

The PyTorch prototype regressed frozen SD-VAE latents (diffusers `AutoencoderKL`). Encoding every
frame at every step would cost more than the model itself, so the latents are computed ONCE per
(data, encoder) as preprocessing and read back next to the frames (F = num_frames, H x W frame
pixels, d = downsample, h = H / d, w = W / d, C latent channels):

  frames:   float32 [F, H, W, 3] in [0, 1] (uint8 with data.dtype='uint8')     from the clip source
  latents:  float32 [F, h, w, C]                                               from the cache

Encoders (`config.latents.encoder`):

  'pixel'  (default; embedded, nothing to load) `pixel_latents`: d x d average pooling of RGB plus
           the per-cell standard deviation of luminance (local structure), C = 4, through a fixed
           affine map that makes each channel roughly zero-mean and unit-scale, the role SD-VAE's
           scaling_factor 0.18215 plays for its latents.
  'vae'    `VAELatentEncoder`: a local diffusers AutoencoderKL directory (config.json +
           diffusion_pytorch_model.safetensors; pickles are refused), CPU torch, the deterministic
           `latent_dist.mean` (never a sample) times the VAE's scaling_factor. Needs the `latents`
           extra (`pip install -e ".[latents]"`).

The cache (`build_latent_cache`), one per split, in `cache_dir` (default `<workdir>/latent_cache`,
passed by the caller):

  latents_<split>_<hash>.npy   float32 [num_clips, F, h, w, C], read with np.load(mmap_mode='r')
  latents_<split>_<hash>.json  metadata: the fingerprint, shape, dtype, encoder identity, file size

<hash> is a SHA-256 of the fingerprint (`cache_fingerprint`): split length, frame shape, a hash of
the frames of three probe clips, the content-determining fields of the data config (when given) and
the encoder's identity (for 'vae': a hash of config.json and of the weights). A changed config thus
gets a new file name and a fresh build; the old files stay (delete them by hand). Both files are
written under temporary names and `os.replace`d, the .npy first, the .json last: the .json marks a
complete cache, so a killed build is never read (its `.*.tmp` file may be deleted), and concurrent
builders of the same cache each write a complete, identical copy. Re-opening checks the metadata
against the expected fingerprint and the .npy's header, shape and byte size; a truncated or
inconsistent cache is logged as a warning and rebuilt (`open_latent_cache` alone raises
`CorruptLatentCacheError`).

Size: the cache holds every clip of the split, len(source) of them; for procedural clips that is
config.data.num_train / num_eval (e.g. 100_000 clips x 8 frames x 8 x 8 x 4 float32 = 800 MB at
64 px with d = 8). Only those clips are encoded, once; lower num_train to bound the build.

`LatentClips` is the random-access source (grain protocol) of one split, `latent_sources` wraps a
`clips.ClipSources` so the video pipeline (`vlmjax.data.video`) carries latents unchanged.

Imports only `clips` from `vlmjax.data`; torch and diffusers are imported lazily, for 'vae' only.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from absl import logging
from einops import rearrange, reduce
import grain
import ml_collections
import numpy as np

from vlmjax.data import clips

ENCODERS = ("pixel", "vae")
# Bump when the bytes a cache holds change for the same config (file layout, pixel encoder maths):
# it is part of every fingerprint, so old caches are not reused.
CACHE_FORMAT = 1
LATENT_DTYPE = np.float32
# BT.601 luma weights of the pixel encoder's structure channel.
LUMA = (0.299, 0.587, 0.114)
# Pixel encoder affine map: latent = (raw - PIXEL_SHIFT) / PIXEL_SCALE per channel (R, G, B mean,
# luminance std). Pooled natural-image colours have a mean near 0.5 and a std near 0.25 per channel;
# the 8 x 8 luminance std has a mean and spread near 0.05 (procedural clips, 64 px, d = 8: colour
# means 0.48-0.52, stds 0.17; luminance std mean 0.055, std 0.035).
PIXEL_SHIFT = (0.5, 0.5, 0.5, 0.05)
PIXEL_SCALE = (0.25, 0.25, 0.25, 0.05)
# Fields of the video data config that do not change a clip's frames, left out of the fingerprint
# (every other field is in it, so a new field errs on the side of a rebuild). Split sizes enter the
# fingerprint as len(source).
_FRAME_NEUTRAL_DATA_FIELDS = frozenset({
    "patch_size", "change_threshold", "shuffle_seed", "num_train", "num_eval", "train_ref_order",
    "eval_ref_order", "ref_mode", "refresh_interval", "num_threads", "prefetch_buffer_size",
    "prefetch_batches", "num_classes", "label_key", "decode_threads"})
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_INSTALL_HINT = 'pip install -e ".[latents]" (diffusers and torch, CPU is enough)'
_LOG_EVERY_S = 30.0


def default_config() -> ml_collections.ConfigDict:
    """The `latents` section of an experiment config: the per-frame regression targets."""
    c = ml_collections.ConfigDict()
    # 'pixel' (embedded: pooled colour + local luminance std, C = 4, nothing to load) or 'vae' (a
    # diffusers AutoencoderKL directory, see vae_path; its latent_dist.mean x scaling_factor).
    c.encoder = "pixel"
    # 'vae' only: a local AutoencoderKL directory (config.json +
    # diffusion_pytorch_model.safetensors, e.g. the vae/ folder of a Stable Diffusion checkpoint).
    # Nothing is downloaded; '' for 'pixel'.
    c.vae_path = ""
    # Frame pixels per latent cell along each side: the pixel encoder's pooling factor; for 'vae' it
    # must equal the VAE's own factor 2 ** (len(block_out_channels) - 1) (8 for SD-VAE). H and W of
    # the frames must be multiples of it.
    c.downsample = 8
    # Where the caches live; '' = the caller's default (the trainer passes <workdir>/latent_cache).
    # Must be a local directory: the cache is memory-mapped.
    c.cache_dir = ""
    # Frames per VAE forward pass while building the cache (CPU torch; bounds its memory).
    c.batch_size = 16
    # grain reader threads producing clips while the encoder runs (0 = inline).
    c.num_threads = 2
    return c


# ---------------------------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------------------------


def _read_vae_config(path: str) -> dict[str, Any]:
    """config.json of an AutoencoderKL directory, after checking the directory holds safetensors."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"config.latents.vae_path={path!r} is not a directory; name a local diffusers "
            "AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).")
    names = os.listdir(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        hint = (f"; it looks like a whole pipeline: use config.latents.vae_path="
                f"{os.path.join(path, 'vae')!r}" if "model_index.json" in names
                and os.path.isdir(os.path.join(path, "vae")) else "")
        raise FileNotFoundError(
            f"config.latents.vae_path={path!r} has no config.json (an AutoencoderKL directory as "
            f"`save_pretrained` writes it){hint}.")
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(
                f"config.latents.vae_path={path!r} holds only pickle-based weights "
                f"({', '.join(pickles)}); vlmjax never unpickles (it can run arbitrary code). "
                "Convert once to safetensors in a trusted environment: `AutoencoderKL."
                "from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`.")
        raise FileNotFoundError(
            f"config.latents.vae_path={path!r} has no *.safetensors weights "
            "(diffusion_pytorch_model.safetensors).")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(
            f"config.latents.vae_path={path!r} holds a {config['_class_name']}, not an "
            "AutoencoderKL; name the VAE's directory.")
    return config


def vae_downsample(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell of an AutoencoderKL: 2 ** (len(block_out_channels) - 1)."""
    return 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)


def check_config(cfg) -> None:
    """Fails early, naming the field of config.latents, on values that cannot work."""
    if cfg.encoder not in ENCODERS:
        close = difflib.get_close_matches(str(cfg.encoder), ENCODERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"config.latents.encoder={cfg.encoder!r} is not one of {ENCODERS}{hint}")
    for field, low in (("downsample", 1), ("batch_size", 1), ("num_threads", 0)):
        if not isinstance(cfg[field], int) or cfg[field] < low:
            raise ValueError(f"config.latents.{field}={cfg[field]!r} must be an int >= {low}.")
    if cfg.cache_dir and "://" in str(cfg.cache_dir):
        raise ValueError(
            f"config.latents.cache_dir={cfg.cache_dir!r} must be a local directory (the cache is "
            "memory-mapped); set it to local disk.")
    if cfg.encoder == "pixel":
        if cfg.vae_path:
            raise ValueError(
                f"config.latents.vae_path={cfg.vae_path!r} is set but config.latents.encoder="
                "'pixel' ignores it; set config.latents.encoder='vae' or "
                "config.latents.vae_path=''.")
        return
    if not cfg.vae_path:
        raise ValueError(
            "config.latents.encoder='vae' needs config.latents.vae_path: a local diffusers "
            "AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).")
    factor = vae_downsample(_read_vae_config(cfg.vae_path))
    if cfg.downsample != factor:
        raise ValueError(
            f"config.latents.downsample={cfg.downsample} but the VAE in {cfg.vae_path!r} "
            f"downsamples by {factor} (2 ** (len(block_out_channels) - 1)); set "
            f"config.latents.downsample={factor}.")


# ---------------------------------------------------------------------------------------------
# Encoders.
# ---------------------------------------------------------------------------------------------


class LatentEncoder(Protocol):
    """Frames -> latents. `identity()` is JSON data that pins the encoder's output (a cache built
    by an encoder of a different identity is never reused)."""

    name: str
    downsample: int
    channels: int

    def identity(self) -> dict[str, Any]: ...

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """frames: float32 [N, H, W, 3] in [0, 1] -> float32 [N, H / d, W / d, C]."""


def _check_frame_shape(shape: Sequence[int], downsample: int) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3]; got shape {tuple(shape)}.")
    _, height, width, _ = shape
    if height % downsample or width % downsample:
        raise ValueError(
            f"frames of {height} x {width} pixels are not a multiple of config.latents."
            f"downsample={downsample}; set config.data.image_size to a multiple of {downsample}.")


def _as_unit_float(frames: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] (uint8 frames are scaled by 1/255)."""
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) * np.float32(1.0 / 255.0)
    return np.asarray(frames, dtype=np.float32)


def pixel_latents(frames: np.ndarray, downsample: int = 8, *,
                  normalize: bool = True) -> np.ndarray:
    """The embedded pixel-space encoder.

    Args:
      frames: [N, H, W, 3] float in [0, 1] (or uint8, scaled by 1/255); H, W multiples of d.
      downsample: d, the pooling factor.
      normalize: apply the fixed affine map (PIXEL_SHIFT, PIXEL_SCALE); False gives the raw
        channels.

    Returns:
      float32 [N, H / d, W / d, 4]: the mean R, G, B of each d x d cell and the standard deviation
      of its luminance (LUMA weights; 0 on a flat cell), each (raw - shift) / scale when normalized.
    """
    _check_frame_shape(frames.shape, downsample)
    x = _as_unit_float(frames)
    colour = reduce(x, "n (h p) (w q) c -> n h w c", "mean", p=downsample, q=downsample)
    luma = np.einsum("nyxc,c->nyx", x, np.asarray(LUMA, np.float32))
    cells = rearrange(luma, "n (h p) (w q) -> n h w (p q)", p=downsample, q=downsample)
    # The std is shift-invariant: centring on each cell's first pixel makes a flat cell exactly 0
    # (its float32 mean is not always exactly its value), then two passes (no cancellation).
    cells = cells - cells[..., :1]
    spread = np.sqrt(np.mean(np.square(cells - cells.mean(-1, keepdims=True)), axis=-1))
    raw = np.concatenate([colour, spread[..., None]], axis=-1).astype(np.float32)
    if not normalize:
        return raw
    return ((raw - np.asarray(PIXEL_SHIFT, np.float32))
            / np.asarray(PIXEL_SCALE, np.float32)).astype(np.float32)


class PixelLatentEncoder:
    """`pixel_latents` as a `LatentEncoder` (C = 4)."""

    name = "pixel"
    channels = 4

    def __init__(self, downsample: int = 8):
        self.downsample = downsample

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "downsample": self.downsample, "shift": list(PIXEL_SHIFT),
                "scale": list(PIXEL_SCALE), "luma": list(LUMA)}

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return pixel_latents(frames, self.downsample)

    def __repr__(self) -> str:
        return f"PixelLatentEncoder(downsample={self.downsample})"


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class VAELatentEncoder:
    """A diffusers AutoencoderKL on CPU torch: frames -> latent_dist.mean x scaling_factor.

    Construction reads only config.json (and hashes the weights for `identity`: ~0.5 s for SD-VAE's
    335 MB); torch, diffusers and the weights are loaded at the first `encode`, so an existing cache
    costs no model load.

    Args:
      path: local AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).
      batch_size: frames per forward pass.
    """

    name = "vae"

    def __init__(self, path: str, batch_size: int = 16):
        if any(importlib.util.find_spec(m) is None for m in ("diffusers", "torch")):
            raise ValueError(
                f"config.latents.encoder='vae' needs diffusers and torch: {_INSTALL_HINT}; or use "
                "config.latents.encoder='pixel'.")
        self.path = str(path)
        self.batch_size = int(batch_size)
        self.config = _read_vae_config(self.path)
        self.downsample = vae_downsample(self.config)
        self.channels = int(self.config.get("latent_channels", 4))
        self._vae = None
        self._identity = None

    def identity(self) -> dict[str, Any]:
        if self._identity is None:  # Hashed once per encoder (both splits ask).
            weights = sorted(n for n in os.listdir(self.path) if n.endswith(".safetensors"))
            self._identity = {
                "name": self.name,
                "config_sha256": hashlib.sha256(
                    json.dumps(self.config, sort_keys=True).encode()).hexdigest(),
                "weights_sha256": {n: _sha256_file(os.path.join(self.path, n)) for n in weights},
            }
        return self._identity

    def _model(self):
        if self._vae is None:
            try:
                import diffusers  # pylint: disable=g-import-not-at-top  (heavy; 'vae' only)
            except ImportError as e:
                raise ValueError(
                    f"config.latents.encoder='vae' needs diffusers: {_INSTALL_HINT}.") from e
            start = time.perf_counter()
            vae = diffusers.AutoencoderKL.from_pretrained(
                self.path, use_safetensors=True, local_files_only=True)
            self._vae = vae.to("cpu").eval()
            logging.info("Loaded the AutoencoderKL in %s (%d pixels per latent, %d channels, "
                         "scaling_factor %s) in %.1f s.", self.path, self.downsample,
                         self.channels, vae.config.scaling_factor, time.perf_counter() - start)
        return self._vae

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """frames: [N, H, W, 3] float in [0, 1] (or uint8) -> float32 [N, H / d, W / d, C]."""
        import torch  # pylint: disable=g-import-not-at-top  (heavy; 'vae' only)

        _check_frame_shape(frames.shape, self.downsample)
        vae = self._model()
        scale = float(vae.config.scaling_factor)
        # SD3 / Flux VAEs also shift: (z - shift_factor) * scaling_factor. SD-VAE's shift is None.
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        x = _as_unit_float(frames)
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                chunk = torch.from_numpy(
                    rearrange(x[start:start + self.batch_size], "n h w c -> n c h w").copy())
                mean = vae.encode(chunk * 2.0 - 1.0).latent_dist.mean  # [n, C, h, w]
                out.append(rearrange(((mean - shift) * scale).float().numpy(),
                                     "n c h w -> n h w c"))
        if not out:
            height, width = frames.shape[1] // self.downsample, frames.shape[2] // self.downsample
            return np.zeros((0, height, width, self.channels), LATENT_DTYPE)
        return np.ascontiguousarray(np.concatenate(out), dtype=LATENT_DTYPE)

    def __repr__(self) -> str:
        return f"VAELatentEncoder({self.path!r}, batch_size={self.batch_size})"


def make_encoder(cfg) -> LatentEncoder:
    """The encoder config.latents names (checked with `check_config`)."""
    check_config(cfg)
    if cfg.encoder == "vae":
        return VAELatentEncoder(cfg.vae_path, cfg.batch_size)
    return PixelLatentEncoder(cfg.downsample)


# ---------------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------------


class CorruptLatentCacheError(ValueError):
    """A cache file exists but cannot be trusted (truncated, inconsistent); `build_latent_cache`
    rebuilds it."""


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _data_fields(data_cfg) -> dict[str, Any]:
    """The fields of a video data config that determine the frames, JSON-able."""
    items = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(items.items())
            if k not in _FRAME_NEUTRAL_DATA_FIELDS}


def cache_fingerprint(source: Sequence[dict[str, np.ndarray]], encoder: LatentEncoder,
                      split: str, data_cfg=None) -> dict[str, Any]:
    """What determines a split's cached latents, as JSON data (hashed into the file name).

    Args:
      source: the split's clips (three probe clips are read: first, middle, last).
      encoder: the latent encoder (its `identity()`).
      split: 'train' | 'eval'.
      data_cfg: the video data config, or None; its frame-determining fields are included (the
        probe hash alone misses a change that leaves those three clips unchanged).

    Returns:
      {format, split, num_clips, frames_shape, frames_dtype, probe_sha256, data, encoder}.
    """
    num = len(source)
    probe = hashlib.sha256()
    shape, dtype = None, None
    for index in sorted({0, num // 2, num - 1} if num else ()):
        frames = np.ascontiguousarray(source[index]["frames"])
        shape, dtype = list(frames.shape), str(frames.dtype)
        probe.update(f"{index}:{frames.dtype}:{frames.shape}".encode())
        probe.update(frames.tobytes())
    return {
        "format": CACHE_FORMAT,
        "split": split,
        "num_clips": num,
        "frames_shape": shape,
        "frames_dtype": dtype,
        "probe_sha256": probe.hexdigest(),
        "data": _data_fields(data_cfg) if data_cfg is not None else None,
        "encoder": encoder.identity(),
    }


@dataclasses.dataclass
class LatentCache:
    """An opened cache of one split.

    Attributes:
      path: the .npy file.
      latents: read-only memory map, float32 [num_clips, F, h, w, C].
      metadata: the .json contents (fingerprint, shape, encoder, ...).
    """

    path: str
    latents: np.ndarray
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def clip_shape(self) -> tuple[int, ...]:
        """[F, h, w, C] of one clip's latents."""
        return tuple(self.latents.shape[1:])

    def __getstate__(self):
        # Pickled (e.g. into grain worker processes) as its path: the map is reopened, not copied.
        return {"path": self.path, "metadata": self.metadata}

    def __setstate__(self, state):
        self.path, self.metadata = state["path"], state["metadata"]
        self.latents = np.load(self.path, mmap_mode="r", allow_pickle=False)

    def __repr__(self) -> str:
        return f"LatentCache({self.path!r}, shape={tuple(self.latents.shape)})"


def cache_paths(cache_dir: str, split: str, fingerprint: Mapping[str, Any]) -> tuple[str, str]:
    """(.npy, .json) paths of the cache of `fingerprint` (its hash is in the name)."""
    stem = os.path.join(os.fspath(cache_dir), f"latents_{split}_{_digest(fingerprint)[:16]}")
    return stem + ".npy", stem + ".json"


def _expected_shape(fingerprint: Mapping[str, Any], encoder: LatentEncoder) -> tuple[int, ...]:
    num = fingerprint["num_clips"]
    if not num:
        return (0,)
    frames, height, width, _ = fingerprint["frames_shape"]
    _check_frame_shape((frames, height, width, 3), encoder.downsample)
    return (num, frames, height // encoder.downsample, width // encoder.downsample,
            encoder.channels)


def open_latent_cache(cache_dir: str, split: str, fingerprint: Mapping[str, Any],
                      expected_shape: Sequence[int] | None = None) -> LatentCache | None:
    """The finished cache of `fingerprint`, or None when there is none.

    Raises:
      CorruptLatentCacheError: the files exist but the metadata does not match the fingerprint or
        the .npy is unreadable, truncated, or of another shape or dtype.
    """
    path, meta_path = cache_paths(cache_dir, split, fingerprint)
    if not os.path.exists(meta_path):  # The .json is written last: no .json, no finished cache.
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptLatentCacheError(f"{meta_path}: unreadable metadata ({e}).") from e
    if metadata.get("fingerprint") != json.loads(json.dumps(fingerprint, default=str)):
        raise CorruptLatentCacheError(f"{meta_path}: its fingerprint is not the expected one.")
    shape = tuple(metadata.get("shape", ()))
    if expected_shape is not None and shape != tuple(expected_shape):
        raise CorruptLatentCacheError(
            f"{meta_path}: shape {shape}, expected {tuple(expected_shape)}.")
    try:
        latents = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:  # Missing, bad header, or shorter than its header says.
        raise CorruptLatentCacheError(f"{path}: unreadable or truncated ({e}).") from e
    if latents.shape != shape or latents.dtype != np.dtype(metadata.get("dtype")):
        raise CorruptLatentCacheError(
            f"{path}: holds {latents.dtype} {latents.shape}, its metadata says "
            f"{metadata.get('dtype')} {shape}.")
    size = os.path.getsize(path)
    if size != metadata.get("file_bytes"):
        raise CorruptLatentCacheError(
            f"{path}: {size} bytes, its metadata says {metadata.get('file_bytes')}.")
    if len(latents) and not (np.isfinite(latents[0]).all() and np.isfinite(latents[-1]).all()):
        raise CorruptLatentCacheError(f"{path}: non-finite latents.")
    return LatentCache(path=path, latents=latents, metadata=metadata)


def _replace_atomically(tmp: str, path: str) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _encode_all(source: Sequence[dict[str, np.ndarray]], encoder: LatentEncoder, out: np.ndarray,
                *, split: str, batch_size: int, num_threads: int) -> None:
    """Encodes clip i of `source` into out[i], `batch_size` frames per encoder call."""
    num, frames_per_clip = out.shape[0], out.shape[1]
    clips_per_batch = max(1, batch_size // frames_per_clip)
    ds = grain.MapDataset.source(source).map(lambda clip: clip["frames"])
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=2 * clips_per_batch))
    ds = ds.batch(clips_per_batch)  # [k, F, H, W, 3], the last batch may be shorter.
    start = last_log = time.perf_counter()
    done = 0
    for frames in ds:
        k = len(frames)
        latents = encoder.encode(rearrange(frames, "k f h w c -> (k f) h w c"))
        latents = rearrange(latents, "(k f) h w c -> k f h w c", k=k)
        if latents.shape[1:] != out.shape[1:]:
            raise ValueError(f"{encoder!r} returned latents of shape {latents.shape[1:]} per "
                             f"clip; expected {out.shape[1:]}.")
        if not np.isfinite(latents).all():
            raise ValueError(
                f"{encoder!r} produced non-finite latents for {split} clips {done}..{done + k - 1};"
                " check config.latents (a broken or fp16-only VAE?).")
        out[done:done + k] = latents
        done += k
        now = time.perf_counter()
        if now - last_log >= _LOG_EVERY_S or done == num:
            rate = done / max(now - start, 1e-9)
            logging.info("Latents (%s, %s): %d/%d clips, %.1f clips/s, %.0f s left.", split,
                         encoder.name, done, num, rate, (num - done) / max(rate, 1e-9))
            last_log = now
    if done != num:
        raise ValueError(f"the {split} source yielded {done} clips, but its len() is {num}.")


def build_latent_cache(source: Sequence[dict[str, np.ndarray]], encoder: LatentEncoder,
                       cache_dir: str, split: str, fingerprint: Mapping[str, Any] | None = None, *,
                       batch_size: int = 16, num_threads: int = 2) -> LatentCache:
    """Opens the split's cache, building it first when it is missing or corrupt.

    Args:
      source: the split's clips, items with frames [F, H, W, 3]; all len(source) of them are
        encoded (for procedural clips: config.data.num_train / num_eval).
      encoder: a `LatentEncoder` (called only when the cache is built).
      cache_dir: local directory (created if needed).
      split: 'train' | 'eval' (in the file name).
      fingerprint: `cache_fingerprint(...)` (None: computed from `source` and `encoder` without the
        data config).
      batch_size: frames per encoder call (whole clips; at least one clip).
      num_threads: grain reader threads producing clips while the encoder runs.

    Returns:
      The opened `LatentCache`, latents float32 [len(source), F, H / d, W / d, C].
    """
    if "://" in os.fspath(cache_dir):
        raise ValueError(
            f"the latent cache directory {cache_dir!r} must be local (the cache is memory-mapped); "
            "set config.latents.cache_dir to a local directory.")
    if fingerprint is None:
        fingerprint = cache_fingerprint(source, encoder, split)
    if fingerprint["num_clips"] != len(source):
        raise ValueError(f"the fingerprint counts {fingerprint['num_clips']} {split} clips, the "
                         f"source has {len(source)}; compute it with "
                         "cache_fingerprint(source, ...).")
    shape = _expected_shape(fingerprint, encoder)
    path, meta_path = cache_paths(cache_dir, split, fingerprint)
    try:
        cache = open_latent_cache(cache_dir, split, fingerprint, shape)
    except CorruptLatentCacheError as e:
        logging.warning("Latent cache is corrupt, rebuilding it: %s", e)
        cache = None
    if cache is not None:
        logging.info("Reusing the %s latent cache %s %s.", split, path, cache.latents.shape)
        return cache

    os.makedirs(cache_dir, exist_ok=True)
    others = sorted(n for n in os.listdir(cache_dir)
                    if n.startswith(f"latents_{split}_") and n.endswith(".npy")
                    and n != os.path.basename(path))
    logging.info("Building the %s latent cache %s: %d clips -> %s float32 with %r%s.", split, path,
                 len(source), shape, encoder,
                 f" (other caches in the folder, for other configs: {', '.join(others)})"
                 if others else "")
    start = time.perf_counter()
    tmp = os.path.join(os.fspath(cache_dir), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        if len(source):
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=LATENT_DTYPE, shape=shape)
            _encode_all(source, encoder, out, split=split, batch_size=batch_size,
                        num_threads=num_threads)
            out.flush()
            del out
        else:
            with open(tmp, "wb") as f:
                np.save(f, np.zeros(shape, LATENT_DTYPE))
        file_bytes = os.path.getsize(tmp)
        _replace_atomically(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    seconds = time.perf_counter() - start
    metadata = {
        "fingerprint": json.loads(json.dumps(fingerprint, default=str)),
        "fingerprint_sha256": _digest(fingerprint),
        "split": split,
        "shape": list(shape),
        "dtype": np.dtype(LATENT_DTYPE).name,
        "file_bytes": file_bytes,
        "encoder": encoder.name,
        "build_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta_tmp = f"{meta_path}.{uuid.uuid4().hex}.tmp"
    with open(meta_tmp, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    _replace_atomically(meta_tmp, meta_path)
    logging.info("Built the %s latent cache %s in %.1f s (%.1f clips/s, %.1f MB).", split, path,
                 seconds, len(source) / max(seconds, 1e-9), file_bytes / 1e6)
    cache = open_latent_cache(cache_dir, split, fingerprint, shape)
    assert cache is not None
    return cache


# ---------------------------------------------------------------------------------------------
# Clips with latents.
# ---------------------------------------------------------------------------------------------


class LatentClips:
    """Random-access clip source (grain protocol) adding each clip's cached latents.

    `latent_clips[i]` is `clips[i]` plus latents float32 [F, h, w, C] (a copy out of the map).
    """

    def __init__(self, clips: Sequence[dict[str, np.ndarray]], cache: LatentCache):
        if len(clips) != len(cache):
            raise ValueError(f"{cache!r} holds {len(cache)} clips, the source {len(clips)}; "
                             "rebuild the cache for this source (build_latent_cache).")
        self._clips = clips
        self._cache = cache

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """[F, h, w, C]."""
        return self._cache.clip_shape

    def __len__(self) -> int:
        return len(self._clips)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        clip = dict(self._clips[index])
        clip["latents"] = np.array(self._cache.latents[index], dtype=np.float32)
        return clip

    def __repr__(self) -> str:
        return f"LatentClips({self._clips!r}, {self._cache!r})"


def latent_sources(clip_sources: clips.ClipSources, latents_cfg, *, cache_dir: str,
                   data_cfg=None) -> clips.ClipSources:
    """`clip_sources` with latents: train and eval wrapped in `LatentClips`, caches built if needed.

    Args:
      clip_sources: e.g. `vlmjax.data.video._clip_sources(data_cfg)`.
      latents_cfg: the `latents` section (`default_config()`).
      cache_dir: used when config.latents.cache_dir is '' (the trainer: <workdir>/latent_cache).
      data_cfg: the video data config, or None; its frame-determining fields go into the
        fingerprint (recommended: without it only the split sizes, frame shape and three probe
        clips detect a data change).

    Returns:
      ClipSources with the same classes; items carry latents float32 [F, h, w, C]; the
      description names the encoder and the cache.
    """
    encoder = make_encoder(latents_cfg)  # Checks the config; loads no model.
    directory = latents_cfg.cache_dir or cache_dir
    if not directory:
        raise ValueError("no latent cache directory: set config.latents.cache_dir (or pass "
                         "cache_dir=<workdir>/latent_cache).")
    wrapped = {}
    for split in ("train", "eval"):
        source = getattr(clip_sources, split)
        cache = build_latent_cache(
            source, encoder, directory, split, cache_fingerprint(source, encoder, split, data_cfg),
            batch_size=latents_cfg.batch_size, num_threads=latents_cfg.num_threads)
        wrapped[split] = LatentClips(source, cache)
    shape = "x".join(str(n) for n in wrapped["train"].latent_shape[1:])
    return clips.ClipSources(
        train=wrapped["train"],
        eval=wrapped["eval"],
        num_classes=clip_sources.num_classes,
        class_names=clip_sources.class_names,
        description=(f"{clip_sources.description} + {encoder.name} latents [{shape}] per frame "
                     f"cached in {directory}"),
    )
