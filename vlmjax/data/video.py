"""Procedural video clips with exact per-patch change maps, for token-reuse ViTs.

Data for the ReuseViT experiments (`shared/specs/token-reuse.md`, Hwang et al.,
"Déjà Vu", PVLDB 2025) that needs no download: every clip is rendered with
numpy from (config.seed, split, clip index), so any clip can be reproduced on
any host, and the ground truth of "which patches changed" is exact.

A clip is a textured background (static, or panning slowly: sub-pixel drift
of an analytic texture) and `num_sprites` moving sprites (squares, discs,
crosses and triangles drawn with numpy, or scikit-learn's bundled 8x8 digits
when scikit-learn is installed) that bounce off the borders. Sprite 0 is the
*main* sprite: clearly the largest and always drawn on top; its class is the
clip label, so the label is learnable from pooled per-frame features.

Each example is a dict of numpy arrays (F = num_frames, H = W = image_size,
p = patch_size, N = (H / p) * (W / p) patches in row-major order, the order of
a ViT's patch embedding):

  frames:          float32 [F, H, W, 3] in [0, 1] (uint8 with dtype='uint8')
  changed_patches: bool    [F, N]  change_energy > change_threshold; frame 0
                                   is all True (nothing before it)
  change_energy:   float32 [F, N]  mean |frame_t - frame_{t-1}| over the
                                   patch's pixels and channels, computed from
                                   the rendered (quantized) frames: the exact
                                   stand-in for the spec's `compressed_map`
                                   (codec residual energy); 1.0 on frame 0
  label:           int32   []      class of the main sprite (4 shapes, or the
                                   digit 0-9)
  ref_mask:        bool    [F, F]  ref_mask[i, j]: frame i may reference frame j
  ref_type:        float32 [F, 3]  one-hot I / P / B role of each frame
  process_order:   int32   [F]     frame indices in processing order
  mask:            float32 []      1 for a real clip, 0 for eval padding

`ref_mask`, `ref_type` and `process_order` depend only on the config and the
split (train and eval may use different orders, as in the spec); they are
repeated per example so every batch is self-contained.

Frame grouping (the spec's "Setting"; see `frame_grouping`): frames are cut
into consecutive groups of G = len(ref_order) frames, and each group is
processed in the codec-like order `ref_order` (spec: train [0, 4, 2, 1, 3],
test [3, 1, 0, 2]). A frame may only reference frames processed before it, in
the same chain; `refresh_interval` restarts the chain. With
ref_mode='nearest' (default, like hierarchical-B codecs) a frame references
the nearest already-processed frame before it and the nearest after it: two
references make it a B frame, one a P frame, none an I frame. ref_order=(0,)
is plain "previous frame" reuse.

Sources (`config.data.source`): 'procedural' (above; the default) renders
clips; 'folder' (`vlmjax.data.video_files`: `root/<class>/<video>`, a video
being a folder of frame images or a video file) and 'tfds' (`vlmjax.data.
tfds_video`: a prepared ArrayRecord TFDS dataset with a video and a label
feature) decode real videos to the same example format, with change_energy
computed from the decoded frames (real pixel change, including codec noise).
All three share one pipeline: a random-access "clip source" per split
(`ClipSources`) feeds the same shuffle / shard / batch / prefetch chain.

Pipelines mirror `vlmjax.data.lm`: `build_video_data(cfg).train_dataset(...)`
is a checkpointable grain IterDataset of per-process batches (save the
iterator with `grain.checkpoint.CheckpointSave`), and `eval_batches(...)` is a
finite deterministic list with the same length on every process.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

SOURCES = ("procedural", "folder", "tfds")
# Split names tried, in order, for an empty config.data.eval_split (real sources).
EVAL_SPLIT_CANDIDATES = ("validation", "val", "eval", "test")
SPRITE_KINDS = ("shapes", "digits")
BACKGROUNDS = ("static", "pan")
REF_MODES = ("nearest", "all", "anchor")
DTYPES = ("float32", "uint8")
SHAPE_NAMES = ("square", "disc", "cross", "triangle")
# Index of each role in `ref_type` (the spec's ref_type(3) decision-MLP input).
REF_TYPES = ("I", "P", "B")
_SPLIT_IDS = {"train": 0, "eval": 1}

# Main sprite radius and distractor radius, as fractions of image_size.
_MAIN_RADIUS = (0.22, 0.3)
_DISTRACTOR_RADIUS = (0.07, 0.12)
# Background: sum of this many oriented sinusoids of up to _MAX_CYCLES cycles
# per image, around a random base colour (kept inside [0.15, 0.85]).
_NUM_WAVES = 6
_MAX_CYCLES = 8


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a video experiment config (procedural or real clips)."""
    c = ml_collections.ConfigDict()
    # Where clips come from: 'procedural' (rendered with numpy, exact change
    # maps, nothing to download), 'folder' (a directory of videos, see `path`)
    # or 'tfds' (a prepared ArrayRecord TFDS dataset; nothing is downloaded).
    c.source = "procedural"
    # F frames per clip, H = W = image_size pixels, p = patch_size.
    c.num_frames = 8
    c.image_size = 64  # Multiple of patch_size; 224 for CLIP-sized inputs.
    c.patch_size = 16
    # Sprites per clip, including the main (labelled) sprite.
    c.num_sprites = 3
    # 'shapes' (square/disc/cross/triangle drawn with numpy; 4 classes) or
    # 'digits' (scikit-learn's bundled load_digits images; 10 classes; needs
    # scikit-learn installed, nothing is downloaded).
    c.sprite_kind = "shapes"
    # Sprite speed in image widths per frame (each sprite draws its own speed
    # in [0.5, 1.5] x this, direction uniform). 0 = sprites stand still.
    c.sprite_speed = 0.03
    # 'static' or 'pan' (the texture drifts by pan_speed image widths per
    # frame in a random direction, sub-pixel: nearly every patch changes).
    c.background = "static"
    c.pan_speed = 0.01
    # Amplitude of the background texture (1 = the default sinusoid mix, 0 = a flat colour). Scaled
    # after drawing, so every other random choice of a clip stays the same.
    c.texture_contrast = 1.0
    # Std of i.i.d. Gaussian pixel noise added to every frame (0 = none). Noise
    # changes every patch: raise change_threshold above ~1.2 x noise.
    c.noise = 0.0
    # A patch counts as changed when its change_energy exceeds this.
    c.change_threshold = 1e-3
    # 'float32' ([0, 1]) or 'uint8' ([0, 255]; 4x less host memory at 224 px).
    c.dtype = "float32"
    # Clip content seed: clip i of a split is rendered from (seed, split, i).
    c.seed = 0
    # Mixed with the trainer's seed for the training order only.
    c.shuffle_seed = 0
    # Distinct training clips (reshuffled every epoch) and evaluation clips.
    c.num_train = 100_000
    c.num_eval = 256
    # Frame grouping (spec "Setting"): processing order inside each group of
    # len(order) frames, for training and for evaluation.
    c.train_ref_order = (0, 4, 2, 1, 3)
    c.eval_ref_order = (3, 1, 0, 2)
    # 'nearest' (nearest processed frame before and after: I/P/B), 'all'
    # (every processed frame of the chain) or 'anchor' (only the chain's first
    # processed frame).
    c.ref_mode = "nearest"
    # Restart the reference chain every this many frames (a multiple of both
    # group sizes; 0 = one chain per clip).
    c.refresh_interval = 0
    # grain reader threads rendering clips (0 = inline) and their read-ahead.
    c.num_threads = 2
    c.prefetch_buffer_size = 16
    # Batches prepared ahead on a background thread (0 = none).
    c.prefetch_batches = 2

    # --- Real videos (source 'folder' / 'tfds'); ignored by 'procedural'. ---
    # The sprite/background fields above, num_train and num_eval are
    # procedural-only: real split sizes are the number of videos (cap
    # evaluation with eval_batches(max_batches=...)). Real frames carry codec
    # noise, so nearly every patch "changes" at change_threshold=1e-3; raise
    # it (e.g. 0.02-0.05) to count only visible change.
    # 'folder': the root directory, either root/<class>/<video> (splits chosen
    # by a hash, see eval_fraction) or root/<train_split>/<class>/<video> and
    # root/<eval_split>/<class>/<video>. A <video> is a folder of frame images
    # (png/jpg/..., in natural name order) or a file: .gif/.webp (Pillow) or
    # .mp4/.webm/.avi/.mkv/.mov/... (PyAV: pip install av, or vlmjax[video]).
    # 'tfds': the TFDS data_dir (with tfds_name; '' = TFDS default) or, with an
    # empty tfds_name, a prepared builder directory holding dataset_info.json.
    c.path = ""
    # 'tfds' only: dataset name, e.g. 'vlmjax_video' (`tfds_video.
    # write_video_dataset`) or 'my_videos/cfg:1.0.0'. Datasets whose frames
    # are a tfds.features.Video need TensorFlow installed to open.
    c.tfds_name = ""
    # 'folder': split sub-directory names (used when root/<train_split> exists);
    # 'tfds': split specs ('train[:90%]' works). An empty eval_split picks the
    # first of EVAL_SPLIT_CANDIDATES ('validation', 'val', 'eval', 'test') that
    # exists.
    c.train_split = "train"
    c.eval_split = ""
    # 'folder' without split sub-directories: fraction of the videos held out
    # for evaluation, chosen by a CRC32 of "<class>/<video>" (stable when
    # videos are added, identical on every host).
    c.eval_fraction = 0.1
    # Frame sampling: 0 = num_frames frames spread uniformly over the whole
    # video; k >= 1 = every k-th frame of a window centred in the video.
    # Videos with too few frames repeat their last frame (zero change).
    c.frame_stride = 0
    # 'tfds' only: features holding the frames ([T, H, W, C] uint8, or [T]
    # encoded png/jpeg bytes) and the integer label.
    c.video_key = "video"
    c.label_key = "label"
    # Label classes; 0 = infer (folder: class sub-directories; tfds: the
    # label's ClassLabel). Required for tfds labels that are plain integers.
    c.num_classes = 0
    # FFmpeg codec threads per video file (PyAV; 0 = FFmpeg's choice). Keep 1:
    # num_threads grain readers already decode videos in parallel, and more
    # codec threads per reader oversubscribe the host cores next to the step.
    c.decode_threads = 1
    return c


