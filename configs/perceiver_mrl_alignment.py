r"""Vision-text alignment through a Perceiver resampler, with Matryoshka embeddings (the seed's
``perceiver_mrl_alignment`` profile; docs/alignment.md).

The vision tower's patch tokens are compressed into L learned latents by a Perceiver resampler
(Flamingo): the representation a VLM decoder later takes as its visual prefix. The mean latent is
projected and trained with CLIP's InfoNCE against the text embedding at every nested MRL dim. In the
PyTorch original this path never learned (R@1 about 0.03%): the latents start at N(0, 1) behind
LayerNorms here, and the resampler has its own learning-rate multiplier.

  python -m vlmjax.main --config=configs/perceiver_mrl_alignment.py --workdir=/tmp/perceiver   # 2-core CPU, < 10 min
  python -m vlmjax.main --config=configs/perceiver_mrl_alignment.py:smoke --workdir=/tmp/perceiver_smoke
  python -m vlmjax.main --config=configs/perceiver_mrl_alignment.py:pretrained --workdir=/tmp/perceiver_clip \
      --config.vision_encoder.init_from=/ckpt/siglip-base-patch16-224 \
      --config.text_encoder.init_from=/ckpt/siglip-base-patch16-224 --config.losses.type=siglip
  python -m vlmjax.plan --config=configs/perceiver_mrl_alignment.py:vitl14 --topology=v5e:4x4  # pod sizing

``vitl14`` is the ``pretrained`` profile on CLIP ViT-L/14 shapes (224 px, 24 x 1024 vision tower, the
12 x 768 CLIP-L text tower), bf16, batch 1024, everything trained: the size the pod planner sweeps.
"""

from configs import common
from vlmjax.data import image_text
from vlmjax.tasks import alignment

VARIANTS = ("default", "smoke", "pretrained", "vitl14")


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = common.trainer(
        # Batch 64 x 1200 steps: on these scenes more updates beat more negatives per step (measured,
        # 2-core CPU: batch 64 reached held-out R@1 0.34 at step 1200 of a 1600-step run; batch 128 was
        # at 0.10 after 500 steps at 2.4x the time per step).
        "alignment", total_steps=1200, batch_size=64, log_every=100, eval_every=400, ckpt_every=400,
        eval=dict(max_batches=0),  # 0 = every held-out pair (num_eval)
        optim=dict(lr=1e-3, warmup_steps=50, weight_decay=0.05, b2=0.98, clip_norm=1.0))
    c.data = image_text.default_config()
    c.data.update(dict(source="scenes", image_size=96, num_eval=256, max_text_len=32))
    c.vision_encoder = dict(
        init_from="", freeze=(), tower=alignment.vision_tower_config(),
        use_perceiver=True, perceiver_num_latents=16, perceiver_num_layers=2, perceiver_num_heads=4,
        perceiver_dim=0, perceiver_ffn_mult=4, perceiver_latent_init_std=1.0, perceiver_lr_mult=1.0,
        use_attention_pooling=False, pool_heads=4, pooling="cls", projection_layers=2)
    c.text_encoder = dict(init_from="", freeze=(), tower=alignment.text_tower_config())
    c.text_encoder.tower.max_position_embeddings = 32
    c.model = dict(embed_dim=128, use_mrl=True, mrl_dimensions=(128, 64, 32, 16), mrl_tied=True,
                   attention_impl="auto", dtype="float32")
    c.losses = dict(type="clip", contrastive_weight=1.0, mrl_weights=(), sample_single_mrl_dim=False,
                    logit_scale_init=0.0, logit_bias_init=-10.0)
    if v == "smoke":
        c.vision_encoder.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, patch_size=8, image_size=32))
        c.vision_encoder.update(dict(perceiver_num_latents=4, perceiver_num_layers=1, perceiver_num_heads=2))
        c.text_encoder.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2))
        c.data.update(dict(image_size=32, num_eval=16, num_threads=0, prefetch_batches=0))
        c.model.update(dict(embed_dim=32, mrl_dimensions=(32, 16, 8)))
        c.losses.sample_single_mrl_dim = True
        c.update(dict(total_steps=4, batch_size=8, log_every=2, eval_every=0))
        c.optim.warmup_steps = 1
    if v in ("pretrained", "vitl14"):
        # The seed's profile: 64 latents, a 512-d embedding with a low-dim MRL schedule, lr 5e-5, the
        # vision tower frozen; the resampler (new, from scratch) at 10x the tower-adaptation lr.
        c.vision_encoder.update(dict(freeze=("",), perceiver_num_latents=64, perceiver_num_layers=4,
                                     perceiver_num_heads=8, perceiver_lr_mult=10.0))
        c.model.update(dict(embed_dim=512, mrl_dimensions=(512, 256, 128, 64)))
        c.data.update(dict(image_size=224, max_text_len=64))
        c.text_encoder.tower.max_position_embeddings = 77
        c.optim.update(dict(lr=5e-5, warmup_steps=200, weight_decay=0.1))
        c.update(dict(total_steps=5000, batch_size=256, eval_every=1000, ckpt_every=1000))
    if v == "vitl14":
        c.vision_encoder.freeze = ()
        c.vision_encoder.tower.update(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, patch_size=14, image_size=224,
                                           scan_layers=True))
        c.text_encoder.tower.update(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12))
        c.model.update(dict(embed_dim=768, mrl_dimensions=(768, 384, 192, 96), dtype="bfloat16"))
        c.update(dict(batch_size=1024, total_steps=20000))
    return c
