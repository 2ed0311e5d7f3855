# Shared by the launch/ scripts (sourced). DeepSpeed's launcher does the work; these functions
# check the job first, pick defaults, and keep per-rank logs.
set -euo pipefail
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}

# Cluster knobs, passed through to every rank (DeepSpeed forwards NCCL_*, PYTHON* and the
# variables in .deepspeed_env to other nodes): NET_IF names the network interface both NCCL
# (GPUs) and gloo (CPU ranks) must use when a node has several.
if [ -n "${NET_IF:-}" ]; then
  export NCCL_SOCKET_IFNAME=$NET_IF GLOO_SOCKET_IFNAME=$NET_IF
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank unless told otherwise
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

usage() {  # the calling script's header comment
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

die() { echo "error: $*" >&2; exit 2; }

# Sets ENTRY and SCRIPT_ARGS from "entry.py args...", or prints the usage.
parse_entry() {
  if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    usage
    [ $# -eq 0 ] && exit 2 || exit 0
  fi
  ENTRY=$1
  shift
  SCRIPT_ARGS=("$@")
}

gpu_count() {  # GPUs on this node; 2 CPU ranks where there is none
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | wc -l
  else
    echo 2
  fi
}

free_port() {
  "$PYTHON" -c 'from dstrain.distributed import free_port; print(free_port())'
}

# Checks the job (entry script, DeepSpeed config against the flags and world size, output
# folder, hostfile, port) and prints the run's output folder.
preflight() {
  "$PYTHON" "$LAUNCH_DIR/preflight.py" --entry "$ENTRY" "$@" -- "${SCRIPT_ARGS[@]}"
}

# Runs deepspeed with its arguments, each rank's output copied to $LOG_DIR/rank<N>.log.
# DRY_RUN=1 prints the command instead.
launch() {
  LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "$DEEPSPEED" "$@"
    echo
    return 0
  fi
  echo "Per-rank logs: $LOG_DIR/rank<N>.log" >&2
  DSTRAIN_LOG_DIR=$LOG_DIR exec "$DEEPSPEED" "$@"
}
