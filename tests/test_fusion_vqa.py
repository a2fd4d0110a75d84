"""The ``fusion_vqa`` task (configs/fusion_vqa.py): the smoke experiment trains and logs per-type accuracy,
the answer prior and the gates; the generative head trains and generates; ViVQA-style CSV files with
Vietnamese text, an id -> file pattern and a local HF tokenizer; a frozen pretrained decoder trains only
the fusion parameters; bad config values are one-line errors naming the field."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from vlmjax import run as runner
from vlmjax import tasks
from vlmjax import tree
from vlmjax.data import vlm_data
from vlmjax.train.metrics import read_metrics


def _smoke(**over):
    return load_config("fusion_vqa", "smoke", **over)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fusion_smoke"))
    summary = runner.run(_smoke(log_every=1, diagnose_at_end=True), workdir)
    # The smoke experiment's stage 'vision' (scene parsing) ran first in WORKDIR/vision; the fusion run is
    # WORKDIR/fusion_vqa and starts its frozen tower from it.
    assert os.path.isfile(os.path.join(workdir, "vision", "summary.json"))
    return os.path.join(workdir, "fusion_vqa"), summary


def test_smoke_trains_and_logs_accuracy_prior_and_gates(smoke_run):
    workdir, s = smoke_run
    assert s["finished"] and s["step"] == 4
    end = s["eval_end"]
    qtypes = ("COUNT", "COLOR", "LOCATION", "OBJECT", "SIZE")
    for key in ("vqa_accuracy", "prior_accuracy", "vqa_loss", "gate/vision", "gate/attn_mean", "gate/ffn_mean",
                "gate/xattn_0/attn", "gate/xattn_1/ffn"):
        assert key in end and np.isfinite(end[key]), key
    assert 0.0 <= end["vqa_accuracy"] <= 1.0
    assert any(f"vqa_accuracy/{t}" in end for t in qtypes)
    assert any(f"prior_accuracy/{t}" in end for t in qtypes)
    # Gates at step 0: sigmoid(1.5) for the vision gate, tanh(gate_init = 1) for the blocks; they move.
    start = s["eval_start"]
    np.testing.assert_allclose(start["gate/vision"], 1 / (1 + np.exp(-1.5)), rtol=1e-6)
    np.testing.assert_allclose(start["gate/xattn_0/attn"], np.tanh(1.0), rtol=1e-6)
    assert end["gate/xattn_0/attn"] != start["gate/xattn_0/attn"]
    train = read_metrics(workdir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"loss", "accuracy", "gate/vision", "gate/xattn_0/attn", "gate/xattn_1/ffn"} <= set(r)
    assert len({r["gate/xattn_1/ffn"] for r in train}) > 1  # a trajectory, not a constant


def test_smoke_run_is_diagnosed(smoke_run):
    """The task's VQA probe (inherited from task 'vlm'): the diagnostics' real-image accuracy is the run's final
    eval, the type prior its answer-prior baseline, and the gates are the fusion blocks' and the vision gate."""
    from vlmjax.diagnostics import report  # pylint: disable=g-import-not-at-top
    workdir, s = smoke_run
    r = report.read_json(os.path.join(os.path.dirname(workdir), "diagnostics"))  # the experiment's, at its root
    assert r["task"] == "fusion_vqa" and r["step"] == 4
    assert r["accuracy"]["real"]["overall"] == pytest.approx(s["eval_end"]["vqa_accuracy"])
    assert r["dataset_bias"]["type_prior"]["overall"] == pytest.approx(s["eval_end"]["prior_accuracy"])
    assert set(r["accuracy"]) == {"real", "shuffled", "blank"}
    gates = " ".join(r["gates"]["final"])
    assert "alpha_attn" in gates and "vision_gate_logit" in gates, r["gates"]["final"]


def test_ablation_variants_differ_only_in_fusion_depth():
    base = load_config("fusion_vqa").to_dict()
    for v, n in (("layers2", 2), ("layers6", 6)):
        c = load_config("fusion_vqa", v).to_dict()
        assert c["fusion"].pop("num_fusion_layers") == n
        want = {**base, "fusion": {k: x for k, x in base["fusion"].items() if k != "num_fusion_layers"}}
        assert c == want
        assert c["decoder"]["num_hidden_layers"] % n == 0 and c["decoder"]["num_hidden_layers"] % 4 == 0


