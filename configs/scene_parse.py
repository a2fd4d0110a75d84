r"""Scene parsing: pretrains a small ViT on what each cell of a procedural scene holds, painted in random
colours, so that its shape features do not depend on colour (task 'scene_parse', docs/vlm.md).

The vision stage of configs/trm_vlm_qa.py and configs/fusion_vqa.py (`stage()` below); alone it is a
quick check of a tower's compositional generalisation: `shape_acc_held_out` is its shape accuracy on
the objects of held-out (colour, shape) pairs in the palette eval scenes, which a tower trained on
the palette scenes gets wrong.

  python -m vlmjax.main --config=configs/scene_parse.py --workdir=/tmp/parse          # 2-core CPU
  python -m vlmjax.main --config=configs/scene_parse.py:smoke --workdir=/tmp/parse_smoke
  python -m vlmjax.main --config=configs/scene_parse.py:palette --workdir=/tmp/parse_pal  # the shortcut
"""

import ml_collections

from configs import common
from vlmjax.data import scene_parse
from vlmjax.tasks import alignment
from vlmjax.tasks import scene_parse as task_lib

VARIANTS = ("default", "smoke", "palette")


def vision_tower_config() -> ml_collections.ConfigDict:
    """The alignment experiments' small CLIP-style ViT for 96 px scenes (``alignment.vision_tower_config``):
    patch 32 = one token per cell of the scenes' 3x3 grid."""
    return alignment.vision_tower_config()


def stage(tower: ml_collections.ConfigDict, scenes_cfg: ml_collections.ConfigDict, image_size: int,
          total_steps: int, smoke: bool = False,
          connector: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """This experiment as another experiment's stage 'vision': its tower, scenes and image size, and
    with a Perceiver ``connector`` (a VLM's ``config.connector``, type 'perceiver') its resampler too."""
    c = get_config("smoke" if smoke else "default")
    c.model.tower = ml_collections.ConfigDict(tower.to_dict())
    if connector is not None and connector.type == "perceiver":
        c.model.resampler.update({k: connector[k] for k in c.model.resampler if k in connector})
    c.data.scenes = ml_collections.ConfigDict(scenes_cfg.to_dict())
    c.data.image_size = image_size
    c.total_steps = total_steps
    c.eval_every = c.ckpt_every = total_steps
    return c


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = common.trainer(
        "scene_parse", total_steps=800, batch_size=32, log_every=100, eval_every=400, ckpt_every=400,
        eval=dict(max_batches=0),
        optim=dict(lr=1e-3, warmup_steps=50, weight_decay=0.05, b2=0.98, clip_norm=1.0))
    c.data = scene_parse.default_config()
    # resampler.num_latents > 0 adds the VLM's Perceiver and its read-out (vlmjax/tasks/scene_parse.py).
    c.model = dict(tower=vision_tower_config(), dtype="float32", attention_impl="xla",
                   resampler=task_lib.resampler_config())
    # Loss = sum of weight x term: cross-entropies of shape (or empty), size and cell index per token;
    # squared RGB error (0..1 per channel, summed over channels) on the tokens of occupied cells; the
    # resampler's read-out terms weigh `latent` x the same weights.
    c.loss = dict(shape=1.0, size=1.0, rgb=5.0, cell=0.2, latent=1.0)
    if v == "palette":
        c.data.colour_mode = "palette"
    if v == "smoke":
        c.model.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  patch_size=16, image_size=48))
        c.data.update(dict(image_size=48, num_eval=8, num_threads=0, prefetch_batches=0))
        c.update(dict(total_steps=4, batch_size=8, log_every=2, eval_every=4, ckpt_every=4))
        c.optim.warmup_steps = 1
    return c
