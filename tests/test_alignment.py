"""The alignment task (configs/pixmo_alignment.py, configs/perceiver_mrl_alignment.py): both profiles
train end to end, resume exactly, freeze towers by regex, load real (tiny random) HF towers, and the
retrieval evaluation reorders and unpads the gathered embeddings correctly."""

import os

import jax
import numpy as np
import pytest
from conftest import load_config

from vlmjax import run as runner
from vlmjax import tasks
from vlmjax import tree
from vlmjax.train.metrics import read_metrics


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


# The Perceiver profile's own end-to-end run is slow-only: its path trains in the default suite through
# test_frozen_vision_tower_and_perceiver_lr_group, and the resume machinery is the same.
@pytest.mark.parametrize("name", ["pixmo_alignment",
                                  pytest.param("perceiver_mrl_alignment", marks=pytest.mark.slow)])
def test_smoke_profiles_train_evaluate_and_resume_exactly(name, tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    over = {"log_every": 1, "ckpt_every": 2}
    s = runner.run(load_config(name, "smoke", **over), full)
    assert s["finished"] and s["step"] == 4
    dims = (32, 16, 8)
    for d in dims:  # every MRL dim evaluated, both directions, at start and end
        for key in (f"i2t_R@1@{d}", f"t2i_R@10@{d}"):
            assert 0.0 <= s["eval_end"][key] <= 1.0
    assert s["eval_end"]["pairs"] == 16
    out = capsys.readouterr().out
    assert "retrieval on 16 held-out pairs" in out and "dim   bytes" in out
    try:  # the plot needs the optional matplotlib ([bench]); without it the run says so
        import matplotlib  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
        assert os.path.exists(os.path.join(full, "retrieval.png"))
    except ImportError:
        assert "no retrieval.png: matplotlib is not installed" in out
        assert not os.path.exists(os.path.join(full, "retrieval.png"))
    # Preempted after step 2 and resumed: the same losses (data iterator, RNG and MRL draws restored).
    assert not runner.run(load_config(name, "smoke", stop_after=2, **over), part)["finished"]
    runner.run(load_config(name, "smoke", **over), part)
    a, b = _train_losses(full), _train_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[i] for i in a], [b[i] for i in a], rtol=1e-5)
    if name == "perceiver_mrl_alignment":  # smoke samples one MRL dim per step and says which
        train = read_metrics(full, "train")
        assert {r["mrl_dim"] for r in train} <= set(dims) and all("loss_sampled" in r for r in train)


def test_frozen_vision_tower_and_perceiver_lr_group(tmp_path):
    cfg = load_config("perceiver_mrl_alignment", "smoke", **{"vision_encoder.freeze": ("",),
                                                             "vision_encoder.perceiver_lr_mult": 5.0})
    task = tasks.build(cfg, None)
    optim = task.optimizer_config(cfg.optim)
    assert optim.frozen == ("^vision_tower/.*(?:)",) and optim.lr_groups[0] == ("^vision_resampler/", 5.0)
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    mesh = shd.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, task, mesh)
    state = trainer.init()
    before = tree.flatten(jax.device_get(state.params))
    batch = trainer.put(next(iter(task.train_dataset(global_batch_size=8, seed=0, process_index=0,
                                                     process_count=1))))
    for _ in range(2):  # the first step's lr is 0 (warmup)
        state, _ = trainer.train_step(state, batch)
    after = tree.flatten(jax.device_get(state.params))
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert not {k for k in moved if k.startswith("vision_tower/")}
    assert {k for k in moved if k.startswith("vision_resampler/")} and {k for k in moved if k.startswith("text_tower/")}


