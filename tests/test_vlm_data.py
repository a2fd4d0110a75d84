"""The captioning + VQA pipeline (vlmjax.data.vlm_data): hand-checked batches, the scene word
tokenizer, the held-out eval split, the answer prior, jsonl / csv sources with non-ASCII text
through an HF tokenizer built here, iterator resume and process sharding. CPU only."""

import json
import os

import numpy as np
import pytest
from PIL import Image
import tokenizers as hf_tokenizers

from conftest import assert_iterator_resumes
from vlmjax.data import scenes
from vlmjax.data import vlm_data

SIZE = 32


def make_config(**overrides):
    c = vlm_data.default_config()
    c.image_size = SIZE
    c.num_eval = 6
    c.answer_prior_samples = 300
    c.num_threads = 1
    c.prefetch_batches = 0
    for k, v in overrides.items():
        c[k] = v
    return c


def _unnormalise(image, data):
    return np.round((image * np.asarray(data.std) + np.asarray(data.mean)) * 255)


@pytest.fixture(scope="module")
def scene_data():
    return vlm_data.build_vlm_data(make_config())


# ---------------------------------------------------------------------------------------------
# Scenes.
# ---------------------------------------------------------------------------------------------


def test_scene_batch_checked_by_hand(scene_data):
    data = scene_data
    cfg = data.config
    # The word tokenizer's ids, spelled out: [PAD] [UNK] [BOS], sorted words, [EOS].
    words = sorted(set(scenes.vocabulary(cfg.scenes)) | {"question", "answer", "caption"})
    wid = {w: 3 + i for i, w in enumerate(words)}
    eos = 3 + len(words)
    assert (data.pad_id, data.bos_id, data.eos_id, data.vocab_size) == (0, 2, eos, eos + 1)
    batch = data.eval_batches(global_batch_size=2, process_index=0, process_count=1,
                              max_batches=1)[0]
    L, P = cfg.max_text_len, cfg.max_prompt_len
    assert batch["input_ids"].shape == batch["labels"].shape == (2, L)
    assert batch["prompt_ids"].shape == batch["prompt_mask"].shape == (2, P)
    assert batch["image"].shape == (2, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in batch if k != "image")
    scene = scenes.sample_scene(0, scenes.eval_indices(cfg.scenes, 6)[0], "eval", cfg.scenes)
    n_obj = len(scene.objects)
    # Row 0: eval scene 0's caption; row 1: its first question, "how many shapes are there?".
    caption = scenes.words(scenes.caption(scene))
    vqa_prompt = "question : how many shapes are there ? answer :".split()
    rows = [([2, wid["caption"], wid[":"]], [wid[w] for w in caption] + [eos]),
            ([2] + [wid[w] for w in vqa_prompt], [wid[scenes.NUMBERS[n_obj]], eos])]
    for r, (prompt, target) in enumerate(rows):
        n_p, n = len(prompt), len(prompt) + len(target)
        np.testing.assert_array_equal(batch["input_ids"][r], prompt + target + [0] * (L - n))
        np.testing.assert_array_equal(batch["labels"][r],
                                      [-100] * n_p + target + [-100] * (L - n))
        np.testing.assert_array_equal(batch["attention_mask"][r], [1] * n + [0] * (L - n))
        np.testing.assert_array_equal(batch["prompt_ids"][r], [0] * (P - n_p) + prompt)
        np.testing.assert_array_equal(batch["prompt_mask"][r], [0] * (P - n_p) + [1] * n_p)
        np.testing.assert_array_equal(_unnormalise(batch["image"][r], data),
                                      scenes.render(scene, SIZE))
    np.testing.assert_array_equal(batch["kind"], [vlm_data.CAPTION, vlm_data.VQA])
    np.testing.assert_array_equal(batch["qtype"], [-1, scenes.QA_TYPES.index("COUNT")])
    np.testing.assert_array_equal(batch["index"], [0, 1])
    np.testing.assert_array_equal(batch["mask"], [1, 1])
    assert data.eval_examples[1] == {"kind": 1, "qtype": "COUNT",
                                     "question": "how many shapes are there?",
                                     "answer": scenes.NUMBERS[n_obj]}
    # Training batches: the same layout; labels are -100 exactly off the target.
    batch = next(iter(data.train_dataset(global_batch_size=4, seed=0, process_index=0,
                                         process_count=1)))
    for r in range(4):
        n = int(batch["attention_mask"][r].sum())
        n_p = int(batch["prompt_mask"][r].sum())
        labelled = batch["labels"][r] != -100
        np.testing.assert_array_equal(labelled, (np.arange(L) >= n_p) & (np.arange(L) < n))
        assert batch["labels"][r][n - 1] == eos and eos not in batch["input_ids"][r][: n - 1]
        np.testing.assert_array_equal(batch["prompt_ids"][r][P - n_p:],
                                      batch["input_ids"][r][:n_p])
        record = data.train_records.text(int(batch["index"][r]))
        assert batch["kind"][r] == record["kind"] and batch["qtype"][r] == record["qtype"]
        assert data.tokenizer.decode(batch["labels"][r][labelled]) == " ".join(
            scenes.words(record["answer"]))


