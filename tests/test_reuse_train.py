"""configs/reuse.py end to end: backbone trained in-run, resume, init_from a vlmjax workdir or an HF
CLIP directory (tiny random models saved here; nothing is downloaded)."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import load_config


def _run(config, workdir):
    from vlmjax import run as runner  # pylint: disable=g-import-not-at-top
    return runner.run(config, str(workdir))


def _final_params(workdir):
    from vlmjax.train import checkpoint  # pylint: disable=g-import-not-at-top
    return checkpoint.load_params(str(workdir))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reuse_smoke")
    summary = _run(load_config("reuse", "smoke"), workdir)
    return workdir, summary


def test_smoke_trains_backbone_then_reuse(smoke_run, capsys):
    workdir, summary = smoke_run
    # Two stages, each in its own workdir: the backbone (configs/video_cls.py) and the reuse modules.
    assert os.path.isdir(workdir / "backbone" / "checkpoints")
    assert os.path.isdir(workdir / "reuse" / "checkpoints")
    assert summary["step"] == 4 and summary["finished"]
    end = summary["eval_end"]
    for key in ("reuse_rate", "reuse/1", "reuse/2", "pooled_cos", "pooled_cos_min", "patch_cos", "sloss",
                "hloss_1", "rloss", "compute_reuse_rate", "flops_ratio"):
        assert key in end and np.isfinite(end[key]), key
    assert 0.0 <= end["reuse_rate"] <= 1.0
    # Packed execution: every clip's hard path restores exactly the tokens decided "reuse".
    assert abs(end["reuse_rate_executed"] - end["reuse_rate"]) < 1e-6
    # The ridge probe, and the backbone stage's own head (a video_cls run has one) on every frame.
    assert set(summary["probe"]) == {"acc_original", "acc_reuse", "acc_reuse_own_probe", "clip_cos",
                                     "head_acc_original", "head_acc_reuse"}
    records = [json.loads(line) for line in open(workdir / "reuse" / "metrics.jsonl")]
    train = [r for r in records if r.get("kind", "train") == "train" and "reuse_gate/1" in r]
    assert train and "tau" in train[-1] and "pooled_cos" in train[-1]
    # The backbone did not move: the reuse run's ViT params are the backbone run's.
    bb, _ = _final_params(workdir / "backbone")
    params, _ = _final_params(workdir / "reuse")
    for k in bb["vit"]:
        for a, b in zip(jax.tree.leaves(bb["vit"][k]), jax.tree.leaves(params[k])):
            np.testing.assert_array_equal(a, b)
    # Rerunning a finished experiment trains nothing, skips both stages and writes no duplicate records.
    capsys.readouterr()
    again = _run(load_config("reuse", "smoke"), workdir)
    assert again["step"] == 4 and again["eval_end"] == summary["eval_end"]
    out = capsys.readouterr().out
    assert out.count("Already finished") == 2 and "Resumed" not in out
    assert [json.loads(line) for line in open(workdir / "reuse" / "metrics.jsonl")] == records


@pytest.mark.slow  # default-suite time; init_from an HF directory stays in the default suite
def test_init_from_vlmjax_workdir(smoke_run, tmp_path):
    workdir, _ = smoke_run
    config = load_config("reuse", "smoke", init_from=str(workdir / "backbone"), total_steps=2)
    summary = _run(config, tmp_path / "w")
    assert not os.path.exists(tmp_path / "w" / "backbone")  # init_from replaces the backbone stage
    assert summary["step"] == 2
    bb, _ = _final_params(workdir / "backbone")
    params, _ = _final_params(tmp_path / "w" / "reuse")
    np.testing.assert_array_equal(bb["vit"]["layers_1"]["mlp"]["fc1"]["kernel"],
                                  params["layers_1"]["mlp"]["fc1"]["kernel"])


def test_init_from_hf_clip_two_tower(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=32, patch_size=8)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                        projection_dim=16)).eval()
    path = str(tmp_path / "clip")
    hf.save_pretrained(path)
    config = load_config("reuse", "clip_b16", init_from=path, total_steps=2, batch_size=2, log_every=1,
                         ckpt_every=2, **{"eval.max_batches": 1, "data.image_size": 32, "data.patch_size": 8,
                                          "data.num_frames": 3, "data.train_ref_order": (0, 2, 1),
                                          "data.eval_ref_order": (1, 0), "reuse.capacity_buckets": (0.5, 1.0),
                                          "data.num_threads": 0, "data.dtype": "float32",
                                          "data.prefetch_batches": 0, "probe.num_train": 8,
                                          "probe.num_eval": 4, "probe.batch_size": 4})
    summary = _run(config, tmp_path / "w")
    assert summary["step"] == 2 and np.isfinite(summary["eval_end"]["pooled_cos"])
    params, _ = _final_params(tmp_path / "w")
    want = hf.vision_model.encoder.layers[2].mlp.fc1.weight.detach().numpy().T
    np.testing.assert_allclose(params["layers_2"]["mlp"]["fc1"]["kernel"], want, atol=1e-6)
    assert "reuse_1" in params and "reuse_2" in params


def test_progressive_stacking_starts_a_deeper_backbone_from_a_shallow_one(smoke_run, tmp_path):
    """video_cls init_from a shallower video_cls run: layer i <- layer floor(i L_src / L) (Gong et al. 2019)."""
    from vlmjax import tasks  # pylint: disable=g-import-not-at-top
    workdir, _ = smoke_run
    src, _ = _final_params(workdir / "backbone")  # the smoke backbone: 3 layers
    config = load_config("video_cls", "smoke", init_from=str(workdir / "backbone"),
                         **{"model.num_hidden_layers": 7})
    task = tasks.build(config, str(tmp_path))
    abstract = jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"]
    params = task.pretrained_params(abstract, None)
    assert sorted(params["vit"]) == sorted(abstract["vit"])
    for i, j in enumerate([0, 0, 0, 1, 1, 2, 2]):  # floor(i * 3 / 7)
        for a, b in zip(jax.tree.leaves(params["vit"][f"layers_{i}"]), jax.tree.leaves(src["vit"][f"layers_{j}"])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(params["head"]["kernel"], src["head"]["kernel"])
    # Another width cannot be stacked: one clear error.
    wide = load_config("video_cls", "smoke", init_from=str(workdir / "backbone"),
                       **{"model.hidden_size": 64, "model.intermediate_size": 128})
    task = tasks.build(wide, str(tmp_path / "wide"))
    with pytest.raises(ValueError, match="stacking needs the same width"):
        task.pretrained_params(jax.eval_shape(task.init_variables, jax.random.PRNGKey(0))["params"], None)
