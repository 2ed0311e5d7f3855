#!/usr/bin/env bash
# Train on several nodes from one: DeepSpeed reaches every node of the hostfile over pdsh/ssh.
#   HOSTFILE=hosts launch/multi_node.sh sft.py --deepspeed ds_configs/zero3.json --model_name_or_path out/pt ...
# The hostfile lists one node a line: "node01 slots=8" (slots = GPUs used there). Every node needs
# the same paths (a shared file system) and password-less ssh from this one.
# Variables: HOSTFILE (required), MASTER_ADDR (default the first node), MASTER_PORT (default 29500,
#   the same for all nodes), LOG_DIR, NET_IF, OMP_NUM_THREADS, DRY_RUN=1.
# A SIGTERM to this script reaches the ranks through DeepSpeed's own relay (pkill over pdsh to each
# node's launcher), which gives them 30 s before SIGKILL; no_ssh.sh (one per node) has no such limit.
. "$(dirname "$0")/common.sh"
parse_entry "$@"

[ -n "${HOSTFILE:-}" ] || die "set HOSTFILE to a file of 'hostname slots=N' lines"
MASTER_PORT=${MASTER_PORT:-29500}
master=()
[ -n "${MASTER_ADDR:-}" ] && master=(--master_addr "$MASTER_ADDR")

preflight --hostfile "$HOSTFILE"
FORWARD_SIGNALS=0  # the launchers run on other nodes, under pdsh; DeepSpeed's runner relays the signal
launch --hostfile "$HOSTFILE" "${master[@]}" --master_port "$MASTER_PORT" "$ENTRY" "${SCRIPT_ARGS[@]}"
