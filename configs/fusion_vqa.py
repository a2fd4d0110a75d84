r"""Flamingo-style fusion VQA: gated cross-attention blocks from the question to the image (issue 16, the
seed's ViVQA model: DINOv2 -> projection -> N gated cross-attention fusion layers -> vision gate ->
decoder -> answer). Task 'fusion_vqa' (vlmjax/tasks/fusion_vqa.py, model vlmjax/models/fusion.py).

On the procedural scenes' typed questions (COUNT, COLOR, LOCATION, OBJECT, SIZE; nothing to download),
with a small CLIP-style ViT (96 px, patch 32: one token per cell of the 3x3 grid) and a 12-layer,
128-wide question encoder trained from scratch, 4 fusion blocks, a classification head over the
training answers. Evaluation on held-out scenes: accuracy per question type beside the answer-prior
baseline, and the gates (tanh per block, the vision gate) in the train and eval metrics.

  python -m vlmjax.main --config=configs/fusion_vqa.py --workdir=/tmp/fusion            # 2-core CPU, < 10 min
  python -m vlmjax.main --config=configs/fusion_vqa.py:smoke --workdir=/tmp/fusion_smoke
  # The seed's ablation (12 decoder layers: a block before every 6th / 3rd / 2nd layer), equal steps:
  python -m vlmjax.main --config=configs/fusion_vqa.py:layers2 --workdir=/tmp/fusion_l2
  python -m vlmjax.main --config=configs/fusion_vqa.py:layers6 --workdir=/tmp/fusion_l6
  # Generated answers instead of a classifier: --config.fusion.head=generate
  # Then how much the model uses the image (docs/diagnostics.md):
  python -m vlmjax.diagnose --workdir=/tmp/fusion
  # The seed's ViVQA profile (accelerator): a frozen DINOv2 tower, a frozen pretrained decoder (its
  # num_hidden_layers divisible by num_fusion_layers=4, e.g. Qwen2.5-0.5B's 24), ViVQA CSVs
  # (columns question, answer, img_id, type) and the COCO image folder, Vietnamese text through the
  # decoder's tokenizer:
  python -m vlmjax.main --config=configs/fusion_vqa.py:vivqa --workdir=gs://bucket/fusion_vivqa \
      --config.vision_encoder.init_from=/ckpt/dinov2-base --config.decoder.init_from=/ckpt/Qwen2.5-0.5B \
      --config.data.path=/data/vivqa/train.csv --config.data.eval_path=/data/vivqa/test.csv \
      --config.data.image_root=/data/coco/train2017 --config.data.image_pattern='{:012d}.jpg'
"""

import ml_collections

from configs import common
from configs import scene_parse
from configs import trm_vlm_qa
from vlmjax.data import vlm_data
from vlmjax.models import fusion
from vlmjax.tasks import vlm

VARIANTS = ("default", "smoke", "layers2", "layers6", "vivqa")


def question_encoder(c: ml_collections.ConfigDict) -> None:
    """A 12-layer, 128-wide Llama-style decoder over the question, trained from scratch: 12 is divisible
    by 2, 4 and 6, so the seed's 2 / 4 / 6 fusion-layer ablation keeps the same language model."""
    c.update(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=0, rope_theta=10000.0, max_position_embeddings=64,
                  tie_word_embeddings=True))


