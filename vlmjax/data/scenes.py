"""Procedural scenes: images of simple shapes whose description is known exactly.

The embedded image-text data of vlmjax (config.data.source='scenes' of
`vlmjax.data.image_text`): nothing is downloaded, every scene is sampled from
(seed, split, index), and captions and question/answer pairs are generated from
the same description the image is rendered from, so they are exactly right.

A scene is 1..max_objects objects on a plain grey background, at most one per
cell of a 3x3 grid:

  object    = (shape, colour, size, cell) + a small deterministic jitter
  shape     in `shapes`   (default circle, square, triangle, cross; also diamond)
  colour    in `colours`  (default red, green, blue, yellow, magenta, cyan; pure
                           RGB values in PALETTE, far from each other and from
                           the greys)
  size      in SIZES      small (radius 0.22 cell) or large (0.40 cell)
  location  in LOCATIONS  "top left", "top", "top right", "left", "center",
                          "right", "bottom left", "bottom", "bottom right"

`render(scene, image_size)` paints uint8 [H, W, 3] (H = W = image_size) with
numpy only: every pixel whose centre lies inside a shape gets the object's pure
colour, every other pixel the background grey (no anti-aliasing), so tests
can count colours. Shapes scale with the image; an object (radius + jitter
<= 0.46 cell) never leaves its cell, so objects never touch.

Held-out compositions (`held_out`, (colour, shape) pairs): training scenes never
contain one; every evaluation scene contains at least one, so retrieval and VQA
on the eval split measure generalisation to unseen colour-shape combinations
(every colour and shape on its own still appears in training).

Text: `caption(scene, template, rng)` describes all objects with one of
CAPTION_TEMPLATES; `questions(scene)` lists the QA pairs whose answer is unique
(types COUNT, COLOR, LOCATION, OBJECT, SIZE). `vocabulary(cfg)` is the closed
set of words all of them use (the built-in word tokenizer of image_text).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence

import ml_collections
import numpy as np

PALETTE = {
    "red": (230, 25, 25),
    "green": (30, 200, 40),
    "blue": (40, 90, 255),
    "yellow": (250, 230, 20),
    "magenta": (220, 30, 220),
    "cyan": (20, 220, 230),
    "orange": (255, 140, 0),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = ("small", "large")
LOCATIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
# Phrase placing an object in its cell ("a small red circle at the top left").
_AT = {"top left": "at the top left", "top": "at the top", "top right": "at the top right",
       "left": "on the left", "center": "in the center", "right": "on the right",
       "bottom left": "at the bottom left", "bottom": "at the bottom",
       "bottom right": "at the bottom right"}
# Backgrounds: a dark and a mid grey (never one of the PALETTE colours).
BACKGROUNDS = ((40, 40, 40), (100, 100, 100))
# Object radius per size, as a fraction of a grid cell (image_size / 3), and the
# largest jitter of the centre. 0.40 + 0.06 < 0.5 keeps every object strictly
# inside its cell; large shapes have > 2x the pixel area of small ones (any shape).
RADIUS = {"small": 0.22, "large": 0.40}
MAX_JITTER = 0.06
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = {"train": 0, "eval": 1}

# Captions: {objects} is the object phrases joined as "A, B and C"; {count} the
# number word, {shapes} "shape"/"shapes". Template 0 is the eval caption.
CAPTION_TEMPLATES = (
    "{objects}",
    "{count} {shapes}: {objects}",
    "there is {objects}",
    "an image of {objects}",
    "a picture with {objects} on a grey background",
    "{located}",
)
EVAL_TEMPLATE = 0
QA_TYPES = ("COUNT", "COLOR", "LOCATION", "OBJECT", "SIZE")
# Question wording, also the source of the vocabulary.
_QUESTIONS = ("how many shapes are there?", "how many {colour} shapes are there?",
              "how many {plural} are there?", "how many {size} shapes are there?",
              "what colour is the {shape}?", "where is the {colour} {shape}?",
              "what shape is {at}?", "what shape is {colour}?",
              "what size is the {colour} {shape}?")


def default_config() -> ml_collections.ConfigDict:
    """The `scenes` section of an image-text data config."""
    c = ml_collections.ConfigDict()
    # Content seed: scene i of a split is sampled from (seed, split, i).
    c.seed = 0
    # Objects per scene, uniform in [min_objects, max_objects] (at most 9, one per cell).
    # 2 keeps a 256-way retrieval that needs colour, shape, size and location of every
    # object while a small model trained from scratch on a CPU can learn it in minutes.
    c.min_objects = 1
    c.max_objects = 2
    # Names from PALETTE and SHAPES.
    c.colours = ("red", "green", "blue", "yellow", "magenta", "cyan")
    c.shapes = ("circle", "square", "triangle", "cross")
    # (colour, shape) pairs never seen in training; each eval scene has at least one.
    c.held_out = (("red", "triangle"), ("green", "cross"), ("blue", "circle"),
                  ("yellow", "square"))
    # Distinct training scenes (one epoch; rendered on the fly, so this costs nothing).
    c.num_train = 100_000
    return c


def check_config(cfg, prefix: str = "config.data.scenes") -> None:
    """One ValueError naming the field for any setting that cannot work."""
    for field, allowed in (("colours", tuple(PALETTE)), ("shapes", SHAPES)):
        values = tuple(cfg[field])
        for v in values:
            if v not in allowed:
                close = difflib.get_close_matches(str(v), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "."
                raise ValueError(f"{prefix}.{field} has {v!r}, not one of {allowed}{hint}")
        if len(set(values)) != len(values) or len(values) < 2:
            raise ValueError(f"{prefix}.{field}={values!r} must list at least 2 distinct names.")
    for field in ("min_objects", "max_objects", "num_train"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"{prefix}.{field}={cfg[field]!r} must be an int >= 1.")
    if not cfg.min_objects <= cfg.max_objects <= len(LOCATIONS):
        raise ValueError(
            f"{prefix}.min_objects={cfg.min_objects} and max_objects={cfg.max_objects} must "
            f"satisfy 1 <= min_objects <= max_objects <= {len(LOCATIONS)} (one object per cell).")
    held = [tuple(p) for p in cfg.held_out]
    for pair in held:
        if len(pair) != 2 or pair[0] not in cfg.colours or pair[1] not in cfg.shapes:
            raise ValueError(
                f"{prefix}.held_out has {pair!r}: each entry must be a (colour, shape) pair "
                f"from colours={tuple(cfg.colours)} and shapes={tuple(cfg.shapes)}.")
    if not held:
        raise ValueError(f"{prefix}.held_out is empty: the eval split needs held-out pairs.")
    train = set(_pairs(cfg, "train"))
    for i, names in ((0, cfg.colours), (1, cfg.shapes)):
        missing = [n for n in names if not any(p[i] == n for p in train)]
        if missing:
            raise ValueError(
                f"{prefix}.held_out={tuple(held)} leaves no training pair with {missing}: "
                "every colour and shape must still appear in training.")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape: names, grid cell (row-major, 0 = top left) and exact centre (image fractions)."""

    shape: str
    colour: str
    size: str
    cell: int
    cx: float
    cy: float

    @property
    def location(self) -> str:
        return LOCATIONS[self.cell]

    @property
    def radius(self) -> float:
        """Radius as a fraction of the image side."""
        return RADIUS[self.size] / 3.0

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {_AT[self.location]}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects in reading order (by cell) and the background grey (RGB)."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class QA:
    type: str  # one of QA_TYPES
    question: str
    answer: str


