"""The image-text pipeline (vlmjax.data.image_text): batch layout, per-process sharding,
iterator checkpoints, padded eval batches, and the jsonl / csv / TFDS sources on data written to
tmp_path. CPU only, nothing downloaded."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
import tokenizers as hf_tokenizers

from conftest import assert_iterator_resumes
from vlmjax.data import image_processing
from vlmjax.data import image_text
from vlmjax.data import scenes

SIZE = 32
WORDS = ("a", "red", "blue", "dog", "cat", "on", "the", "sofa", "photo", "of")


def make_config(**overrides):
    c = image_text.default_config()
    c.image_size = SIZE
    c.num_eval = 10
    c.num_threads = 1
    c.prefetch_batches = 0
    for k, v in overrides.items():
        c[k] = v
    return c


def _unnormalise(image, data):
    return np.round((image * np.asarray(data.std) + np.asarray(data.mean)) * 255)


# ---------------------------------------------------------------------------------------------
# Scenes.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_data():
    return image_text.build_image_text_data(make_config())


def test_scene_batches_layout(scene_data):
    data = scene_data
    assert data.eos_id == data.vocab_size - 1 and data.pad_id == 0 and data.bos_id == 2
    batch = next(iter(data.train_dataset(global_batch_size=4, seed=0, process_index=0,
                                         process_count=1)))
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["text"].shape == (4, 32) and batch["text"].dtype == np.int32
    assert batch["text_valid"].dtype == bool and batch["mask"].dtype == np.float32
    assert batch["index"].dtype == np.int32 and (batch["mask"] == 1).all()
    for image, row, valid, index in zip(batch["image"], batch["text"], batch["text_valid"],
                                        batch["index"]):
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any()
        assert row[0] == data.bos_id and row[n - 1] == data.eos_id
        assert (row[n:] == data.pad_id).all()
        assert 1 not in row[1 : n - 1]  # no [UNK]
        assert data.eos_id not in row[1 : n - 1] and data.eos_id == row.max()
        record = data.train_records[int(index)]
        assert data.tokenizer.decode(row) == " ".join(scenes.words(record["caption"]))
        # Pixels: normalised with CLIP mean/std from the rendered scene.
        np.testing.assert_array_equal(_unnormalise(image, data), record["image"])


def test_scene_vocabulary_is_closed(scene_data):
    tok = scene_data.tokenizer
    texts = []
    for i in range(200):
        scene = scenes.sample_scene(0, i, "eval" if i % 2 else "train", scene_data.config.scenes)
        texts += [scenes.caption(scene, t) for t in range(len(scenes.CAPTION_TEMPLATES))]
        texts += [f"{q.question} {q.answer}" for q in scenes.questions(scene)]
    assert all(1 not in ids and len(ids) for ids in tok.encode_batch(texts))  # no [UNK]
    assert (tok.encode("a purple blob") == [tok.encode("a")[0], 1, 1]).all()


def test_eval_rows_are_images_with_their_own_distinct_captions(scene_data):
    batches = scene_data.eval_batches(global_batch_size=4, process_index=0, process_count=1)
    assert len(batches) == 3
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1] * 10 + [0, 0])
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, list(range(10)) + [9, 9])
    texts = [tuple(t) for b in batches for t in b["text"]][:10]
    assert len(set(texts)) == 10
    held = {tuple(p) for p in scene_data.config.scenes.held_out}
    for i in range(10):
        scene = scene_data.eval_records.scene(i)
        assert any((o.colour, o.shape) in held for o in scene.objects)
        row = batches[i // 4]["text"][i % 4]
        assert scene_data.tokenizer.decode(row) == " ".join(scenes.words(scenes.caption(scene)))
    # Two processes: same number of batches, rows split by process, padding only at the end.
    parts = [scene_data.eval_batches(global_batch_size=4, process_index=p, process_count=2)
             for p in range(2)]
    assert [len(p) for p in parts] == [3, 3] and parts[0][0]["image"].shape[0] == 2
    np.testing.assert_array_equal(parts[1][0]["index"], [2, 3])
    assert sum(float(b["mask"].sum()) for p in parts for b in p) == 10
    assert len(scene_data.eval_batches(global_batch_size=4, process_index=0, process_count=1,
                                       max_batches=1)) == 1


def test_truncated_text_keeps_eos_and_the_tokenizer_is_saved(tmp_path):
    data = image_text.build_image_text_data(make_config(max_text_len=5), workdir=str(tmp_path))
    saved = hf_tokenizers.Tokenizer.from_file(str(tmp_path / image_text.SCENE_TOKENIZER_FILE))
    text = data.train_records[3]["caption"]
    assert saved.encode(text, add_special_tokens=False).ids == data.tokenizer.encode(text).tolist()
    assert saved.token_to_id("[EOS]") == data.eos_id
    ex = data.example(0)
    assert ex["text_valid"].all() and ex["text"][0] == data.bos_id and ex["text"][-1] == data.eos_id
    np.testing.assert_array_equal(ex["text"][1:4], data.tokenizer.encode(
        data.train_records[0]["caption"])[:3])


def test_sharding_is_disjoint_and_the_iterator_resumes(scene_data, tmp_path):
    cfg = make_config()
    cfg.scenes.num_train = 16
    data = image_text.build_image_text_data(cfg)
    seen = []
    for p in range(2):
        it = iter(data.train_dataset(global_batch_size=4, seed=3, process_index=p, process_count=2))
        seen.append(np.concatenate([next(it)["index"] for _ in range(4)]))  # one epoch
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(16))
    ds = image_text.build_image_text_data(make_config(prefetch_batches=2)).train_dataset(
        global_batch_size=4, seed=1, process_index=0, process_count=1)
    assert_iterator_resumes(ds, 2, tmp_path / "ckpt")
    it = iter(ds)  # grain get_state / set_state, as the trainer's checkpoint does
    next(it)
    state = it.get_state()
    expected = next(it)
    resumed = iter(ds)
    resumed.set_state(state)
    got = next(resumed)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"source='scene' .*did you mean 'scenes'"):
        image_text.build_image_text_data(make_config(source="scene"))
    with pytest.raises(ValueError, match="max_text_len=2"):
        image_text.build_image_text_data(make_config(max_text_len=2))
    with pytest.raises(ValueError, match="needs config.data.tokenizer"):
        image_text.build_image_text_data(make_config(source="jsonl", path=str(tmp_path / "x")))
    cfg = make_config()
    cfg.scenes.shapes = ("circle", "sqare")
    with pytest.raises(ValueError, match="did you mean 'square'"):
        image_text.build_image_text_data(cfg)


# ---------------------------------------------------------------------------------------------
# Real sources: jsonl, csv, TFDS.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A local HF tokenizer dir (WordLevel); special ids in config.json's text_config, as CLIP."""
    path = str(tmp_path_factory.mktemp("tok"))
    vocab = {t: i for i, t in enumerate(("<pad>", "<s>", "</s>", "<unk>") + WORDS)}
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"text_config": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}}, f)
    return path


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8),
             " ".join(rng.choice(WORDS, size=3 + i % 4))) for i in range(n)]