def fusion_section() -> ml_collections.ConfigDict:
    """``config.fusion``: ``fusion.FusionConfig``'s fields without attention_impl / dtype (config.model's)."""
    c = fusion.default_config()
    del c["attention_impl"]
    del c["dtype"]
    return c


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = common.trainer(
        "fusion_vqa", total_steps=1500, batch_size=64, log_every=100, eval_every=500, ckpt_every=500,
        eval=dict(max_batches=0),
        optim=dict(lr=1e-3, warmup_steps=100, weight_decay=0.05, b2=0.98, clip_norm=1.0))
    c.data = vlm_data.default_config()
    # Questions only (a classifier has nothing to say about captions), one per image.
    c.data.update(dict(source="scenes", image_size=96, num_eval=128, eval_questions=3, caption_fraction=0.0,
                       turns=1, max_text_len=32, max_prompt_len=16, answer_prior_samples=5000))
    c.vision_encoder = dict(init_from="", freeze=(), tower=trm_vlm_qa.vision_tower_config())
    c.decoder = vlm.decoder_section()
    question_encoder(c.decoder)
    c.fusion = fusion_section()
    c.fusion.update(dict(num_fusion_layers=4, use_vision_gate=True, vision_gate_init=1.5, head="classify",
                         num_answers=0, answer_pool="mean", projector_layers=1, xattn_num_heads=4, xattn_ffn_mult=2,
                         # Open gates (tanh(1) = 0.76): the question encoder is trained from scratch, so there is no
                         # language model to preserve, and with Flamingo's closed gates (0) the from-scratch visual
                         # path got no gradient: the attention gates stayed at +-0.002 and train accuracy at the
                         # answer prior (0.39) for 400 steps.
                         gate_init=1.0))
    c.model = dict(attention_impl="xla", dtype="float32")
    c.generation = vlm.generation_config()
    c.text_only = False

    if v == "smoke":
        c.vision_encoder.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, patch_size=16, image_size=48))
        c.decoder.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1))
        c.fusion.update(dict(num_fusion_layers=2, xattn_num_heads=2))
        c.data.update(dict(image_size=48, num_eval=8, eval_questions=2, answer_prior_samples=300, num_threads=0,
                           prefetch_batches=0))
        c.update(dict(total_steps=4, batch_size=8, log_every=2, eval_every=4, ckpt_every=4))
        c.optim.warmup_steps = 1
    if v in ("layers2", "layers6"):
        c.fusion.num_fusion_layers = int(v[len("layers"):])
    if v == "vivqa":
        # The seed: DINOv2 (frozen) -> Linear 768 -> D -> 4 gated fusion blocks -> vision gate (init 1.5) ->
        # a frozen pretrained decoder -> answer classifier; lr 2e-4, batch 16, gradient checkpointing.
        c.vision_encoder.freeze = ("",)
        # Used only without --config.vision_encoder.init_from (a DINOv2-base-shaped tower from scratch).
        c.vision_encoder.tower.update(dict(variant="dinov2", hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                                           image_size=224, hidden_act="gelu", layer_norm_eps=1e-6, remat="full"))
        c.decoder.update(dict(remat="full", dtype="bfloat16"))
        c.fusion.update(dict(num_fusion_layers=4, use_vision_gate=True, vision_gate_init=1.5, projector_layers=1,
                             xattn_num_heads=8, xattn_ffn_mult=4, dropout=0.1, num_answers=0,
                             gate_init=0.0))  # Flamingo: the pretrained decoder is unchanged at step 0
        c.model.dtype = "bfloat16"
        c.model.attention_impl = "auto"
        c.data.update(dict(source="csv", image_size=224, question_key="question", answer_key="answer",
                           image_key="img_id", qtype_key="type", image_pattern="{:012d}.jpg", num_eval=500,
                           eval_questions=0, max_text_len=64, max_prompt_len=48))
        c.optim.update(dict(lr=2e-4, warmup_steps=200, weight_decay=0.01))
        c.update(dict(total_steps=10_000, batch_size=16, log_every=100, eval_every=1000, ckpt_every=1000))
    if v != "vivqa":
        # Stage 'vision' (configs/scene_parse.py): the tower learns to parse scenes painted in random colours,
        # then stays frozen. Trained from scratch on the VQA data the tower read colour only (docs/fusion.md).
        c.stages = ml_collections.ConfigDict(dict(vision=scene_parse.stage(
            c.vision_encoder.tower, c.data.scenes, c.data.image_size, 4 if v == "smoke" else 800, smoke=v == "smoke")))
        c.vision_encoder.freeze = ("",)
    return c