# ---------------------------------------------------------------------------------------------
# Frame grouping.
# ---------------------------------------------------------------------------------------------


def _check_order(order, field: str) -> tuple[int, ...]:
    order = tuple(int(k) for k in order)
    if not order or sorted(order) != list(range(len(order))):
        raise ValueError(
            f"config.data.{field}={order!r} must be a permutation of 0..G-1 (G = frame "
            "group size), e.g. (0, 4, 2, 1, 3) or (0,) for previous-frame references.")
    return order


def frame_grouping(num_frames: int, order, *, ref_mode: str = "nearest",
                   refresh_interval: int = 0) -> dict[str, np.ndarray]:
    """Processing order, reference mask and I/P/B role of every frame.

    Frames are cut into consecutive groups of G = len(order) frames; group g
    (frames g*G .. g*G+G-1) is processed in the order g*G + order[k] (a last,
    shorter group keeps the relative order of its entries < its length). The
    chain of frame t is t // refresh_interval (a single chain when 0). When
    frame t is processed, its candidates are the frames of its chain processed
    before it, and it references, by `ref_mode`:

      'nearest': the latest-in-time candidate before t and the earliest after
                 t (at most two; the codec-like hierarchical-B choice);
      'all':     every candidate;
      'anchor':  the chain's first processed frame.

    A frame never references itself or a frame processed after it. Its role is
    I without references, B with references on both sides in time, else P.

    Args:
      num_frames: F.
      order: a permutation of range(G).
      ref_mode: one of REF_MODES.
      refresh_interval: frames per chain, 0 or a multiple of G.

    Returns:
      process_order: int32 [F] frame indices in processing order;
      ref_mask: bool [F, F], ref_mask[i, j] = frame i may reference frame j
        (indices are time indices; `ref_mask[o][:, o]` with o = process_order
        is strictly lower triangular);
      ref_type: float32 [F, 3] one-hot over REF_TYPES = (I, P, B).
    """
    order = _check_order(order, "train_ref_order / eval_ref_order")
    group = len(order)
    if ref_mode not in REF_MODES:
        raise ValueError(f"config.data.ref_mode={ref_mode!r} is not one of {REF_MODES}.")
    if refresh_interval < 0 or (refresh_interval and refresh_interval % group):
        raise ValueError(
            f"config.data.refresh_interval={refresh_interval} must be 0 (one chain per "
            f"clip) or a multiple of the frame group size {group} (len of {order}): the "
            "chain restarts at a group boundary.")
    process_order = []
    for start in range(0, num_frames, group):
        process_order += [start + k for k in order if start + k < num_frames]

    def chain(t):
        return t // refresh_interval if refresh_interval else 0

    ref_mask = np.zeros((num_frames, num_frames), dtype=bool)
    ref_type = np.zeros((num_frames, len(REF_TYPES)), dtype=np.float32)
    processed: list[int] = []
    for t in process_order:
        candidates = [j for j in processed if chain(j) == chain(t)]
        if ref_mode == "all":
            refs = candidates
        elif ref_mode == "anchor":
            refs = candidates[:1]
        else:
            past = [j for j in candidates if j < t]
            future = [j for j in candidates if j > t]
            refs = ([max(past)] if past else []) + ([min(future)] if future else [])
        ref_mask[t, refs] = True
        if not refs:
            role = "I"
        elif min(refs) < t < max(refs):
            role = "B"
        else:
            role = "P"
        ref_type[t, REF_TYPES.index(role)] = 1.0
        processed.append(t)
    return {
        "process_order": np.asarray(process_order, dtype=np.int32),
        "ref_mask": ref_mask,
        "ref_type": ref_type,
    }