def _pairs(cfg, split: str) -> list[tuple[str, str]]:
    held = {tuple(p) for p in cfg.held_out}
    pairs = [(c, s) for c in cfg.colours for s in cfg.shapes]
    return [p for p in pairs if p not in held] if split == "train" else pairs


def sample_scene(seed: int, index: int, split: str, cfg) -> Scene:
    """Scene `index` of `split` ('train' or 'eval'), a function of (seed, split, index).

    Train scenes draw each object's (colour, shape) from the pairs that are not held out;
    eval scenes draw their first object from the held-out pairs and the rest from all pairs.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {tuple(SPLITS)}.")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = sorted(rng.choice(len(LOCATIONS), size=n, replace=False).tolist())
    pairs = _pairs(cfg, split)
    held = [tuple(p) for p in cfg.held_out]
    first = int(rng.integers(n))  # Which object carries the held-out pair in eval.
    objects = []
    for k, cell in enumerate(cells):
        options = held if (split == "eval" and k == first) else pairs
        colour, shape = options[int(rng.integers(len(options)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        jx, jy = rng.uniform(-MAX_JITTER, MAX_JITTER, size=2)
        row, col = divmod(cell, 3)
        objects.append(SceneObject(shape=shape, colour=colour, size=size, cell=cell,
                                   cx=float((col + 0.5 + jx) / 3), cy=float((row + 0.5 + jy) / 3)))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(objects=tuple(objects), background=background)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test at coordinates relative to the centre, in radii (v grows downwards)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":  # side 1.6 r: about the circle's area
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":  # pointing up
        return (v >= -1.0) & (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "cross":  # bars a third of the extent wide
        return (((np.abs(u) <= 1.0) & (np.abs(v) <= 0.34))
                | ((np.abs(v) <= 1.0) & (np.abs(u) <= 0.34)))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; shapes: {SHAPES}.")


def render(scene: Scene, image_size: int,
           rgb: Sequence[tuple[int, int, int]] | None = None) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: pixel centres inside a shape get its pure colour.

    rgb: one (r, g, b) per object, in place of its palette colour (`random_colours`); None = the
    palette colours the scene names.
    """
    if rgb is not None and len(rgb) != len(scene.objects):
        raise ValueError(f"rgb has {len(rgb)} colours for a scene of {len(scene.objects)} objects.")
    coords = (np.arange(image_size, dtype=np.float64) + 0.5) / image_size
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = scene.background
    for k, obj in enumerate(scene.objects):
        r = obj.radius
        u = (coords[None, :] - obj.cx) / r
        v = (coords[:, None] - obj.cy) / r
        image[shape_mask(obj.shape, u, v)] = PALETTE[obj.colour] if rgb is None else rgb[k]
    return image


