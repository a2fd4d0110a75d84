"""VQA diagnostics (``vlmjax.diagnostics``, ``python -m vlmjax.diagnose``): every number against hand-made
models whose behaviour is known, the report files, the Task hook, and one end-to-end run (the vlm
smoke experiment trained with ``diagnose_at_end``, then diagnosed again through the CLI)."""

import dataclasses
import json
import math
import os
import sys
import types

import numpy as np
import pytest
from conftest import load_config, run_module

from vlmjax import diagnostics, errors
from vlmjax.diagnostics import gates, metrics, report

# ------------------------------------------------------------------------------------------------
# A hand-made VQA set: 6 pictures (red, green, blue, red, green, blue; each with a pixel marking its
# number, so no two are identical), two questions about each: its colour (COLOR) and "how many
# things?" (COUNT, always 'two'). Batches of 5 like a task's eval batches: the last one padded with
# copies of the last row, mask 0.
# ------------------------------------------------------------------------------------------------

RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
VOCAB = ("red", "green", "blue", "grey", "two", "")
BLANK = np.full((4, 4, 3), 0.5, np.float32)


def _examples(n_images=6):
    out = []
    for g in range(n_images):
        colour = ("red", "green", "blue")[g % 3]
        image = np.tile(np.asarray(RGB[colour], np.float32), (4, 4, 1))
        image[0, 0, :] = 0.01 * (g + 1)  # distinct pictures, same colour every third one
        out.append({"image": image, "qtype": "COLOR", "question": "What colour is it?", "answer": colour})
        out.append({"image": image, "qtype": "COUNT", "question": "how many things?", "answer": "two"})
    return out


def _batches(examples, size=5):
    batches = []
    for start in range(0, len(examples), size):
        idx = list(range(start, min(start + size, len(examples))))
        mask = [1] * len(idx) + [0] * (size - len(idx))
        idx += [idx[-1]] * (size - len(idx))
        batches.append({"image": np.stack([examples[i]["image"] for i in idx]),
                        "qid": np.asarray([examples[i]["qtype"] == "COUNT" for i in idx], np.int32),
                        "index": np.asarray(idx, np.int32), "mask": np.asarray(mask, np.int32)})
    return batches


def _sees_colour(image):
    mean = image[1:, 1:].reshape(-1, 3).mean(0)  # the marker pixel left out
    return "grey" if mean.max() - mean.min() < 0.1 else ("red", "green", "blue")[int(np.argmax(mean))]


MODELS = {
    # answers from the text alone: the most frequent training answer of each type
    "ignores_image": lambda image, qid: "two" if qid else "red",
    # reads the colour off the picture
    "reads_colour": lambda image, qid: "two" if qid else _sees_colour(image),
}


def _evaluate(model):
    """batches -> outputs combined as Trainer.eval_outputs combines them (per-example arrays concatenated)."""
    def evaluate(batches):
        cols = {"pred": [], "index": [], "mask": []}
        for b in batches:
            cols["pred"].append([VOCAB.index(model(im, q)) for im, q in zip(b["image"], b["qid"])])
            cols["index"].append(b["index"])
            cols["mask"].append(b["mask"])
        return {k: np.concatenate(v) for k, v in cols.items()}
    return evaluate


TRAIN = ([{"qtype": "COLOR", "question": "what colour is the thing?", "answer": a}
          for a in ("red", "red", "red", "green", "green", "blue")]
         + [{"qtype": "COUNT", "question": "how many things?", "answer": "two"}] * 3)


def _probe(examples, **over):
    def rows(outputs):
        keep = outputs["mask"] > 0
        cols = {k: [] for k in diagnostics.vqa.ROW_FIELDS}
        for i, p in zip(outputs["index"][keep], outputs["pred"][keep]):
            ex = examples[int(i)]
            for k, v in (("index", int(i)), ("qtype", ex["qtype"]), ("question", ex["question"]),
                         ("answer", ex["answer"]), ("prediction", VOCAB[p]), ("correct", VOCAB[p] == ex["answer"])):
                cols[k].append(v)
        return cols
    return diagnostics.VQAProbe(rows=rows, train_examples=TRAIN, blank_image=BLANK, qtypes=("COLOR", "COUNT"),
                                **over)