# ---------------------------------------------------------------------------------------------
# Clip rendering.
# ---------------------------------------------------------------------------------------------


def _shape_mask(kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test of shape `kind` at coordinates normalised to the radius."""
    if kind == 0:  # square (side 1.6 r, area close to the disc's)
        return (np.abs(x) <= 0.8) & (np.abs(y) <= 0.8)
    if kind == 1:  # disc
        return x * x + y * y <= 1.0
    if kind == 2:  # cross (bars one third of the extent wide)
        return (((np.abs(x) <= 1.0) & (np.abs(y) <= 0.34))
                | ((np.abs(y) <= 1.0) & (np.abs(x) <= 0.34)))
    # triangle pointing up (y grows downwards)
    return (y >= -1.0) & (y <= 1.0) & (np.abs(x) <= (y + 1.0) / 2.0)


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: float32 [n, 8, 8] in [0, 1], int32 [n]."""
    try:
        from sklearn import datasets  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ValueError(
            "config.data.sprite_kind='digits' needs scikit-learn (its load_digits data "
            "ships in the wheel, nothing is downloaded); install scikit-learn or use "
            "config.data.sprite_kind='shapes'.") from e
    digits = datasets.load_digits()
    return (np.asarray(digits.images, np.float32) / 16.0,
            np.asarray(digits.target, np.int32))


def _digit_mask(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nearest-neighbour 8x8 digit stretched over [-1, 1]^2, thresholded."""
    size = image.shape[0]
    col = np.floor((x + 1.0) / 2.0 * size).astype(np.int64)
    row = np.floor((y + 1.0) / 2.0 * size).astype(np.int64)
    inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    return inside & (image[np.clip(row, 0, size - 1), np.clip(col, 0, size - 1)] > 0.3)


def _bounce(start: np.ndarray, velocity: np.ndarray, steps: np.ndarray,
            low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Positions [F, ...] of points moving at `velocity`, reflected in [low, high]."""
    span = np.maximum(high - low, 1e-6)
    unfolded = (start - low) + steps[:, None, None] * velocity
    folded = np.mod(unfolded, 2.0 * span)
    return low + np.where(folded > span, 2.0 * span - folded, folded)


def _num_classes(sprite_kind: str) -> int:
    return 10 if sprite_kind == "digits" else len(SHAPE_NAMES)


def render_clip(cfg, index: int, split: str = "train") -> dict[str, np.ndarray]:
    """Renders clip `index` of `split` ('train' | 'eval') from (cfg.seed, split, index).

    Returns the per-clip arrays frames [F, H, W, 3], changed_patches [F, N],
    change_energy [F, N] and label [] (see the module docstring); frame
    grouping is added by the pipeline.
    """
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(cfg.seed), _SPLIT_IDS[split], int(index)]))
    frames_n, size, patch = cfg.num_frames, cfg.image_size, cfg.patch_size
    steps = np.arange(frames_n, dtype=np.float64)
    coords = (np.arange(size) + 0.5) / size  # pixel centres, image units

    # Background: base colour + oriented sinusoids, evaluated analytically so
    # a pan is an exact sub-pixel shift. cos(A + B) is split into outer
    # products of 1-D cos/sin, O(H W) per wave.
    base = rng.uniform(0.35, 0.65, size=3)
    cycles = rng.integers(-_MAX_CYCLES, _MAX_CYCLES + 1, size=(_NUM_WAVES, 2))
    cycles[:, 0] = np.where((cycles[:, 0] == 0) & (cycles[:, 1] == 0), 1, cycles[:, 0])
    phases = rng.uniform(0.0, 2.0 * np.pi, size=_NUM_WAVES)
    colours = rng.uniform(-1.0, 1.0, size=(_NUM_WAVES, 3)) * (0.2 / np.sqrt(_NUM_WAVES) * cfg.texture_contrast)
    pan_angle = rng.uniform(0.0, 2.0 * np.pi)

    def background(offset_x: float, offset_y: float) -> np.ndarray:
        a = 2.0 * np.pi * cycles[:, :1] * (coords[None, :] + offset_x) + phases[:, None]
        b = 2.0 * np.pi * cycles[:, 1:] * (coords[None, :] + offset_y)
        # sum_k cos(a[k, x] + b[k, y]) colours[k, c] as one float32
        # [H, 2K] @ [2K, W*3] matmul (cos(A + B) = cos A cos B - sin A sin B).
        rows = np.ascontiguousarray(
            np.concatenate([np.cos(b), -np.sin(b)]).T, dtype=np.float32)
        cols = (np.concatenate([np.cos(a), np.sin(a)])[:, :, None]
                * np.tile(colours, (2, 1))[:, None])
        # np.einsum (optimize=False) runs in-thread: BLAS threads oversubscribe
        # the cores next to grain reader threads and a train step (5x slower).
        texture = np.einsum("yk,kz->yz", rows, cols.reshape(2 * len(a), -1).astype(np.float32))
        return np.clip(base.astype(np.float32) + texture.reshape(size, size, 3), 0.15, 0.85)

    # Sprites: 0 is the main one (large, labelled, drawn last = on top).
    num = cfg.num_sprites
    radius = np.concatenate([rng.uniform(*_MAIN_RADIUS, size=1),
                             rng.uniform(*_DISTRACTOR_RADIUS, size=num - 1)]) * size
    if cfg.sprite_kind == "digits":
        images, targets = _load_digits()
        picks = rng.integers(0, len(images), size=num)
        label = int(targets[picks[0]])
        masks = [functools.partial(_digit_mask, images[i]) for i in picks]
    else:
        kinds = rng.integers(0, len(SHAPE_NAMES), size=num)
        label = int(kinds[0])
        masks = [functools.partial(_shape_mask, int(k)) for k in kinds]
    # Saturated colours: one channel high, one low, one random.
    colour = rng.uniform(0.0, 1.0, size=(num, 3))
    for k in range(num):
        hi, lo = rng.permutation(3)[:2]
        colour[k, hi], colour[k, lo] = rng.uniform(0.9, 1.0), rng.uniform(0.0, 0.1)
    speed = cfg.sprite_speed * size * rng.uniform(0.5, 1.5, size=num)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=num)
    velocity = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=-1)  # [K, 2]
    low, high = radius[:, None], size - radius[:, None]
    start = rng.uniform(low, high, size=(num, 2))
    centres = _bounce(start, velocity, steps, low, high)  # [F, K, 2] (x, y), pixels

    if cfg.background == "static":
        static_bg = background(0.0, 0.0)
    frames = np.empty((frames_n, size, size, 3), dtype=np.float32)
    pixel = np.arange(size) + 0.5
    for t in range(frames_n):
        if cfg.background == "static":
            frame = static_bg.copy()
        else:
            shift = t * cfg.pan_speed
            frame = background(shift * np.cos(pan_angle), shift * np.sin(pan_angle))
        for k in reversed(range(num)):
            cx, cy = centres[t, k]
            r = radius[k]
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
            inside = masks[k]((pixel[None, x0:x1] - cx) / r, (pixel[y0:y1, None] - cy) / r)
            frame[y0:y1, x0:x1][inside] = colour[k]
        frames[t] = frame
    if cfg.noise:
        frames += rng.normal(0.0, cfg.noise, size=frames.shape).astype(np.float32)
    np.clip(frames, 0.0, 1.0, out=frames)
    if cfg.dtype == "uint8":
        frames = np.round(frames * 255.0).astype(np.uint8)
    return clip_example(frames, label, patch_size=patch,
                        change_threshold=cfg.change_threshold)


