r"""DTF: a decoder whose dynamic layers process only the tokens a surprise router picks.

Spec: shared/specs/routing.md (decision/dynamic layer pairs, PriorFFN, D_st / D_ch, CE / CU with the
causal moving average, probabilistic OR, top-k at gamma, causal router). The model has the sizes of
configs/lm.py (the dense baseline), trained from scratch on the embedded corpus.

  python -m vlmjax.main --config=configs/dtf.py --workdir=/tmp/dtf             # 2-core CPU: < 10 min
  python -m vlmjax.main --config=configs/dtf.py:smoke --workdir=/tmp/dtf_smoke  # seconds, for tests
  python -m vlmjax.main --config=configs/dtf.py:qwen --workdir=/tmp/dtf_qwen \
      --config.init_from=/ckpt/Qwen2.5-0.5B         # LoRA fine-tune of a pretrained Qwen2.5 + DTF routers
  python -m vlmjax.main --config=configs/dtf.py:smollm2_135m --workdir=/tmp/dtf135  # accelerator-sized

Switches (config.routing): gate=prob_or|ce_only, beta=learned|scheduled, d_ch=mse|kl, capacity (gamma),
every/offset (which layers are dynamic), causal_capacity, lambda_prior, lambda_causal.
"""

from vlmjax.tasks import routed_lm

VARIANTS = ("default", "smoke", "qwen", "smollm2_135m")


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/dtf.py:{variant} is not a variant; choose one of {VARIANTS}.")
    c = routed_lm.config_for("dtf", variant)
    if variant == "qwen":
        # Pretrained Qwen2.5 (architecture and tokenizer from --config.init_from) with LoRA r=16,
        # alpha=32, dropout 0.05 on the attention and MLP projections (the base stays frozen); the
        # DTF routers and PriorFFNs (params under routers_*) train fully at 10x the adapters' lr.
        c.data.tokenizer = "hf"
        c.data.seq_len = 512
        c.model.dtype = "bfloat16"
        c.model.update(dict(lora_rank=16, lora_alpha=32.0, lora_dropout=0.05))
        c.optim.trainable = (r"lora_", r"^routers_")
        c.optim.lr = 1e-4
        c.optim.lr_groups = ((r"^routers_", 10.0),)
        c.optim.weight_decay = 0.01
        c.optim.warmup_steps = 20
        c.total_steps = 2000
        c.batch_size = 16
        c.eval_every = 250
        c.ckpt_every = 250
        c.log_every = 10
    return c