def _diagnose(model, **kw):
    examples = _examples()
    return diagnostics.diagnose(_probe(examples), _batches(examples), _evaluate(MODELS[model]), **kw)


def test_a_model_that_ignores_the_image_has_no_drop_and_matches_the_bias_baseline():
    r = _diagnose("ignores_image")
    assert r["num_questions"] == 12 and r["counts"] == {"overall": 12, "COLOR": 6, "COUNT": 6}
    assert set(r["accuracy"]) == {"real", "shuffled", "blank"}
    for mode in ("shuffled", "blank"):
        assert r["vision_drop"][mode] == {"overall": 0.0, "COLOR": 0.0, "COUNT": 0.0}
        assert r["answer_changed"][mode] == 0.0
    # It answers each type's most frequent training answer: exactly the type-prior baseline.
    assert r["accuracy"]["real"] == r["dataset_bias"]["type_prior"] == {"overall": 8 / 12, "COLOR": 2 / 6, "COUNT": 1.0}
    assert r["text_only"]["blank_images"] == r["accuracy"]["real"]
    assert r["headline"]["text_only_accuracy"] == r["headline"]["dataset_bias"] == 8 / 12


def test_a_model_that_reads_the_image_loses_exactly_its_colour_answers():
    r = _diagnose("reads_colour")
    assert r["accuracy"]["real"] == {"overall": 1.0, "COLOR": 1.0, "COUNT": 1.0}
    # Shuffled: every picture is replaced by the next distinct one, of another colour; blank: grey.
    for mode in ("shuffled", "blank"):
        assert r["accuracy"][mode] == {"overall": 0.5, "COLOR": 0.0, "COUNT": 1.0}
        assert r["vision_drop"][mode] == {"overall": 0.5, "COLOR": 1.0, "COUNT": 0.0}
        assert r["answer_changed"][mode] == 0.5
    assert r["headline"]["vision_dependency_drop"] == 0.5 and r["images"] == {"examples": 12, "distinct": 6}


def test_shuffled_images_are_a_derangement_of_the_distinct_pictures():
    examples = _examples()
    batches = _batches(examples)
    modes = diagnostics.ImageModes(batches, "image", BLANK)
    assert modes.num_images == 6 and modes.can_shuffle
    shuffled = list(modes("shuffled"))
    for b, (real, shuf) in enumerate(zip(batches, shuffled)):
        for r in range(len(real["mask"])):
            if real["mask"][r]:
                assert not np.array_equal(shuf["image"][r], real["image"][r])  # never its own picture
            else:
                np.testing.assert_array_equal(shuf["image"][r], real["image"][r])  # padding untouched
        np.testing.assert_array_equal(shuf["index"], real["index"])  # every other field unchanged
        assert all((x["image"] == BLANK).all() for x in [list(modes("blank"))[b]])
    # Both questions about one picture get the same other picture; all 6 pictures are still used.
    flat = np.concatenate([s["image"][s["mask"] > 0] for s in shuffled])
    assert all(np.array_equal(flat[i], flat[i + 1]) for i in range(0, 12, 2))
    assert len(metrics.image_groups(list(flat))) == 12 and metrics.image_groups(list(flat)).max() == 5
    np.testing.assert_array_equal(metrics.derangement(np.array([0, 0, 1, 2, 2])), [2, 2, 3, 0, 0])
    assert metrics.derangement(np.array([0, 0])) is None
    one = [{**e, "image": BLANK} for e in examples]  # a single picture: no shuffled mode, said so
    r = diagnostics.diagnose(_probe(one), _batches(one), _evaluate(MODELS["reads_colour"]))
    assert "shuffled" not in r["accuracy"] and r["headline"]["vision_dependency_drop"] is None
    assert any("1 distinct image" in n for n in r["notes"])


