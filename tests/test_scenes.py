"""Procedural scenes (vlmjax.data.scenes): determinism, and captions / QA answers that agree with
the rendered pixels (colours counted, shapes and sizes measured), held-out colour-shape pairs,
distinct eval captions. numpy only, nothing downloaded."""

import dataclasses

import numpy as np
import pytest

from vlmjax.data import scenes

CFG = scenes.default_config()


def _colour_of(pixel) -> str:
    for name, rgb in scenes.PALETTE.items():
        if tuple(pixel) == rgb:
            return name
    raise AssertionError(f"pixel {tuple(pixel)} is neither a palette colour nor the background")


def _cell(image: np.ndarray, cell: int) -> np.ndarray:
    """Pixels whose centres lie in grid cell `cell` (row-major)."""
    size = image.shape[0]
    centre = (np.arange(size) + 0.5) / size
    row, col = divmod(cell, 3)
    rows = (centre >= row / 3) & (centre < (row + 1) / 3)
    cols = (centre >= col / 3) & (centre < (col + 1) / 3)
    return image[rows][:, cols]


def _classify(mask: np.ndarray) -> str:
    """Shape (of the default four) of one object's pixel mask, from its bounding box: the fill
    ratio (square 1, circle pi/4, cross ~0.57, triangle 1/2) and the top/bottom asymmetry."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = box.mean()
    h = box.shape[0]
    top, bottom = box[: h // 2].sum(), box[(h + 1) // 2:].sum()
    if fill > 0.9:
        return "square"
    if fill > 0.7:
        return "circle"
    return "triangle" if top < 0.6 * bottom else "cross"  # a cross is symmetric


def scene_from_pixels(image: np.ndarray, background) -> list[tuple[int, str, str, str]]:
    """(cell, colour, shape, size) of every occupied cell, measured on the image alone."""
    found = []
    cell_area = (image.shape[0] / 3) ** 2
    for cell in range(9):
        pixels = _cell(image, cell)
        fg = np.any(pixels != np.asarray(background, np.uint8), axis=-1)
        if not fg.any():
            continue
        colours = {_colour_of(p) for p in pixels[fg]}
        assert len(colours) == 1, f"cell {cell} holds several colours {colours}"
        # Large shapes cover >= 0.32 of a cell, small ones <= 0.152 (module constants).
        size = "large" if fg.sum() / cell_area > 0.22 else "small"
        found.append((cell, colours.pop(), _classify(fg), size))
    return found


def _scenes(n, split="train", seed=0):
    return [scenes.sample_scene(seed, i, split, CFG) for i in range(n)]


def test_scene_is_a_function_of_seed_split_and_index():
    a = scenes.sample_scene(0, 5, "train", CFG)
    assert a == scenes.sample_scene(0, 5, "train", CFG)
    assert a != scenes.sample_scene(0, 6, "train", CFG)
    assert a != scenes.sample_scene(0, 5, "eval", CFG)
    assert a != scenes.sample_scene(1, 5, "train", CFG)
    np.testing.assert_array_equal(scenes.render(a, 64), scenes.render(a, 64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.objects = ()  # type: ignore[misc]
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    assert scenes.caption(a, rng=rng()) == scenes.caption(a, rng=rng())


@pytest.mark.parametrize("split", ["train", "eval"])
def test_captions_and_answers_agree_with_the_pixels(split):
    seen_types = set()
    for scene in _scenes(120, split):
        image = scenes.render(scene, 96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        measured = scene_from_pixels(image, scene.background)
        described = [(o.cell, o.colour, o.shape, o.size) for o in scene.objects]
        assert measured == described
        for o in scene.objects:  # location words against the object's pixel centroid
            ys, xs = np.nonzero(np.all(image == scenes.PALETTE[o.colour], axis=-1))
            # Its own pixels: within 0.4 cell (12.8 px) of its centre; other objects are farther.
            own = (np.abs(ys + 0.5 - o.cy * 96) < 13.5) & (np.abs(xs + 0.5 - o.cx * 96) < 13.5)
            row, col = int(ys[own].mean() // 32), int(xs[own].mean() // 32)
            words = o.location.split()
            assert ("top" in words, "bottom" in words) == (row == 0, row == 2), o
            assert ("left" in words, "right" in words) == (col == 0, col == 2), o
            assert (o.location == "center") == (row == col == 1)
        # The caption and every answer follow from the pixels alone.
        rebuilt = scenes.Scene(
            objects=tuple(scenes.SceneObject(shape=s, colour=c, size=z, cell=k, cx=0.0, cy=0.0)
                          for k, c, s, z in measured),
            background=scene.background)
        assert scenes.caption(rebuilt) == scenes.caption(scene)
        qa = scenes.questions(scene)
        assert qa == scenes.questions(rebuilt)
        # A few answers checked directly against pixel counts.
        answers = {q.question: q.answer for q in qa}
        assert len(answers) == len(qa)  # no question twice
        assert answers["how many shapes are there?"] == scenes.NUMBERS[len(measured)]
        for colour in scenes.PALETTE:
            cells = sum(np.all(_cell(image, k) == scenes.PALETTE[colour], axis=-1).any()
                        for k in range(9))
            key = f"how many {colour} shapes are there?"
            assert answers.get(key, "zero") == scenes.NUMBERS[cells]
        for q in qa:
            seen_types.add(q.type)
            if q.type == "LOCATION":  # "where is the red circle?" -> that colour is in that cell
                colour = q.question.split()[3]
                cell = scenes.LOCATIONS.index(q.answer)
                assert np.all(_cell(image, cell) == scenes.PALETTE[colour], axis=-1).any()
            if q.type == "COLOR":  # only asked when the shape is unique
                shape = q.question.split()[-1].rstrip("?")
                assert sum(s == shape for _, _, s, _ in measured) == 1
    assert seen_types == set(scenes.QA_TYPES)


def test_captions_name_every_object_in_every_template():
    scene = next(s for s in _scenes(50) if len(s.objects) == 2)
    texts = {scenes.caption(scene, t) for t in range(len(scenes.CAPTION_TEMPLATES))}
    assert len(texts) == len(scenes.CAPTION_TEMPLATES)
    for text in texts:
        for o in scene.objects:
            assert f"{o.size} {o.colour} {o.shape}" in text
    a, b = scene.objects
    assert scenes.caption(scene) == f"{a.phrase()} and {b.phrase()}"
    assert scenes.caption(scene, 1).startswith("two shapes: ")
    orders = {scenes.caption(scene, 0, np.random.default_rng(i)) for i in range(20)}
    assert len(orders) == 2  # the rng shuffles the object order


def test_held_out_pairs_never_in_train_and_in_every_eval_scene():
    held = {tuple(p) for p in CFG.held_out}
    train_pairs = {(o.colour, o.shape) for s in _scenes(2000) for o in s.objects}
    assert not train_pairs & held
    assert {c for c, _ in train_pairs} == set(CFG.colours)
    assert {s for _, s in train_pairs} == set(CFG.shapes)
    counts = {len(s.objects) for s in _scenes(2000)}
    assert counts == set(range(CFG.min_objects, CFG.max_objects + 1))
    indices = scenes.eval_indices(CFG, 256)
    evals = [scenes.sample_scene(CFG.seed, i, "eval", CFG) for i in indices]
    assert all(any((o.colour, o.shape) in held for o in s.objects) for s in evals)
    captions = [scenes.caption(s) for s in evals]
    assert len(set(captions)) == 256 == len(indices) and indices == sorted(set(indices))
    assert indices[-1] > 255  # some raw scenes were skipped for a repeated caption


def test_render_scales_with_the_resolution():
    for scene in _scenes(30):
        small, large = scenes.render(scene, 48), scenes.render(scene, 144)
        assert small.shape == (48, 48, 3) and large.shape == (144, 144, 3)
        for o in scene.objects:
            rgb = scenes.PALETTE[o.colour]
            areas = [np.all(_cell(im, o.cell) == rgb, axis=-1).mean() for im in (small, large)]
            assert areas[0] > 0 and abs(areas[0] - areas[1]) < 0.25 * areas[1]
        # Downsampling the fine image by 3 (nearest, centre pixel) gives the coarse one nearly
        # everywhere: the same geometry, only sampled more finely.
        assert np.mean(np.all(large[1::3, 1::3] == small, axis=-1)) > 0.97


def test_config_errors_name_the_field():
    cfg = scenes.default_config()
    cfg.colours = ("red", "gren", "blue")
    with pytest.raises(ValueError, match=r"scenes.colours has 'gren'.*did you mean 'green'"):
        scenes.check_config(cfg)
    cfg = scenes.default_config()
    cfg.held_out = tuple(("red", s) for s in cfg.shapes)
    with pytest.raises(ValueError, match=r"leaves no training pair with \['red'\]"):
        scenes.check_config(cfg)
    cfg = scenes.default_config()
    cfg.max_objects = 10
    with pytest.raises(ValueError, match="max_objects=10"):
        scenes.check_config(cfg)
