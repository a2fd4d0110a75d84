#!/usr/bin/env bash
# Create a Cloud TPU VM pod slice, run a vlmjax config on every worker, watch, stop, delete it.
#
#   launch/tpu_pod.sh create NAME --zone Z --accelerator-type v5litepod-64 [--version IMAGE] [--spot]
#                                 [--num-slices N]
#   launch/tpu_pod.sh run    NAME --zone Z [--num-slices N] [--include PATH]... -- \
#                                 --config=configs/X.py[:variant] --workdir=gs://BUCKET/DIR [--config.a=b ...]
#   launch/tpu_pod.sh logs   NAME --zone Z [--worker K] [--slice S] [--lines N] [--no-follow]
#   launch/tpu_pod.sh stop   NAME --zone Z [--num-slices N]
#   launch/tpu_pod.sh delete NAME --zone Z [--num-slices N]
#
# Options for every subcommand: --project P (passed to gcloud), --dry-run (print each gcloud command,
# one per line, shell-quoted, and run none), -h/--help. Everything after `--` goes to
# `python -m vlmjax.main` byte for byte (spaces, quotes, $ and ; included).
#
# run: ships the tracked files (`git ls-files`, with their working-tree contents) plus any --include
# paths as one tarball to ~/vlmjax/runs/RUN_ID/src on every worker; builds a Python 3.12 venv with uv
# once (~/vlmjax/venv; `uv pip install -e ".[tpu]"` again only when pyproject.toml changed); stops
# stale jobs (pkill -f vlmjax.main, processes holding /dev/accel* or /dev/vfio/*), removes
# /tmp/libtpu_lockfile; starts the job with nohup, one log per worker at
# ~/vlmjax/runs/RUN_ID/worker-$(hostname).log, and writes RUN_ID to ~/vlmjax/latest. The trainer
# gets --config.distributed.initialize=yes right after --config (a later one of yours wins): JAX
# finds the pod from the TPU metadata, and a worker that cannot never trains alone. The workdir
# must be shared (gs://), so re-running the same `run` resumes from its latest checkpoint.
# --num-slices N (multislice): the queued resource NAME with nodes NAME-0 .. NAME-(N-1); the
# MEGASCALE_* environment comes from the queued resource, the job runs on every worker of each.
#
# VLMJAX_REPO: the repository to ship (default: the one holding this script).
# Test-only environment, read on the worker (tests/test_launch.py): VLMJAX_LAUNCH_PYTHON (use this
# python, no uv/venv/install), VLMJAX_LAUNCH_KILL_PATTERN (default vlmjax.main),
# VLMJAX_LAUNCH_DEVICES (default "/dev/accel* /dev/vfio/*"), VLMJAX_LAUNCH_LIBTPU_LOCK (default
# /tmp/libtpu_lockfile), VLMJAX_LAUNCH_KILL_WAIT (seconds before SIGKILL, default 60).
set -euo pipefail

PROG=launch/tpu_pod.sh

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "$PROG: error: $* (see $PROG --help)" >&2; exit 2; }

# Shell-quote every argument (bash syntax), space separated.
qargs() {
  local out=() a
  for a in "$@"; do out+=("$(printf '%q' "$a")"); done
  printf '%s' "${out[*]}"
}
# POSIX single quotes (for the remote login shell, whatever it is).
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

DRY_RUN=0
gc() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$(qargs gcloud "$@")"
  else
    gcloud "$@"
  fi
}

# ---------------------------------------------------------------------------------------------
# Code that runs on the workers.
# ---------------------------------------------------------------------------------------------