def _write_files(folder, kind, pairs, name="pairs", missing=None):
    os.makedirs(os.path.join(folder, "imgs"), exist_ok=True)
    rows = []
    for i, (image, text) in enumerate(pairs):
        rel = os.path.join("imgs", f"{name}_{i}.png")
        if i != missing:
            Image.fromarray(image).save(os.path.join(folder, rel))
        rows.append({"image": rel, "caption": text})
    file = os.path.join(folder, f"{name}.{kind}")
    with open(file, "w", newline="") as f:
        if kind == "jsonl":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(f, fieldnames=["caption", "image"])
            writer.writeheader()
            writer.writerows(rows)
    return file


def _resized(image):
    return np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_file_sources(kind, tmp_path, tokenizer_dir):
    pairs = _pairs(8)
    file = _write_files(str(tmp_path), kind, pairs)
    data = image_text.build_image_text_data(make_config(source=kind, path=file, num_eval=3,
                                                        tokenizer=tokenizer_dir))
    assert (data.bos_id, data.eos_id, data.pad_id) == (1, 2, 0)
    assert len(data.train_records) == 5 and len(data.eval_records) == 3  # first 3 rows held out
    for split, offset in (("train", 3), ("eval", 0)):
        ex = data.example(1, split)
        image, text = pairs[offset + 1]
        np.testing.assert_array_equal(_unnormalise(ex["image"], data), _resized(image))
        n = int(ex["text_valid"].sum())
        assert ex["text"][0] == 1 and ex["text"][n - 1] == 2 and n == len(text.split()) + 2
        assert data.tokenizer.decode(ex["text"]) == text and int(ex["index"]) == 1
    batches = data.eval_batches(global_batch_size=2, process_index=0, process_count=1)
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 0])
    batch = next(iter(data.train_dataset(global_batch_size=4, seed=0, process_index=0,
                                         process_count=1)))
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["text"].shape == (4, 32)
    # A separate eval file; images from image_root.
    eval_file = _write_files(str(tmp_path), kind, _pairs(2, seed=1), name="val")
    data = image_text.build_image_text_data(make_config(
        source=kind, path=file, eval_path=eval_file, image_root=str(tmp_path),
        tokenizer=tokenizer_dir))
    assert len(data.train_records) == 8 and len(data.eval_records) == 2