def test_answer_vocabulary_and_unknown_answers():
    vocab = vlm_data.answer_vocabulary(["Red", "red.", "blue", "two", "blue", "red", "zebra"], 2)
    assert vocab == (vlm_data.UNK_ANSWER, "red", "blue")
    task = tasks.build(_smoke(**{"fusion.num_answers": 3}), None)
    data = task.data
    assert len(data.answer_vocab) == 4 and task.fusion_config.num_answers == 4
    ex = [data.example(i, "eval") for i in range(6)]
    for e, row in zip(ex, data.eval_examples):
        if row["kind"] == vlm_data.CAPTION:
            assert e["answer_id"] == -1
        elif vlm_data.normalize_answer(row["answer"]) in data.answer_vocab:
            assert data.answer_vocab[e["answer_id"]] == vlm_data.normalize_answer(row["answer"])
        else:
            assert e["answer_id"] == 0
    # Predicting <unk> is never correct, even for an answer outside the vocabulary.
    rows = [i for i, r in enumerate(data.eval_examples) if r["kind"] == vlm_data.VQA]
    outputs = {"index": np.array(rows), "mask": np.ones(len(rows)), "answer_pred": np.zeros(len(rows), np.int32)}
    assert data.accuracy(task._predictions(outputs))["overall"] == 0.0  # pylint: disable=protected-access


def _steps(cfg, workdir=None, n=1, evaluate=True):
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    task = tasks.build(cfg, workdir)
    tr = Trainer(cfg, task, shd.make_mesh(cfg.mesh))
    state = tr.init(task.pretrained_params(tr.abstract_state.params, tr.state_shardings.params))
    before = tree.flatten(jax.device_get(state.params))
    batch = tr.put(next(iter(task.train_dataset(global_batch_size=cfg.batch_size, seed=0, process_index=0,
                                                process_count=1))))
    for _ in range(n):
        state, m = tr.train_step(state, batch)
    after = tree.flatten(jax.device_get(state.params))
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    metrics = None
    if evaluate:
        metrics = tr.evaluate(state, task.eval_batches(global_batch_size=cfg.batch_size, process_index=0,
                                                       process_count=1))
    return task, before, moved, float(m["loss"]), metrics, (tr, state)


@pytest.mark.slow  # default-suite time; the generative head's forward and generation are tested at model level in test_fusion.py
def test_generative_head_trains_and_generates():
    task, _, moved, loss, metrics, (tr, state) = _steps(_smoke(**{"fusion.head": "generate", "optim.warmup_steps": 0}))
    assert np.isfinite(loss) and "answer_head/fc1/kernel" not in {k for k in moved}
    assert any(k.startswith("decoder/xattn_") for k in moved)
    assert {"vqa_accuracy", "prior_accuracy", "vqa_loss", "gate/vision"} <= set(metrics)
    del tr
    batch = task.eval_batches(global_batch_size=8, process_index=0, process_count=1)[0]
    out = jax.device_get(jax.jit(task.eval_fn)(state.params, state.model_state, batch))
    assert out["generated"].shape == (8, int(task.gen.max_new_tokens))
    assert out["vqa_count"] > 0 and np.isfinite(out["vqa_nll"])
    answers = task._predictions({"index": np.arange(8), "mask": np.ones(8),  # pylint: disable=protected-access
                                 "generated": np.full((8, 3), task.data.eos_id)})
    assert answers == {i: "" for i in range(8)}


