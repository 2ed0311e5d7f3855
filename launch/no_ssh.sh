#!/usr/bin/env bash
# Run once on every node (Kubernetes, bare nodes, SLURM's srun): no ssh between nodes. Each
# node's launcher starts its own ranks and they meet at MASTER_ADDR:MASTER_PORT.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/no_ssh.sh pretrain.py configs/pretrain_120m.json   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/no_ssh.sh pretrain.py configs/pretrain_120m.json   # node 1
# Variables: NNODES, NODE_RANK, MASTER_ADDR (required), NGPU (ranks on each node, default all
#   GPUs), MASTER_PORT (default 29500, the same on every node), HOSTFILE (default: written for
#   NNODES nodes of NGPU slots), LOG_DIR, NET_IF, OMP_NUM_THREADS, DRY_RUN=1.
# On Kubernetes make this the container's command (exec form, no shell in front): a SIGTERM to it
# reaches its node's ranks, which save a checkpoint and exit with 75 (README, "Preemption").
. "$(dirname "$0")/common.sh"
parse_entry "$@"

: "${NNODES:?set NNODES, the number of nodes}" "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}"
NGPU=${NGPU:-$(gpu_count)}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${HOSTFILE:-}" ]; then
  # DeepSpeed takes the world's shape from a hostfile; with --no_ssh the names are only labels.
  HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/dstrain-hosts.XXXXXX")
  for ((node = 0; node < NNODES; node++)); do echo "node$node slots=$NGPU"; done >"$HOSTFILE"
fi
check_port=()
[ "$NODE_RANK" = 0 ] && check_port=(--master_port "$MASTER_PORT" --check_port)

preflight --hostfile "$HOSTFILE" "${check_port[@]}"
launch --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" "$ENTRY" "${SCRIPT_ARGS[@]}"