def test_prefix_baseline_on_hand_made_questions():
    train = ([{"qtype": "WHAT", "question": "is there a cube?", "answer": "yes"}] * 3
             + [{"qtype": "WHAT", "question": "What colour is it?", "answer": "Red."}] * 2
             + [{"qtype": "WHAT", "question": "what shape is it?", "answer": "cube"}])
    rows = {"qtype": ["WHAT", "WHAT", "WHAT", "WHAT", "OTHER"],
            "question": ["Is there a ball?", "what colour is the sky?", "what shape is that?", "where is the cube?",
                         "how big?"],
            "answer": ["yes", "red", "ball", "yes", "big"]}
    norm = lambda s: s.lower().strip().rstrip(".?")  # noqa: E731
    type_prior, prefix_prior = metrics.answer_priors(train, norm)
    assert type_prior == {"WHAT": "yes"}
    assert prefix_prior == {("WHAT", "is there a"): "yes", ("WHAT", "what colour is"): "red",
                            ("WHAT", "what shape is"): "cube"}
    # 'where is the' was never seen: the type's answer; type 'OTHER' was never seen: '' (wrong).
    assert metrics.bias_predictions(rows, type_prior, prefix_prior, norm) == (
        ["yes", "yes", "yes", "yes", ""], ["yes", "red", "cube", "yes", ""])
    b = metrics.bias_baselines(train, rows, norm, types=("WHAT", "OTHER"))
    assert b["type_prior"] == {"overall": 2 / 5, "WHAT": 2 / 4, "OTHER": 0.0}
    assert b["prefix_prior"] == {"overall": 3 / 5, "WHAT": 3 / 4, "OTHER": 0.0}
    assert b["train_questions"] == 6 and b["prefixes"] == 3
    assert metrics.most_frequent(["b", "a", "B"]) == "b" and metrics.most_frequent(["b", "a"]) == "a"
    assert metrics.question_prefix("  What   COLOUR is the cube?") == "what colour is"