def test_multi_turn_examples_keep_the_first_turn_and_label_every_answer():
    """data.turns=4: turn 1 is the single-turn record (so the answer prior is unchanged), then
    distinct questions about the same scene, whole turns only, each target labelled with its kind."""
    one = vlm_data.build_vlm_data(make_config(num_eval=2, answer_prior_samples=50))
    data = vlm_data.build_vlm_data(make_config(num_eval=2, answer_prior_samples=50, turns=4,
                                               max_text_len=64))
    assert data.answer_prior == one.answer_prior
    batch = next(iter(data.train_dataset(global_batch_size=8, seed=0, process_index=0, process_count=1)))
    eos, L = data.eos_id, data.config.max_text_len
    turns_seen = 0
    for r in range(8):
        index = int(batch["index"][r])
        first, record = one.train_records.text(index), data.train_records.text(index)
        assert {k: record[k] for k in first} == first
        questions = [t["question"] for t in record["more"]]
        assert len(set(questions)) == len(questions) and first["question"] not in questions
        scene = scenes.sample_scene(0, index, "train", data.config.scenes)
        truth = {q.question: q.answer for q in scenes.questions(scene)}
        assert all(truth[t["question"]] == t["answer"] for t in record["more"])
        # Rebuild the row by hand: [BOS] p1 t1 [EOS] p2 t2 [EOS] ... while whole turns fit.
        ids, labels, kinds = [], [], []
        for i, turn in enumerate([first] + record["more"]):
            p, t = vlm_data.format_example(turn["kind"], turn["question"], turn["answer"])
            p_ids = ([data.bos_id] if i == 0 else []) + data.tokenizer.encode(p).tolist()
            t_ids = data.tokenizer.encode(t).tolist() + [eos]
            if len(ids) + len(p_ids) + len(t_ids) > L:
                break
            turns_seen += i > 0
            ids += p_ids + t_ids
            labels += [-100] * len(p_ids) + t_ids
            kinds += [-1] * len(p_ids) + [turn["kind"]] * len(t_ids)
        n = len(ids)
        np.testing.assert_array_equal(batch["input_ids"][r], ids + [data.pad_id] * (L - n))
        np.testing.assert_array_equal(batch["labels"][r], labels + [-100] * (L - n))
        np.testing.assert_array_equal(batch["label_kind"][r], kinds + [-1] * (L - n))
        np.testing.assert_array_equal(batch["attention_mask"][r], [1] * n + [0] * (L - n))
        assert batch["kind"][r] == first["kind"]
    assert turns_seen >= 8  # later turns are really there
    # Evaluation stays one turn per example.
    ev = data.eval_batches(global_batch_size=2, process_index=0, process_count=1, max_batches=1)[0]
    assert int((ev["labels"][1] == eos).sum()) == 1
    with pytest.raises(ValueError, match="config.data.turns"):
        vlm_data.build_vlm_data(make_config(turns=0))


def test_scene_text_never_encodes_to_unk(scene_data):
    data = scene_data
    cfg = data.config.scenes
    texts = [p + t for e in data.eval_examples
             for p, t in [vlm_data.format_example(e["kind"], e["question"], e["answer"])]]
    for i in range(300):
        scene = scenes.sample_scene(0, i, "train" if i % 2 else "eval", cfg)
        texts += [vlm_data.format_example(0, "", scenes.caption(scene, t))[1]
                  for t in range(len(scenes.CAPTION_TEMPLATES))]
        texts += [vlm_data.format_example(1, q.question, q.answer)[0] + " " + q.answer
                  for q in scenes.questions(scene)]
    encoded = data.tokenizer.encode_batch(texts)
    assert all(len(ids) and data.tokenizer.unk_id not in ids for ids in encoded)
    assert data.tokenizer.unk_id in data.tokenizer.encode("question: a purple blob")


