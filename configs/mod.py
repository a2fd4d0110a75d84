r"""Mixture-of-Depths (Raposo et al. 2024): every other layer processes 12.5% of the tokens.

Model, data and schedule are the dense baseline's (configs/lm.py); this file adds the routing.
Causal inference by an auxiliary BCE on the router logits (routing.mod_causal='aux') or a
stop-gradient predictor MLP ('predictor'). docs/routing.md.

  python -m vlmjax.main --config=configs/mod.py --workdir=/tmp/mod
  python -m vlmjax.main --config=configs/mod.py:smoke --workdir=/tmp/mod_smoke
  python -m vlmjax.main --config=configs/mod.py:smollm2_135m --workdir=/tmp/mod135  # accelerator-sized
"""

from configs import common
from configs import lm
from vlmjax.models import routing

VARIANTS = ("default", "smoke", "smollm2_135m")


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = lm.get_config(v)
    c.task = "routed_lm"
    c.routing = routing.default_config()
    c.routing.update(dict(
        kind="mod",
        every=2, offset=1,     # the paper's "every other block"
        capacity=0.125,        # 12.5% of the tokens per routed block (the paper's best)
        causal_capacity=1.0,
        mod_causal="aux",      # aux BCE on the router logits | predictor (MLP on sg(x))
        lambda_causal=0.01,
    ))
    return c
