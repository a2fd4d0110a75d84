"""Real-video sources of vlmjax.data.video: a folder of videos (frame folders, GIF, mp4) and a
prepared TFDS dataset. Same example format as the procedural clips; change maps from the decoded
frames; deterministic, sharded and checkpointable pipelines. CPU only, data made in tmp_path."""

import hashlib
import os
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import assert_iterator_resumes
from vlmjax.data import video
from vlmjax.data import video_files

SIZE, PATCH = 16, 8  # N = 4 patches: (0, 0) top-left, (0, 1), (1, 0), (1, 1)
CLASSES = ("alpha", "beta", "gamma")


def make_config(**overrides):
    c = video.default_config()
    c.image_size, c.patch_size = SIZE, PATCH
    c.num_frames = 6
    c.prefetch_batches = 0
    for k, v in overrides.items():
        c[k] = v
    return c


def _hash(frames: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(frames).tobytes()).hexdigest()


def _clip_frames(seed: int, num_frames: int, size=(SIZE, SIZE)) -> np.ndarray:
    """uint8 [T, H, W, 3]: a random still background; frame t writes t into the top-left corner,
    so consecutive frames differ in patch 0 only (and by the value t, which also checks order)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    frames = np.repeat(base[None], num_frames, axis=0)
    frames[:, :4, :4] = (np.arange(num_frames, dtype=np.uint8) * 10 + 5)[:, None, None, None]
    return frames


def _write_frame_folder(folder, frames):
    os.makedirs(folder)
    for t, frame in enumerate(frames):  # frame_2.png sorts before frame_10.png (natural order)
        Image.fromarray(frame).save(os.path.join(folder, f"frame_{t}.png"))


def _write_class_tree(root, videos_per_class, num_frames=6, seed=0):
    """root/<class>/v<i>/ frame folders; returns {path: frames}."""
    written = {}
    for c, name in enumerate(CLASSES):
        for i in range(videos_per_class):
            frames = _clip_frames(seed + 100 * c + i, num_frames)
            path = os.path.join(root, name, f"v{i}")
            _write_frame_folder(path, frames)
            written[path] = frames
    return written


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("videos"))
    return root, _write_class_tree(root, videos_per_class=5)


@pytest.fixture(scope="module")
def split_tree(tmp_path_factory):
    """root/train/<class>/v0..v1 (6 clips) and root/eval/<class>/v0 (3 clips)."""
    root = str(tmp_path_factory.mktemp("split_videos"))
    train = _write_class_tree(os.path.join(root, "train"), videos_per_class=2, seed=0)
    evals = _write_class_tree(os.path.join(root, "eval"), videos_per_class=1, seed=50)
    return root, train, evals


# ---------------------------------------------------------------------------------------------
# Folder source.
# ---------------------------------------------------------------------------------------------


def test_defaults_keep_procedural_source():
    c = video.default_config()
    assert c.source == "procedural"
    data = video.build_video_data(make_config(num_train=4, num_eval=2))
    np.testing.assert_array_equal(data.clip(1)["frames"],
                                  video.render_clip(data.config, 1)["frames"])
    assert data.class_names == video.SHAPE_NAMES and len(data.train_clips) == 4


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_folder_clips_shapes_labels_and_exact_frames(class_tree, dtype):
    root, written = class_tree
    data = video.build_video_data(make_config(source="folder", path=root, dtype=dtype))
    assert data.class_names == CLASSES and data.num_classes == 3 and data.num_patches == 4
    assert len(data.train_clips) + len(data.eval_clips) == len(written)
    for split, clips in (("train", data.train_clips), ("eval", data.eval_clips)):
        for i, (path, label) in enumerate(clips.videos):
            ex = data.clip(i, split)
            assert int(ex["label"]) == label == CLASSES.index(os.path.basename(os.path.dirname(path)))
            assert ex["frames"].shape == (6, SIZE, SIZE, 3) and ex["frames"].dtype == np.dtype(dtype)
            assert ex["changed_patches"].shape == (6, 4) and ex["changed_patches"].dtype == bool
            assert ex["change_energy"].shape == (6, 4) and ex["change_energy"].dtype == np.float32
            assert ex["label"].dtype == np.int32 and ex["mask"] == 1.0
            assert ex["ref_mask"].shape == (6, 6) and ex["process_order"].shape == (6,)
            # PNG is lossless and the frames are already SIZE x SIZE: exact pixels, in order.
            scale = 1.0 if dtype == "uint8" else 1.0 / 255.0
            np.testing.assert_allclose(ex["frames"], written[path] * scale, rtol=1e-6)


def test_change_energy_is_zero_for_still_frames_and_positive_where_pixels_changed(tmp_path):
    frames = _clip_frames(7, 6)
    frames[3] = frames[2]  # frame 3 repeats frame 2: no change anywhere
    _write_frame_folder(tmp_path / "train" / "a" / "v", frames)
    _write_frame_folder(tmp_path / "eval" / "a" / "v", frames)
    data = video.build_video_data(make_config(source="folder", path=str(tmp_path)))
    ex = data.clip(0)
    energy = ex["change_energy"]
    np.testing.assert_array_equal(energy, video.change_energy(ex["frames"], PATCH))
    assert (energy[0] == 1).all() and ex["changed_patches"][0].all()
    assert (energy[3] == 0).all() and not ex["changed_patches"][3].any()
    for t in (1, 2, 4, 5):  # only the top-left patch changed
        assert energy[t, 0] > 0 and (energy[t, 1:] == 0).all()
        np.testing.assert_array_equal(ex["changed_patches"][t], [True, False, False, False])


def test_short_clips_repeat_their_last_frame(tmp_path):
    frames = _clip_frames(3, 3)
    for split in ("train", "eval"):
        _write_frame_folder(tmp_path / split / "a" / "v", frames)
    data = video.build_video_data(make_config(source="folder", path=str(tmp_path), num_frames=8,
                                              dtype="uint8"))
    ex = data.clip(0)
    np.testing.assert_array_equal(ex["frames"][:3], frames)
    np.testing.assert_array_equal(ex["frames"][3:], np.repeat(frames[2:], 5, axis=0))
    assert (ex["change_energy"][3:] == 0).all() and not ex["changed_patches"][3:].any()


def test_frame_sampling():
    assert list(video_files.sample_frame_indices(12, 4)) == [1, 4, 7, 10]  # segment centres
    assert list(video_files.sample_frame_indices(4, 4)) == [0, 1, 2, 3]
    assert list(video_files.sample_frame_indices(3, 5)) == [0, 1, 2, 2, 2]
    assert list(video_files.sample_frame_indices(20, 3, stride=2)) == [7, 9, 11]  # centred
    assert list(video_files.sample_frame_indices(4, 3, stride=2)) == [0, 2, 3]


def test_resize_and_centre_crop_of_large_non_square_frames(tmp_path):
    # 48 x 96 frames: the centre 48 x 48 square (columns 24..71) is resized to 16 x 16. Only
    # columns 16..79 are white (the antialiasing filter reads 3 pixels past the square), so
    # any black in the output means a wrong crop.
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[:, 16:80] = 255
    for split in ("train", "eval"):
        _write_frame_folder(tmp_path / split / "a" / "v", [frame] * 2)
    ex = video.build_video_data(make_config(source="folder", path=str(tmp_path),
                                            dtype="uint8")).clip(0)
    assert ex["frames"].shape == (6, SIZE, SIZE, 3)
    assert (ex["frames"] == 255).all()


def test_animated_gif(tmp_path):
    # Flat colours survive GIF's 256-colour palette exactly.
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    frames = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    frames[:] = (40, 40, 40)
    for t, colour in enumerate(colours):
        frames[t, :PATCH, :PATCH] = colour  # only patch 0 changes
    images = [Image.fromarray(f) for f in frames]
    for split in ("train", "eval"):
        os.makedirs(tmp_path / split / "b")
        images[0].save(tmp_path / split / "b" / "clip.gif", save_all=True,
                       append_images=images[1:], duration=40, loop=0)
    data = video.build_video_data(make_config(source="folder", path=str(tmp_path),
                                              num_frames=4, dtype="uint8"))
    ex = data.clip(0)
    np.testing.assert_array_equal(ex["frames"], frames)
    assert (ex["change_energy"][1:, 0] > 0).all() and (ex["change_energy"][1:, 1:] == 0).all()
    assert data.class_names == ("b",) and int(ex["label"]) == 0


def test_hash_split_is_deterministic_disjoint_and_stable(class_tree, tmp_path):
    root, written = class_tree
    a = video.build_video_data(make_config(source="folder", path=root))
    b = video.build_video_data(make_config(source="folder", path=root))
    assert a.train_clips.videos == b.train_clips.videos and a.eval_clips.videos == b.eval_clips.videos
    train = {p for p, _ in a.train_clips.videos}
    evals = {p for p, _ in a.eval_clips.videos}
    assert train and evals and not train & evals and train | evals == set(written)
    for i in range(len(a.train_clips)):
        for key, value in a.clip(i).items():
            np.testing.assert_array_equal(value, b.clip(i)[key])
    # The split of a video depends on its own name only: adding videos moves no other video.
    bigger = tmp_path / "bigger"
    _write_class_tree(str(bigger), videos_per_class=8)
    big = video.build_video_data(make_config(source="folder", path=str(bigger)))
    big_eval = {os.path.relpath(p, bigger) for p, _ in big.eval_clips.videos}
    small_eval = {os.path.relpath(p, root) for p in evals}
    assert small_eval <= big_eval


def test_split_directories(split_tree):
    root, train, evals = split_tree
    data = video.build_video_data(make_config(source="folder", path=root))
    assert {p for p, _ in data.train_clips.videos} == set(train)
    assert {p for p, _ in data.eval_clips.videos} == set(evals)
    assert "'train' / 'eval'" in data.description
    # An explicit eval_split must exist.
    with pytest.raises(ValueError, match="eval_split"):
        video.build_video_data(make_config(source="folder", path=root, eval_split="test"))


def test_per_process_shards_are_disjoint_and_cover_an_epoch(split_tree):
    root, train, _ = split_tree
    data = video.build_video_data(make_config(source="folder", path=root, dtype="uint8"))
    all_clips = {_hash(f) for f in train.values()}
    assert len(data.train_clips) == 6
    seen = []
    for p in range(2):
        it = iter(data.train_dataset(global_batch_size=2, seed=0, process_index=p,
                                     process_count=2))
        clips = []
        for _ in range(3):  # 3 steps x 2 global clips = one epoch
            batch = next(it)
            assert batch["frames"].shape == (1, 6, SIZE, SIZE, 3)
            assert batch["label"].shape == (1,) and batch["change_energy"].shape == (1, 6, 4)
            clips += [_hash(f) for f in batch["frames"]]
        seen.append(set(clips))
        assert len(clips) == len(set(clips)) == 3
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == all_clips


def test_iterator_checkpoint_resume_gives_the_same_batches(split_tree, tmp_path):
    root, _, _ = split_tree
    data = video.build_video_data(make_config(source="folder", path=root, prefetch_batches=2))
    ds = data.train_dataset(global_batch_size=2, seed=3, process_index=0, process_count=1)
    assert_iterator_resumes(ds, 4, tmp_path / "ckpt")  # one epoch is 3 steps: the checkpoint lies in the second epoch


def test_eval_batches_padded_and_equal_across_processes(split_tree):
    root, _, _ = split_tree
    data = video.build_video_data(make_config(source="folder", path=root))
    per_process = [data.eval_batches(global_batch_size=2, process_index=p, process_count=2)
                   for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == 2  # 3 clips -> 2 batches of 2
    masks = np.concatenate([np.concatenate([b[p]["mask"] for p in range(2)])
                            for b in zip(*per_process)])
    np.testing.assert_array_equal(masks, [1, 1, 1, 0])
    np.testing.assert_array_equal(per_process[1][0]["frames"][0], data.clip(1, "eval")["frames"])
    np.testing.assert_array_equal(per_process[0][0]["ref_mask"][0], data.eval_grouping["ref_mask"])


def test_folder_errors_say_what_to_change(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="did you mean 'folder'"):
        video.build_video_data(make_config(source="folders"))
    with pytest.raises(ValueError, match="needs config.data.path"):
        video.build_video_data(make_config(source="folder"))
    with pytest.raises(ValueError, match="is not a directory"):
        video.build_video_data(make_config(source="folder", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no class sub-directories"):
        video.build_video_data(make_config(source="folder", path=str(tmp_path)))
    # Frames directly in the class directory: each video needs its own folder.
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    os.makedirs(tmp_path / "cls")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "cls" / "f0.png")
    with pytest.raises(ValueError, match="own sub-directory"):
        video.build_video_data(make_config(source="folder", path=str(tmp_path)))
    # A single video cannot be hash-split into two non-empty splits.
    os.makedirs(tmp_path / "cls" / "v0")
    with pytest.raises(ValueError, match="left the .* split empty"):
        video.build_video_data(make_config(source="folder", path=str(tmp_path)))
    # A train/ directory without an evaluation directory.
    os.makedirs(tmp_path / "split" / "train" / "cls" / "v0")
    with pytest.raises(ValueError, match="no evaluation split directory"):
        video.build_video_data(make_config(source="folder", path=str(tmp_path / "split")))
    # An empty frame folder fails when read, naming the file.
    os.makedirs(tmp_path / "split" / "eval" / "cls" / "v0")
    data = video.build_video_data(make_config(source="folder", path=str(tmp_path / "split")))
    with pytest.raises(ValueError, match="cannot decode video .*v0.*holds no images"):
        data.clip(0)
    with pytest.raises(ValueError, match="global batch size"):
        data.train_dataset(global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="eval_fraction=2.0"):
        video.build_video_data(make_config(source="folder", path=str(tmp_path / "split"),
                                           eval_fraction=2.0))
    # Video files without PyAV: a clear install hint, at build time.
    os.makedirs(tmp_path / "mp4" / "train" / "cls")
    os.makedirs(tmp_path / "mp4" / "eval" / "cls")
    (tmp_path / "mp4" / "train" / "cls" / "v.mp4").write_bytes(b"")
    (tmp_path / "mp4" / "eval" / "cls" / "v.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(ImportError, match="pip install av"):
        video.build_video_data(make_config(source="folder", path=str(tmp_path / "mp4")))


def test_num_classes_override(split_tree):
    root, _, _ = split_tree
    assert video.build_video_data(make_config(source="folder", path=root,
                                              num_classes=10)).num_classes == 10
    with pytest.raises(ValueError, match="num_classes=2 is smaller"):
        video.build_video_data(make_config(source="folder", path=root, num_classes=2))


def test_mp4_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    for split in ("train", "eval"):
        for name, moving in (("still", False), ("moving", True)):
            os.makedirs(tmp_path / split / name)
            with av.open(str(tmp_path / split / name / "clip.mp4"), "w") as out:
                stream = out.add_stream("mpeg4", rate=10)
                stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
                for t in range(12):
                    frame = np.full((48, 64, 3), 100, np.uint8)
                    x = 4 * t if moving else 8
                    frame[16:32, x:x + 8] = 250
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
    data = video.build_video_data(make_config(source="folder", path=str(tmp_path), num_frames=8))
    assert data.class_names == ("moving", "still")
    moving, still = data.clip(0), data.clip(1)
    assert moving["frames"].shape == (8, SIZE, SIZE, 3) and int(moving["label"]) == 0
    assert int(still["label"]) == 1
    # Lossy codec: a still video changes by codec noise at most; a moving bar changes a lot.
    assert moving["change_energy"][1:].max() > 0.05
    assert still["change_energy"][1:].max() < 0.01
    a = video_files.decode_video(str(tmp_path / "train" / "moving" / "clip.mp4"),
                                 num_frames=20, size=SIZE)
    assert a.shape == (20, SIZE, SIZE, 3)  # 12 frames: the last repeats
    np.testing.assert_array_equal(a[12:], np.repeat(a[11:12], 8, axis=0))


# ---------------------------------------------------------------------------------------------
# TFDS source.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["raw", "png"])
def tfds_video_dir(request, tmp_path_factory):
    from vlmjax.data import tfds_video  # pylint: disable=g-import-not-at-top

    data_dir = str(tmp_path_factory.mktemp(f"tfds_{request.param}"))
    train = [(_clip_frames(i, 6), i % 3) for i in range(6)]
    train[1] = (_clip_frames(1, 2), 1)  # short: padded with its last frame
    train[2] = (_clip_frames(2, 6, size=(24, 40)), 2)  # resized and cropped when read
    validation = [(_clip_frames(10 + i, 6), i % 3) for i in range(3)]
    builder_dir = tfds_video.write_video_dataset(
        data_dir, {"train": train, "validation": validation}, class_names=CLASSES,
        frame_format=request.param)
    return data_dir, builder_dir, train, validation


def test_tfds_clips_by_name_and_by_builder_dir(tfds_video_dir):
    data_dir, builder_dir, train, validation = tfds_video_dir
    by_name = video.build_video_data(make_config(source="tfds", tfds_name="vlmjax_video",
                                                 path=data_dir, dtype="uint8"))
    by_dir = video.build_video_data(make_config(source="tfds", path=builder_dir, dtype="uint8"))
    for data in (by_name, by_dir):
        assert data.class_names == CLASSES and data.num_classes == 3
        assert len(data.train_clips) == 6 and len(data.eval_clips) == 3  # eval: 'validation'
        for i in (0, 3, 4):
            ex = data.clip(i)
            np.testing.assert_array_equal(ex["frames"], train[i][0])
            assert int(ex["label"]) == train[i][1] and ex["label"].dtype == np.int32
            np.testing.assert_array_equal(ex["change_energy"],
                                          video.change_energy(ex["frames"], PATCH))
            assert (ex["change_energy"][1:, 1:] == 0).all() and (ex["change_energy"][1:, 0] > 0).all()
        short = data.clip(1)
        np.testing.assert_array_equal(short["frames"][2:], np.repeat(train[1][0][1:], 4, axis=0))
        assert (short["change_energy"][2:] == 0).all()
        assert data.clip(2)["frames"].shape == (6, SIZE, SIZE, 3)
        np.testing.assert_array_equal(data.clip(0, "eval")["frames"], validation[0][0])
    float_clip = video.build_video_data(make_config(source="tfds", path=builder_dir)).clip(0)
    assert float_clip["frames"].dtype == np.float32 and float_clip["frames"].max() <= 1.0


def test_tfds_pipeline_batches_and_resume(tfds_video_dir, tmp_path):
    _, builder_dir, _, _ = tfds_video_dir
    data = video.build_video_data(make_config(source="tfds", path=builder_dir, num_threads=2))
    ds = data.train_dataset(global_batch_size=2, seed=1, process_index=0, process_count=1)
    it = iter(ds)
    batch = next(it)
    assert batch["frames"].shape == (2, 6, SIZE, SIZE, 3) and batch["label"].shape == (2,)
    next(it)
    state = it.get_state()
    expected = next(it)
    resumed = iter(ds)
    resumed.set_state(state)
    for key, value in next(resumed).items():
        np.testing.assert_array_equal(value, expected[key])
    batches = data.eval_batches(global_batch_size=2, process_index=0, process_count=1)
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 0])


def test_tfds_errors_name_the_field(tfds_video_dir, tmp_path):
    data_dir, builder_dir, _, _ = tfds_video_dir
    with pytest.raises(ValueError, match="needs config.data.tfds_name"):
        video.build_video_data(make_config(source="tfds"))
    with pytest.raises(ValueError, match="video_key='frames'"):
        video.build_video_data(make_config(source="tfds", path=builder_dir, video_key="frames"))
    with pytest.raises(ValueError, match="eval_split='test'"):
        video.build_video_data(make_config(source="tfds", path=builder_dir, eval_split="test"))
    with pytest.raises(ValueError, match="tfds_name='no_such_video'"):
        video.build_video_data(make_config(source="tfds", path=data_dir,
                                           tfds_name="no_such_video"))
    with pytest.raises(ValueError, match="no dataset_info.json"):
        video.build_video_data(make_config(source="tfds", path=str(tmp_path)))
