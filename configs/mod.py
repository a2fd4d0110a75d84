r"""Mixture-of-Depths (Raposo et al. 2024): every other layer processes 12.5% of the tokens.

Same sizes as configs/lm.py (the dense baseline) and configs/dtf.py. Causal inference by an auxiliary
BCE on the router logits (routing.mod_causal='aux') or a stop-gradient predictor MLP ('predictor').

  python -m vlmjax.main --config=configs/mod.py --workdir=/tmp/mod
  python -m vlmjax.main --config=configs/mod.py:smoke --workdir=/tmp/mod_smoke
"""

from vlmjax.tasks import routed_lm

VARIANTS = ("default", "smoke", "smollm2_135m")


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/mod.py:{variant} is not a variant; choose one of {VARIANTS}.")
    return routed_lm.config_for("mod", variant)
