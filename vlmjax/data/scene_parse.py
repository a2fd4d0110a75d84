"""Scene parsing: what is in each cell of a procedural scene, for pretraining a vision tower.

The data of `task='scene_parse'` (`vlmjax.tasks.scene_parse`), the vision stage of the VLM and
fusion experiments (`configs/trm_vlm_qa.py`, `configs/fusion_vqa.py`). Every scene of
`vlmjax.data.scenes` is a 3x3 grid of cells holding at most one object each, so its exact parse is
known: per cell, whether it is empty, the object's shape, size and RGB colour.

Why a stage of its own. Trained on the palette scenes, a tower learns shape *given colour*: with
six colours and the held-out (colour, shape) pairs never shown, "red and pointed" is never needed,
and the cheapest features tie shape to the colours it was seen in. Measured with this task's heads
on a tower trained on palette scenes (96 px, patch 32, 300 steps, 2-core CPU): shape accuracy 0.86
on eval objects of seen pairs and 0.00 on objects of held-out pairs. Painted with random colours
instead (`colour_mode='random'`: a uniform RGB colour per object, at least `min_palette_distance`
from every palette colour and from the background, so no palette colour and no held-out pair is
ever shown), shape has to be read from the outline alone, and shape accuracy on held-out pairs of
the palette eval scenes rises with training (0.74 after 600 steps in the same measurement).

Examples (training: scenes of the training split, random or palette colours; evaluation: the
palette scenes of the eval split, every one holding a held-out pair, as in VQA):

  image:    float32 [S, S, 3]   CLIP mean/std normalised (as `vlm_data`)
  shape:    int32 [9]           per cell, row-major: 0 empty, 1 + index in scenes.shapes
  size:     int32 [9]           0 empty, 1 small, 2 large
  rgb:      float32 [9, 3]      the object's colour in [0, 1] (0 where empty)
  colour:   int32 [9]           1 + index in scenes.colours of a palette object, 0 otherwise
  held_out: int32 [9]           1 where the cell's (colour, shape) pair is held out
  index:    int32               record index
  mask:     float32             1 for real eval rows, 0 for padding (eval only)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from vlmjax.data import image_text, scenes

NUM_CELLS = len(scenes.LOCATIONS)
COLOUR_MODES = ("random", "palette")


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a scene-parsing experiment."""
    c = ml_collections.ConfigDict()
    # S: images are S x S; 96 with patch 32 gives one patch per grid cell.
    c.image_size = 96
    # Mixed with the trainer's seed for the training order only (scene content: scenes.seed).
    c.seed = 0
    # 'random': every training object gets a random RGB colour away from the palette (module
    # docstring); 'palette': the scenes' own colours (the shortcut this stage exists to avoid).
    c.colour_mode = "random"
    # Largest per-channel difference a random colour keeps from every palette colour and from the
    # background (0..255).
    c.min_palette_distance = 64
    # Eval scenes (palette colours, each with a held-out pair).
    c.num_eval = 256
    c.num_threads = 2
    c.prefetch_buffer_size = 16
    c.prefetch_batches = 2
    c.scenes = scenes.default_config()
    return c


def check_config(cfg) -> None:
    if cfg.colour_mode not in COLOUR_MODES:
        raise ValueError(f"config.data.colour_mode={cfg.colour_mode!r} is not one of {COLOUR_MODES}.")
    if not 0 <= cfg.min_palette_distance <= 128:
        raise ValueError(f"config.data.min_palette_distance={cfg.min_palette_distance} must be in [0, 128] "
                         "(larger leaves almost no RGB colour away from the palette).")
    if cfg.num_eval < 1:
        raise ValueError(f"config.data.num_eval={cfg.num_eval} must be >= 1.")
    scenes.check_config(cfg.scenes, "config.data.scenes")


