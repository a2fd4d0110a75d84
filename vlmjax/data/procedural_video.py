"""Procedural video clips with exact per-patch change maps (config.data.source='procedural').

Data for the ReuseViT experiments (`docs/token-reuse.md`, Hwang et al.,
"Déjà Vu", PVLDB 2025) that needs no download: every clip is rendered with
numpy from (config.seed, split, clip index), so any clip can be reproduced on
any host, and the ground truth of "which patches changed" is exact.

A clip is a textured background (static, or panning slowly: sub-pixel drift
of an analytic texture) and `num_sprites` moving sprites (squares, discs,
crosses and triangles drawn with numpy, or scikit-learn's bundled 8x8 digits
when scikit-learn is installed) that bounce off the borders. Sprite 0 is the
*main* sprite: clearly the largest and always drawn on top; its class is the
clip label (4 shapes, or the digit 0-9), so the label is learnable from pooled
per-frame features.

`render_clip` returns the per-clip arrays of `clips.clip_example` (frames,
changed_patches, change_energy, label); change_energy is computed from the
rendered (quantized) frames: the exact stand-in for the spec's
`compressed_map` (codec residual energy). `ProceduralClips` is the
random-access clip source of one split, `procedural_sources` the
`ClipSources` the pipeline (`vlmjax.data.video`) consumes.
"""

from __future__ import annotations

import functools

from einops import rearrange
import numpy as np

from vlmjax.data import clips

SPRITE_KINDS = ("shapes", "digits")
BACKGROUNDS = ("static", "pan")
SHAPE_NAMES = ("square", "disc", "cross", "triangle")
_SPLIT_IDS = {"train": 0, "eval": 1}

# Main sprite radius and distractor radius, as fractions of image_size.
_MAIN_RADIUS = (0.22, 0.3)
_DISTRACTOR_RADIUS = (0.07, 0.12)
# Background: sum of this many oriented sinusoids of up to _MAX_CYCLES cycles
# per image, around a random base colour (kept inside [0.15, 0.85]).
_NUM_WAVES = 6
_MAX_CYCLES = 8
# Heading marks (config.data.heading_marks): the four headings (x, y steps; y grows downwards), each
# written on the sprite as the phase of a checkerboard of 2x2-pixel squares (period 4, anchored to
# the pixel grid): heading k shifts it by _MARK_SHIFT[k] pixels (x, y). Half the squares are the sprite
# colour, half _MARK_DARK x it, so a region the sprite covers has (nearly) the same mean colour and
# luminance spread whatever the heading: the 8x pooled latents barely see it (measured on random
# discs: 0.03 rms latent change between headings against 0.15 for a 2.4 px move), a patch embedding
# reads it linearly.
HEADINGS = ("right", "down", "left", "up")
_HEADING_STEP = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
_MARK_SHIFT = ((0, 0), (1, 0), (0, 1), (1, 1))
_MARK_DARK = 0.45


