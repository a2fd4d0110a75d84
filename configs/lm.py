r"""Dense decoder LM trained from scratch on the embedded English corpus (the routing baseline).

The routed experiments (configs/mod.py, dtf.py, tdtf.py) start from this file's model, data and
schedule, so their comparisons are at the same sizes.

  python -m vlmjax.main --config=configs/lm.py --workdir=/tmp/lm              # 2-core CPU: 5-15 min (README)
  python -m vlmjax.main --config=configs/lm.py:smoke --workdir=/tmp/lm_smoke  # seconds, for tests
  python -m vlmjax.main --config=configs/lm.py:smollm2_135m --workdir=/tmp/lm135 \
      --config.data.source=jsonl --config.data.path='/data/*.jsonl'          # accelerator-sized

Fine-tune a pretrained Llama / SmolLM2 / Qwen checkpoint (architecture and tokenizer from the
directory; fine-tuning learning rate, the routed configs' ``:pretrained`` variants start from here):
  python -m vlmjax.main --config=configs/lm.py:finetune --workdir=/tmp/ft --config.init_from=/ckpt/SmolLM2-135M
An offline SmolLM2-135M-Instruct directory: python -m vlmjax.convert.gguf (README, "Pretrained weights").
"""

from configs import common
from vlmjax import data
from vlmjax.models import decoder
from vlmjax.tasks import lm

VARIANTS = ("default", "smoke", "finetune", "smollm2_135m", "qwen25_05b", "qwen25_1_5b", "qwen25_7b")

# Qwen2.5 shapes (the HF config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B}): for from-scratch runs at those
# sizes on a pod and for the pod planner (python -m vlmjax.plan). Tokenizer: train one on your data
# or point config.data.tokenizer_path at a Qwen directory; the embedding keeps Qwen's vocabulary size.
QWEN25_SHAPES = {
    "qwen25_05b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen25_1_5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
    "qwen25_7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, head_dim=128, tie_word_embeddings=False),
}


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = common.trainer(
        "lm", total_steps=500, batch_size=32, log_every=50, eval_every=200, ckpt_every=200,
        eval=dict(max_batches=16), optim=dict(lr=3e-3, warmup_steps=50, weight_decay=0.1))

    c.data = data.default_config()
    c.data.update(dict(source="embedded", tokenizer="bpe", bpe_vocab_size=2048, seq_len=128))

    # A 4-layer Llama-style decoder (RMSNorm, RoPE, GQA 4:2, SwiGLU, tied embeddings): 3.2M params.
    c.model = decoder.default_config()
    c.model.update(dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048))

    # A continuation of this prompt is sampled at the end of the run.
    c.sample = lm.sample_config()
    c.sample.update(dict(prompt="The", max_new_tokens=96, temperature=0.7, top_p=0.9))

    if v == "smoke":
        c.data.update(dict(tokenizer="bytes", seq_len=32))
        c.model.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8))
        c.update(dict(total_steps=6, batch_size=8, log_every=1, eval_every=3, ckpt_every=3))
        c.eval.max_batches = 2
        c.optim.warmup_steps = 2
        c.sample.max_new_tokens = 8
    elif v == "finetune":
        # Full fine-tune of a pretrained decoder given by --config.init_from (its tokenizer too). The
        # from-scratch lr (3e-3) wrecks it in one step (issue 12: val loss 2.78 -> 7.16); 5e-5 with
        # a short warmup is a usual fine-tuning rate for a ~100M-1B decoder.
        c.data.update(dict(tokenizer="hf", seq_len=256))
        c.model.dtype = "bfloat16"
        c.update(dict(total_steps=300, batch_size=8, log_every=10, eval_every=100, ckpt_every=100))
        c.optim.update(dict(lr=5e-5, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1))
        c.eval.max_batches = 8
    elif v == "smollm2_135m":
        c.model = decoder.default_config()  # the SmolLM2-135M shape: d576, 30 layers, 9:3 heads
        # Scanned layers: one compiled layer (group) instead of 30 (the pod planner compiles this step
        # for a 256-chip v5e in ~1/5 of the looped layout's time).
        c.model.update(dict(dtype="bfloat16", scan_layers=True))
        c.data.update(dict(tokenizer="bpe", bpe_vocab_size=49152, seq_len=2048))
        c.update(dict(total_steps=20000, batch_size=256, log_every=100, eval_every=1000, ckpt_every=1000))
        c.optim.update(dict(lr=3e-3, warmup_steps=1000))
    elif v in QWEN25_SHAPES:
        c.model = decoder.default_config()
        c.model.update(dict(QWEN25_SHAPES[v], attention_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
                            max_position_embeddings=32768, dtype="bfloat16", scan_layers=True))
        # Byte tokens stand in until a real tokenizer is given (config.data.tokenizer='hf' +
        # tokenizer_path); the data must be a real corpus (source=jsonl|tfds): the embedded one is
        # smaller than one global batch of 256 x 2048 tokens.
        c.data.update(dict(tokenizer="bytes", seq_len=2048))
        c.update(dict(total_steps=20000, batch_size=256, log_every=100, eval_every=1000, ckpt_every=1000))
        c.optim.update(dict(lr=3e-4 if v == "qwen25_7b" else 1e-3, warmup_steps=1000))
    return c