def test_eval_is_held_out_and_deterministic(scene_data):
    data = scene_data
    cfg = data.config.scenes
    held = {tuple(p) for p in cfg.held_out}
    raw = scenes.eval_indices(cfg, 6)
    expected = []
    for r in raw:  # One caption, then every question of the scene, in order.
        scene = scenes.sample_scene(cfg.seed, r, "eval", cfg)
        assert any((o.colour, o.shape) in held for o in scene.objects)
        expected.append((0, None, "", scenes.caption(scene)))
        expected += [(1, q.type, q.question, q.answer) for q in scenes.questions(scene)]
    assert [tuple(e.values()) for e in data.eval_examples] == expected
    for i in range(0, 300, 7):  # Training scenes never show a held-out pair.
        assert not any((o.colour, o.shape) in held
                       for o in scenes.sample_scene(cfg.seed, i, "train", cfg).objects)
    again = vlm_data.build_vlm_data(make_config())
    assert again.eval_examples == data.eval_examples and again.answer_prior == data.answer_prior
    a, b = (d.eval_batches(global_batch_size=8, process_index=0, process_count=1)
            for d in (data, again))
    assert len(a) == len(b) == -(-len(data.eval_examples) // 8)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    np.testing.assert_array_equal(np.concatenate([x["index"] for x in a])[: len(expected)],
                                  np.arange(len(expected)))
    # Two processes: the same batch count each, disjoint rows, padding only at the end.
    parts = [data.eval_batches(global_batch_size=8, process_index=p, process_count=2)
             for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(a)
    real = [int(i) for p in parts for x in p for i, m in zip(x["index"], x["mask"]) if m]
    assert sorted(real) == list(range(len(expected)))
    # A fixed subset of questions per scene.
    sub = vlm_data.build_vlm_data(make_config(eval_questions=2))
    assert len(sub.eval_examples) <= 3 * 6 and sum(e["kind"] == 0 for e in sub.eval_examples) == 6
    assert {(e["question"], e["answer"]) for e in sub.eval_examples if e["kind"]} <= {
        (q, a) for _, _, q, a in expected}
    assert sub.eval_examples == vlm_data.build_vlm_data(make_config(eval_questions=2)).eval_examples


def test_seen_compositions_eval_draws_new_training_distribution_scenes():
    """eval_compositions='seen': scenes drawn like training's at indices training never reads (the i.i.d.
    test beside the held-out-pair one), rendered from the same scenes the questions describe."""
    data = vlm_data.build_vlm_data(make_config(eval_compositions="seen"))
    cfg = data.config.scenes
    expected = []
    for i in range(6):
        scene = scenes.sample_scene(cfg.seed, cfg.num_train + i, "train", cfg)
        expected.append((0, None, "", scenes.caption(scene)))
        expected += [(1, q.type, q.question, q.answer) for q in scenes.questions(scene)]
    assert [tuple(e.values()) for e in data.eval_examples] == expected
    batch = data.eval_batches(global_batch_size=8, process_index=0, process_count=1)[0]
    first = scenes.render(scenes.sample_scene(cfg.seed, cfg.num_train, "train", cfg), SIZE)
    np.testing.assert_allclose(_unnormalise(batch["image"][0], data), first, atol=1)
    with pytest.raises(ValueError, match="eval_compositions='unseen'"):
        vlm_data.build_vlm_data(make_config(eval_compositions="unseen"))


def test_scene_prior_is_the_most_frequent_training_answer(scene_data):
    data = scene_data
    counts = {}
    for i in range(300):
        t = data.train_records.text(i)
        if t["kind"] == vlm_data.VQA:
            counts.setdefault(scenes.QA_TYPES[t["qtype"]], []).append(t["answer"])
    assert set(data.answer_prior) == set(counts) == set(scenes.QA_TYPES)
    for qtype, answers in counts.items():
        best = data.answer_prior[qtype]
        assert answers.count(best) == max(answers.count(a) for a in set(answers))
    kinds = [data.train_records.text(i)["kind"] for i in range(300)]
    assert 0.1 < kinds.count(vlm_data.CAPTION) / 300 < 0.3  # caption_fraction 0.2
    acc = data.prior_accuracy()
    vqa = [e for e in data.eval_examples if e["kind"] == vlm_data.VQA]
    right = sum(e["answer"] == data.answer_prior[e["qtype"]] for e in vqa)
    assert acc["overall"] == pytest.approx(right / len(vqa))


def test_sharding_is_disjoint_and_the_iterator_resumes(tmp_path):
    cfg = make_config()
    cfg.scenes.num_train = 16
    data = vlm_data.build_vlm_data(cfg)
    seen = []
    for p in range(2):
        it = iter(data.train_dataset(global_batch_size=4, seed=3, process_index=p,
                                     process_count=2))
        seen.append(np.concatenate([next(it)["index"] for _ in range(4)]))  # one epoch
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(16))
    ds = vlm_data.build_vlm_data(make_config(prefetch_batches=2)).train_dataset(
        global_batch_size=4, seed=1, process_index=0, process_count=1)
    assert_iterator_resumes(ds, 2, tmp_path / "ckpt")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"source='scene' .*did you mean 'scenes'"):
        vlm_data.build_vlm_data(make_config(source="scene"))
    with pytest.raises(ValueError, match=r"config.data.max_text_len=20 is too short: .* needs "
                                         r"\d+ tokens.*Set config.data.max_text_len=2\d"):
        vlm_data.build_vlm_data(make_config(max_text_len=20))
    # All training examples are captions ("caption:"), so the eval questions are the long ones.
    with pytest.raises(ValueError, match=r"max_prompt_len=8 is too short: SceneEvalRecords \d"):
        vlm_data.build_vlm_data(make_config(max_prompt_len=8, caption_fraction=1.0))
    with pytest.raises(ValueError, match="caption_fraction=1.5"):
        vlm_data.build_vlm_data(make_config(caption_fraction=1.5))
    with pytest.raises(ValueError, match="needs config.data.tokenizer"):
        vlm_data.build_vlm_data(make_config(source="jsonl", path=str(tmp_path / "x")))