# Defines stop_stale: SIGTERM (the trainer checkpoints and exits) to every vlmjax.main process and
# every process holding a TPU device, SIGKILL after VLMJAX_LAUNCH_KILL_WAIT s, then removes the
# libtpu lock a killed process leaves behind.
REMOTE_STOP_STALE=$(cat <<'EOF'
running() {  # whether any of the pids is still running (a zombie has exited)
  local p
  for p in "$@"; do [[ $(ps -o stat= -p "$p" 2>/dev/null) =~ ^[^Z] ]] && return 0; done
  return 1
}
stop_stale() {
  # [.]: the pattern must not match the shell running this very code (bash -c CODE).
  local pattern=${VLMJAX_LAUNCH_KILL_PATTERN:-vlmjax[.]main}
  local wait_s=${VLMJAX_LAUNCH_KILL_WAIT:-60}
  local lock=${VLMJAX_LAUNCH_LIBTPU_LOCK:-/tmp/libtpu_lockfile}
  local devices=${VLMJAX_LAUNCH_DEVICES:-/dev/accel* /dev/vfio/*}
  local find_args=() d pids
  for d in $devices; do find_args+=(-o -lname "$d"); done
  pids=$( { pgrep -f -- "$pattern" || true
            find /proc/[0-9]*/fd -maxdepth 1 \( -false "${find_args[@]}" \) 2>/dev/null \
              | cut -d/ -f3 || true; } | { grep -vx "$$" || true; } | sort -u | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    echo "vlmjax: $(hostname): stopping stale processes $pids"
    kill -TERM $pids 2>/dev/null || true
    local t=0
    while [ "$t" -lt "$wait_s" ] && running $pids; do sleep 1; t=$((t + 1)); done
    if running $pids; then kill -KILL $pids 2>/dev/null || true; sleep 1; fi
  fi
  if [ -e "$lock" ]; then
    rm -f "$lock" 2>/dev/null || sudo -n rm -f "$lock" || true
  fi
}
EOF
)

# The per-worker run script: $1 = run id, the rest = vlmjax.main arguments.
remote_run_script() {
  local run_id=$1; shift
  cat <<EOF
#!/usr/bin/env bash
# Written by $PROG for run $run_id: unpack, install, stop stale jobs, start vlmjax on this worker.
set -euo pipefail
RUN_ID=$(printf '%q' "$run_id")
ARGS=($(qargs "$@"))
EOF
  printf '%s\n' "$REMOTE_STOP_STALE"
  cat <<'EOF'
BASE="$HOME/vlmjax"
RUN_DIR="$BASE/runs/$RUN_ID"
SRC="$RUN_DIR/src"
STAGED="$HOME/vlmjax-$RUN_ID"
mkdir -p "$SRC"
tar -xzf "$STAGED.tar.gz" -C "$SRC"
mv -f "$STAGED.tar.gz" "$STAGED.sh" "$RUN_DIR/"

PY=${VLMJAX_LAUNCH_PYTHON:-}
if [ -z "$PY" ]; then
  export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"
  if ! command -v uv >/dev/null 2>&1; then
    curl -LsSf https://astral.sh/uv/install.sh | sh || python3 -m pip install --user -q uv
  fi
  VENV="$BASE/venv"
  [ -x "$VENV/bin/python" ] || uv venv --python 3.12 "$VENV"
  want=$(sha256sum "$SRC/pyproject.toml" | cut -d' ' -f1)
  if [ "$(cat "$VENV/.vlmjax-pyproject.sha256" 2>/dev/null || true)" != "$want" ]; then
    (cd "$SRC" && uv pip install --python "$VENV/bin/python" -e ".[tpu]")
    echo "$want" > "$VENV/.vlmjax-pyproject.sha256"
  fi
  PY="$VENV/bin/python"
fi

stop_stale
HOST=$(hostname)
LOG="$RUN_DIR/worker-$HOST.log"
cd "$SRC"
# This run's source wins over the editable install (which points at the run that installed it).
PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" nohup setsid "$PY" -m vlmjax.main "${ARGS[@]}" \
  > "$LOG" 2>&1 < /dev/null &
echo $! > "$RUN_DIR/worker-$HOST.pid"
echo "$RUN_ID" > "$BASE/latest"
echo "vlmjax: $HOST: started run $RUN_ID (pid $!), log $LOG"
EOF
}

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

while [ "${1:-}" = --dry-run ]; do DRY_RUN=1; shift; done
[ $# -gt 0 ] || die "missing subcommand: create, run, logs, stop or delete"
case $1 in
  -h|--help) usage; exit 0 ;;
  create|run|logs|stop|delete) CMD=$1; shift ;;
  *) die "unknown subcommand '$1': use create, run, logs, stop or delete" ;;
esac

