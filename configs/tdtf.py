r"""TDTF: temporal DTF, a teacher dense block and a transition network with a student causal router.

Scheduled betas; at inference only the tokens the causal router picks update the stream and write K/V.

Model, data and schedule are the dense baseline's (configs/lm.py); this file adds the routing.
docs/routing.md.

  python -m vlmjax.main --config=configs/tdtf.py --workdir=/tmp/tdtf
  python -m vlmjax.main --config=configs/tdtf.py:smoke --workdir=/tmp/tdtf_smoke
  python -m vlmjax.main --config=configs/tdtf.py:pretrained --workdir=/tmp/tdtf_ft --config.init_from=/ckpt/SmolLM2-135M
  python -m vlmjax.main --config=configs/tdtf.py:smollm2_135m --workdir=/tmp/tdtf135  # accelerator-sized
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
        kind="tdtf",
        every=2, offset=1,
        capacity=0.5,                  # gamma
        causal_capacity="auto",  # causal eval/decoding: running budget capacity + margin
        gate="prob_or",
        beta="scheduled",              # the spec schedules beta_ce / beta_cu (cosine 0.1 -> 100)
        beta_start=0.1, beta_end=100.0,
        prior_ffn_factor=0.125,        # transition-network width
        ma_window=100,
        lambda_causal=0.01,
        lambda_tpn=0.05,
    ))
    c.optim.lr_groups = ((r"^routers_\d+/causal/", 10.0),)  # as configs/dtf.py

    if v in ("pretrained", "pretrained_lora"):
        common.route_pretrained(c, v)  # warm start of a pretrained decoder (see configs/common.py)
    return c