def random_colours(scene: Scene, rng: np.random.Generator, min_distance: int) -> list[tuple[int, int, int]]:
    """One uniformly random RGB colour per object of `scene`, each at least `min_distance` (largest
    per-channel difference) from every PALETTE colour and from the scene's background.

    Scenes painted with these never show a palette colour, so a model trained on them never sees
    any (colour, shape) pair of the palette (in particular not the held-out ones), yet every shape
    appears in a continuum of colours: shape features that do not depend on colour are the only
    ones that fit (`vlmjax.data.scene_parse`).
    """
    avoid = np.asarray(list(PALETTE.values()) + [scene.background], np.int64)
    out = []
    for _ in scene.objects:
        for _ in range(1000):
            c = rng.integers(0, 256, size=3)
            if np.abs(avoid - c).max(axis=1).min() >= min_distance:
                break
        else:
            raise ValueError(f"min_distance={min_distance} leaves no RGB colour away from the palette; lower it.")
        out.append(tuple(int(x) for x in c))
    return out


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, template: int | None = None,
            rng: np.random.Generator | None = None) -> str:
    """A description of every object of `scene`.

    Args:
      scene: the scene.
      template: index into CAPTION_TEMPLATES; None = drawn from `rng` (EVAL_TEMPLATE without).
      rng: shuffles the order in which objects are named; None = reading order (by cell).
    """
    if template is None:
        template = EVAL_TEMPLATE if rng is None else int(rng.integers(len(CAPTION_TEMPLATES)))
    objects = list(scene.objects)
    if rng is not None:
        objects = [objects[i] for i in rng.permutation(len(objects))]
    n = len(objects)
    located = " and ".join(f"{_AT[o.location]} there is a {o.size} {o.colour} {o.shape}"
                           for o in objects)
    return CAPTION_TEMPLATES[template].format(
        objects=_join([o.phrase() for o in objects]), count=NUMBERS[n],
        shapes="shape" if n == 1 else "shapes", located=located)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def questions(scene: Scene) -> list[QA]:
    """Every question about `scene` whose answer is unique, in a fixed order.

    COUNT: all shapes, per colour / shape / size present (answers are number words);
    COLOR: the colour of a shape that occurs once; LOCATION: where a (colour, shape) that
    occurs once is; OBJECT: the shape in an occupied cell, the shape of a colour that occurs
    once; SIZE: the size of a (colour, shape) that occurs once.
    """
    objs = scene.objects

    def count(**attrs) -> int:
        return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in objs)

    qa = [QA("COUNT", "how many shapes are there?", NUMBERS[len(objs)])]
    for colour in dict.fromkeys(o.colour for o in objs):
        qa.append(QA("COUNT", f"how many {colour} shapes are there?",
                     NUMBERS[count(colour=colour)]))
    for shape in dict.fromkeys(o.shape for o in objs):
        qa.append(QA("COUNT", f"how many {plural(shape)} are there?", NUMBERS[count(shape=shape)]))
    for size in dict.fromkeys(o.size for o in objs):
        qa.append(QA("COUNT", f"how many {size} shapes are there?", NUMBERS[count(size=size)]))
    for o in objs:
        if count(shape=o.shape) == 1:
            qa.append(QA("COLOR", f"what colour is the {o.shape}?", o.colour))
    for o in objs:
        if count(colour=o.colour, shape=o.shape) == 1:
            qa.append(QA("LOCATION", f"where is the {o.colour} {o.shape}?", o.location))
    for o in objs:
        qa.append(QA("OBJECT", f"what shape is {_AT[o.location]}?", o.shape))
        if count(colour=o.colour) == 1:
            qa.append(QA("OBJECT", f"what shape is {o.colour}?", o.shape))
    for o in objs:
        if count(colour=o.colour, shape=o.shape) == 1:
            qa.append(QA("SIZE", f"what size is the {o.colour} {o.shape}?", o.size))
    return qa


