r"""Dense decoder LM trained from scratch on the embedded English corpus.

Runs on a laptop CPU as written (2 cores: under 10 minutes), and on a GPU/TPU with a bigger
model by overriding fields or by the variants below.

  python -m vlmjax.main --config=configs/lm.py --workdir=/tmp/lm
  python -m vlmjax.main --config=configs/lm.py:smoke --workdir=/tmp/lm_smoke   # seconds, for tests
  python -m vlmjax.main --config=configs/lm.py:smollm2_135m --workdir=/tmp/lm135 \
      --config.data.source=jsonl --config.data.path='/data/*.jsonl'        # accelerator-sized
"""

from vlmjax.tasks import lm

VARIANTS = lm.LM_VARIANTS


def get_config(arg: str | None = None):
    """Variants: default (CPU, ~5 min), smoke (seconds, tests), smollm2_135m (accelerator)."""
    return lm.lm_config(arg or "default")
