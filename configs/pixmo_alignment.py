r"""Vision-text alignment with attention pooling + MLP projection and Matryoshka embeddings
(the seed's ``pixmo_alignment`` profile; docs/alignment.md).

A vision tower's patch tokens are pooled by a learned MAP probe, projected, and trained with CLIP's
InfoNCE against a text tower's embedding; the Matryoshka loss trains every nested prefix of the
embedding at once. Evaluation: image<->text R@1/5/10 on held-out pairs at every MRL dim.

  python -m vlmjax.main --config=configs/pixmo_alignment.py --workdir=/tmp/pixmo          # 2-core CPU, < 10 min
  python -m vlmjax.main --config=configs/pixmo_alignment.py:smoke --workdir=/tmp/pixmo_smoke
  # Real towers (a CLIP / SigLIP two-tower directory gives both; tokenizer and image preprocessing
  # come from the text / vision directories unless config.data names others):
  python -m vlmjax.main --config=configs/pixmo_alignment.py:pretrained --workdir=/tmp/pixmo_clip \
      --config.vision_encoder.init_from=/ckpt/clip-vit-base-patch16 \
      --config.text_encoder.init_from=/ckpt/clip-vit-base-patch16 \
      --config.data.source=jsonl --config.data.path=/data/pixmo/train.jsonl --config.data.image_root=/data/pixmo
"""

from configs import common
from vlmjax.data import image_text
from vlmjax.tasks import alignment

VARIANTS = ("default", "smoke", "pretrained")


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
    # Towers trained from scratch on procedural scenes (fields of vit.ViTConfig / TextEncoderConfig).
    c.vision_encoder = dict(
        init_from="", freeze=(), tower=alignment.vision_tower_config(),
        use_perceiver=False, perceiver_num_latents=64, perceiver_num_layers=3, perceiver_num_heads=4,
        perceiver_dim=0, perceiver_ffn_mult=4, perceiver_latent_init_std=1.0, perceiver_lr_mult=1.0,
        use_attention_pooling=True, pool_heads=4, pooling="cls", projection_layers=2)
    c.text_encoder = dict(init_from="", freeze=(), tower=alignment.text_tower_config())
    c.text_encoder.tower.max_position_embeddings = 32
    c.model = dict(embed_dim=256, use_mrl=True, mrl_dimensions=(256, 128, 64, 32, 16), mrl_tied=True,
                   attention_impl="auto", dtype="float32")
    c.losses = dict(type="clip", contrastive_weight=1.0, mrl_weights=(), sample_single_mrl_dim=False,
                    logit_scale_init=0.0, logit_bias_init=-10.0)
    if v == "smoke":
        c.vision_encoder.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, patch_size=8, image_size=32))
        c.vision_encoder.pool_heads = 2
        c.text_encoder.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2))
        c.data.update(dict(image_size=32, num_eval=16, num_threads=0, prefetch_batches=0))
        c.model.update(dict(embed_dim=32, mrl_dimensions=(32, 16, 8)))
        c.update(dict(total_steps=4, batch_size=8, log_every=2, eval_every=0))
        c.optim.warmup_steps = 1
    if v == "pretrained":
        # The seed's profile: a 2048-d pooled embedding with a high-dim MRL schedule, lr 5e-5, the
        # vision tower frozen (its features are the point; the pool, projections and text tower adapt).
        c.model.update(dict(embed_dim=2048, mrl_dimensions=(2048, 1024, 512, 256, 128)))
        c.vision_encoder.update(dict(freeze=("",), pool_heads=8))
        c.data.update(dict(image_size=224, max_text_len=64))
        c.text_encoder.tower.max_position_embeddings = 77
        c.optim.update(dict(lr=5e-5, warmup_steps=200, weight_decay=0.1))
        c.update(dict(total_steps=5000, batch_size=256, eval_every=1000, ckpt_every=1000))
    return c
