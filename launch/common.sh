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
# folder, hostfile, port); sets OUTPUT_DIR and PREEMPTION_SIGNALS (the run's --preemption_signals,
# e.g. "TERM USR2") from the two lines it prints.
preflight() {
  local checked
  checked=$("$PYTHON" "$LAUNCH_DIR/preflight.py" --entry "$ENTRY" "$@" -- "${SCRIPT_ARGS[@]}")
  OUTPUT_DIR=${checked%%$'\n'*}
  PREEMPTION_SIGNALS=
  if [[ $checked == *$'\n'* ]]; then PREEMPTION_SIGNALS=${checked#*$'\n'}; fi
}

# Runs deepspeed with its arguments, each rank's output copied to $LOG_DIR/rank<N>.log.
# DRY_RUN=1 prints the command instead. The preemption signals (SIGTERM from SLURM or Kubernetes)
# go to the ranks, all at once, through launch/supervise.py, which holds DeepSpeed's own launcher
# off them: it would kill the ranks one after another 30 s after a SIGTERM (see supervise.py).
# FORWARD_SIGNALS=0 (multi_node.sh: pdsh starts the launchers) leaves them to DeepSpeed.
launch() {
  LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}
  local command=("$DEEPSPEED" "$@")
  if [ "${FORWARD_SIGNALS:-1}" = 1 ] && [ -n "${PREEMPTION_SIGNALS:-}" ]; then
    command=("$PYTHON" "$LAUNCH_DIR/supervise.py" --signals "$PREEMPTION_SIGNALS" -- "${command[@]}")
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${command[@]}"
    echo
    return 0
  fi
  echo "Per-rank logs: $LOG_DIR/rank<N>.log" >&2
  DSTRAIN_LOG_DIR=$LOG_DIR exec "${command[@]}"
}
