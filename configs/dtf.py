r"""DTF: a decoder whose dynamic layers process only the tokens a surprise router picks.

docs/routing.md: decision/dynamic layer pairs, PriorFFN, D_st / D_ch, CE / CU with the causal moving
average, probabilistic OR, top-k at gamma, causal router. Model, data and schedule are the dense
baseline's (configs/lm.py), so the two compare at the same sizes; this file adds the routing.

  python -m vlmjax.main --config=configs/dtf.py --workdir=/tmp/dtf             # 2-core CPU: 5-15 min (README)
  python -m vlmjax.main --config=configs/dtf.py:smoke --workdir=/tmp/dtf_smoke  # seconds, for tests
  python -m vlmjax.main --config=configs/dtf.py:qwen --workdir=/tmp/dtf_qwen \
      --config.init_from=/ckpt/Qwen2.5-0.5B         # LoRA fine-tune of a pretrained Qwen2.5 + DTF routers
  python -m vlmjax.main --config=configs/dtf.py:smollm2_135m --workdir=/tmp/dtf135  # accelerator-sized

Switches (config.routing): gate=prob_or|ce_only, beta=learned|scheduled, d_ch=mse|kl, capacity (gamma),
every/offset (which layers are dynamic), causal_capacity, lambda_prior, lambda_causal.
"""

from configs import common
from configs import lm
from vlmjax.models import routing

VARIANTS = ("default", "smoke", "qwen", "smollm2_135m")


def get_config(arg: str | None = None):
    v = common.variant(arg, VARIANTS, __file__)
    c = lm.get_config("default" if v == "qwen" else v)
    c.task = "routed_lm"

    c.routing = routing.default_config()
    c.routing.update(dict(
        kind="dtf",
        every=2, offset=1,     # layers 1, 3, ... are dynamic; layer i-1 is each one's decision layer
        capacity=0.5,          # gamma: top-k of G keeps half of the tokens
        causal_capacity=1.0,   # causal evaluation/decoding: every token the causal router picks
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

    if v == "qwen":
        # Pretrained Qwen2.5 (architecture and tokenizer from --config.init_from) with LoRA r=16,
        # alpha=32, dropout 0.05 on the attention and MLP projections (the base stays frozen); the
        # DTF routers and PriorFFNs (params under routers_*) train fully at 10x the adapters' lr.
        c.data.update(dict(tokenizer="hf", seq_len=512))
        c.model.update(dict(dtype="bfloat16", lora_rank=16, lora_alpha=32.0, lora_dropout=0.05))
        c.optim.update(dict(trainable=(r"lora_", r"^routers_"), lr=1e-4, lr_groups=((r"^routers_", 10.0),),
                            weight_decay=0.01, warmup_steps=20))
        c.update(dict(total_steps=2000, batch_size=16, eval_every=250, ckpt_every=250, log_every=10))
    return c
