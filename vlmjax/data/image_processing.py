"""Image preprocessing of HF checkpoints (``preprocessor_config.json``), on PIL + numpy.

Re-implements the transformers PIL-backend processors that the vision towers of ``vlmjax.convert``
are trained with, so a pipeline needs no torch/torchvision:

    CLIPImageProcessor    resize shortest edge -> center crop -> rescale -> normalise (CLIP mean/std)
    SiglipImageProcessor  resize to a fixed height x width -> rescale -> normalise (0.5 / 0.5)
    BitImageProcessor     as CLIP (DINOv2 checkpoints: shortest edge 256, crop 224, ImageNet mean/std)
    ViTImageProcessor     as SigLIP with bilinear resampling

The steps and their numerics follow ``transformers.image_processing_backends.PilBackend``: the
resize runs in PIL on uint8 (so values are rounded to uint8 as in transformers), the rescale in
float64 then float32, the normalisation in float32. Output is NHWC float32, what
``VisionTransformer`` takes.

  proc = ImageProcessor.from_pretrained("/ckpt/clip-vit-base-patch32")
  pixel_values = proc([img_uint8_hwc, ...])   # [B, 224, 224, 3] float32
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# PIL resampling filter codes (transformers ``PILImageResampling``), as stored in "resample".
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# The transformers class attributes used when preprocessor_config.json leaves a field out.
# default_to_square: how an int "size" is read (False: shortest edge, True: height = width).
_CLIP_LIKE = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                  resample=3, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, default_to_square=False)
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP_LIKE,
    "BitImageProcessor": _CLIP_LIKE,
    "SiglipImageProcessor": dict(size={"height": 224, "width": 224}, do_center_crop=False, resample=3,
                                 image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD,
                                 default_to_square=False),
    "ViTImageProcessor": dict(size={"height": 224, "width": 224}, do_center_crop=False, resample=2,
                              image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD,
                              default_to_square=True, do_convert_rgb=False),
}
# Fields read from the json; everything else there (processor_class, ...) is metadata.
_FIELDS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
           "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def _pil():
    try:
        from PIL import Image  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("vlmjax.data.image_processing resizes with Pillow, as transformers does: "
                          "`pip install pillow`.") from e
    return Image


def _size_dict(value: Any, field: str, default_to_square: bool) -> dict[str, int]:
    """HF ``get_size_dict``: an int means a shortest edge or a square, a pair (h, w), or a dict."""
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, Mapping):
        d = {k: int(v) for k, v in value.items() if v is not None}
        if set(d) in ({"shortest_edge"}, {"height", "width"}):
            return d
    raise ValueError(f"preprocessor_config.json {field}={value!r} is not supported; use "
                     "{'shortest_edge': n} or {'height': h, 'width': w} (or an int).")


def resize_output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """Target (height, width): fixed, or the shortest edge set to ``size['shortest_edge']`` with the
    long edge ``int(short * long / short_in)`` (truncated, as transformers / torchvision)."""
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    short, long = (width, height) if width <= height else (height, width)
    new_short = size["shortest_edge"]
    new_long = int(new_short * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C] centered; zero-pads first when the image is smaller (HF)."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    canvas = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[top_pad : top_pad + h, left_pad : left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> [H, W, 3]; alpha is composited onto white
    (transformers ``convert_to_rgb``)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected an [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] image, got shape {image.shape}.")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(image.dtype)
    return image


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """One HF image processor's settings and its ``__call__``; build it with ``from_pretrained``."""

    size: Mapping[str, int]
    crop_size: Mapping[str, int] | None = None
    do_resize: bool = True
    resample: int = 3
    do_center_crop: bool = False
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    processor_type: str = "CLIPImageProcessor"

    @classmethod
    def from_pretrained(cls, path: str) -> "ImageProcessor":
        """Reads ``path/preprocessor_config.json`` (a checkpoint directory) or that json file."""
        path = os.fspath(path)
        file = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No preprocessor_config.json at {path}; it is written by the HF image "
                                    "processor's save_pretrained next to config.json.")
        with open(file) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageProcessor":
        """From a preprocessor_config.json dict; fields it omits take the processor class's defaults."""
        kind = d.get("image_processor_type") or d.get("feature_extractor_type") or ""
        kind = kind.removesuffix("Pil").removesuffix("Fast").replace("FeatureExtractor", "ImageProcessor")
        if kind not in PROCESSOR_DEFAULTS:
            raise ValueError(f"image_processor_type={kind!r} is not supported; supported: {sorted(PROCESSOR_DEFAULTS)}.")
        defaults = PROCESSOR_DEFAULTS[kind]
        values = {k: d[k] for k in _FIELDS if d.get(k) is not None}
        for k in ("size", "crop_size", "resample", "image_mean", "image_std", "do_center_crop"):
            values.setdefault(k, defaults.get(k))
        values.setdefault("do_convert_rgb", defaults.get("do_convert_rgb", True))
        values["size"] = _size_dict(values["size"], "size", defaults["default_to_square"])
        values["crop_size"] = _size_dict(values["crop_size"], "crop_size", True) if values.get("crop_size") else None
        if values["do_center_crop"] and (values["crop_size"] is None or "height" not in values["crop_size"]):
            raise ValueError("do_center_crop=True needs crop_size {'height': h, 'width': w}.")
        if int(values["resample"]) not in RESAMPLE:
            raise ValueError(f"resample={values['resample']!r}; use a PIL filter code {RESAMPLE}.")
        for k in ("image_mean", "image_std"):
            v = values[k]
            values[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        return cls(processor_type=kind, **values)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, or None if it depends on the input's aspect ratio."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and "height" in self.size:
            return self.size["height"], self.size["width"]
        return None

    def process(self, image: np.ndarray) -> np.ndarray:
        """One uint8 image [H, W, C] (or [H, W]) -> float32 [h, w, 3]."""
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"Images must be uint8 (0..255), got {image.dtype}; e.g. np.asarray(PIL image).")
        image = to_rgb(image) if self.do_convert_rgb else image
        if self.do_resize:
            h, w = resize_output_size(image.shape[0], image.shape[1], self.size)
            if (h, w) != image.shape[:2]:  # PIL returns a copy for the same size
                pil = _pil().fromarray(image[..., 0] if image.shape[-1] == 1 else image)
                image = np.asarray(pil.resize((w, h), resample=int(self.resample)))
                image = image[..., None] if image.ndim == 2 else image
        if self.do_center_crop:
            image = center_crop(image, self.crop_size["height"], self.crop_size["width"])
        out = image
        if self.do_rescale:
            out = (out.astype(np.float64) * self.rescale_factor).astype(np.float32)
        out = out.astype(np.float32)
        if self.do_normalize:
            if out.shape[-1] != len(self.image_mean):
                raise ValueError(f"A {out.shape[-1]}-channel image cannot be normalised with {len(self.image_mean)} "
                                 "means; set do_convert_rgb=True or pass RGB images.")
            out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return out

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 HWC images (any sizes) -> float32 [B, H, W, 3] (NHWC) for ``VisionTransformer``."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8:
            images = [images]
        out = [self.process(im) for im in images]
        shapes = {o.shape for o in out}
        if len(shapes) > 1:
            raise ValueError(f"Processed images have different shapes {sorted(shapes)} (size={dict(self.size)}, "
                             f"do_center_crop={self.do_center_crop}); batch them separately or crop.")
        return np.stack(out)


__all__ = ["ImageProcessor", "PROCESSOR_DEFAULTS", "center_crop", "resize_output_size", "to_rgb"]