def test_finalize_eval_reorders_and_drops_padding():
    """Rows arrive in any order with eval padding; retrieval is on real rows in index order."""
    cfg = load_config("pixmo_alignment", "smoke")
    task = tasks.build(cfg, None)
    rng = np.random.default_rng(0)
    n, pad = 6, 2
    base = rng.normal(size=(n, 32)).astype(np.float32)
    outputs = {"mask": np.r_[np.ones(n), np.zeros(pad)].astype(np.float32),
               "index": np.r_[np.arange(n)[::-1], [0, 0]].astype(np.int32)}
    for m in task.dims:
        img = base[:, :m] / np.linalg.norm(base[:, :m], axis=1, keepdims=True)
        txt = img.copy()
        txt[[0, 1]] = txt[[1, 0]]  # texts of items 0 and 1 swapped: both directions miss them at R@1
        outputs[f"img_{m}"] = np.r_[img[::-1], np.ones((pad, m))]  # padded rows would match everything
        outputs[f"txt_{m}"] = np.r_[txt[::-1], np.ones((pad, m))]
    metrics = task.finalize_eval(outputs)
    assert metrics["pairs"] == n
    for m in task.dims:
        assert metrics[f"i2t_R@1@{m}"] == pytest.approx(4 / 6) and metrics[f"t2i_R@1@{m}"] == pytest.approx(4 / 6)
        assert metrics[f"i2t_R@5@{m}"] == 1.0


def _tiny_clip_dir(path, vocab):
    """A random CLIPModel (both towers) with a word-level tokenizer over ``vocab`` saved next to it."""
    import torch  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # pylint: disable=g-import-not-at-top
    words = ["[PAD]", "[UNK]", "[BOS]"] + sorted(vocab) + ["[EOS]"]
    ids = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=ids["[EOS]"],
                         bos_token_id=ids["[BOS]"], pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(path, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    return CLIPModel.from_pretrained(path)


def test_real_towers_load_from_a_two_tower_checkpoint(tmp_path):
    """``:pretrained`` with a (tiny, random) CLIP two-tower directory for both towers: the task takes the
    tokenizer from it, loads both towers' weights, keeps the vision tower frozen, and trains."""
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax.data import scenes  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    hf_dir = str(tmp_path / "clip")
    hf = _tiny_clip_dir(hf_dir, scenes.vocabulary(scenes.default_config()))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    cfg = load_config("pixmo_alignment", "pretrained", **{
        "vision_encoder.init_from": hf_dir, "text_encoder.init_from": hf_dir, "data.image_size": 32,
        "data.max_text_len": 32, "data.num_eval": 16, "data.num_threads": 0, "data.prefetch_batches": 0,
        "model.embed_dim": 32, "model.mrl_dimensions": (32, 16), "vision_encoder.pool_heads": 2,
        "total_steps": 2, "batch_size": 8, "optim.warmup_steps": 1})
    task = tasks.build(cfg, None)
    assert task.data.vocab_size == sd["text_model.embeddings.token_embedding.weight"].shape[0]
    trainer = Trainer(cfg, task, shd.make_mesh(cfg.mesh))
    state = trainer.init(task.pretrained_params(trainer.abstract_state.params, trainer.state_shardings.params))
    patch_hf = np.transpose(sd["vision_model.embeddings.patch_embedding.weight"], (2, 3, 1, 0))
    params = tree.flatten(jax.device_get(state.params))
    np.testing.assert_allclose(params["text_tower/token_embedding/embedding"],
                               sd["text_model.embeddings.token_embedding.weight"], rtol=1e-6)
    np.testing.assert_allclose(params["vision_tower/embeddings/patch_embedding/kernel"].reshape(-1),
                               patch_hf.reshape(-1), rtol=1e-6)
    batch = trainer.put(next(iter(task.train_dataset(global_batch_size=8, seed=0, process_index=0,
                                                     process_count=1))))
    for _ in range(2):  # the first step's lr is 0 (warmup)
        state, metrics = trainer.train_step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    after = tree.flatten(jax.device_get(state.params))
    np.testing.assert_array_equal(after["vision_tower/embeddings/patch_embedding/kernel"],
                                  params["vision_tower/embeddings/patch_embedding/kernel"])  # frozen
    assert not np.array_equal(after["text_tower/token_embedding/embedding"],
                              params["text_tower/token_embedding/embedding"])