def targets(scene: scenes.Scene, cfg, rgb=None) -> dict[str, np.ndarray]:
    """The per-cell targets of `scene` (module docstring); rgb: the colours it was painted with
    (None = its palette colours)."""
    held = {tuple(p) for p in cfg.held_out}
    out = {"shape": np.zeros(NUM_CELLS, np.int32), "size": np.zeros(NUM_CELLS, np.int32),
           "rgb": np.zeros((NUM_CELLS, 3), np.float32), "colour": np.zeros(NUM_CELLS, np.int32),
           "held_out": np.zeros(NUM_CELLS, np.int32)}
    for k, obj in enumerate(scene.objects):
        out["shape"][obj.cell] = 1 + list(cfg.shapes).index(obj.shape)
        out["size"][obj.cell] = 1 + scenes.SIZES.index(obj.size)
        out["rgb"][obj.cell] = np.asarray(scenes.PALETTE[obj.colour] if rgb is None else rgb[k], np.float32) / 255.0
        out["colour"][obj.cell] = 0 if rgb is not None else 1 + list(cfg.colours).index(obj.colour)
        out["held_out"][obj.cell] = int((obj.colour, obj.shape) in held)
    return out


class SceneParseRecords:
    """Random-access records of one split: the rendered uint8 image and its per-cell targets.

    Train record i is training scene i; with colour_mode 'random' its colours are drawn from
    (scenes.seed, i, 2), so a record is the same however often it is read. Eval record i is the
    eval scene `scenes.eval_indices(...)[i]` in its palette colours.
    """

    def __init__(self, cfg, split: str):
        self._cfg, self._split = cfg, split
        self._raw = None if split == "train" else scenes.eval_indices(cfg.scenes, cfg.num_eval)

    def __len__(self) -> int:
        return self._cfg.scenes.num_train if self._raw is None else len(self._raw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index, sc = int(index), self._cfg.scenes
        raw = index if self._raw is None else self._raw[index]
        scene = scenes.sample_scene(sc.seed, raw, self._split, sc)
        rgb = None
        if self._split == "train" and self._cfg.colour_mode == "random":
            rng = np.random.default_rng([sc.seed, scenes.SPLITS["train"], index, 2])
            rgb = scenes.random_colours(scene, rng, self._cfg.min_palette_distance)
        return {"image": scenes.render(scene, self._cfg.image_size, rgb), "index": index,
                **targets(scene, sc, rgb)}

    def __repr__(self) -> str:
        return f"SceneParseRecords(split={self._split!r}, n={len(self)})"


class _ToExample(grain.transforms.Map):
    def __init__(self, preprocess):
        self._preprocess = preprocess

    def map(self, record: dict) -> dict[str, np.ndarray]:
        out = {k: v for k, v in record.items() if k != "image"}
        out["image"] = self._preprocess(record["image"])
        out["index"] = np.int32(record["index"])
        out["mask"] = np.float32(1.0)
        return out


@dataclasses.dataclass
class SceneParseData(image_text.RecordPipelines):
    """Training stream and eval batches of scene parsing (`RecordPipelines`)."""

    config: Any
    train_records: Any
    eval_records: Any
    description: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _to_example: _ToExample = dataclasses.field(repr=False, default=None)


def build(cfg) -> SceneParseData:
    """The scene-parsing data of a `data` config section (`default_config`)."""
    check_config(cfg)
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    preprocess = image_text.Preprocess(cfg.image_size, None)
    return SceneParseData(
        config=cfg, train_records=SceneParseRecords(cfg, "train"), eval_records=SceneParseRecords(cfg, "eval"),
        description=(f"procedural scenes ({cfg.colour_mode} colours for training, {cfg.image_size} px, "
                     f"{cfg.num_eval} palette eval scenes)"),
        mean=preprocess.mean, std=preprocess.std, _to_example=_ToExample(preprocess))


__all__ = ["COLOUR_MODES", "NUM_CELLS", "SceneParseData", "SceneParseRecords", "build", "default_config",
           "targets"]