NAME="" ZONE="" PROJECT="" NUM_SLICES=1 ACCEL="" VERSION="" SPOT=0 WORKER=0 SLICE=0 LINES=100
FOLLOW=1 INCLUDES=() TRAIN_ARGS=() SEEN_DASHDASH=0
need() {  # the option's value: from --opt=value, else the next argument (called with "$@")
  if [ "$has_val" = 0 ]; then
    [ $# -gt 0 ] || die "$opt needs a value"
    val=$1; NEXT_SHIFT=1
  fi
}
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --*=*) opt=${arg%%=*}; val=${arg#*=}; has_val=1 ;;
    *) opt=$arg; val=""; has_val=0 ;;
  esac
  NEXT_SHIFT=0
  case $opt in
    --) TRAIN_ARGS=("$@"); SEEN_DASHDASH=1; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --zone) need "$@"; ZONE=$val ;;
    --project) need "$@"; PROJECT=$val ;;
    --num-slices) need "$@"; NUM_SLICES=$val ;;
    --accelerator-type) need "$@"; ACCEL=$val ;;
    --version) need "$@"; VERSION=$val ;;
    --spot) SPOT=1 ;;
    --include) need "$@"; INCLUDES+=("$val") ;;
    --worker) need "$@"; WORKER=$val ;;
    --slice) need "$@"; SLICE=$val ;;
    --lines) need "$@"; LINES=$val ;;
    --no-follow) FOLLOW=0 ;;
    -*) die "unknown option '$opt' for '$CMD'" ;;
    *) [ -z "$NAME" ] || die "unexpected argument '$arg': trainer arguments go after '--'"
       NAME=$arg ;;
  esac
  [ "$NEXT_SHIFT" = 0 ] || shift
done

[ -n "$NAME" ] || die "missing the TPU name: $PROG $CMD NAME --zone ZONE ..."
[ -n "$ZONE" ] || die "missing --zone (e.g. --zone us-west4-a)"
[[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, not '$NUM_SLICES'"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number (0, 1, ...), not '$WORKER'"
[[ $SLICE =~ ^[0-9]+$ ]] && [ "$SLICE" -lt "$NUM_SLICES" ] || [ "$CMD" != logs ] || \
  die "--slice must be in 0..$((NUM_SLICES - 1)); pass --num-slices for a multislice pod"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, not '$LINES'"
case $CMD in
  create) [ -n "$ACCEL" ] || die "create needs --accelerator-type (e.g. v5litepod-64)" ;;
  *) [ -z "$ACCEL$VERSION" ] && [ "$SPOT" = 0 ] || \
       die "--accelerator-type, --version and --spot belong to 'create', not '$CMD'" ;;
