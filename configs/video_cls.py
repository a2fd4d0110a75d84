r"""Frame classification on procedural video: trains a small CLIP-style ViT from scratch.

Every frame of a clip is one example labelled with the clip's class (its main sprite). This is the
backbone configs/reuse.py trains first (its stage 'backbone') when no pretrained ViT is given; run
alone it is a quick ViT training sanity check that needs nothing downloaded.

  python -m vlmjax.main --config=configs/video_cls.py --workdir=/tmp/vcls          # 2-core CPU: 3-11 min
  python -m vlmjax.main --config=configs/video_cls.py:smoke --workdir=/tmp/vcls_smoke
  python -m vlmjax.main --config=configs/video_cls.py --workdir=/tmp/vcls_real \
      --config.data.source=folder --config.data.path=/data/videos   # class sub-directories of videos
"""

from configs import common
from vlmjax.data import video
from vlmjax.tasks import video_cls

VARIANTS = ("default", "smoke")


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    # Frames of one clip are near-duplicates: one frame of more clips per step learns much faster. A
    # ViT from scratch sits at chance for a few hundred steps on this data before it learns the
    # shapes (measured with 64 clips x 2 frames per step: still 35% after 1000 steps; 128 x 1: loss
    # 1.0 by step 400).
    c = common.trainer(
        "video_cls", total_steps=1000, batch_size=128, log_every=50, eval_every=0, ckpt_every=0,
        eval=dict(max_batches=4), optim=dict(lr=1e-3, warmup_steps=20, weight_decay=0.0))
    c.data = video.default_config()
    c.data.update(dict(source="procedural", image_size=64, patch_size=16, num_frames=1, num_threads=3))
    # A small CLIP-style ViT (fields of vlmjax.models.vit.ViTConfig): D=128, 4 layers, 64 px, patch 16.
    c.model = video_cls.vit_config()
    c.model.update(dict(variant="clip", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, patch_size=16, image_size=64, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, dtype="float32"))
    if v == "smoke":
        c.model.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            patch_size=8, image_size=32))
        c.data.update(dict(image_size=32, patch_size=8, num_threads=0, prefetch_batches=0))
        c.update(dict(total_steps=4, batch_size=4, log_every=2))
        c.eval.max_batches = 1
        c.optim.warmup_steps = 1
    return c