def _tokenizer_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
    from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["question: answer: con mèo màu gì? có bao nhiêu con chó? màu đỏ xanh hai ba"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:  # the special ids, as a checkpoint has
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    return path


VI_ROWS = [("con mèo màu gì?", "đỏ", 2), ("con mèo màu gì?", "xanh", 2), ("có bao nhiêu con chó?", "hai", 0),
           ("có bao nhiêu con chó?", "ba", 0)]


def _vivqa_files(folder, n=12):
    """train.csv / test.csv in the ViVQA layout (unnamed index, question, answer, img_id, type) and an image
    folder of COCO-style names ('{:012d}.jpg')."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    files = {}
    for split, count in (("train", n), ("test", 4)):
        file = os.path.join(folder, f"{split}.csv")
        with open(file, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "question", "answer", "img_id", "type"])
            for i in range(count):
                q, a, t = VI_ROWS[i % len(VI_ROWS)]
                img_id = 1000 * (split == "test") + i + 7
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                    os.path.join(folder, "images", f"{img_id:012d}.jpg"))
                w.writerow([i, q, a, img_id, t])
        files[split] = file
    return files


def _vivqa_overrides(files, folder, **more):
    return {"data.source": "csv", "data.path": files["train"], "data.eval_path": files["test"],
            "data.image_root": os.path.join(folder, "images"), "data.image_key": "img_id", "data.qtype_key": "type",
            "data.image_pattern": "{:012d}.jpg", "data.max_text_len": 48, "data.max_prompt_len": 32,
            "batch_size": 4, **more}


def test_vivqa_csv_with_vietnamese_text_trains(tmp_path):
    folder = str(tmp_path / "vivqa")
    files = _vivqa_files(folder)
    tok = _tokenizer_dir(str(tmp_path / "tok"))
    # A tower from scratch (the smoke config freezes the one its vision stage trains).
    cfg = _smoke(**_vivqa_overrides(files, folder, **{"data.tokenizer": tok, "optim.warmup_steps": 0,
                                                     "vision_encoder.freeze": ()}))
    task, _, moved, loss, metrics, _ = _steps(cfg)
    assert np.isfinite(loss) and any(k.startswith("vision_tower/") for k in moved)
    data = task.data
    assert data.qtypes == ("0", "2") and [e["question"] for e in data.eval_examples][:2] == [VI_ROWS[0][0]] * 2
    assert set(data.answer_vocab) == {vlm_data.UNK_ANSWER, "đỏ", "xanh", "hai", "ba"}
    assert data.tokenizer.decode(data.tokenizer.encode("con mèo màu gì?")) == "con mèo màu gì?"
    assert {"vqa_accuracy/0", "vqa_accuracy/2", "prior_accuracy/2"} <= set(metrics)
    # The pattern names the file; a missing image is an error naming it.
    assert vlm_data.image_file_name("{:012d}.jpg", "557") == "000000000557.jpg"
    assert vlm_data.image_file_name("{}.jpg", "abc") == "abc.jpg" and vlm_data.image_file_name("", "a/b.png") == "a/b.png"
    os.remove(os.path.join(folder, "images", f"{7:012d}.jpg"))
    with pytest.raises(FileNotFoundError, match="000000000007.jpg"):
        tasks.build(cfg, None).data.example(0)


def _tiny_dinov2_dir(path):
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             patch_size=8, image_size=32)).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_frozen_pretrained_decoder_and_dinov2_tower_train_only_the_fusion_params(tmp_path):
    """HF Llama decoder + HF DINOv2 tower (frozen with freeze=('',)): after two steps only the fusion blocks,
    the vision gate, the projection and the answer head have moved; the frozen weights are the checkpoints'."""
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    from test_vlm_task import _tiny_llama_dir  # pylint: disable=g-import-not-at-top
    hf = str(tmp_path / "llama")
    _tiny_llama_dir(hf, 320)
    dino = _tiny_dinov2_dir(str(tmp_path / "dinov2"))
    folder = str(tmp_path / "vivqa")
    files = _vivqa_files(folder)
    cfg = _smoke(**_vivqa_overrides(files, folder, **{
        "decoder.init_from": hf, "vision_encoder.init_from": dino, "vision_encoder.freeze": ("",),
        "data.image_size": 32,
        "optim.warmup_steps": 0}))
    task, before, moved, loss, _, _ = _steps(cfg, n=2, evaluate=False)
    assert np.isfinite(loss) and task.decoder_config.hidden_size == 64  # the checkpoint's architecture
    assert task.vision_config.variant == "dinov2" and task.vision_config.hidden_size == 32
    decoder_moved = {k for k in moved if k.startswith("decoder/")}
    assert decoder_moved and all(k.startswith("decoder/xattn_") or k == "decoder/vision_gate_logit"
                                 for k in decoder_moved), decoder_moved
    assert {"decoder/xattn_0/alpha_attn", "decoder/vision_gate_logit"} <= moved
    assert any(k.startswith("answer_head/") for k in moved) and any(k.startswith("vision_proj/") for k in moved)
    assert not any(k.startswith("vision_tower/") for k in moved)
    # The frozen parts are the checkpoints'.
    hf_w = load_file(os.path.join(hf, "model.safetensors"))
    np.testing.assert_array_equal(before["decoder/embed_tokens/embedding"], hf_w["model.embed_tokens.weight"])
    dino_w = load_file(os.path.join(dino, "model.safetensors"))
    np.testing.assert_array_equal(before["vision_tower/embeddings/class_embedding"].reshape(-1),
                                  dino_w["embeddings.cls_token"].reshape(-1))


@pytest.mark.parametrize("over,field", [
    ({"fusion.head": "classfy"}, "config.fusion.head"),
    ({"fusion.num_fusion_layers": 3}, "config.fusion.num_fusion_layers"),
    ({"fusion.num_answers": -1}, "config.fusion.num_answers"),
    ({"fusion.vision_gate_init": float("nan")}, "config.fusion.vision_gate_init"),
    ({"data.caption_fraction": 0.2}, "config.data.caption_fraction"),
    ({"data.turns": 2}, "config.data.turns"),
    ({"data.image_pattern": "x.jpg"}, "config.data.image_pattern"),
    ({"decoder.use_lora": True}, "config.decoder.use_lora"),
    ({"decoder.type": "trm"}, "config.decoder.type"),
])
def test_bad_config_values_name_the_field(over, field):
    with pytest.raises(ValueError) as e:
        tasks.build(_smoke(**over), None)
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg
