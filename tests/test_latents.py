"""vlmjax.data.latents: the pixel and VAE latent encoders, the latent cache (atomic, fingerprinted,
corruption detected) and clip sources with latents. CPU only, tiny data in tmp_path; the VAE is a
tiny random diffusers AutoencoderKL saved as safetensors."""

import json
import logging
import os

import numpy as np
import pytest

from vlmjax.data import latents
from vlmjax.data import procedural_video
from vlmjax.data import video


def _data_config(**overrides):
    c = video.default_config()
    c.image_size, c.patch_size, c.num_frames = 32, 8, 4
    c.num_train, c.num_eval = 6, 3
    for k, v in overrides.items():
        c[k] = v
    return c


def _latents_config(**overrides):
    c = latents.default_config()
    c.num_threads = 0
    for k, v in overrides.items():
        c[k] = v
    return c


class CountingEncoder:
    """Wraps an encoder and counts the frames it encodes."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.downsample, self.channels = inner.name, inner.downsample, inner.channels
        self.frames = 0

    def identity(self):
        return self.inner.identity()

    def encode(self, frames):
        self.frames += len(frames)
        return self.inner.encode(frames)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """(directory, torch module) of a tiny random AutoencoderKL: 2 blocks -> downsample 2."""
    diffusers = pytest.importorskip("diffusers")
    import torch  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path, safe_serialization=True)
    return str(path), vae


# ---------------------------------------------------------------------------------------------
# Pixel encoder.
# ---------------------------------------------------------------------------------------------


def test_pixel_latents_flat_colour():
    colour = np.array([0.2, 0.4, 0.6], np.float32)
    frames = np.broadcast_to(colour, (2, 16, 24, 3)).copy()
    raw = latents.pixel_latents(frames, 8, normalize=False)
    assert raw.shape == (2, 2, 3, 4) and raw.dtype == np.float32
    np.testing.assert_allclose(raw[..., :3], np.broadcast_to(colour, (2, 2, 3, 3)), atol=1e-6)
    assert np.all(raw[..., 3] == 0.0)  # A flat cell has no structure.
    out = latents.pixel_latents(frames, 8)
    expected = (np.array([*colour, 0.0]) - latents.PIXEL_SHIFT) / np.array(latents.PIXEL_SCALE)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)


def test_pixel_latents_structure_and_uint8():
    # Cell (0, 0): a black/white checkerboard, luminance std 0.5 (white's luminance is 1). Cell
    # (0, 1): flat grey. Mean colour 0.5 in both.
    frames = np.full((1, 4, 8, 3), 0.5, np.float32)
    frames[0, :, :4] = ((np.arange(4)[:, None] + np.arange(4)[None]) % 2)[..., None]
    raw = latents.pixel_latents(frames, 4, normalize=False)
    np.testing.assert_allclose(raw[0, 0, 0], [0.5, 0.5, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(raw[0, 0, 1], [0.5, 0.5, 0.5, 0.0], atol=1e-6)
    as_uint8 = np.round(frames * 255).astype(np.uint8)
    np.testing.assert_allclose(latents.pixel_latents(as_uint8, 4),
                               latents.pixel_latents(as_uint8.astype(np.float32) / 255, 4),
                               atol=1e-6)


def test_pixel_latents_needs_multiples_of_downsample():
    with pytest.raises(ValueError, match="multiple of config.latents.downsample=8"):
        latents.pixel_latents(np.zeros((1, 12, 16, 3), np.float32), 8)


# ---------------------------------------------------------------------------------------------
# VAE encoder and config checks.
# ---------------------------------------------------------------------------------------------


def test_vae_encoder_matches_torch(tiny_vae):
    import torch  # pylint: disable=g-import-not-at-top
    path, vae = tiny_vae
    frames = np.random.default_rng(0).uniform(size=(3, 32, 32, 3)).astype(np.float32)
    encoder = latents.VAELatentEncoder(path, batch_size=2)  # 3 frames: batches of 2 and 1.
    assert (encoder.downsample, encoder.channels) == (2, 4)
    out = encoder.encode(frames)
    with torch.no_grad():
        x = torch.from_numpy(frames).permute(0, 3, 1, 2) * 2 - 1
        ref = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).permute(0, 2, 3, 1)
    assert out.shape == (3, 16, 16, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(encoder.encode(frames), out)  # The mean: deterministic.


def test_check_config(tiny_vae, tmp_path):
    path, _ = tiny_vae
    latents.check_config(_latents_config())
    latents.check_config(_latents_config(encoder="vae", vae_path=path, downsample=2))
    with pytest.raises(ValueError, match="did you mean 'vae'"):
        latents.check_config(_latents_config(encoder="vea"))
    with pytest.raises(ValueError, match="needs config.latents.vae_path"):
        latents.check_config(_latents_config(encoder="vae"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        latents.check_config(_latents_config(encoder="vae", vae_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match=r"downsamples by 2.*config.latents.downsample=2"):
        latents.check_config(_latents_config(encoder="vae", vae_path=path))  # default 8
    with pytest.raises(ValueError, match="vae_path='x' is set but"):
        latents.check_config(_latents_config(vae_path="x"))
    with pytest.raises(ValueError, match="must be a local directory"):
        latents.check_config(_latents_config(cache_dir="gs://bucket/cache"))


def test_bin_only_vae_is_refused(tiny_vae, tmp_path):
    path, _ = tiny_vae
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        (tmp_path / "config.json").write_text(f.read())
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not unpickled")
    cfg = _latents_config(encoder="vae", vae_path=str(tmp_path), downsample=2)
    with pytest.raises(ValueError, match=r"only pickle-based weights.*safe_serialization=True"):
        latents.check_config(cfg)
    with pytest.raises(ValueError, match="safetensors"):
        latents.VAELatentEncoder(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The cache.
# ---------------------------------------------------------------------------------------------


def _source(**overrides):
    return procedural_video.ProceduralClips(_data_config(**overrides), "train", 6)


def test_cache_round_trip_reuses_without_encoding(tmp_path):
    source = _source()
    encoder = CountingEncoder(latents.PixelLatentEncoder(8))
    fingerprint = latents.cache_fingerprint(source, encoder, "train")
    cache = latents.build_latent_cache(source, encoder, str(tmp_path), "train", fingerprint,
                                       batch_size=8, num_threads=0)
    assert encoder.frames == 6 * 4
    assert cache.latents.shape == (6, 4, 4, 4, 4) and cache.latents.dtype == np.float32
    for i in range(6):
        np.testing.assert_array_equal(cache.latents[i], latents.pixel_latents(source[i]["frames"]))
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["shape"] == [6, 4, 4, 4, 4] and meta["encoder"] == "pixel"

    again = CountingEncoder(latents.PixelLatentEncoder(8))
    reopened = latents.build_latent_cache(source, again, str(tmp_path), "train",
                                          latents.cache_fingerprint(source, again, "train"))
    assert again.frames == 0  # Reused: not a single frame encoded.
    assert isinstance(reopened.latents, np.memmap)
    np.testing.assert_array_equal(reopened.latents, cache.latents)


def test_changed_fingerprint_builds_a_new_cache(tmp_path):
    encoder = CountingEncoder(latents.PixelLatentEncoder(8))
    first = latents.build_latent_cache(_source(), encoder, str(tmp_path), "train", num_threads=0)
    other = _source(noise=0.05)  # Other frames: the probe hash changes.
    second = latents.build_latent_cache(other, encoder, str(tmp_path), "train", num_threads=0)
    assert second.path != first.path and encoder.frames == 2 * 6 * 4
    np.testing.assert_array_equal(second.latents[2], latents.pixel_latents(other[2]["frames"]))
    # Another encoder setting: another cache too.
    coarse = latents.build_latent_cache(other, latents.PixelLatentEncoder(16), str(tmp_path),
                                        "train", num_threads=0)
    assert coarse.latents.shape == (6, 4, 2, 2, 4) and coarse.path != second.path


def test_data_config_enters_the_fingerprint():
    source, encoder = _source(), latents.PixelLatentEncoder(8)

    def digest(cfg):
        return latents.cache_paths("d", "train",
                                   latents.cache_fingerprint(source, encoder, "train", cfg))[0]

    base = digest(_data_config())
    assert digest(_data_config(change_threshold=0.5, shuffle_seed=3)) == base  # Frames unchanged.
    assert digest(_data_config(sprite_speed=0.05)) != base
    assert digest(None) != base


def test_truncated_cache_is_detected_and_rebuilt(tmp_path, caplog):
    source = _source()
    encoder = CountingEncoder(latents.PixelLatentEncoder(8))
    fingerprint = latents.cache_fingerprint(source, encoder, "train")
    cache = latents.build_latent_cache(source, encoder, str(tmp_path), "train", fingerprint,
                                       num_threads=0)
    expected = np.array(cache.latents)
    path = cache.path
    del cache
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(latents.CorruptLatentCacheError, match="truncated"):
        latents.open_latent_cache(str(tmp_path), "train", fingerprint)
    with caplog.at_level(logging.WARNING):
        rebuilt = latents.build_latent_cache(source, encoder, str(tmp_path), "train", fingerprint,
                                             num_threads=0)
    assert "corrupt, rebuilding" in caplog.text
    assert encoder.frames == 2 * 6 * 4
    np.testing.assert_array_equal(rebuilt.latents, expected)


def test_half_written_cache_is_never_read(tmp_path):
    source = _source()
    encoder = CountingEncoder(latents.PixelLatentEncoder(8))
    fingerprint = latents.cache_fingerprint(source, encoder, "train")
    path, meta_path = latents.cache_paths(str(tmp_path), "train", fingerprint)
    np.save(path, np.zeros((6, 4, 4, 4, 4), np.float32))  # A .npy without its .json: unfinished.
    assert latents.open_latent_cache(str(tmp_path), "train", fingerprint) is None
    cache = latents.build_latent_cache(source, encoder, str(tmp_path), "train", fingerprint,
                                       num_threads=0)
    assert encoder.frames == 6 * 4 and os.path.exists(meta_path)
    np.testing.assert_array_equal(cache.latents[0], latents.pixel_latents(source[0]["frames"]))


# ---------------------------------------------------------------------------------------------
# Clip sources with latents.
# ---------------------------------------------------------------------------------------------


def test_latent_sources_pixel(tmp_path):
    data_cfg = _data_config()
    sources = latents.latent_sources(video._clip_sources(data_cfg), _latents_config(),
                                     cache_dir=str(tmp_path / "latent_cache"), data_cfg=data_cfg)
    assert (len(sources.train), len(sources.eval)) == (6, 3)
    assert sources.num_classes == 4 and "pixel latents" in sources.description
    item = sources.train[5]
    assert item["frames"].shape == (4, 32, 32, 3) and item["label"].shape == ()
    assert item["latents"].shape == (4, 4, 4, 4) and item["latents"].dtype == np.float32
    np.testing.assert_array_equal(item["latents"], latents.pixel_latents(item["frames"]))
    assert sources.eval[2]["latents"].shape == (4, 4, 4, 4)
    assert len(os.listdir(tmp_path / "latent_cache")) == 4  # .npy + .json per split


def test_latent_sources_vae(tiny_vae, tmp_path):
    path, _ = tiny_vae
    data_cfg = _data_config(num_train=2, num_eval=1)
    cfg = _latents_config(encoder="vae", vae_path=path, downsample=2, batch_size=3,
                          cache_dir=str(tmp_path))
    sources = latents.latent_sources(video._clip_sources(data_cfg), cfg, cache_dir="",
                                     data_cfg=data_cfg)
    item = sources.train[1]
    assert item["latents"].shape == (4, 16, 16, 4)
    direct = latents.VAELatentEncoder(path).encode(item["frames"])
    np.testing.assert_allclose(item["latents"], direct, atol=1e-5)
