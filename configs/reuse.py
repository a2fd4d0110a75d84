r"""Token reuse for video ViTs (ReuseViT, Hwang et al. PVLDB 2025; shared/specs/token-reuse.md).

Trains the per-layer reuse modules (decision + restoration MLPs) against the frozen backbone on
procedural video; evaluation runs the hard (gather) inference path and reports reuse rates, pooled
and patch cosine to the original model, the analytic FLOPs ratio and a linear probe.

  python -m vlmjax.main --config=configs/reuse.py --workdir=/tmp/reuse
      (no init_from: a small ViT is trained on the same clips first, in /tmp/reuse/backbone)
  python -m vlmjax.main --config=configs/reuse.py:smoke --workdir=/tmp/reuse_smoke
  python -m vlmjax.main --config=configs/reuse.py:clip_b16 --config.init_from=/ckpt/clip-vit-base-patch16 \
      --workdir=/tmp/reuse_clip
  --config.init_from may also be a vlmjax workdir of a video_cls run.
"""

from vlmjax.tasks import reuse


def get_config(arg: str | None = None):
    return reuse.get_config(arg or "default")
