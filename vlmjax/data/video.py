"""Video clips for token-reuse ViTs: the data config, its checks and the grain pipeline.

Data for the ReuseViT experiments (`docs/token-reuse.md`, Hwang et al.,
"Déjà Vu", PVLDB 2025). Each example is a dict of numpy arrays (F =
num_frames, H = W = image_size, p = patch_size, N = (H / p) * (W / p) patches
in row-major order, the order of a ViT's patch embedding):

  frames:          float32 [F, H, W, 3] in [0, 1] (uint8 with dtype='uint8')
  changed_patches: bool    [F, N]  change_energy > change_threshold; frame 0
                                   is all True (nothing before it)
  change_energy:   float32 [F, N]  mean |frame_t - frame_{t-1}| over the
                                   patch's pixels and channels; 1.0 on frame 0
  label:           int32   []      class of the clip
  ref_mask:        bool    [F, F]  ref_mask[i, j]: frame i may reference frame j
  ref_type:        float32 [F, 3]  one-hot I / P / B role of each frame
  process_order:   int32   [F]     frame indices in processing order
  mask:            float32 []      1 for a real clip, 0 for eval padding

The first four come from the clip source (`vlmjax.data.clips.clip_example`);
`ref_mask`, `ref_type` and `process_order` depend only on the config and the
split (train and eval may use different orders, as in the spec); they are
repeated per example so every batch is self-contained.

Frame grouping (the spec's "Setting"; see `clips.frame_grouping`): frames are
cut into consecutive groups of G = len(ref_order) frames, and each group is
processed in the codec-like order `ref_order` (spec: train [0, 4, 2, 1, 3],
test [3, 1, 0, 2]). A frame may only reference frames processed before it, in
the same chain; `refresh_interval` restarts the chain. With
ref_mode='nearest' (default, like hierarchical-B codecs) a frame references
the nearest already-processed frame before it and the nearest after it: two
references make it a B frame, one a P frame, none an I frame. ref_order=(0,)
is plain "previous frame" reuse.

Sources (`config.data.source`): 'procedural' (the default;
`vlmjax.data.procedural_video`: numpy-rendered sprites with exact change
maps) renders clips; 'folder' (`vlmjax.data.video_files`:
`root/<class>/<video>`, a video being a folder of frame images or a video
file) and 'tfds' (`vlmjax.data.tfds_video`: a prepared ArrayRecord TFDS
dataset with a video and a label feature) decode real videos to the same
example format, with change_energy computed from the decoded frames (real
pixel change, including codec noise). All three share one pipeline: a
random-access "clip source" per split (`clips.ClipSources`) feeds the same
shuffle / shard / batch / prefetch chain (`vlmjax.data.common`).

Pipelines mirror `vlmjax.data.lm`: `build_video_data(cfg).train_dataset(...)`
is a checkpointable grain IterDataset of per-process batches (save the
iterator with `grain.checkpoint.CheckpointSave`), and `eval_batches(...)` is a
finite deterministic list with the same length on every process.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from vlmjax.data import clips
from vlmjax.data import common
from vlmjax.data import procedural_video
from vlmjax.data import tfds_video
from vlmjax.data import video_files
# Re-exported: these lived here before the clip format (`clips`) and the renderer
# (`procedural_video`) got their own modules, and are used as vlmjax.data.video.<name>.
from vlmjax.data.clips import (  # noqa: F401  pylint: disable=unused-import
    EVAL_SPLIT_CANDIDATES, REF_MODES, REF_TYPES, ClipSources, change_energy, clip_example,
    frame_grouping)
from vlmjax.data.procedural_video import (  # noqa: F401  pylint: disable=unused-import
    BACKGROUNDS, SHAPE_NAMES, SPRITE_KINDS, ProceduralClips, render_clip)

SOURCES = ("procedural", "folder", "tfds")
DTYPES = ("float32", "uint8")


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
    # Sprite radii x this (1 = the main sprite 0.22-0.3, the others 0.07-0.12 image widths). Scaled
    # after drawing, so every other random choice of a clip stays the same; < 1 makes the change
    # between frames small and local (the foveated experiment).
    c.sprite_scale = 1.0
    # The other sprites' radius range (0.07-0.12) x distractor_scale and speed x distractor_speed
    # (0 = they stand still). Applied after drawing, like sprite_scale.
    c.distractor_scale = 1.0
    c.distractor_speed = 1.0
    # Heading marks (the foveated experiment): every sprite steps along one of four headings (right,
    # down, left, up), written on it as the phase of a 2x2-pixel checkerboard, which leaves the 8x8
    # cells' mean colour and luminance spread (nearly) unchanged: the pooled latents barely see a
    # heading, a full-resolution read can. Sprite 0 (the mover) draws a new heading with probability
    # `turn` every frame (1 = every frame), so where it goes next is written on it, not in its past;
    # the others keep theirs unless `distractor_turn` (the same, per other sprite): standing sprites
    # whose marks change too, so that the change of a read pooled over every sprite does not single
    # out the mover's new heading (differencing frames would cancel still marks).
    c.heading_marks = False
    c.turn = 0.0
    c.distractor_turn = 0.0
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
# Config checks and the pipeline.
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
    for field in ("sprite_scale", "distractor_scale"):
        if not 0.0 < cfg[field] <= 4.0:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be in (0, 4].")
    for field in ("sprite_speed", "distractor_speed", "pan_speed", "noise", "change_threshold"):
        if not cfg[field] >= 0:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be >= 0.")
    for field in ("turn", "distractor_turn"):
        if not 0.0 <= cfg[field] <= 1.0:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be a probability in [0, 1].")
    if cfg.source == "procedural":
        procedural_video.check_sprites(cfg.sprite_kind)
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


class _ToExample(grain.transforms.Map):
    """Per-clip arrays -> example dict (adds the split's frame grouping and mask)."""

    def __init__(self, grouping: dict[str, np.ndarray]):
        self._grouping = grouping

    def map(self, clip: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        example = dict(clip)
        example.update(self._grouping)
        example[clips.MASK_KEY] = np.float32(1.0)
        return example


class _EvalRow(grain.transforms.Map):
    """(clip index, real?) -> example; padding rows repeat a clip with mask 0."""

    def __init__(self, source: Sequence[dict[str, np.ndarray]], grouping: dict[str, np.ndarray]):
        self._source = source
        self._to_example = _ToExample(grouping)

    def map(self, row: tuple[int, bool]) -> dict[str, np.ndarray]:
        index, real = row
        example = self._to_example.map(self._source[index])
        example[clips.MASK_KEY] = np.float32(real)
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
            source, grouping = self.train_clips, self.train_grouping
        else:
            source, grouping = self.eval_clips, self.eval_grouping
        return _ToExample(grouping).map(source[index])

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
        local_batch = common.check_batching(global_batch_size, process_index, process_count,
                                            unit="clips")
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
        ds = common.sharded_train_dataset(
            self.train_clips, seed=seed, shuffle_seed=cfg.shuffle_seed,
            process_index=process_index, process_count=process_count,
            transform=_ToExample(self.train_grouping), read_options=self._read_options())
        return common.batch_and_prefetch(ds, local_batch, cfg.prefetch_batches)

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
        local_batch = common.check_batching(global_batch_size, process_index, process_count,
                                            unit="clips")
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
        sources = video_files.folder_clip_sources(cfg)
    elif cfg.source == "tfds":
        sources = tfds_video.tfds_clip_sources(cfg)  # Imports tensorflow_datasets (slow) here.
    else:
        return procedural_video.procedural_sources(cfg)
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
    train_order = clips.check_order(data_cfg.train_ref_order, "train_ref_order")
    eval_order = clips.check_order(data_cfg.eval_ref_order, "eval_ref_order")
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