esac
[ "$CMD" = run ] || [ ${#INCLUDES[@]} -eq 0 ] || die "--include belongs to 'run', not '$CMD'"
[ "$CMD" = run ] || [ "$SEEN_DASHDASH" = 0 ] || die "only 'run' takes trainer arguments after '--'"

COMMON=(--zone "$ZONE")
[ -z "$PROJECT" ] || COMMON+=(--project "$PROJECT")
# The TPU VM node names: NAME, or the multislice queued resource's NAME-0 .. NAME-(N-1).
NODES=()
if [ "$NUM_SLICES" = 1 ]; then NODES=("$NAME"); else
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$NAME-$i"); done
fi

default_version() {
  case $1 in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default --version for --accelerator-type $1: pass --version (a TPU VM runtime image)" ;;
  esac
}

ssh_all() {  # node, remote command
  gc compute tpus tpu-vm ssh "$1" "${COMMON[@]}" --worker=all --command "$2"
}

case $CMD in
  create)
    VERSION=${VERSION:-$(default_version "$ACCEL")}
    extra=()
    [ "$SPOT" = 0 ] || extra+=(--spot)
    if [ "$NUM_SLICES" = 1 ]; then
      gc compute tpus tpu-vm create "$NAME" "${COMMON[@]}" --accelerator-type "$ACCEL" \
        --version "$VERSION" "${extra[@]}"
    else
      gc compute tpus queued-resources create "$NAME" "${COMMON[@]}" --accelerator-type "$ACCEL" \
        --runtime-version "$VERSION" --node-count "$NUM_SLICES" --node-prefix "$NAME" "${extra[@]}"
    fi
    ;;

  run)
    [ ${#TRAIN_ARGS[@]} -gt 0 ] || \
      die "missing trainer arguments: run NAME --zone Z -- --config=configs/X.py --workdir=gs://..."
    has_config=0 workdir=""
    for a in "${TRAIN_ARGS[@]}"; do
      case $a in
        --config=*|--config) has_config=1 ;;
        --workdir=*) workdir=${a#--workdir=} ;;
      esac
    done
    prev=""; for a in "${TRAIN_ARGS[@]}"; do [ "$prev" != --workdir ] || workdir=$a; prev=$a; done
    [ "$has_config" = 1 ] || die "missing --config=configs/X.py[:variant] after '--'"
    [ -n "$workdir" ] || die "missing --workdir=gs://BUCKET/DIR after '--' (shared by all workers)"
    case $workdir in
      *://*) ;;
      *) echo "$PROG: warning: --workdir=$workdir is not gs://: every worker must see the same" \
              "directory (a shared mount), or the checkpoints are broken" >&2 ;;
    esac
    REPO=${VLMJAX_REPO:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
    REPO=$(cd "$REPO" && pwd -P)
    # Repository-relative --include paths (files or folders, given relative to here or absolute).
    INCLUDE_REL=()
    for p in "${INCLUDES[@]}"; do
      [ -e "$p" ] || die "--include $p does not exist"
      abs=$(cd "$(dirname "$p")" && pwd -P)/$(basename "$p")
      case $abs in
        "$REPO"/?*) INCLUDE_REL+=("${abs#"$REPO"/}") ;;
        *) die "--include $p is outside the repository $REPO" ;;
      esac
    done
    RUN_ID=$(date -u +%Y%m%d-%H%M%S)-$$
    STAGE=$(mktemp -d "${TMPDIR:-/tmp}/vlmjax-launch.XXXXXX")
    if [ "$DRY_RUN" = 1 ]; then
      echo "$PROG: dry run: staged files kept in $STAGE" >&2
    else
      trap 'rm -rf "$STAGE"' EXIT
    fi
    # The tracked files that exist in the working tree plus the files under the includes (no
    # .venv, __pycache__), NUL separated, each once.
    { (cd "$REPO" && git ls-files -z) | while IFS= read -r -d '' f; do
        if [ -e "$REPO/$f" ] || [ -L "$REPO/$f" ]; then printf '%s\0' "$f"; fi
      done
      [ ${#INCLUDE_REL[@]} -eq 0 ] || (cd "$REPO" && find "${INCLUDE_REL[@]}" \
        \( -name .venv -o -name __pycache__ \) -prune -o \( -type f -o -type l \) -print0)
    } | sort -zu > "$STAGE/files"
    TARBALL="$STAGE/vlmjax-$RUN_ID.tar.gz"
    SCRIPT="$STAGE/vlmjax-$RUN_ID.sh"
    tar -czf "$TARBALL" -C "$REPO" --no-recursion --null -T "$STAGE/files"
    # --config.distributed.initialize=yes right after --config (absl wants overrides after it), so
    # an explicit --config.distributed.initialize later in the arguments wins.
    ARGS=() inserted=0 take_next=0
    for a in "${TRAIN_ARGS[@]}"; do
      ARGS+=("$a")
      if [ "$inserted" = 0 ] && { [ "$take_next" = 1 ] || [[ $a == --config=* ]]; }; then
        ARGS+=(--config.distributed.initialize=yes); inserted=1
      fi
      take_next=0; [ "$a" != --config ] || take_next=1
    done
    remote_run_script "$RUN_ID" "${ARGS[@]}" > "$SCRIPT"
    for node in "${NODES[@]}"; do
      gc compute tpus tpu-vm scp "$TARBALL" "$SCRIPT" "$node:~/" "${COMMON[@]}" --worker=all
      ssh_all "$node" "bash ~/vlmjax-$RUN_ID.sh"
    done
    [ "$DRY_RUN" = 1 ] || \
      echo "$PROG: run $RUN_ID started on ${NODES[*]}; watch it with: $PROG logs $NAME --zone $ZONE" >&2
    ;;

  logs)
    follow=$([ "$FOLLOW" = 1 ] && echo " -F" || true)
    code='set -eu; B="$HOME/vlmjax"; [ -s "$B/latest" ] || { echo "no vlmjax run on $(hostname)" >&2; exit 1; }; '
    code+="exec tail -n $LINES$follow \"\$B/runs/\$(cat \"\$B/latest\")\"/worker-*.log"
    gc compute tpus tpu-vm ssh "${NODES[$SLICE]}" "${COMMON[@]}" "--worker=$WORKER" \
      --command "bash -c $(sq "$code")"
    ;;

  stop)
    code=$(printf '%s\nset -eu\nstop_stale\necho "vlmjax: $(hostname): stopped"\n' "$REMOTE_STOP_STALE")
    for node in "${NODES[@]}"; do ssh_all "$node" "bash -c $(sq "$code")"; done
    ;;

  delete)
    if [ "$NUM_SLICES" = 1 ]; then
      gc compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
    else
      gc compute tpus queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
    fi
    ;;
esac
