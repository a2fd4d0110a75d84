"""Procedural video clips (vlmjax.data.video): determinism, exact change maps, frame grouping,
per-process sharding and iterator checkpoints. CPU only, nothing downloaded."""

import hashlib

import numpy as np
import pytest

from conftest import assert_iterator_resumes
from vlmjax.data import procedural_video
from vlmjax.data import video


def make_config(**overrides):
    c = video.default_config()
    c.num_train = 32
    c.num_eval = 10
    c.prefetch_batches = 0
    for k, v in overrides.items():
        c[k] = v
    return c


def _hash(frames: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frames).tobytes()).hexdigest()


def _patch_energy_loop(frames: np.ndarray, p: int) -> np.ndarray:
    """Direct per-patch mean |frame_t - frame_{t-1}|, one patch at a time."""
    x = frames.astype(np.float64) / (255.0 if frames.dtype == np.uint8 else 1.0)
    f, h, w, _ = x.shape
    out = np.ones((f, (h // p) * (w // p)))
    for t in range(1, f):
        n = 0
        for i in range(h // p):
            for j in range(w // p):
                block = slice(i * p, (i + 1) * p), slice(j * p, (j + 1) * p)
                out[t, n] = np.abs(x[t][block] - x[t - 1][block]).mean()
                n += 1
    return out


# ---------------------------------------------------------------------------------------------
# Clips.
# ---------------------------------------------------------------------------------------------


def test_clip_is_a_function_of_seed_split_and_index():
    cfg = make_config()
    a, b = video.render_clip(cfg, 7), video.render_clip(cfg, 7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert _hash(video.render_clip(cfg, 8)["frames"]) != _hash(a["frames"])
    assert _hash(video.render_clip(cfg, 7, "eval")["frames"]) != _hash(a["frames"])
    assert _hash(video.render_clip(make_config(seed=1), 7)["frames"]) != _hash(a["frames"])


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_shapes_and_dtypes(dtype):
    data = video.build_video_data(make_config(dtype=dtype, image_size=96, num_frames=6))
    ex = data.clip(0)
    assert data.num_patches == 36 and data.num_classes == 4
    assert ex["frames"].shape == (6, 96, 96, 3) and ex["frames"].dtype == np.dtype(dtype)
    assert ex["changed_patches"].shape == (6, 36) and ex["changed_patches"].dtype == bool
    assert ex["change_energy"].shape == (6, 36) and ex["change_energy"].dtype == np.float32
    assert ex["ref_mask"].shape == (6, 6) and ex["ref_mask"].dtype == bool
    assert ex["ref_type"].shape == (6, 3) and ex["process_order"].shape == (6,)
    assert ex["label"].dtype == np.int32 and 0 <= ex["label"] < 4
    if dtype == "float32":
        assert 0.0 <= ex["frames"].min() and ex["frames"].max() <= 1.0


@pytest.mark.parametrize("overrides", [
    {}, {"dtype": "uint8"}, {"background": "pan"},
    {"noise": 0.02, "change_threshold": 0.03, "patch_size": 8}])
def test_change_maps_match_direct_recomputation(overrides):
    cfg = make_config(**overrides)
    ex = video.render_clip(cfg, 3)
    energy = _patch_energy_loop(ex["frames"], cfg.patch_size)
    np.testing.assert_allclose(ex["change_energy"], energy, rtol=1e-5, atol=1e-6)
    expected = energy > cfg.change_threshold
    expected[0] = True
    np.testing.assert_array_equal(ex["changed_patches"], expected)


def test_still_sprites_on_static_background_change_nothing():
    cfg = make_config(sprite_speed=0.0, background="static")
    for index in range(4):
        ex = video.render_clip(cfg, index)
        assert ex["changed_patches"][0].all()
        assert not ex["changed_patches"][1:].any()
        assert (ex["change_energy"][1:] == 0).all()


def test_moving_sprites_change_some_patches_and_leave_most():
    cfg = make_config(image_size=224, num_frames=4)
    for index in range(3):
        changed = video.render_clip(cfg, index)["changed_patches"][1:]
        assert changed.any(axis=1).all()  # every frame has a changed patch
        assert changed.mean() < 0.5  # most patches are reusable
    # A panning background changes (almost) everything.
    pan = video.render_clip(make_config(image_size=224, num_frames=4, background="pan"), 0)
    assert pan["changed_patches"][1:].mean() > 0.8


def test_heading_marks_the_mover_steps_where_its_mark_points():
    """data.heading_marks + turn: every sprite steps along one of four headings; the mover (sprite 0)
    draws a new one with probability `turn` per frame; a step that would leave the box is reversed
    first, so the heading shown at frame t is the step t -> t+1. Rendering adds the checkerboard
    marks inside the sprites only: outside them the frames equal the unmarked ones."""
    rng = np.random.default_rng(0)
    low, high = np.full((3, 1), 5.0), np.full((3, 1), 43.0)
    start = np.array([[6.0, 24.0], [20.0, 20.0], [30.0, 30.0]])
    speed, heading0 = np.array([3.0, 0.0, 2.0]), np.array([2, 1, 0])  # the mover heads into the wall
    centres, headings = procedural_video._turning(start, heading0, speed, 1.0, 40, low, high, rng)
    assert centres.shape == (40, 3, 2) and headings.shape == (40, 3)
    steps = procedural_video._HEADING_STEP[headings[:-1]] * speed[:, None]
    np.testing.assert_allclose(centres[1:] - centres[:-1], steps, atol=1e-9)
    assert headings[0, 0] != 2 or centres[1, 0, 0] > 6.0  # never steps out of the box
    assert ((centres >= 5.0) & (centres <= 43.0)).all()
    assert len(set(headings[:, 0].tolist())) == 4  # the mover turns
    assert (headings[:, 1] == 1).all()  # a standing sprite keeps its heading
    assert set(headings[:, 2].tolist()) == {0, 2}  # a straight one only reverses at the walls
    still, _ = procedural_video._turning(start, heading0, speed, 0.0, 40, low, high, rng)
    assert (np.diff(still[:, 0, 1]) == 0).all()  # turn=0: the mover keeps its axis
    # distractor_turn: the standing sprite's mark changes too, and it still stands.
    flick, flick_headings = procedural_video._turning(start, heading0, speed, 1.0, 40, low, high, rng, 1.0)
    assert len(set(flick_headings[:, 1].tolist())) == 4
    np.testing.assert_allclose(flick[:, 1], np.broadcast_to(start[1], (40, 2)))

    base = dict(image_size=48, patch_size=8, num_sprites=4, sprite_scale=0.4, distractor_scale=2.5,
                distractor_speed=0.0, sprite_speed=0.05, num_frames=6)
    plain = video.render_clip(make_config(**base), 3)["frames"]
    marked = video.render_clip(make_config(**base, heading_marks=True, turn=1.0), 3)
    frames = marked["frames"]
    assert marked["changed_patches"][1:].any(-1).all() and marked["changed_patches"][1:].mean() < 0.3
    # Standing sprites: the same pixels as unmarked, except the dark squares of their marks.
    base["sprite_speed"] = 0.0
    stand = video.render_clip(make_config(**base), 3)["frames"]
    stand_marked = video.render_clip(make_config(**base, heading_marks=True), 3)["frames"]
    differ = np.any(stand_marked != stand, -1)
    assert 0 < differ.mean() < 0.1
    np.testing.assert_allclose(stand_marked[differ].reshape(-1, 3) / procedural_video._MARK_DARK,
                               stand[differ].reshape(-1, 3), atol=2e-6)
    assert plain.shape == frames.shape
    with pytest.raises(ValueError, match="turn"):
        video.build_video_data(make_config(turn=2.0))
    with pytest.raises(ValueError, match="distractor_turn"):
        video.build_video_data(make_config(distractor_turn=-0.5))


def test_labels_cover_all_shapes():
    cfg = make_config()
    labels = {int(video.render_clip(cfg, i)["label"]) for i in range(40)}
    assert labels == set(range(len(video.SHAPE_NAMES)))


def test_digit_sprites_label_is_the_main_digit(monkeypatch):
    # scikit-learn may be absent: stand in for load_digits with distinct 8x8 patterns.
    rng = np.random.default_rng(0)
    images = (rng.uniform(size=(20, 8, 8)) > 0.4).astype(np.float32)
    targets = np.arange(20, dtype=np.int32) % 10
    monkeypatch.setattr(procedural_video, "_load_digits", lambda: (images, targets))
    data = video.build_video_data(make_config(sprite_kind="digits"))
    assert data.num_classes == 10
    labels = [int(data.clip(i)["label"]) for i in range(30)]
    assert set(labels) <= set(range(10)) and len(set(labels)) > 3


# ---------------------------------------------------------------------------------------------
# Frame grouping.
# ---------------------------------------------------------------------------------------------


def _roles(grouping):
    return "".join(video.REF_TYPES[i] for i in grouping["ref_type"].argmax(-1))


def _refs(grouping, t):
    return list(np.flatnonzero(grouping["ref_mask"][t]))


def test_spec_orders_give_codec_like_references():
    # Spec train order [0, 4, 2, 1, 3]: 0 is I, 4 is P on 0, 2 is B on (0, 4), 1 is B on (0, 2)
    # and 3 is B on (2, 4).
    g = video.frame_grouping(5, (0, 4, 2, 1, 3))
    assert list(g["process_order"]) == [0, 4, 2, 1, 3]
    assert _roles(g) == "IBBBP"
    assert [_refs(g, t) for t in range(5)] == [[], [0, 2], [0, 4], [2, 4], [0]]
    # Spec test order [3, 1, 0, 2]: 3 is I, 1 is P on 3, 0 is P on 1, 2 is B on (1, 3).
    g = video.frame_grouping(4, (3, 1, 0, 2))
    assert _roles(g) == "PPBI"
    assert [_refs(g, t) for t in range(4)] == [[1], [3], [1, 3], []]
    # Groups chain: the second group's first processed frame references the first group.
    g = video.frame_grouping(8, (3, 1, 0, 2))
    assert list(g["process_order"]) == [3, 1, 0, 2, 7, 5, 4, 6]
    assert _refs(g, 7) == [3] and _refs(g, 5) == [3, 7]
    # (0,) is previous-frame reuse.
    g = video.frame_grouping(5, (0,))
    assert _roles(g) == "IPPPP" and [_refs(g, t) for t in range(1, 5)] == [[0], [1], [2], [3]]
    # A shorter last group keeps the relative order of its frames.
    g = video.frame_grouping(8, (0, 4, 2, 1, 3))
    assert list(g["process_order"]) == [0, 4, 2, 1, 3, 5, 7, 6]


@pytest.mark.parametrize("order", [(0, 4, 2, 1, 3), (3, 1, 0, 2), (0,), (1, 0)])
@pytest.mark.parametrize("mode", video.REF_MODES)
@pytest.mark.parametrize("refresh", [0, 4, 8])
def test_ref_mask_never_self_later_or_across_chains(order, mode, refresh):
    if refresh % len(order):
        with pytest.raises(ValueError, match="refresh_interval"):
            video.frame_grouping(8, order, ref_mode=mode, refresh_interval=refresh)
        return
    g = video.frame_grouping(8, order, ref_mode=mode, refresh_interval=refresh)
    o, mask = g["process_order"], g["ref_mask"]
    assert sorted(o) == list(range(8))
    assert not mask.diagonal().any()
    # In processing order the mask is strictly lower triangular: only earlier-processed frames.
    assert not np.triu(mask[o][:, o]).any()
    chain = np.arange(8) // refresh if refresh else np.zeros(8, int)
    assert not (mask & (chain[:, None] != chain[None, :])).any()
    roles = _roles(g)
    for t in range(8):
        refs = _refs(g, t)
        assert roles[t] == ("I" if not refs else "B" if min(refs) < t < max(refs) else "P")
        if mode == "nearest":
            assert len(refs) <= 2
        if mode == "anchor":
            assert len(refs) <= 1
    # Exactly one I frame per chain: its first processed frame.
    assert roles.count("I") == len(set(chain))


def test_bad_orders_and_configs_fail_naming_the_field():
    with pytest.raises(ValueError, match="train_ref_order"):
        video.build_video_data(make_config(train_ref_order=(0, 2)))
    with pytest.raises(ValueError, match="image_size"):
        video.build_video_data(make_config(image_size=70))
    with pytest.raises(ValueError, match="background"):
        video.build_video_data(make_config(background="zoom"))
    with pytest.raises(ValueError, match="refresh_interval"):
        video.build_video_data(make_config(refresh_interval=4))  # train groups are 5 frames
    try:
        import sklearn  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        with pytest.raises(ValueError, match="scikit-learn"):
            video.build_video_data(make_config(sprite_kind="digits"))


# ---------------------------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------------------------


def test_batches_per_process_disjoint_and_covering_an_epoch():
    data = video.build_video_data(make_config(num_train=16))
    all_clips = {_hash(data.clip(i)["frames"]) for i in range(16)}
    seen = []
    for p in range(2):
        it = iter(data.train_dataset(global_batch_size=4, seed=0, process_index=p,
                                     process_count=2))
        clips = []
        for _ in range(4):  # 4 steps x 4 global clips = one epoch
            batch = next(it)
            assert batch["frames"].shape == (2, 8, 64, 64, 3)
            assert batch["ref_mask"].shape == (2, 8, 8) and batch["label"].shape == (2,)
            np.testing.assert_array_equal(batch["ref_mask"][0], data.train_grouping["ref_mask"])
            clips += [_hash(f) for f in batch["frames"]]
        seen.append(set(clips))
        assert len(clips) == len(set(clips)) == 8
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_clips


def test_iterator_checkpoint_round_trip_through_orbax(tmp_path):
    data = video.build_video_data(make_config(num_train=8, prefetch_batches=2))
    ds = data.train_dataset(global_batch_size=2, seed=3, process_index=0, process_count=1)
    assert_iterator_resumes(ds, 5, tmp_path / "ckpt")  # one epoch is 4 steps: the checkpoint lies in the second epoch


def test_eval_batches_deterministic_padded_and_equal_across_processes():
    data = video.build_video_data(make_config(num_eval=10))
    per_process = [data.eval_batches(global_batch_size=4, process_index=p, process_count=2)
                   for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == 3
    masks = np.concatenate([np.concatenate([b[p]["mask"] for p in range(2)])
                            for b in zip(*per_process)])
    np.testing.assert_array_equal(masks, [1] * 10 + [0] * 2)
    first = per_process[0][0]
    np.testing.assert_array_equal(first["frames"][1], data.clip(1, "eval")["frames"])
    np.testing.assert_array_equal(first["ref_mask"][0], data.eval_grouping["ref_mask"])
    again = data.eval_batches(global_batch_size=4, process_index=0, process_count=2,
                              max_batches=1)
    assert len(again) == 1
    for key in first:
        np.testing.assert_array_equal(first[key], again[0][key])
