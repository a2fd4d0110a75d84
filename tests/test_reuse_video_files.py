"""Token reuse on real-video sources (issue 19, item 3): the folder source computes change_energy
exactly as the procedural renderer does, and the reuse smoke experiment runs end to end on animated
GIFs made here (frozen backbone: a video_cls smoke run trained once for this module). CPU only."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from vlmjax.data import clips
from vlmjax.data import video

SIZE, PATCH = 32, 8  # configs/reuse.py:smoke (the backbone's input): a 4 x 4 patch grid


def _smoke_data(**overrides):
    """The data section of configs/reuse.py:smoke with `overrides`, unlocked."""
    c = video.default_config()
    c.update(load_config("reuse", "smoke").data.to_dict())
    c.update(overrides)
    return c


def _write_png_folder(folder, frames):
    os.makedirs(folder)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, f"frame_{t:03d}.png"))


# ---------------------------------------------------------------------------------------------
# 1. change_energy parity: a procedural clip stored as PNG frames reads back with the same maps.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder_dtype", ["uint8", "float32"])
def test_frame_folder_change_energy_equals_procedural(tmp_path, folder_dtype):
    base = _smoke_data(dtype="uint8", num_frames=6, num_train=4, num_eval=1)
    procedural = video.build_video_data(base)
    # Clip 0 of the smoke data: sprites moving over a static textured background, so some patches
    # change between frames and some do not (otherwise equal maps would prove little).
    ref = procedural.clip(0)
    assert ref["frames"].dtype == np.uint8 and ref["frames"].shape == (6, SIZE, SIZE, 3)
    assert (ref["change_energy"][1:] > 0).any() and (ref["change_energy"][1:] == 0).any()
    assert ref["changed_patches"][1:].any() and not ref["changed_patches"][1:].all()
    # A second clip, so the split directories hold one video each.
    _write_png_folder(tmp_path / "train" / "shape" / "v0", ref["frames"])
    _write_png_folder(tmp_path / "eval" / "shape" / "v0", procedural.clip(1)["frames"])

    for num_frames, indices in ((6, [0, 1, 2, 3, 4, 5]), (3, [1, 3, 5])):
        # T == F samples every frame in order ((2i + 1) T // 2F = i); 3 of 6 frames are the segment
        # centres 1, 3, 5.
        np.testing.assert_array_equal(clips.sample_frame_indices(6, num_frames), indices)
        cfg = _smoke_data(source="folder", path=str(tmp_path), num_frames=num_frames, dtype=folder_dtype)
        ex = video.build_video_data(cfg).clip(0)
        frames = ref["frames"][indices]
        # PNG is lossless and the frames are already image_size: resize_crop returns them untouched.
        if folder_dtype == "uint8":
            np.testing.assert_array_equal(ex["frames"], frames)
        else:
            np.testing.assert_array_equal(ex["frames"], frames.astype(np.float32) * np.float32(1 / 255))
        # Exact, not to a tolerance: both sources end in clips.clip_example on the same values. The
        # renderer's uint8 frames go through change_energy's astype(float32) * (1/255); the folder's
        # float32 frames were made by finish_clip with that same float32 product, and its uint8 frames
        # are the renderer's bytes, so the per-patch means are bit-identical. (A tolerance would hide
        # a diverging path: scaling by / 255 instead of * (1/255) changes 35 of the 96 energies in
        # the last bits.)
        if num_frames == 6:
            np.testing.assert_array_equal(ex["change_energy"], ref["change_energy"])
            np.testing.assert_array_equal(ex["changed_patches"], ref["changed_patches"])
        else:  # Sampled frames: the map of the frames the clip holds (what the model sees).
            want = clips.change_energy(frames, PATCH)
            np.testing.assert_array_equal(ex["change_energy"], want)
            np.testing.assert_array_equal(ex["changed_patches"][1:], want[1:] > cfg.change_threshold)
            assert ex["changed_patches"][0].all()
        assert ex["change_energy"].dtype == np.float32 and ex["change_energy"].shape == (num_frames, 16)


# ---------------------------------------------------------------------------------------------
# 2. The reuse smoke experiment on animated GIFs.
# ---------------------------------------------------------------------------------------------

GIF_FRAMES = 6
# Flat colours: each frame has < 256 of them, so GIF's palette stores them exactly.
STRIPES = ((200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60))
SHAPE_ROWS = (2, 8)  # the shape stays in pixel rows 2..7: patch row 0 only


def _gif_frames(kind: int, seed: int) -> np.ndarray:
    """uint8 [T, 32, 32, 3]: static vertical stripes; a 6 x 6 shape (class `kind`: 0 square, 1
    cross) slides right 4 px per frame along the top patch row; patch rows 1-3 never change."""
    rng = np.random.default_rng(seed)
    background = np.zeros((SIZE, SIZE, 3), np.uint8)
    order = rng.permutation(len(STRIPES))
    for i in range(SIZE // 8):
        background[:, 8 * i:8 * i + 8] = STRIPES[order[i]]
    yy, xx = np.mgrid[:6, :6]
    mask = np.ones((6, 6), bool) if kind == 0 else (abs(yy - 2.5) < 1.5) | (abs(xx - 2.5) < 1.5)
    x0 = int(rng.integers(0, 3))
    frames = np.repeat(background[None], GIF_FRAMES, axis=0)
    for t in range(GIF_FRAMES):
        x = x0 + 4 * t
        frames[t, SHAPE_ROWS[0]:SHAPE_ROWS[1], x:x + 6][mask] = (250, 250, 250)
    return frames


def _write_gif(path, frames):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    with Image.open(path) as im:  # Pillow merges identical consecutive frames: none here
        assert im.n_frames == len(frames)


@pytest.fixture(scope="module")
def gif_root(tmp_path_factory):
    """root/{train,eval}/{square,cross}/*.gif: 2 classes x 3 videos (2 train, 1 eval each)."""
    root = tmp_path_factory.mktemp("gifs")
    written = {}
    for kind, name in enumerate(("square", "cross")):
        for i in range(3):
            split = "train" if i < 2 else "eval"
            path = str(root / split / name / f"clip_{i}.gif")
            written[path] = _gif_frames(kind, seed=10 * kind + i)
            _write_gif(path, written[path])
    return str(root), written


@pytest.fixture(scope="module")
def backbone_workdir(tmp_path_factory):
    """A trained video_cls backbone for init_from: the 'backbone' stage of configs/reuse.py:smoke (what
    test_reuse_train.py's smoke_run trains first), run alone for 2 steps."""
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top
    workdir = tmp_path_factory.mktemp("reuse_backbone")
    stage = load_config("reuse", "smoke", **{"stages.backbone.total_steps": 2}).stages.backbone
    assert runner.run(stage, str(workdir))["finished"]
    return str(workdir)


def test_gif_change_energy_zero_where_the_shape_never_went(gif_root):
    root, written = gif_root
    cfg = _smoke_data(source="folder", path=root, dtype="uint8")
    data = video.build_video_data(cfg)
    indices = clips.sample_frame_indices(GIF_FRAMES, cfg.num_frames)  # 3 of 6: [1, 3, 5]
    for split, source in (("train", data.train_clips), ("eval", data.eval_clips)):
        for i, (path, _) in enumerate(source.videos):
            ex = data.clip(i, split)
            np.testing.assert_array_equal(ex["frames"], written[path][indices])  # GIF kept the pixels
            energy = ex["change_energy"].reshape(cfg.num_frames, SIZE // PATCH, SIZE // PATCH)
            assert (energy[1:, 1:] == 0).all()  # patch rows 1-3: the static background
            assert not ex["changed_patches"].reshape(energy.shape)[1:, 1:].any()
            # In patch row 0, positive exactly where the shape covered or uncovered pixels.
            moved = (written[path][indices[1:]] != written[path][indices[:-1]]).any(-1)[:, :PATCH]
            moved = moved.reshape(cfg.num_frames - 1, PATCH, SIZE // PATCH, PATCH).any((1, 3))
            assert moved.any() and not moved.all()
            np.testing.assert_array_equal(energy[1:, 0] > 0, moved)
            np.testing.assert_array_equal(ex["change_energy"], clips.change_energy(ex["frames"], PATCH))


def test_reuse_smoke_on_gifs(gif_root, backbone_workdir, tmp_path):
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top
    root, _ = gif_root
    config = load_config("reuse", "smoke", init_from=backbone_workdir, total_steps=2, **{
        # 4 training / 2 evaluation clips, fewer than the smoke probe's 8 / 4: it reads what there is.
        "data.source": "folder", "data.path": root})
    summary = runner.run(config, str(tmp_path / "w"))
    assert summary["finished"] and summary["step"] == 2
    assert not os.path.exists(tmp_path / "w" / "backbone")  # init_from: no backbone stage
    end = summary["eval_end"]
    for key in ("reuse_rate", "reuse_rate_executed", "compute_reuse_rate"):
        assert key in end and np.isfinite(end[key]) and 0.0 <= end[key] <= 1.0, (key, end.get(key))
    # execution='packed' (the default) restores exactly the tokens the decisions reuse.
    assert abs(end["reuse_rate_executed"] - end["reuse_rate"]) <= 1e-6
    layers = [k.split("/")[1] for k in end if k.startswith("reuse/")]
    assert layers and all(abs(end[f"reuse_executed/{l}"] - end[f"reuse/{l}"]) <= 1e-6 for l in layers)
    assert end["clips"] == 2 and np.isfinite(end["pooled_cos"])
    assert set(summary["probe"]) >= {"acc_original", "acc_reuse", "clip_cos"}