_WORD = re.compile(r"\w+|[^\w\s]+")  # The split of tokenizers' Whitespace pre-tokenizer.


def words(text: str) -> list[str]:
    """`text` split as the built-in scene tokenizer splits it (words and punctuation runs)."""
    return _WORD.findall(text.lower())


def vocabulary(cfg) -> tuple[str, ...]:
    """Every word a caption, question or answer of `cfg`'s scenes can use, in a fixed order.

    Built from the template texts (fields removed) and all names, so it is closed by
    construction; sorted, so it depends only on the colour/shape lists.
    """
    texts = [re.sub(r"\{\w+\}", " ", t) for t in CAPTION_TEMPLATES + _QUESTIONS]
    texts += list(_AT.values()) + list(LOCATIONS) + list(NUMBERS) + list(SIZES) + [", and"]
    texts += list(cfg.colours) + list(cfg.shapes) + [plural(s) for s in cfg.shapes]
    return tuple(sorted({w for t in texts for w in words(t)}))


def eval_indices(cfg, num_eval: int) -> list[int]:
    """Raw eval-scene indices whose EVAL_TEMPLATE captions are pairwise distinct.

    Scans raw indices 0, 1, 2, ... and skips any scene whose caption was already taken, so
    eval scene i is raw scene `eval_indices(cfg, n)[i]` (the same on every host) and caption
    retrieval over the eval split has exactly one right answer per image.
    """
    seen: set[str] = set()
    chosen: list[int] = []
    index = 0
    # The number of distinct eval captions is finite; give up long before an endless scan.
    limit = 200 * num_eval + 10_000
    while len(chosen) < num_eval:
        if index >= limit:
            raise ValueError(
                f"config.data.num_eval={num_eval}: only {len(chosen)} distinct eval captions in "
                f"{limit} scenes; lower num_eval or allow more objects/colours/shapes.")
        text = caption(sample_scene(cfg.seed, index, "eval", cfg))
        if text not in seen:
            seen.add(text)
            chosen.append(index)
        index += 1
    return chosen


class SceneRecords:
    """Random-access records of one split: {'image': uint8 [S, S, 3], 'caption': str, 'index'}.

    Train record i is scene i with a caption template and object order drawn per index
    (from (seed, split, i, 1)); eval record i is scene `raw_indices[i]` with the eval caption.
    """

    def __init__(self, cfg, split: str, image_size: int, raw_indices: Sequence[int] | None = None):
        self._cfg, self._split, self._size = cfg, split, image_size
        self._raw = None if raw_indices is None else list(raw_indices)

    def __len__(self) -> int:
        return self._cfg.num_train if self._raw is None else len(self._raw)

    def scene(self, index: int) -> Scene:
        raw = index if self._raw is None else self._raw[index]
        return sample_scene(self._cfg.seed, raw, self._split, self._cfg)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        scene = self.scene(index)
        if self._split == "train":
            rng = np.random.default_rng([self._cfg.seed, SPLITS["train"], index, 1])
            text = caption(scene, rng=rng)
        else:
            text = caption(scene)
        return {"image": render(scene, self._size), "caption": text, "index": index}

    def __repr__(self) -> str:
        return f"SceneRecords(split={self._split!r}, n={len(self)}, image_size={self._size})"
