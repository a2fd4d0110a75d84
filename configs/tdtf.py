r"""TDTF: the temporal DTF variant (teacher dense block + transition network, scheduled betas,
student causal router; at inference only the selected tokens update the stream and write K/V).

Same sizes as configs/lm.py and configs/dtf.py.

  python -m vlmjax.main --config=configs/tdtf.py --workdir=/tmp/tdtf
  python -m vlmjax.main --config=configs/tdtf.py:smoke --workdir=/tmp/tdtf_smoke
"""

from vlmjax.tasks import routed_lm

VARIANTS = ("default", "smoke", "smollm2_135m")


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"configs/tdtf.py:{variant} is not a variant; choose one of {VARIANTS}.")
    return routed_lm.config_for("tdtf", variant)