def clip_example(frames: np.ndarray, label: int, *, patch_size: int,
                 change_threshold: float) -> dict[str, np.ndarray]:
    """Per-clip arrays of a finished clip (every source ends here).

    Args:
      frames: [F, H, W, 3] in the output dtype (float32 in [0, 1] or uint8);
        the change maps are computed from exactly these values.
      label: the clip's class.
      patch_size: p.
      change_threshold: a patch changed when its change_energy exceeds this.

    Returns:
      frames, changed_patches bool [F, N] (frame 0 all True), change_energy
      float32 [F, N] and label int32 [].
    """
    energy = change_energy(frames, patch_size)
    changed = energy > change_threshold
    changed[0] = True
    return {
        "frames": frames,
        "changed_patches": changed,
        "change_energy": energy,
        "label": np.int32(label),
    }


def change_energy(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """Per-patch mean |frame_t - frame_{t-1}|, float32 [F, N]; 1.0 on frame 0.

    Args:
      frames: [F, H, W, C], float in [0, 1] or uint8 (scaled by 1/255).
      patch_size: p; H and W must be multiples of it.

    Returns:
      float32 [F, (H/p) * (W/p)], patches in row-major order.
    """
    f, h, w, c = frames.shape
    x = frames.astype(np.float32)
    if frames.dtype == np.uint8:
        x *= 1.0 / 255.0
    energy = np.ones((f, (h // patch_size) * (w // patch_size)), dtype=np.float32)
    if f > 1:
        diff = np.abs(x[1:] - x[:-1]).reshape(
            f - 1, h // patch_size, patch_size, w // patch_size, patch_size, c)
        energy[1:] = diff.mean(axis=(2, 4, 5)).reshape(f - 1, -1)
    return energy


# ---------------------------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------------------------


def _check_config(cfg) -> None:
    """Fails early, naming the field, on values that cannot work."""
    if cfg.source not in SOURCES:
        close = difflib.get_close_matches(str(cfg.source), SOURCES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"config.data.source={cfg.source!r} is not one of {SOURCES}{hint}")
    for field in ("num_frames", "image_size", "patch_size", "num_sprites", "num_eval"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be an int >= 1.")
    for field in ("num_train", "num_threads", "prefetch_buffer_size", "prefetch_batches",
                  "refresh_interval", "frame_stride", "num_classes", "decode_threads"):
        if not isinstance(cfg[field], int) or cfg[field] < 0:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be an int >= 0.")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(
            f"config.data.image_size={cfg.image_size} must be a multiple of "
            f"config.data.patch_size={cfg.patch_size} (whole ViT patches).")
    for field, allowed in (("sprite_kind", SPRITE_KINDS), ("background", BACKGROUNDS),
                           ("ref_mode", REF_MODES), ("dtype", DTYPES)):
        if cfg[field] not in allowed:
            raise ValueError(f"config.data.{field}={cfg[field]!r} is not one of {allowed}.")
    for field in ("sprite_speed", "pan_speed", "noise", "change_threshold"):
        if not cfg[field] >= 0:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be >= 0.")
    if cfg.source == "procedural":
        if cfg.sprite_kind == "digits":
            _load_digits()  # Raises with a hint when scikit-learn is missing.
        return
    if not cfg.train_split:
        raise ValueError(
            f"config.data.train_split is empty; source={cfg.source!r} needs the training "
            "split's name (e.g. 'train').")
    if cfg.source == "folder":
        if not cfg.path:
            raise ValueError(
                "source='folder' needs config.data.path: the root directory of "
                "root/<class>/<video> (or root/<train_split>/<class>/<video>).")
        if not 0.0 < cfg.eval_fraction < 1.0:
            raise ValueError(
                f"config.data.eval_fraction={cfg.eval_fraction!r} must be in (0, 1): it "
                "holds out evaluation videos when the folder has no split sub-directories.")
    if cfg.source == "tfds" and not (cfg.tfds_name or cfg.path):
        raise ValueError(
            "source='tfds' needs config.data.tfds_name (with config.data.path as its "
            "data_dir) or config.data.path naming a prepared builder directory.")


def _check_batching(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validates the batch layout and returns the per-process batch size."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count}).")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of "
            f"process_count={process_count}: every process loads "
            "global_batch_size // process_count clips.")
    return global_batch_size // process_count


def _mix_seeds(seed: int, shuffle_seed: int) -> int:
    return int(np.random.SeedSequence([seed, shuffle_seed]).generate_state(1)[0])


class ProceduralClips:
    """Random-access clip source of one procedural split (grain data source).

    `clips[i]` renders clip i of `split` (`render_clip`); nothing is stored,
    so any length costs nothing up front.
    """

    def __init__(self, cfg, split: str, length: int):
        self._cfg = cfg
        self._split = split
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return render_clip(self._cfg, int(index), self._split)

    def __repr__(self) -> str:
        return f"ProceduralClips({self._split!r}, {self._length} clips)"


@dataclasses.dataclass(frozen=True)
class ClipSources:
    """What a source provides to the shared pipeline.

    Attributes:
      train / eval: random-access clip sources (grain `RandomAccessDataSource`
        protocol: `len(s)` and `s[i]` -> the per-clip arrays frames,
        changed_patches, change_energy and label of `clip_example`). `s[i]`
        is called from grain's reader threads, so it may decode files.
      num_classes: label classes.
      class_names: name of each class (label order).
      description: human-readable origin, for logs.
    """

    train: Sequence[dict[str, np.ndarray]]
    eval: Sequence[dict[str, np.ndarray]]
    num_classes: int
    class_names: tuple[str, ...]
    description: str


def _procedural_sources(cfg) -> ClipSources:
    names = SHAPE_NAMES if cfg.sprite_kind == "shapes" else tuple(str(d) for d in range(10))
    return ClipSources(
        train=ProceduralClips(cfg, "train", cfg.num_train),
        eval=ProceduralClips(cfg, "eval", cfg.num_eval),
        num_classes=_num_classes(cfg.sprite_kind),
        class_names=names,
        description=f"procedural {cfg.sprite_kind} clips (seed {cfg.seed})",
    )


class _ToExample(grain.transforms.Map):
    """Per-clip arrays -> example dict (adds the split's frame grouping and mask)."""

    def __init__(self, grouping: dict[str, np.ndarray]):
        self._grouping = grouping

    def map(self, clip: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        example = dict(clip)
        example.update(self._grouping)
        example["mask"] = np.float32(1.0)
        return example


class _EvalRow(grain.transforms.Map):
    """(clip index, real?) -> example; padding rows repeat a clip with mask 0."""

    def __init__(self, clips, grouping: dict[str, np.ndarray]):
        self._clips = clips
        self._to_example = _ToExample(grouping)

    def map(self, row: tuple[int, bool]) -> dict[str, np.ndarray]:
        index, real = row
        example = self._to_example.map(self._clips[index])
        example["mask"] = np.float32(real)
        return example


@dataclasses.dataclass
class VideoData:
    """Clips of one data config (any source): training stream and eval batches.

    Attributes:
      config: the data config (frozen copy).
      num_classes: label classes (4 shapes or 10 digits for 'procedural').
      num_patches: N = (image_size / patch_size) ** 2.
      train_grouping / eval_grouping: `frame_grouping` of each split
        (process_order [F], ref_mask [F, F], ref_type [F, 3]).
      train_clips / eval_clips: the random-access clip sources of each split
        (`ClipSources`); their lengths are the split sizes.
      class_names: name of each label.
      description: where the clips come from, for logs.
    """

    config: Any
    num_classes: int
    num_patches: int
    train_grouping: dict[str, np.ndarray]
    eval_grouping: dict[str, np.ndarray]
    train_clips: Sequence[dict[str, np.ndarray]]
    eval_clips: Sequence[dict[str, np.ndarray]]
    class_names: tuple[str, ...] = ()
    description: str = ""

    def clip(self, index: int, split: str = "train") -> dict[str, np.ndarray]:
        """One example of `split` exactly as the pipelines produce it."""
        if split == "train":
            clips, grouping = self.train_clips, self.train_grouping
        else:
            clips, grouping = self.eval_clips, self.eval_grouping
        return _ToExample(grouping).map(clips[index])

    def _read_options(self) -> grain.ReadOptions:
        return grain.ReadOptions(num_threads=self.config.num_threads,
                                 prefetch_buffer_size=self.config.prefetch_buffer_size)

    def train_dataset(self, *, global_batch_size: int, seed: int, process_index: int,
                      process_count: int) -> grain.IterDataset:
        """The infinite, shuffled training stream of this process.

        Clip indices 0..len(train_clips)-1 are shuffled with (seed,
        shuffle_seed), reshuffled every epoch, and dealt round-robin to the
        processes (each clip goes to one process per epoch); clips are
        rendered or decoded lazily by grain's reader threads (num_threads,
        prefetch_buffer_size clips ahead), so decoding overlaps the step.

        Returns:
          A grain.IterDataset of dicts (module docstring) with a leading
          per-process batch axis B = global_batch_size // process_count;
          `iter()` it and checkpoint the iterator with
          `grain.checkpoint.CheckpointSave`.
        """
        cfg = self.config
        local_batch = _check_batching(global_batch_size, process_index, process_count)
        num_train = len(self.train_clips)
        if num_train < global_batch_size:
            if cfg.source == "procedural":
                raise ValueError(
                    f"config.data.num_train={cfg.num_train} is smaller than the global batch "
                    f"size {global_batch_size}; raise config.data.num_train.")
            raise ValueError(
                f"the training split of {self.description} has {num_train} clips, fewer "
                f"than the global batch size {global_batch_size}; add videos or lower the "
                "batch size.")
        ds = grain.MapDataset.source(self.train_clips)
        # Shuffle before repeat: grain then reshuffles every epoch (seed + epoch).
        ds = ds.shuffle(seed=_mix_seeds(seed, cfg.shuffle_seed)).repeat()
        ds = ds[process_index::process_count]
        ds = ds.map(_ToExample(self.train_grouping))
        ds = ds.to_iter_dataset(self._read_options())
        ds = ds.batch(local_batch, drop_remainder=True)
        if cfg.prefetch_batches:
            ds = grain.experimental.ThreadPrefetchIterDataset(
                ds, prefetch_buffer_size=cfg.prefetch_batches)
        return ds

    def eval_batches(self, *, global_batch_size: int, process_index: int,
                     process_count: int, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
        """This process's share of the evaluation batches, in a fixed order.

        Global batch b holds eval clips [b G, (b + 1) G); process p gets rows
        [p B, (p + 1) B), B = G // process_count. Rows past the last eval clip
        repeat it with mask = 0, so every process gets the same number of
        batches. Clips are read by grain's reader threads (num_threads).

        Args:
          global_batch_size: G.
          process_index: this process, in [0, process_count).
          process_count: number of processes.
          max_batches: at most this many (leading) global batches; 0 = all.

        Returns:
          A list of dicts with a leading [B] axis (module docstring); frame
          grouping from config.data.eval_ref_order.
        """
        local_batch = _check_batching(global_batch_size, process_index, process_count)
        if max_batches < 0:
            raise ValueError(f"max_batches={max_batches} must be >= 0 (0 = all).")
        num_eval = len(self.eval_clips)
        if not num_eval:
            raise ValueError(f"{self.description} has no evaluation clips.")
        num_batches = math.ceil(num_eval / global_batch_size)
        if max_batches:
            num_batches = min(num_batches, max_batches)
        rows = []
        for b in range(num_batches):
            first = b * global_batch_size + process_index * local_batch
            rows += [(min(i, num_eval - 1), i < num_eval)
                     for i in range(first, first + local_batch)]
        ds = grain.MapDataset.source(rows).map(_EvalRow(self.eval_clips, self.eval_grouping))
        ds = ds.to_iter_dataset(self._read_options()).batch(local_batch)
        return list(ds)


def _clip_sources(cfg) -> ClipSources:
    """The train/eval clip sources that `cfg.source` names."""
    if cfg.source == "folder":
        from vlmjax.data import video_files  # pylint: disable=g-import-not-at-top
        sources = video_files.folder_clip_sources(cfg)
    elif cfg.source == "tfds":
        # Imported here: tensorflow_datasets is slow to import.
        from vlmjax.data import tfds_video  # pylint: disable=g-import-not-at-top
        sources = tfds_video.tfds_clip_sources(cfg)
    else:
        return _procedural_sources(cfg)
    inferred = sources.num_classes
    if cfg.num_classes:
        if cfg.num_classes < inferred:
            raise ValueError(
                f"config.data.num_classes={cfg.num_classes} is smaller than the "
                f"{inferred} classes of {sources.description}; raise it or set 0 (infer).")
        sources = dataclasses.replace(sources, num_classes=cfg.num_classes)
    elif not inferred:
        raise ValueError(
            f"{sources.description}: the number of classes is unknown (the label is not "
            "a ClassLabel); set config.data.num_classes.")
    return sources


def build_video_data(data_cfg) -> VideoData:
    """Validates the config, opens the clip sources and precomputes frame grouping.

    Args:
      data_cfg: the data section (`default_config()`); `source` picks
        procedural clips, a folder of videos or a prepared TFDS dataset.

    Returns:
      VideoData. Folder and TFDS sources are scanned/opened here (fast: no
      frame is decoded until a clip is read), so bad paths fail here.
    """
    _check_config(data_cfg)
    train_order = _check_order(data_cfg.train_ref_order, "train_ref_order")
    eval_order = _check_order(data_cfg.eval_ref_order, "eval_ref_order")
    groupings = [frame_grouping(data_cfg.num_frames, order, ref_mode=data_cfg.ref_mode,
                                refresh_interval=data_cfg.refresh_interval)
                 for order in (train_order, eval_order)]
    cfg = ml_collections.FrozenConfigDict(data_cfg)
    sources = _clip_sources(cfg)
    return VideoData(
        config=cfg,
        num_classes=sources.num_classes,
        num_patches=(cfg.image_size // cfg.patch_size) ** 2,
        train_grouping=groupings[0],
        eval_grouping=groupings[1],
        train_clips=sources.train,
        eval_clips=sources.eval,
        class_names=sources.class_names,
        description=sources.description,
    )
