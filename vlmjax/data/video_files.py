"""Real videos from a directory tree, as clips for token-reuse ViTs (source='folder').

Layout (`config.data.path` = root; one sub-directory per class, sorted class
names give the labels 0..C-1):

  root/<class>/<video>                    splits by a hash (eval_fraction), or
  root/<train_split>/<class>/<video>      explicit splits, used whenever
  root/<eval_split>/<class>/<video>       root/<train_split> exists

A <video> is either
  * a folder of frame images (IMAGE_EXTENSIONS), in natural name order
    (frame_2.png before frame_10.png), decoded with Pillow; only the sampled
    frames are opened, and JPEGs are decoded at reduced resolution (draft
    mode); or
  * a file: animated GIF / WebP / APNG (Pillow), or any FFmpeg container
    (AV_EXTENSIONS: mp4, webm, avi, mkv, ...) decoded with PyAV, an optional
    dependency (`pip install av`, or the `video` extra of vlmjax).
Hidden entries and other files (annotations, READMEs) are skipped.

Every clip is decoded to num_frames frames of image_size x image_size: the
frames are sampled (`sample_frame_indices`: uniform over the video, or every
frame_stride-th frame of a centred window; short videos repeat their last
frame), and each is resized so its shorter side is image_size (bilinear,
antialiased) and centre-cropped. change_energy / changed_patches are computed
from the decoded frames with `clips.change_energy`, so they are the real
pixel-change energy (codec noise included) in place of the procedural exact
maps; the example format is the one of `vlmjax.data.clips` / `vlmjax.data.video`.

Clip i of a split is always the same video decoded the same way (no random
crops or offsets), so any host can reproduce any clip; decoding happens in
grain's reader threads (`config.data.num_threads`), ahead of the step.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlmjax.data import clips
# Frame sampling and resizing live in `clips` (shared with tfds_video); re-exported here, where
# they were defined before.
from vlmjax.data.clips import finish_clip
from vlmjax.data.clips import open_frame
from vlmjax.data.clips import resize_crop
from vlmjax.data.clips import sample_frame_indices

# Frame images of a frame-folder video.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Video files Pillow decodes (animated images).
PIL_EXTENSIONS = (".gif", ".webp", ".apng")
# Video files decoded with PyAV (FFmpeg).
AV_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv",
                 ".flv", ".wmv", ".3gp", ".ts")


# ---------------------------------------------------------------------------------------------
# Decoders.
# ---------------------------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    """Sort key that compares digit runs as numbers: frame_2 < frame_10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", name))


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def list_frames(folder: str) -> list[str]:
    """Frame image paths of a frame-folder video, in natural name order."""
    names = [n for n in os.listdir(folder)
             if not n.startswith(".") and _ext(n) in IMAGE_EXTENSIONS]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _decode_frame_folder(folder: str, num_frames: int, size: int, stride: int) -> np.ndarray:
    paths = list_frames(folder)
    if not paths:
        raise ValueError(
            f"frame folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    indices = sample_frame_indices(len(paths), num_frames, stride)
    decoded = {i: open_frame(paths[i], size) for i in set(indices.tolist())}
    return np.stack([decoded[i] for i in indices.tolist()])


def _decode_animation(path: str, num_frames: int, size: int, stride: int) -> np.ndarray:
    with Image.open(path) as image:
        indices = sample_frame_indices(getattr(image, "n_frames", 1), num_frames, stride)
        decoded = {}
        for i in sorted(set(indices.tolist())):  # Increasing: GIF frames decode in sequence.
            image.seek(i)
            decoded[i] = resize_crop(image, size)
    return np.stack([decoded[i] for i in indices.tolist()])


def import_av():
    """PyAV, or an error that says how to install it."""
    try:
        import av  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(
            f"decoding video files ({', '.join(AV_EXTENSIONS)}) needs PyAV: "
            "`pip install av` (or `pip install 'vlmjax[video]'`). Without it, store each "
            "video as a folder of frame images or an animated GIF.") from e
    return av


def _av_frame_to_array(frame, size: int) -> np.ndarray:
    """Scales in libswscale straight to the target size (no full-size RGB copy)."""
    width, height = frame.width, frame.height
    scale = size / min(width, height)
    out_w, out_h = max(size, round(width * scale)), max(size, round(height * scale))
    rgb = frame.to_ndarray(width=out_w, height=out_h, format="rgb24",
                           interpolation="BILINEAR")
    top, left = (out_h - size) // 2, (out_w - size) // 2
    return np.ascontiguousarray(rgb[top:top + size, left:left + size])


def _decode_av(path: str, num_frames: int, size: int, stride: int, threads: int) -> np.ndarray:
    av = import_av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream.")
        total = container.streams.video[0].frames
    if total <= 0:
        # Some containers (webm, mkv) store no frame count: count the packets,
        # which only demuxes (no decoding).
        with av.open(path) as container:
            total = sum(1 for packet in container.demux(container.streams.video[0])
                        if packet.size)
    indices = sample_frame_indices(total, num_frames, stride)
    wanted = set(indices.tolist())
    decoded: dict[int, np.ndarray] = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        if threads != 1:
            stream.thread_type = "AUTO"
        latest = None
        # Decode sequentially (seeking lands on keyframes only) and stop after
        # the last sampled frame; only sampled frames are converted to RGB.
        for t, frame in enumerate(container.decode(stream)):
            latest = frame
            if t in wanted:
                decoded[t] = _av_frame_to_array(frame, size)
            if t >= max(wanted):
                break
    if latest is None:
        raise ValueError("no frame could be decoded.")
    missing = wanted - decoded.keys()
    if missing:  # The header over-counted the frames: repeat the last one, as for short clips.
        tail = _av_frame_to_array(latest, size)
        decoded.update(dict.fromkeys(missing, tail))
    return np.stack([decoded[i] for i in indices.tolist()])


def decode_video(path: str, *, num_frames: int, size: int, stride: int = 0,
                 threads: int = 1) -> np.ndarray:
    """Decodes one video (frame folder or file) to a clip.

    Args:
      path: a frame folder, or a file with a PIL_EXTENSIONS / AV_EXTENSIONS
        extension.
      num_frames: F.
      size: output height and width (shorter side resized, centre crop).
      stride: frame sampling (`sample_frame_indices`).
      threads: FFmpeg codec threads (PyAV files only; 0 = FFmpeg's choice).

    Returns:
      uint8 [F, size, size, 3].
    """
    if os.path.isdir(path):
        return _decode_frame_folder(path, num_frames, size, stride)
    ext = _ext(path)
    if ext in PIL_EXTENSIONS:
        return _decode_animation(path, num_frames, size, stride)
    if ext in AV_EXTENSIONS:
        return _decode_av(path, num_frames, size, stride, threads)
    raise ValueError(
        f"{path!r} is not a frame folder or a video file "
        f"({', '.join(PIL_EXTENSIONS + AV_EXTENSIONS)}).")


# ---------------------------------------------------------------------------------------------
# The clip source.
# ---------------------------------------------------------------------------------------------


class FolderClips:
    """Random-access clips of a list of videos (a grain data source).

    `clips[i]` decodes video i (in grain's reader threads when used by the
    pipeline) and returns frames, changed_patches, change_energy and label
    (`clips.clip_example`); nothing is cached, so memory stays flat.
    """

    def __init__(self, videos: Sequence[tuple[str, int]], cfg, description: str):
        self._videos = list(videos)
        self._cfg = cfg
        self._description = description

    @property
    def videos(self) -> list[tuple[str, int]]:
        """(path, label) of every clip, in index order."""
        return list(self._videos)

    def __len__(self) -> int:
        return len(self._videos)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        path, label = self._videos[index]
        cfg = self._cfg
        try:
            frames = decode_video(path, num_frames=cfg.num_frames, size=cfg.image_size,
                                  stride=cfg.frame_stride, threads=cfg.decode_threads)
        except ImportError:
            raise
        except Exception as e:  # Name the file: a bad video must be easy to find and remove.
            raise ValueError(
                f"cannot decode video {path!r} (clip {index} of {self._description}): "
                f"{type(e).__name__}: {e}") from e
        return finish_clip(frames, label, cfg)

    def __repr__(self) -> str:
        return f"FolderClips({self._description}, {len(self)} clips)"


# ---------------------------------------------------------------------------------------------
# Scanning the directory tree.
# ---------------------------------------------------------------------------------------------


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _class_videos(class_dir: str) -> tuple[list[str], int]:
    """Video paths in a class directory (natural order), and stray images seen."""
    videos, stray_images = [], 0
    for entry in os.scandir(class_dir):
        if entry.name.startswith("."):
            continue
        ext = _ext(entry.name)
        if entry.is_dir() or ext in PIL_EXTENSIONS or ext in AV_EXTENSIONS:
            videos.append(entry.name)
        elif ext in IMAGE_EXTENSIONS:
            stray_images += 1
    return [os.path.join(class_dir, n) for n in sorted(videos, key=_natural_key)], stray_images


def _scan_classes(root: str, classes: Sequence[str], *, required: bool) -> list[list[str]]:
    """Videos of each class under `root` (a missing class directory has none)."""
    out = []
    for name in classes:
        class_dir = os.path.join(root, name)
        videos, stray = _class_videos(class_dir) if os.path.isdir(class_dir) else ([], 0)
        if required and not videos:
            hint = (f" It holds {stray} images directly: put each frame-folder video in its "
                    f"own sub-directory, {class_dir}/<video>/<frames>."
                    if stray else "")
            raise ValueError(
                f"class directory {class_dir!r} holds no videos (frame folders or "
                f"{', '.join(PIL_EXTENSIONS + AV_EXTENSIONS)} files).{hint}")
        out.append(videos)
    return out


def _no_classes_error(root: str, train_split: str) -> ValueError:
    return ValueError(
        f"config.data.path={root!r} has no class sub-directories: expected "
        f"root/<class>/<video> or root/{train_split}/<class>/<video>.")


def scan_video_folder(root: str, *, train_split: str = "train", eval_split: str = "",
                      eval_fraction: float = 0.1):
    """Lists the videos of each split and the class names.

    Args:
      root: the dataset directory (`config.data.path`).
      train_split / eval_split: split sub-directory names. When
        root/<train_split> exists the splits are those sub-directories (an
        empty eval_split picks the first existing of
        `clips.EVAL_SPLIT_CANDIDATES`); otherwise root holds the classes and
        a video goes to eval when CRC32("<class>/<video>") / 2^32 <
        eval_fraction.
      eval_fraction: see above.

    Returns:
      (class_names, train, eval, layout): sorted class names and lists of
      (path, label), in (class, natural name) order; layout describes the
      split rule.
    """
    if not os.path.isdir(root):
        raise ValueError(
            f"config.data.path={root!r} is not a directory; source='folder' needs the "
            "root of root/<class>/<video>.")
    train_root = os.path.join(root, train_split)
    if os.path.isdir(train_root):
        candidates = (eval_split,) if eval_split else clips.EVAL_SPLIT_CANDIDATES
        found = [s for s in candidates if os.path.isdir(os.path.join(root, s))]
        if not found:
            raise ValueError(
                f"config.data.path={root!r} has a {train_split!r} split directory but no "
                f"evaluation split directory (looked for {', '.join(map(repr, candidates))}); "
                "set config.data.eval_split to its name.")
        eval_root = os.path.join(root, found[0])
        classes = _subdirs(train_root)
        if not classes:
            raise _no_classes_error(root, train_split)
        unknown = sorted(set(_subdirs(eval_root)) - set(classes))
        if unknown:
            raise ValueError(
                f"evaluation classes {unknown} under {eval_root!r} have no training "
                f"directory under {train_root!r}; labels come from the training classes.")
        train_videos = _scan_classes(train_root, classes, required=True)
        eval_videos = _scan_classes(eval_root, classes, required=False)
        train = [(p, c) for c, paths in enumerate(train_videos) for p in paths]
        evals = [(p, c) for c, paths in enumerate(eval_videos) for p in paths]
        layout = f"splits {train_split!r} / {found[0]!r}"
    else:
        if eval_split and os.path.isdir(os.path.join(root, eval_split)):
            raise ValueError(
                f"config.data.path={root!r} has an {eval_split!r} split directory but no "
                f"{train_split!r} one; set config.data.train_split to the training "
                "directory's name.")
        classes = _subdirs(root)
        if not classes:
            raise _no_classes_error(root, train_split)
        train, evals = [], []
        for c, paths in enumerate(_scan_classes(root, classes, required=True)):
            for path in paths:
                key = f"{classes[c]}/{os.path.basename(path)}".encode()
                held_out = zlib.crc32(key) / 2.0**32 < eval_fraction
                (evals if held_out else train).append((path, c))
        layout = f"hash split, eval_fraction={eval_fraction}"
        if not train or not evals:
            raise ValueError(
                f"config.data.path={root!r}: the hash split (eval_fraction={eval_fraction}) "
                f"of its {len(train) + len(evals)} videos left the "
                f"{'training' if not train else 'evaluation'} split empty; add videos, "
                f"change eval_fraction or make root/{train_split} and root/<eval> "
                "split directories.")
    if not evals:
        raise ValueError(f"the evaluation split of {root!r} ({layout}) holds no videos.")
    return tuple(classes), train, evals, layout


def folder_clip_sources(cfg) -> clips.ClipSources:
    """The train/eval `ClipSources` of `config.data.source='folder'`."""
    root = os.path.abspath(os.path.expanduser(cfg.path))
    classes, train, evals, layout = scan_video_folder(
        root, train_split=cfg.train_split, eval_split=cfg.eval_split,
        eval_fraction=cfg.eval_fraction)
    if any(_ext(p) in AV_EXTENSIONS for p, _ in train + evals):
        import_av()  # Fail here, not later in a reader thread, when PyAV is missing.
    description = f"video folder {root!r} ({layout})"
    return clips.ClipSources(
        train=FolderClips(train, cfg, description + " train"),
        eval=FolderClips(evals, cfg, description + " eval"),
        num_classes=len(classes),
        class_names=classes,
        description=description,
    )
