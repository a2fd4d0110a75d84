#!/usr/bin/env bash
# Launch a vlmjax config on every worker of a TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   e.g. launch/tpu_pod.sh my-v5p-64 us-east5-a configs/lm.py:smollm2_135m gs://bucket/runs/lm135
#
# Every worker runs the same command; jax.distributed.initialize() discovers the pod from the TPU
# metadata (config.distributed.initialize=auto), each process reads its own data slice and only
# process 0 writes logs. WORKDIR must be shared by all workers (a GCS bucket or a shared mount) so
# the orbax checkpoints are one checkpoint. Re-running the same command resumes.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=${VLMJAX_REPO:-$(git rev-parse --show-toplevel)}
# 1) copy the working tree to every worker, 2) install, 3) run.
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all "$REPO" "$TPU_NAME":~/vlmjax
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/vlmjax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip && pip install -q -e . 'jax[tpu]'
  python -m vlmjax.main --config=$CONFIG --workdir=$WORKDIR --config.distributed.initialize=yes $*
"
