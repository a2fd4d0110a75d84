r"""Dense decoder LM trained from scratch on the embedded English corpus.

Runs on a laptop CPU as written (2 cores: under 10 minutes), and on a GPU/TPU with a bigger
model by overriding fields or by the variants below.

  python -m vlmjax.main --config=configs/lm.py --workdir=/tmp/lm
  python -m vlmjax.main --config=configs/lm.py:smoke --workdir=/tmp/lm_smoke   # seconds, for tests
  python -m vlmjax.main --config=configs/lm.py:smollm2_135m --workdir=/tmp/lm135 \
      --config.data.source=jsonl --config.data.path='/data/*.jsonl'        # accelerator-sized
"""

from vlmjax import data
from vlmjax.models import decoder
from vlmjax.tasks import lm
from vlmjax.train.config import base_config

VARIANTS = ("default", "smoke", "smollm2_135m")


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/lm.py:{variant} is not a variant; choose one of {VARIANTS}.")
    c = base_config()
    c.task = "lm"
    c.data = data.default_config()
    c.data.source = "embedded"
    c.data.tokenizer = "bpe"
    c.data.bpe_vocab_size = 2048
    c.data.seq_len = 128

    c.model = decoder.default_config()
    c.model.update(dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048))
    c.sample = lm.sample_config()

    c.total_steps = 500
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = 200
    c.ckpt_every = 200
    c.eval.max_batches = 16
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1

    if variant == "smoke":
        c.data.tokenizer = "bytes"
        c.data.seq_len = 32
        c.model.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8))
        c.total_steps = 6
        c.batch_size = 8
        c.log_every = 1
        c.eval_every = 3
        c.ckpt_every = 3
        c.eval.max_batches = 2
        c.optim.warmup_steps = 2
        c.sample.max_new_tokens = 8
    elif variant == "smollm2_135m":
        c.model = decoder.default_config()  # SmolLM2-135M shape
        c.model.dtype = "bfloat16"
        c.data.tokenizer = "bpe"
        c.data.bpe_vocab_size = 49152
        c.data.seq_len = 2048
        c.total_steps = 20000
        c.batch_size = 256
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 1000
        c.eval_every = 1000
        c.ckpt_every = 1000
        c.log_every = 100
    return c
