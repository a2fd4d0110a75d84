r"""Mixture-of-Depths (Raposo et al. 2024): every other layer processes 12.5% of the tokens.

Model, data and schedule are the dense baseline's (configs/lm.py); this file adds the routing.
Causal inference by an auxiliary BCE on the router logits (routing.mod_causal='aux') or a
stop-gradient predictor MLP ('predictor'). docs/routing.md.

  python -m vlmjax.main --config=configs/mod.py --workdir=/tmp/mod
  python -m vlmjax.main --config=configs/mod.py:smoke --workdir=/tmp/mod_smoke
  python -m vlmjax.main --config=configs/mod.py:pretrained --workdir=/tmp/mod_ft --config.init_from=/ckpt/SmolLM2-135M
  python -m vlmjax.main --config=configs/mod.py:smollm2_135m --workdir=/tmp/mod135  # accelerator-sized
"""

from configs import common
from configs import lm
from vlmjax.models import routing

VARIANTS = ("default", "smoke", "pretrained", "pretrained_lora", "smollm2_135m")


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = lm.get_config("finetune" if v.startswith("pretrained") else v)
    c.task = "routed_lm"
    c.routing = routing.default_config()
    c.routing.update(dict(
        kind="mod",
        every=2, offset=1,     # the paper's "every other block"
        capacity=0.125,        # 12.5% of the tokens per routed block (the paper's best)
        causal_capacity="auto",  # causal eval/decoding: running budget capacity + margin
        mod_causal="aux",      # aux BCE on the router logits | predictor (MLP on sg(x))
        lambda_causal=0.01,
    ))

    if v in ("pretrained", "pretrained_lora"):
        # MoD's causal decisions come from the predictor MLP (it has the bias that starts "all in");
        # at 12.5% capacity a pretrained model loses too much, so gamma is 0.5 here.
        c.routing.update(dict(mod_causal="predictor", capacity=0.5))
        common.route_pretrained(c, v)
    return c
