"""Video clips from a prepared TFDS dataset (source='tfds'), and a writer for one.

Reading uses the ArrayRecord data source of TFDS (`builder.as_data_source`,
what `tfds.data_source(name, split=..., data_dir=...)` returns), which decodes
with numpy: TensorFlow is never imported. Nothing is downloaded or generated;
the dataset must already be prepared with file_format='array_record'.

The frames feature (`config.data.video_key`) may hold, per record:
  * uint8 [T, H, W, C] (C = 1, 3 or 4): a `tfds.features.Tensor` (what
    `write_video_dataset` writes with frame_format='raw'), or a
    `tfds.features.Video` decoded by TFDS; or
  * [T] encoded images (png/jpeg bytes; frame_format='png'/'jpeg'): only the
    sampled frames are decoded (Pillow; JPEGs at reduced resolution).
The label (`config.data.label_key`) is an integer; a `ClassLabel` also gives
num_classes and class names.

`tfds.features.Video` cannot be used here: its constructor calls TensorFlow
(tf.dtypes), and encoding needs ffmpeg, so neither writing nor even loading
the dataset info of such a dataset works without TensorFlow.
`write_video_dataset` stores frames as a `Tensor(shape=(None, None, None, 3),
dtype=uint8, encoding='zlib')` instead (or as [T] png/jpeg bytes), which
TFDS encodes and decodes with numpy only.

Frames are sampled, resized and centre-cropped exactly as the folder source
does (`vlmjax.data.video_files`; both use `vlmjax.data.clips`), and change
maps are computed from the decoded frames.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlmjax.data import clips
from vlmjax.data import common

FRAME_FORMATS = ("raw", "png", "jpeg")


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def _encode_frame(frame: np.ndarray, frame_format: str) -> bytes:
    buffer = io.BytesIO()
    if frame_format == "jpeg":
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
    else:
        Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def write_video_dataset(data_dir: str, splits: Mapping[str, Sequence[tuple[np.ndarray, int]]],
                        *, class_names: Sequence[str] | None = None,
                        frame_format: str = "raw", video_key: str = "video",
                        label_key: str = "label") -> str:
    """Builds dataset ``vlmjax_video`` (array_record) under ``data_dir``, without TensorFlow.

    Args:
      data_dir: TFDS data directory (``config.data.path`` with
        ``config.data.tfds_name='vlmjax_video'``).
      splits: split name -> (frames, label) pairs; frames uint8 [T, H, W, 3]
        (T, H and W may differ between videos), label an int in
        [0, num classes).
      class_names: label names (a ClassLabel); default: "0".."C-1" with C the
        largest label + 1.
      frame_format: 'raw' (uint8 tensor, zlib-compressed: exact, larger),
        'png' (lossless, smaller for flat content) or 'jpeg' (quality 95,
        smallest; decoded at reduced resolution when read).
      video_key / label_key: feature names.

    Returns:
      The prepared builder directory (``data_dir/vlmjax_video/1.0.0``), also
      accepted as ``config.data.path`` without ``tfds_name``. Record i of a
      split is ``splits[split][i]``.
    """
    if frame_format not in FRAME_FORMATS:
        raise ValueError(f"frame_format={frame_format!r} is not one of {FRAME_FORMATS}.")
    examples = {name: [(np.asarray(f), int(y)) for f, y in items] for name, items in splits.items()}
    for name, items in examples.items():
        for i, (frames, _) in enumerate(items):
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(
                    f"split {name!r} video {i}: frames must be uint8 [T, H, W, 3], got "
                    f"{frames.dtype} {frames.shape}.")
    if class_names is None:
        top = max((y for items in examples.values() for _, y in items), default=0)
        class_names = [str(c) for c in range(top + 1)]
    class_names = list(class_names)

    def features(tfds):
        if frame_format == "raw":
            # Multiple unknown dimensions need an explicit encoding in TFDS.
            frames_feature = tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                                  encoding="zlib")
        else:
            frames_feature = tfds.features.Tensor(shape=(None,), dtype=np.object_)
        return tfds.features.FeaturesDict({
            video_key: frames_feature,
            label_key: tfds.features.ClassLabel(names=class_names),
        })

    def encode(frames: np.ndarray):
        if frame_format == "raw":
            return frames
        return np.array([_encode_frame(f, frame_format) for f in frames], dtype=object)

    def records(split):  # Encoded lazily, one video at a time.
        for frames, label in examples[split]:
            yield {video_key: encode(frames), label_key: label}

    # disable_shuffling: record i of a split is splits[split][i] (TFDS otherwise orders records
    # by a hash of their keys).
    return common.write_tfds_dataset(
        data_dir, "VlmjaxVideo", features, {name: records(name) for name in examples},
        disable_shuffling=True, module=__name__)


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------


def decode_frames(value: Any, *, num_frames: int, size: int, stride: int = 0) -> np.ndarray:
    """One record's frames feature -> uint8 [F, size, size, 3].

    Args:
      value: uint8 [T, H, W, C] / [T, H, W] frames, or a [T] sequence of
        encoded images (bytes).
      num_frames / size / stride: as `video_files.decode_video` (`clips.sample_frame_indices`).
    """
    encoded = isinstance(value, (list, tuple)) or (
        isinstance(value, np.ndarray) and value.dtype == object)
    if encoded:
        indices = clips.sample_frame_indices(len(value), num_frames, stride)
        decoded = {i: clips.open_frame(io.BytesIO(value[i]), size)
                   for i in set(indices.tolist())}
        return np.stack([decoded[i] for i in indices.tolist()])
    frames = np.asarray(value)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"frames have shape {frames.shape}; expected [T, H, W, C] with C in (1, 3, 4), "
            "or [T] encoded images.")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames have dtype {frames.dtype}; expected uint8.")
    indices = clips.sample_frame_indices(len(frames), num_frames, stride)
    out = frames[indices]
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    out = out[..., :3]
    if out.shape[1:3] != (size, size):
        out = np.stack([clips.resize_crop(Image.fromarray(f), size) for f in out])
    return np.ascontiguousarray(out)


class TfdsClips:
    """Random-access clips of one TFDS split (a grain data source).

    `clips[i]` reads record i (in grain's reader threads when used by the
    pipeline) and returns frames, changed_patches, change_energy and label.
    """

    def __init__(self, data_source: Sequence[Any], cfg, description: str):
        self._source = data_source
        self._cfg = cfg
        self._description = description

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip {index} is out of range for {len(self)} clips.")
        cfg = self._cfg
        record = self._source[int(index) % len(self)]
        for key, field in ((cfg.video_key, "video_key"), (cfg.label_key, "label_key")):
            if key not in record:
                raise ValueError(
                    f"{self._description} has no feature config.data.{field}={key!r} "
                    f"(features: {sorted(record)}).")
        try:
            frames = decode_frames(record[cfg.video_key], num_frames=cfg.num_frames,
                                   size=cfg.image_size, stride=cfg.frame_stride)
        except Exception as e:
            raise ValueError(
                f"cannot decode feature {cfg.video_key!r} of record {index} of "
                f"{self._description}: {type(e).__name__}: {e}") from e
        return clips.finish_clip(frames, int(np.asarray(record[cfg.label_key])), cfg)

    def __repr__(self) -> str:
        return f"TfdsClips({self._description}, {len(self)} clips)"


def tfds_clip_sources(cfg) -> clips.ClipSources:
    """The train/eval `ClipSources` of `config.data.source='tfds'`."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder, origin = common.open_tfds_builder(
        cfg.tfds_name, cfg.path, writer="vlmjax.data.tfds_video.write_video_dataset")
    features = builder.info.features
    for key, field in ((cfg.video_key, "video_key"), (cfg.label_key, "label_key")):
        if key not in features:
            raise ValueError(
                f"{origin} has no feature config.data.{field}={key!r} "
                f"(features: {sorted(features.keys())}).")
    eval_split = common.resolve_eval_split(builder, cfg.eval_split, clips.EVAL_SPLIT_CANDIDATES, origin)
    sources = {}
    for split, field in ((cfg.train_split, "train_split"), (eval_split, "eval_split")):
        data_source = common.tfds_split(builder, split, field=field, origin=origin)
        sources[field] = TfdsClips(data_source, cfg, f"{origin} split {split!r}")
        if not len(sources[field]):
            raise ValueError(f"config.data.{field}={split!r} of {origin} holds no records.")
    label = features[cfg.label_key]
    if isinstance(label, tfds.features.ClassLabel):
        num_classes, class_names = label.num_classes, tuple(label.names)
    else:
        num_classes = cfg.num_classes
        class_names = tuple(str(c) for c in range(num_classes))
    sources["train_split"][0]  # Fails early, naming the feature, on a bad record layout.
    return clips.ClipSources(
        train=sources["train_split"],
        eval=sources["eval_split"],
        num_classes=num_classes,
        class_names=class_names,
        description=f"{origin} (splits {cfg.train_split!r} / {eval_split!r})",
    )
