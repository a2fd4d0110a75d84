"""The clip format every video source produces, and the frame utilities the sources share.

A *clip source* (procedural renderer, folder of videos, TFDS dataset) is a random-access sequence
whose item i is the per-clip dict of `clip_example` (F = num_frames, H = W = image_size, p =
patch_size, N = (H / p) * (W / p) patches in row-major order, the order of a ViT's patch
embedding):

  frames:          float32 [F, H, W, 3] in [0, 1] (uint8 with dtype='uint8')
  changed_patches: bool    [F, N]  change_energy > change_threshold; frame 0 all True
  change_energy:   float32 [F, N]  mean |frame_t - frame_{t-1}| over the patch's pixels and
                                   channels (`change_energy`); 1.0 on frame 0
  label:           int32   []

The pipeline (`vlmjax.data.video`) adds the split's `frame_grouping` (process_order, ref_mask,
ref_type) and `mask` to make an example. `ClipSources` is what a source hands the pipeline.

Real-video sources (`video_files`, `tfds_video`) decode their frames with `sample_frame_indices`,
`resize_crop` / `open_frame` and `finish_clip`, so both read videos identically.

Imports nothing from `vlmjax.data`: renderer, sources and pipeline all build on this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from einops import reduce
import numpy as np
from PIL import Image

# Keys of the per-clip dict of a clip source (`clip_example`).
CLIP_KEYS = ("frames", "changed_patches", "change_energy", "label")
# Keys the pipeline adds: the split's frame grouping, and the eval padding mask.
GROUPING_KEYS = ("process_order", "ref_mask", "ref_type")
MASK_KEY = "mask"

# Split names tried, in order, for an empty config.data.eval_split (real sources).
EVAL_SPLIT_CANDIDATES = ("validation", "val", "eval", "test")
REF_MODES = ("nearest", "all", "anchor")
# Index of each role in `ref_type` (the spec's ref_type(3) decision-MLP input).
REF_TYPES = ("I", "P", "B")


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


# ---------------------------------------------------------------------------------------------
# Change maps.
# ---------------------------------------------------------------------------------------------


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
    f, h, w, _ = frames.shape
    x = frames.astype(np.float32)
    if frames.dtype == np.uint8:
        x *= 1.0 / 255.0
    energy = np.ones((f, (h // patch_size) * (w // patch_size)), dtype=np.float32)
    if f > 1:
        energy[1:] = reduce(np.abs(x[1:] - x[:-1]), "f (h p) (w q) c -> f (h w)", "mean",
                            p=patch_size, q=patch_size)
    return energy


# ---------------------------------------------------------------------------------------------
# Frame grouping.
# ---------------------------------------------------------------------------------------------


def check_order(order, field: str) -> tuple[int, ...]:
    """`config.data.<field>` as a tuple, checked to be a permutation of 0..G-1."""
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
    order = check_order(order, "train_ref_order / eval_ref_order")
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
# Decoded videos -> clips (frame sampling and resizing, shared by video_files and tfds_video).
# ---------------------------------------------------------------------------------------------


def sample_frame_indices(num_available: int, num_frames: int, stride: int = 0) -> np.ndarray:
    """Which of a video's frames make the clip.

    Args:
      num_available: T, frames in the video (>= 1).
      num_frames: F, frames in the clip.
      stride: 0 = F frames spread uniformly over the video (frame i is the
        centre of the i-th of F equal segments); k >= 1 = every k-th frame of
        a window of (F - 1) k + 1 frames centred in the video.

    Returns:
      int64 [F] non-decreasing indices in [0, T). When the video is too short
      the indices past its end are T - 1: the last frame repeats (its
      change_energy is 0).
    """
    if num_available < 1:
        raise ValueError("the video has no frames.")
    steps = np.arange(num_frames, dtype=np.int64)
    if stride == 0:
        if num_available >= num_frames:
            return (2 * steps + 1) * num_available // (2 * num_frames)
        return np.minimum(steps, num_available - 1)
    span = (num_frames - 1) * stride + 1
    start = max(0, (num_available - span) // 2)
    return np.minimum(start + stride * steps, num_available - 1)


def resize_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side of a PIL image to `size`, centre crop: uint8 [size, size, 3].

    One PIL resize of the centred square (`box`), bilinear; Pillow widens the
    filter when downscaling, so it is antialiased (no aliasing of fine
    texture that would show up as spurious change energy).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if (width, height) == (size, size):
        return np.asarray(image, dtype=np.uint8)
    side = min(width, height)
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box),
                      dtype=np.uint8)


def open_frame(file, size: int) -> np.ndarray:
    """Decodes one image file (path or file object) to uint8 [size, size, 3].

    JPEGs are decoded with DCT scaling (`Image.draft`) to the smallest size
    whose shorter side is still >= `size`: up to 8x less decoding work.
    """
    with Image.open(file) as image:
        if image.format == "JPEG":
            width, height = image.size
            scale = size / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        return resize_crop(image, size)


def finish_clip(frames: np.ndarray, label: int, cfg) -> dict[str, np.ndarray]:
    """uint8 [F, H, W, 3] decoded frames -> the per-clip arrays of `clip_example` (reads the
    config's dtype, patch_size and change_threshold)."""
    if cfg.dtype == "float32":
        frames = frames.astype(np.float32) * np.float32(1.0 / 255.0)
    return clip_example(frames, label, patch_size=cfg.patch_size,
                        change_threshold=cfg.change_threshold)