# ---------------------------------------------------------------------------------------------
# Files: jsonl / csv, an HF tokenizer directory, the answer prior.
# ---------------------------------------------------------------------------------------------

VI_QUESTION = "Con mèo màu gì?"
VI_ANSWER = "màu đỏ"
CORPUS = ["question: what colour is the cat? answer: red", "caption: a dog on a sofa",
          f"question: {VI_QUESTION} answer: {VI_ANSWER}", "Đây là một con chó trên ghế sofa.",
          "how many dogs are there? two three one"] * 4


def _tokenizer_dir(folder, bos):
    """A local HF tokenizer dir: byte-level BPE learned here; Llama-like <s> BOS, or none
    (tokenizer_config.json bos_token null, as Qwen2.5)."""
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf_tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=hf_tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>" if bos else None, "eos_token": "</s>"}, f)
    return folder


def _image(i):
    return np.random.default_rng(i).integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt,bos", [("jsonl", True), ("csv", False)])
def test_file_sources_with_vietnamese_text(fmt, bos, tmp_path):
    tok_dir = _tokenizer_dir(str(tmp_path / "tok"), bos)
    rows = [{"image": _image(0), "question": VI_QUESTION, "answer": VI_ANSWER},
            {"image": _image(1), "question": "", "answer": "Đây là một con chó"},
            {"image": _image(2), "question": "how many dogs are there?", "answer": "two"},
            {"image": _image(3), "question": "what colour is the cat?", "answer": "red"}]
    file = vlm_data.write_vqa_files(str(tmp_path), rows, fmt)
    data = vlm_data.build_vlm_data(make_config(source=fmt, path=file, num_eval=2,
                                               tokenizer=tok_dir))
    assert data.bos_id == (1 if bos else None) and (data.eos_id, data.pad_id) == (2, 0)
    assert data.qtypes == ("ALL",) and data.answer_prior == {"ALL": "red"}  # a tie: a-z first
    assert data.eval_examples == [
        {"kind": 1, "qtype": "ALL", "question": VI_QUESTION, "answer": VI_ANSWER},
        {"kind": 0, "qtype": None, "question": "", "answer": "Đây là một con chó"}]
    batch = data.eval_batches(global_batch_size=2, process_index=0, process_count=1)[0]
    tok = data.tokenizer
    for r, (prompt, target) in enumerate([(f"question: {VI_QUESTION} answer:", " " + VI_ANSWER),
                                          ("caption:", " Đây là một con chó")]):
        first = [1] if bos else []
        want_p = first + tok.encode(prompt).tolist()
        want_t = tok.encode(target).tolist() + [2]
        n_p, n = len(want_p), len(want_p) + len(want_t)
        np.testing.assert_array_equal(batch["input_ids"][r][:n], want_p + want_t)
        assert (batch["input_ids"][r][n:] == 0).all() and batch["attention_mask"][r].sum() == n
        np.testing.assert_array_equal(batch["labels"][r], [-100] * n_p + want_t
                                      + [-100] * (data.config.max_text_len - n))
        np.testing.assert_array_equal(batch["prompt_ids"][r][-n_p:], want_p)
        assert batch["prompt_mask"][r].sum() == n_p
        assert tok.decode(batch["labels"][r][n_p:n]) == target  # UTF-8 survives the round trip
        assert tok.decode(batch["prompt_ids"][r]) == prompt
        assert vlm_data.normalize_answer(tok.decode(want_t)) == vlm_data.normalize_answer(
            target)
        expected = np.asarray(Image.fromarray(rows[r]["image"]).resize(
            (SIZE, SIZE), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(_unnormalise(batch["image"][r], data), expected)
    np.testing.assert_array_equal(batch["kind"], [1, 0])
    np.testing.assert_array_equal(batch["qtype"], [0, -1])
    train = next(iter(data.train_dataset(global_batch_size=2, seed=0, process_index=0,
                                         process_count=1)))
    assert sorted(train["index"].tolist()) == [0, 1]
    # A separate eval file.
    eval_file = vlm_data.write_vqa_files(str(tmp_path), rows[:1], fmt, name="val")
    data = vlm_data.build_vlm_data(make_config(source=fmt, path=file, eval_path=eval_file,
                                               tokenizer=tok_dir))
    assert len(data.train_records) == 4 and len(data.eval_records) == 1
    with pytest.raises(ValueError, match=r"max_prompt_len=2 is too short: .*vqa\.%s:\d+ needs"
                       % fmt):
        vlm_data.build_vlm_data(make_config(source=fmt, path=file, num_eval=2, max_prompt_len=2,
                                            max_text_len=3, tokenizer=tok_dir))


def test_answer_prior_and_its_accuracy_on_a_hand_made_file(tmp_path):
    tok_dir = _tokenizer_dir(str(tmp_path / "tok"), bos=True)

    def row(i, q, a, t):
        return {"image": _image(i), "question": q, "answer": a, "question_type": t}

    eval_rows = [row(0, "what colour is the cat?", "Red.", "color"),  # prior right
                 row(1, "what colour is the dog?", "blue", "color"),  # wrong
                 row(2, "how many dogs are there?", " two!", "count"),  # right
                 row(3, "what shape is it?", "circle", "shape"),  # type unseen in training
                 row(4, "", "a red cat", "")]  # a caption: not scored
    train_rows = [row(5, "what colour is the cat?", "red", "color"),
                  row(6, "what colour is the dog?", "RED", "color"),
                  row(7, "what colour is the sofa?", "blue", "color"),
                  row(8, "how many cats are there?", "three", "count"),
                  row(9, "how many dogs are there?", "Two.", "count"),
                  row(10, "how many dogs are there?", "two", "count"),
                  row(11, "", "a dog on a sofa", "")]
    file = vlm_data.write_vqa_files(str(tmp_path), eval_rows + train_rows, "jsonl")
    data = vlm_data.build_vlm_data(make_config(source="jsonl", path=file, num_eval=5,
                                               tokenizer=tok_dir))
    assert data.qtypes == ("color", "count", "shape")
    assert data.answer_prior == {"color": "red", "count": "two"}
    assert data.prior_accuracy() == {"overall": 0.5, "color": 0.5, "count": 1.0, "shape": 0.0}
    assert data.accuracy({0: "red", 1: "Blue", 3: "circle.", 4: "x"}) == {
        "overall": 1.0, "color": 1.0, "shape": 1.0}
    assert [e["qtype"] for e in data.eval_examples] == ["color", "color", "count", "shape", None]
    batch = data.eval_batches(global_batch_size=6, process_index=0, process_count=1)[0]
    np.testing.assert_array_equal(batch["qtype"], [0, 0, 1, 2, -1, -1])
    np.testing.assert_array_equal(batch["mask"], [1, 1, 1, 1, 1, 0])
    # Some questions typed, others not: an error naming the line.
    bad = vlm_data.write_vqa_files(str(tmp_path), train_rows[:3] + [
        {"image": _image(0), "question": "why?", "answer": "because"}], "jsonl", name="bad")
    with pytest.raises(ValueError, match=r"bad.jsonl:4: question without a type"):
        vlm_data.build_vlm_data(make_config(source="jsonl", path=bad, num_eval=1,
                                            tokenizer=tok_dir))


def test_normalize_answer():
    norm = vlm_data.normalize_answer
    assert norm("  Two   Cats. ") == "two cats" == norm("two cats!?")
    assert norm("Màu ĐỎ!") == "màu đỏ" and norm("top left") == "top left"
    assert norm("...") == "" and norm("3.5") == "3.5"
