"""The foveated task wired as configs/foveated.py:paper wires it (DINOv3 encoder + Llama LLM from
Hugging Face directories, AutoencoderKL latents, the deep query), end to end on CPU with tiny random
checkpoints: the smoke run trains, evaluates and draws attention.png; at step 0 the trainer's params
are the checkpoints' tensors, and the model's encoder / LLM compute what transformers computes; a
pickle-only or missing checkpoint directory is refused with one line naming the config field.

Nothing is downloaded: every checkpoint is a tiny random model saved to a tmp dir."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import load_config

from vlmjax import convert
from vlmjax import run as runner
from vlmjax import sharding as shd
from vlmjax import tasks
from vlmjax import tree
from vlmjax.train import trainer as trainer_lib

diffusers = pytest.importorskip("diffusers")

SIZE, PATCH = 32, 8  # the tiny DINOv3's image and patch size; the data's too
PATCH_KERNEL = "embeddings/patch_embedding/kernel"
DINOV3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH,
              num_register_tokens=2, image_size=SIZE, layerscale_value=0.5)
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)


def _randomize(model, seed):
    """Weights far from the HF init (std 0.02 makes near-uniform attention and near-zero features), so
    a wrong mapping or transpose shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ("norm" in name and name.endswith("weight")) or name.endswith("lambda1"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"encoder", "decoder", "vae": directory} plus the torch encoder and LLM."""
    root = tmp_path_factory.mktemp("fov_ckpts")
    torch.manual_seed(0)
    enc = _randomize(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**DINOV3)), 1).eval()
    enc.save_pretrained(root / "dinov3")  # transformers 5 writes safetensors only
    llm = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), 2).eval()
    llm.save_pretrained(root / "llama")
    # 4 blocks: downsample 2 ** 3 = 8 (config.latents.downsample's default), 4 latent channels.
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    vae.save_pretrained(root / "vae", safe_serialization=True)
    dirs = {"encoder": str(root / "dinov3"), "decoder": str(root / "llama"), "vae": str(root / "vae")}
    for d in dirs.values():
        assert any(f.endswith(".safetensors") for f in os.listdir(d)), os.listdir(d)
    return dirs, enc, llm


def _config(dirs, **overrides):
    over = {"encoder.init_from": dirs["encoder"], "decoder.init_from": dirs["decoder"], "latents.encoder": "vae",
            "latents.vae_path": dirs["vae"], "latents.downsample": 8, "foveated.query_mode": "deep",
            "data.image_size": SIZE, "data.patch_size": PATCH}
    over.update(overrides)
    return load_config("foveated", "smoke", **over)


@pytest.fixture(scope="module")
def paper_run(checkpoints, tmp_path_factory):
    dirs = checkpoints[0]
    workdir = str(tmp_path_factory.mktemp("fov_pretrained"))
    return workdir, runner.run(_config(dirs), workdir)


@pytest.mark.slow  # ~25 s on 2 cores; the wiring is covered by the step-0 tests below in the default suite
def test_pretrained_smoke_run_trains_evaluates_and_draws(paper_run):
    workdir, s = paper_run
    assert s["finished"] and s["step"] == 4
    for when in ("eval_start", "eval_end"):
        m = s[when]
        for key in ("loss_fine", "loss_coarse", "ratio", "ratio_static", "ratio_shuffled", "loss_copy_last",
                    "motion_attention_coarse", "motion_attention_fine"):
            assert key in m and np.isfinite(m[key]), (when, key)
        assert m["loss_coarse"] > 0
        # Pass 2 with the static query is pass 1 exactly.
        np.testing.assert_allclose(m["ratio_static"], 1.0, rtol=1e-5)
    # Step 0: the zero-initialised query head makes pass 2 read what pass 1 read.
    np.testing.assert_allclose(s["eval_start"]["ratio"], 1.0, rtol=1e-5)
    assert np.isfinite(s["last_train"]["loss"])
    assert os.path.getsize(os.path.join(workdir, "attention.png")) > 0
    cache = os.path.join(workdir, "latent_cache")
    assert any(f.endswith(".npy") for f in os.listdir(cache))


@pytest.fixture(scope="module")
def step0(checkpoints, tmp_path_factory):
    """(task, step-0 params) built the way the run builds them (pretrained_params -> Trainer.init)."""
    dirs = checkpoints[0]
    cfg = _config(dirs, **{"latents.cache_dir": str(tmp_path_factory.mktemp("fov_latent_cache"))})
    task = tasks.build(cfg, None)
    tr = trainer_lib.Trainer(cfg, task, shd.make_mesh(cfg.mesh))
    loaded = task.pretrained_params(tr.abstract_state.params, tr.state_shardings.params)
    assert set(loaded) == {"encoder", "llm"}
    state = tr.init(loaded)
    return task, jax.device_get(state.params)


def test_step0_params_are_the_checkpoints(checkpoints, step0):
    dirs = checkpoints[0]
    _, params = step0
    _, enc_ref = convert.load_hf(dirs["encoder"])
    got, want = tree.flatten(params["encoder"]), tree.flatten(jax.device_get(enc_ref))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"encoder/{k}")
    # Every LLM tensor but the vocabulary matrices (the LLM reads frame features, never token ids).
    _, llm_ref = convert.load_hf(dirs["decoder"])
    want = {k: v for k, v in tree.flatten(jax.device_get(llm_ref)).items()
            if not k.startswith(("embed_tokens/", "lm_head/"))}
    got = tree.flatten(params["llm"])
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"llm/{k}")
    # Spot checks against the torch tensors themselves (nn.Linear [out, in] -> kernel [in, heads, head_dim]).
    _, enc, llm = checkpoints
    sd = llm.state_dict()
    q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(params["llm"]["layers_1"]["self_attn"]["q_proj"]["kernel"].reshape(32, 32), q.T)
    patch = enc.state_dict()["embeddings.patch_embeddings.weight"].numpy()  # [D, 3, p, p]
    kernel = np.asarray(tree.flatten(params["encoder"])[PATCH_KERNEL])
    np.testing.assert_array_equal(kernel, patch.transpose(2, 3, 1, 0))


def test_step0_encoder_and_llm_match_transformers(checkpoints, step0):
    """The model's own encoder (the deep query's patch cache, DINOv3 RoPE) and LLM backbone, with the
    step-0 params, against transformers on random inputs."""
    _, enc, llm = checkpoints
    task, params = step0
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = enc(torch.tensor(x)).last_hidden_state.numpy()
    cache = task.model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                             method=lambda m, f: m.encoder.patch_cache(f))
    assert ref.shape == (2, 1 + 2 + (SIZE // PATCH) ** 2, 32)
    np.testing.assert_allclose(cache["outputs"]["last_hidden_state"], ref, atol=1e-4, rtol=1e-4)
    assert len(cache["k"]) == DINOV3["num_hidden_layers"]

    e = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    with torch.no_grad():
        ref = llm.model(inputs_embeds=torch.tensor(e)).last_hidden_state.numpy()
    hidden, _ = task.model.apply({"params": params}, jnp.asarray(e), method=lambda m, h: m.llm.backbone(h))
    np.testing.assert_allclose(hidden, ref, atol=1e-4, rtol=1e-4)


def _pickle_only(src, dst):
    """A copy of ``src`` with its weights as pytorch_model.bin (no safetensors)."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    model = transformers.AutoModel.from_pretrained(src)
    torch.save(model.state_dict(), os.path.join(dst, "pytorch_model.bin"))
    return str(dst)


@pytest.mark.parametrize("field", ["encoder", "decoder"])
def test_pickle_only_or_missing_checkpoint_names_the_field(field, checkpoints, tmp_path):
    dirs = checkpoints[0]
    bad = _pickle_only(dirs[field], tmp_path / "pickled")
    with pytest.raises(ValueError, match=rf"config\.{field}\.init_from=.*pytorch_model\.bin") as e:
        tasks.build(_config(dict(dirs, **{field: bad})), str(tmp_path / "wd"))
    assert "\n" not in str(e.value)
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match=rf"config\.{field}\.init_from=.*no_such_dir") as e:
        tasks.build(_config(dict(dirs, **{field: missing})), str(tmp_path / "wd"))
    assert "\n" not in str(e.value)