@functools.lru_cache(maxsize=8)
def _checkerboards(size: int) -> np.ndarray:
    """bool [len(HEADINGS), size, size]: where heading k's mark is dark (the squares of the
    checkerboard shifted by _MARK_SHIFT[k], anchored to the pixel grid)."""
    x, y = np.arange(size)[None, :], np.arange(size)[:, None]
    return np.stack([((x + sx) // 2 + (y + sy) // 2) % 2 == 1 for sx, sy in _MARK_SHIFT])


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


def _turning(start: np.ndarray, heading0: np.ndarray, speed: np.ndarray, turn: float, frames_n: int,
             low: np.ndarray, high: np.ndarray, rng: np.random.Generator, distractor_turn: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Sprites with heading marks (``data.heading_marks``): each steps along one of ``HEADINGS``;
    every frame sprite 0 (the mover) draws a new heading (uniform over the four) with probability
    ``turn``, each other sprite with probability ``distractor_turn``.

    start [K, 2] pixels, heading0 [K] codes, speed [K] -> centres [F, K, 2] and headings [F, K] (codes):
    the heading shown at frame t is the direction of the step t -> t+1, reversed first when that
    step would leave [low, high] (so the mark never lies).
    """
    num = start.shape[0]
    centres = np.empty((frames_n, num, 2))
    headings = np.empty((frames_n, num), np.int64)
    pos, code = start.astype(np.float64).copy(), heading0.astype(np.int64).copy()
    turns = rng.uniform(size=frames_n) < turn
    draws = rng.integers(0, len(HEADINGS), size=frames_n)
    if distractor_turn:
        others = rng.uniform(size=(frames_n, num - 1)) < distractor_turn
        other_draws = rng.integers(0, len(HEADINGS), size=(frames_n, num - 1))
    for t in range(frames_n):
        if turns[t]:
            code[0] = draws[t]
        if distractor_turn:
            code[1:] = np.where(others[t], other_draws[t], code[1:])
        nxt = pos + speed[:, None] * _HEADING_STEP[code]
        out = ((nxt < low) | (nxt > high)).any(-1)
        code = np.where(out, (code + 2) % len(HEADINGS), code)  # reverse: right <-> left, down <-> up
        centres[t], headings[t] = pos, code
        pos = np.clip(pos + speed[:, None] * _HEADING_STEP[code], low, high)
    return centres, headings


def num_classes(sprite_kind: str) -> int:
    """Label classes of `sprite_kind`: 4 shapes or 10 digits."""
    return 10 if sprite_kind == "digits" else len(SHAPE_NAMES)


def class_names(sprite_kind: str) -> tuple[str, ...]:
    """Name of each label of `sprite_kind`."""
    return SHAPE_NAMES if sprite_kind == "shapes" else tuple(str(d) for d in range(10))


def check_sprites(sprite_kind: str) -> None:
    """Raises, with a hint, when `sprite_kind` needs a package that is missing."""
    if sprite_kind == "digits":
        _load_digits()  # Raises with a hint when scikit-learn is missing.


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
        texture = np.einsum("yk,kz->yz", rows,
                            rearrange(cols, "k x c -> k (x c)").astype(np.float32))
        texture = rearrange(texture, "y (x c) -> y x c", c=3)
        return np.clip(base.astype(np.float32) + texture, 0.15, 0.85)

    # Sprites: 0 is the main one (large, labelled, drawn last = on top).
    num = cfg.num_sprites
    radius = np.concatenate([rng.uniform(*_MAIN_RADIUS, size=1),
                             rng.uniform(*_DISTRACTOR_RADIUS, size=num - 1) * cfg.distractor_scale]
                            ) * (size * cfg.sprite_scale)
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
    speed[1:] *= cfg.distractor_speed
    angle = rng.uniform(0.0, 2.0 * np.pi, size=num)
    velocity = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=-1)  # [K, 2]
    low, high = radius[:, None], size - radius[:, None]
    start = rng.uniform(low, high, size=(num, 2))
    marks = bool(cfg.get("heading_marks", False))
    if marks:
        heading0 = rng.integers(0, len(HEADINGS), size=num)
        centres, headings = _turning(start, heading0, speed, float(cfg.turn), frames_n, low, high, rng,
                                     float(cfg.get("distractor_turn", 0.0)))
    else:
        centres = _bounce(start, velocity, steps, low, high)  # [F, K, 2] (x, y), pixels

    if cfg.background == "static":
        static_bg = background(0.0, 0.0)
    if cfg.background == "static":
        frames = np.broadcast_to(static_bg, (frames_n, size, size, 3)).copy()
    else:
        frames = np.stack([background(t * cfg.pan_speed * np.cos(pan_angle), t * cfg.pan_speed * np.sin(pan_angle))
                           for t in range(frames_n)])
    # Sprites, back to front, each drawn in every frame at once over the box its path covers ([F, h, w]
    # masks): one vectorised pass per sprite costs less than F small passes in the reader threads.
    pixel = np.arange(size) + 0.5
    if marks:
        checker = _checkerboards(size)  # [len(HEADINGS), H, W]: the mark's dark squares per heading
    for k in reversed(range(num)):
        cx, cy = centres[:, k, 0, None, None], centres[:, k, 1, None, None]  # [F, 1, 1] pixels
        r = radius[k]
        x0, x1 = max(int(np.min(cx) - r) - 1, 0), min(int(np.max(cx) + r) + 2, size)
        y0, y1 = max(int(np.min(cy) - r) - 1, 0), min(int(np.max(cy) + r) + 2, size)
        inside = masks[k]((pixel[None, None, x0:x1] - cx) / r, (pixel[None, y0:y1, None] - cy) / r)
        box = frames[:, y0:y1, x0:x1]
        box[inside] = colour[k]
        if marks:
            # The heading mark: the checkerboard's phase (HEADINGS, _MARK_SHIFT).
            box[inside & checker[headings[:, k], y0:y1, x0:x1]] = colour[k] * _MARK_DARK
    if cfg.noise:
        frames += rng.normal(0.0, cfg.noise, size=frames.shape).astype(np.float32)
    np.clip(frames, 0.0, 1.0, out=frames)
    if cfg.dtype == "uint8":
        frames = np.round(frames * 255.0).astype(np.uint8)
    return clips.clip_example(frames, label, patch_size=patch,
                              change_threshold=cfg.change_threshold)


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




def procedural_sources(cfg) -> clips.ClipSources:
    """The train/eval `ClipSources` of `config.data.source='procedural'`."""
    return clips.ClipSources(
        train=ProceduralClips(cfg, "train", cfg.num_train),
        eval=ProceduralClips(cfg, "eval", cfg.num_eval),
        num_classes=num_classes(cfg.sprite_kind),
        class_names=class_names(cfg.sprite_kind),
        description=f"procedural {cfg.sprite_kind} clips (seed {cfg.seed})",
    )