def test_feature_diversity():
    assert metrics.feature_diversity(np.tile([[1.0, 2.0, 3.0]], (5, 1))) == pytest.approx(0.0, abs=1e-12)
    assert metrics.feature_diversity(3 * np.eye(4)) == pytest.approx(1.0)
    assert metrics.feature_diversity(np.array([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(2.0)
    f = np.random.default_rng(0).normal(size=(7, 5))
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    cos = u @ u.T
    assert metrics.feature_diversity(f) == pytest.approx(1 - cos[~np.eye(7, dtype=bool)].mean())
    assert math.isnan(metrics.feature_diversity(np.ones((1, 3))))
    # Through diagnose: one feature row per distinct picture (not per question).
    r = _diagnose("ignores_image", features=lambda b: np.eye(3)[(b["image"][:, 1, 1] > 0.5).argmax(-1)])
    assert r["feature_diversity"]["images"] == 6 and r["feature_diversity"]["dim"] == 3
    assert r["feature_diversity"]["value"] == pytest.approx(1 - (6 * 1 / 30))  # 6 same-colour ordered pairs of 30


def test_gate_stats_from_a_hand_built_params_tree():
    params = {
        "decoder": {"xattn_0": {"alpha_attn": np.zeros(()), "alpha_ffn": np.array([0.5, -0.5])},
                    "xattn_1": {"alpha_attn": np.array(2.0)},
                    "layers_0": {"mlp": {"gate_proj": {"kernel": np.ones((2, 2))}}, "alpha": np.array(1.0)}},
        "fusion": {"layers": {"attn_gate": np.array([[0.1], [0.2], [0.3]])}},  # scanned: [L=3, 1]
        "vision_gate_logit": np.array(1.5),
    }
    stats = gates.gate_stats(params)
    assert list(stats) == ["decoder/layers_0/alpha", "decoder/xattn_0/alpha_attn", "decoder/xattn_0/alpha_ffn",
                           "decoder/xattn_1/alpha_attn", "fusion/layers/attn_gate[0]", "fusion/layers/attn_gate[1]",
                           "fusion/layers/attn_gate[2]", "vision_gate_logit"]
    assert stats["decoder/xattn_0/alpha_attn"] == {"kind": "tanh", "mean": 0.0, "min": 0.0, "max": 0.0, "size": 1}
    ffn = stats["decoder/xattn_0/alpha_ffn"]
    assert ffn["mean"] == pytest.approx(0.0) and ffn["max"] == pytest.approx(math.tanh(0.5)) and ffn["min"] == -ffn["max"]
    assert stats["fusion/layers/attn_gate[2]"]["mean"] == pytest.approx(math.tanh(0.3))
    assert stats["vision_gate_logit"]["kind"] == "sigmoid"
    assert stats["vision_gate_logit"]["mean"] == pytest.approx(1 / (1 + math.exp(-1.5)))
    summary = gates.summarize(stats)
    assert summary["sigmoid"]["gates"] == 1 and summary["tanh"]["gates"] == 7
    assert summary["tanh"]["max"] == pytest.approx(math.tanh(2.0)) and summary["tanh"]["min"] == pytest.approx(-math.tanh(0.5))
    assert gates.find_gates(params) == {k.split("[")[0]: v["kind"] for k, v in stats.items()}
    later = {"vision_gate_logit": np.array(0.0)}
    traj = gates.trajectory([(10, later), (0, params)])
    assert traj["vision_gate_logit"][0][0] == 0 and traj["vision_gate_logit"][1] == [10, 0.5, 0.5, 0.5]
    logged = gates.metric_trajectory([{"step": 5, "fusion/gate_0": 0.25, "loss": 1.0}, {"step": 2, "fusion/gate_0": 0.1}])
    assert logged == {"fusion/gate_0": [[2, 0.1, 0.1, 0.1], [5, 0.25, 0.25, 0.25]]}
    # Through diagnose: the final values and a given trajectory land in the report.
    r = _diagnose("ignores_image", params=params, trajectory=traj, trajectory_source="checkpoints")
    assert r["gates"]["final"]["vision_gate_logit"]["mean"] == pytest.approx(stats["vision_gate_logit"]["mean"])
    assert r["headline"]["vision_gate_mean"] == pytest.approx(stats["vision_gate_logit"]["mean"])
    assert r["gates"]["trajectory"]["vision_gate_logit"][1] == [10, 0.5, 0.5, 0.5]


def test_report_json_round_trips_the_table_prints_and_plots_are_optional(tmp_path, capsys, monkeypatch):
    r = _diagnose("reads_colour", params={"vision_gate_logit": np.array(0.0)},
                  trajectory={"vision_gate_logit": [[0, 0.5, 0.5, 0.5], [4, 0.6, 0.6, 0.6]]},
                  trajectory_source="checkpoints", meta={"workdir": "/w", "step": 4, "split": "val"})
    written = report.write(r, tmp_path)
    assert report.read_json(tmp_path) == r == json.loads((tmp_path / "diagnostics.json").read_text())
    table = report.format_table(r)
    lines = table.splitlines()
    assert lines[0] == "VQA diagnostics: /w, step 4, split val, 12 questions"
    assert next(line for line in lines if line.split()[0] == "overall").split() == ["overall", "12", "100.0", "50.0", "50.0", "+50.0", "+50.0", "66.7", "66.7"]
    assert "vision_gate_logit" in table and "trajectory (checkpoints): 2 step(s) 0..4" in table
    try:  # matplotlib is the optional [bench] extra
        import matplotlib  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
        assert sorted(os.path.basename(p) for p in written["plots"]) == ["accuracy_by_type.png", "gate_trajectories.png"]
        assert all(os.path.getsize(p) > 1000 for p in written["plots"])
    except ImportError:
        assert written["plots"] == []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    capsys.readouterr()
    assert report.plot(r, tmp_path / "none") == []
    assert capsys.readouterr().out.strip() == ("(no diagnostics plots: matplotlib is not installed; "
                                               "pip install -e '.[bench]')")


def test_tasks_without_the_hook_fail_in_one_line(tmp_path):
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    from vlmjax.train.task import Task  # pylint: disable=g-import-not-at-top
    assert tasks.task_class("vlm").has_vqa_probe() and not tasks.task_class("lm").has_vqa_probe()
    with pytest.raises(errors.UserError, match=r"config.task='lm' \(LMTask\) has no VQA diagnostics"):
        Task.vqa_probe(type("LMTask", (), {"config": types.SimpleNamespace(task="lm")})())
    with pytest.raises(errors.UserError, match="config.diagnose_at_end=True, but config.task='lm'"):
        runner.run(load_config("lm", "smoke", diagnose_at_end=True), str(tmp_path / "lm"))
    assert not (tmp_path / "lm").exists()  # refused before anything ran
    # A workdir with a run that did not finish, and one with no run at all.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(load_config("lm", "smoke").to_json_best_effort())
    with pytest.raises(errors.UserError, match=r"is not finished \(no checkpoint yet\).*python -m vlmjax.main"):
        runner.saved_run(str(unfinished))
    with pytest.raises(errors.UserError, match="no vlmjax run"):
        runner.saved_run(str(tmp_path))


def test_cli_error_for_a_workdir_without_a_run_is_one_line(tmp_path):
    p = run_module(["-m", "vlmjax.diagnose", f"--workdir={tmp_path}"], timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and lines, p.stderr[-2000:]
    assert lines[-1].startswith("vlmjax: error: --workdir=") and "python -m vlmjax.main --config=" in lines[-1]
    assert "Traceback" not in p.stderr and "looks like a bug" not in lines[-1]


# ------------------------------------------------------------------------------------------------
# End to end: configs/trm_vlm_qa.py:smoke (decoder stage + VLM), trained once for this module.
# ------------------------------------------------------------------------------------------------

KEYS = {"workdir", "task", "step", "split", "num_questions", "qtypes", "counts", "accuracy", "vision_drop",
        "answer_changed", "text_only", "dataset_bias", "feature_diversity", "gates", "images", "headline", "notes"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top
    wd = str(tmp_path_factory.mktemp("vlm_diag"))
    summary = runner.run(load_config("trm_vlm_qa", "smoke", ckpt_every=2, diagnose_at_end=True), wd)
    assert summary["finished"]
    return wd, summary


def test_smoke_run_is_diagnosed_at_the_end_and_by_the_cli(smoke_run, tmp_path, capsys):
    from vlmjax import diagnose  # pylint: disable=g-import-not-at-top
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top
    from vlmjax.train.metrics import read_json  # pylint: disable=g-import-not-at-top
    wd, summary = smoke_run
    at_end = report.read_json(os.path.join(wd, "diagnostics"))
    assert KEYS <= set(at_end) and at_end["task"] == "vlm" and at_end["step"] == 4
    end = summary["eval_end"]
    # The real-image accuracy is the run's own final eval; the type prior is its answer-prior baseline.
    assert at_end["accuracy"]["real"]["overall"] == pytest.approx(end["vqa_accuracy"])
    assert at_end["dataset_bias"]["type_prior"]["overall"] == pytest.approx(end["prior_accuracy"])
    for t in at_end["qtypes"]:
        assert at_end["dataset_bias"]["type_prior"][t] == pytest.approx(end[f"prior_accuracy/{t}"])
    # The question-only baseline is the text-only decoder stage's final eval, on the same data.
    stage_end = read_json(os.path.join(wd, "decoder", "summary.json"))["eval_end"]
    q_only = at_end["text_only"]["question_only"]
    assert q_only["overall"] == pytest.approx(stage_end["vqa_accuracy"]) and q_only["same_data"]
    assert q_only["source"] == os.path.join(wd, "decoder")
    assert at_end["images"]["distinct"] == 8 and at_end["feature_diversity"]["images"] == 8  # 8 eval scenes
    assert 0.0 <= at_end["feature_diversity"]["value"] <= 2.0 and at_end["feature_diversity"]["dim"] == 32
    assert at_end["num_questions"] == at_end["counts"]["overall"] == 16
    assert set(at_end["accuracy"]) == {"real", "shuffled", "blank"} and at_end["gates"]["final"] == {}
    # Rerunning the finished, diagnosed experiment does nothing.
    capsys.readouterr()
    runner.run(load_config("trm_vlm_qa", "smoke", ckpt_every=2, diagnose_at_end=True), wd)
    assert "VQA diagnostics" not in capsys.readouterr().out
    # The CLI (in-process) on the experiment's WORKDIR writes the same report where --out says.
    out = str(tmp_path / "out")
    diagnose.cli(["diagnose", f"--workdir={wd}", f"--out={out}"])
    printed = capsys.readouterr().out
    assert f"VQA diagnostics: {os.path.join(wd, 'vlm')}, step 4, split val, 16 questions" in printed
    assert "drop:shuf" in printed and f"diagnostics: {os.path.join(out, 'diagnostics.json')}" in printed
    again = report.read_json(out)
    assert {k: again[k] for k in KEYS - {"notes"}} == {k: at_end[k] for k in KEYS - {"notes"}}


def test_gate_trajectory_is_read_from_every_checkpoint(smoke_run, monkeypatch, capsys):
    """The smoke VLM has no gates: name one of its params a sigmoid gate, and the diagnostics read it
    from each kept checkpoint (steps 2 and 4) alone."""
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top
    from vlmjax.tasks import vlm  # pylint: disable=g-import-not-at-top
    from vlmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
    wd, _ = smoke_run
    probe = vlm.VLMTask.vqa_probe
    monkeypatch.setattr(vlm.VLMTask, "vqa_probe", lambda self: dataclasses.replace(
        probe(self), gate_patterns=((r"^vision_token_norm/bias$", "sigmoid"),)))
    r = runner.diagnose_workdir(wd, None)
    assert checkpoint.checkpoint_steps(os.path.join(wd, "vlm")) == [2, 4]
    assert list(r["gates"]["final"]) == ["vision_token_norm/bias"]
    traj = r["gates"]["trajectory"]["vision_token_norm/bias"]
    assert r["gates"]["trajectory_source"] == "checkpoints" and [p[0] for p in traj] == [2, 4]
    assert traj[-1][1:] == pytest.approx([r["gates"]["final"]["vision_token_norm/bias"][k] for k in ("mean", "min", "max")])
    assert traj[0][1:] != traj[1][1:]  # the bias moved between the two checkpoints
    assert "gates: sigmoid mean" in capsys.readouterr().out


def test_vlm_blank_image_is_mid_grey_through_the_data_preprocessing():
    from vlmjax.data import vlm_data  # pylint: disable=g-import-not-at-top
    data = vlm_data.build_vlm_data(load_config("trm_vlm_qa", "smoke").data)
    blank = data.blank_image()
    assert blank.shape == (48, 48, 3) and blank.dtype == np.float32
    want = (128 / 255 - np.asarray(data.mean, np.float32)) / np.asarray(data.std, np.float32)
    np.testing.assert_allclose(blank, np.broadcast_to(want, blank.shape), rtol=1e-6)
    assert data.example(0, "eval")["image"].shape == blank.shape  # the layout of a real image
    assert data.train_vqa and {"qtype", "question", "answer"} == set(data.train_vqa[0])
    assert data.answer_prior == metrics.answer_priors(data.train_vqa, vlm_data.normalize_answer)[0]