def test_processor_sets_size_and_normalisation(tmp_path, tokenizer_dir):
    pairs = _pairs(4)
    file = _write_files(str(tmp_path), "jsonl", pairs)
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "SiglipImageProcessor",
                   "size": {"height": SIZE, "width": SIZE}}, f)
    data = image_text.build_image_text_data(make_config(
        source="jsonl", path=file, num_eval=1, tokenizer=tokenizer_dir, processor=str(tmp_path)))
    assert data.mean == data.std == (0.5, 0.5, 0.5)
    proc = image_processing.ImageProcessor.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(data.example(0)["image"], proc.process(pairs[1][0]))
    with pytest.raises(ValueError, match="image_size=16"):
        image_text.build_image_text_data(make_config(
            source="jsonl", path=file, num_eval=1, tokenizer=tokenizer_dir,
            processor=str(tmp_path), image_size=16))


def test_file_source_errors_name_the_file_and_line(tmp_path, tokenizer_dir):
    file = _write_files(str(tmp_path), "jsonl", _pairs(4), missing=2)
    data = image_text.build_image_text_data(make_config(source="jsonl", path=file, num_eval=1,
                                                        tokenizer=tokenizer_dir))
    with pytest.raises(FileNotFoundError,
                       match=r"pairs.jsonl:3: image file .*pairs_2.png not found"):
        data.example(1)
    with pytest.raises(FileNotFoundError, match="pairs_2.png not found"):
        next(iter(data.train_dataset(global_batch_size=3, seed=0, process_index=0,
                                     process_count=1)))
    with open(file, "a") as f:
        f.write('{"image": "imgs/pairs_0.png"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:5: no non-empty string 'caption'"):
        image_text.build_image_text_data(make_config(source="jsonl", path=file, num_eval=1,
                                                     tokenizer=tokenizer_dir))
    with open(file, "a") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match="pairs.jsonl:5"):
        image_text.build_image_text_data(make_config(source="jsonl", path=file, num_eval=1,
                                                     tokenizer=tokenizer_dir))
    csv_file = _write_files(str(tmp_path), "csv", _pairs(3))
    with pytest.raises(ValueError, match=r"pairs.csv:1: the header .* no column 'img'"):
        image_text.build_image_text_data(make_config(source="csv", path=csv_file, num_eval=1,
                                                     tokenizer=tokenizer_dir, image_key="img"))
    with pytest.raises(FileNotFoundError, match="no_such.jsonl"):
        image_text.build_image_text_data(make_config(
            source="jsonl", path=str(tmp_path / "no_such.jsonl"), tokenizer=tokenizer_dir))


def test_tfds_source(tmp_path, tokenizer_dir):
    train, validation = _pairs(5), _pairs(3, seed=2)
    train[1] = (np.full((SIZE, SIZE, 3), 7, np.uint8), "a red dog")  # already S x S: exact
    builder_dir = image_text.write_image_text_dataset(
        str(tmp_path), {"train": train, "validation": validation}, image_format="png")
    for cfg in (make_config(source="tfds", path=builder_dir, tokenizer=tokenizer_dir),
                make_config(source="tfds", path=str(tmp_path), tfds_name="vlmjax_image_text",
                            tokenizer=tokenizer_dir)):
        data = image_text.build_image_text_data(cfg)
        assert len(data.train_records) == 5 and len(data.eval_records) == 3
        ex = data.example(1)
        np.testing.assert_array_equal(_unnormalise(ex["image"], data), 7)
        assert data.tokenizer.decode(ex["text"]) == "a red dog"
        np.testing.assert_array_equal(_unnormalise(data.example(2, "eval")["image"], data),
                                      _resized(validation[2][0]))
    batches = data.eval_batches(global_batch_size=2, process_index=0, process_count=1)
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 0])
    with pytest.raises(ValueError, match="caption_key='text'"):
        image_text.build_image_text_data(make_config(source="tfds", path=builder_dir,
                                                     tokenizer=tokenizer_dir, caption_key="text"))
    with pytest.raises(ValueError, match="eval_split='test'"):
        image_text.build_image_text_data(make_config(source="tfds", path=builder_dir,
                                                     tokenizer=tokenizer_dir, eval_split="test"))
