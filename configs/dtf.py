r"""DTF: a decoder whose dynamic layers process only the tokens a surprise router picks.

docs/routing.md: decision/dynamic layer pairs, PriorFFN, D_st / D_ch, CE / CU with the causal moving
average, probabilistic OR, top-k at gamma, causal router. Model, data and schedule are the dense
baseline's (configs/lm.py), so the two compare at the same sizes; this file adds the routing.

  python -m vlmjax.main --config=configs/dtf.py --workdir=/tmp/dtf             # 2-core CPU: 5-15 min (README)
  python -m vlmjax.main --config=configs/dtf.py:smoke --workdir=/tmp/dtf_smoke  # seconds, for tests
  python -m vlmjax.main --config=configs/dtf.py:pretrained --workdir=/tmp/dtf_ft \
      --config.init_from=/ckpt/SmolLM2-135M         # route a pretrained Llama/Qwen (full fine-tune)
  python -m vlmjax.main --config=configs/dtf.py:pretrained_lora --workdir=/tmp/dtf_lora \
      --config.init_from=/ckpt/Qwen2.5-0.5B         # same with LoRA on a frozen base
  python -m vlmjax.main --config=configs/dtf.py:smollm2_135m --workdir=/tmp/dtf135  # accelerator-sized
  python -m vlmjax.plan --config=configs/dtf.py:qwen25_7b --topology=v5p:4x4x4 \
      --config.mesh.fsdp=-1 --config.mesh.data=1   # will a 7B-shaped DTF train step fit a v5p-128? (no TPU needed)

Switches (config.routing): gate=prob_or|ce_only, beta=learned|scheduled, d_ch=mse|kl, capacity (gamma),
every/offset (which layers are dynamic), causal_capacity, lambda_prior, lambda_causal.
"""

from configs import common
from configs import lm
from vlmjax.models import routing

VARIANTS = ("default", "smoke", "pretrained", "pretrained_lora", "smollm2_135m", "qwen25_05b", "qwen25_1_5b",
            "qwen25_7b")


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = lm.get_config("finetune" if v.startswith("pretrained") else v)
    c.task = "routed_lm"

    c.routing = routing.default_config()
    c.routing.update(dict(
        kind="dtf",
        every=2, offset=1,     # layers 1, 3, ... are dynamic; layer i-1 is each one's decision layer
        capacity=0.5,          # gamma: top-k of G keeps half of the tokens
        causal_capacity="auto",  # causal eval/decoding: running budget gamma + causal_margin
        gate="prob_or",        # G = S_CE + S_CU - S_CE S_CU
        beta="learned",
        d_ch="mse",
        prior_ffn_factor=0.125,
        ma_window=100,
        lambda_prior=0.05,
        lambda_causal=0.01,
    ))
    # The causal router is a linear probe on stop-gradient states chasing a moving top-k target: at
    # the LM's lr it barely moves in a short run (tests/test_routed_train.py), hence 10x.
    c.optim.lr_groups = ((r"^routers_\d+/causal/", 10.0),)

    if v in ("pretrained", "pretrained_lora"):
        common.route_pretrained(c, v)  # warm start of a pretrained decoder (see configs/common.py)
    return c
