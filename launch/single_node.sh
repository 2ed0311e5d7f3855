#!/usr/bin/env bash
# Train on this machine's GPUs (on 2 CPU ranks where it has none) with DeepSpeed.
#   launch/single_node.sh pretrain.py configs/pretrain_tiny.json
#   NGPU=4 launch/single_node.sh sft.py --deepspeed ds_configs/zero3.json --model_name_or_path out/pt ...
#   INCLUDE=localhost:0,2 launch/single_node.sh pretrain.py ...      # these GPUs only
#   CUDA_VISIBLE_DEVICES=0,2 launch/single_node.sh pretrain.py ...   # the same
#   DRY_RUN=1 launch/single_node.sh pretrain.py ...                   # check the job, print the command
# Variables: NGPU (default all GPUs), INCLUDE / EXCLUDE (DeepSpeed's --include / --exclude;
#   CUDA_VISIBLE_DEVICES is turned into INCLUDE),
#   MASTER_PORT (default a free port), LOG_DIR (default <output_dir>/logs), NET_IF, OMP_NUM_THREADS.
# The entry script's arguments pass through untouched.
. "$(dirname "$0")/common.sh"
parse_entry "$@"

# DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES itself, so a user's choice becomes --include.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ -z "${INCLUDE:-}" ] && [ -z "${EXCLUDE:-}" ]; then
  INCLUDE=localhost:$CUDA_VISIBLE_DEVICES
fi
NGPU=${NGPU:-$(gpu_count)}
select=(--num_gpus "$NGPU")
world_size=$NGPU
if [ -n "${INCLUDE:-}" ]; then
  select=(--include "$INCLUDE")
  ids=${INCLUDE#*:}
  world_size=$(( $(tr -cd ',' <<<"$ids" | wc -c) + 1 ))
elif [ -n "${EXCLUDE:-}" ]; then
  select+=(--exclude "$EXCLUDE")
  ids=${EXCLUDE#*:}
  world_size=$(( NGPU - $(tr -cd ',' <<<"$ids" | wc -c) - 1 ))
fi
MASTER_PORT=${MASTER_PORT:-$(free_port)}

preflight --world_size "$world_size" --master_port "$MASTER_PORT" --check_port
launch "${select[@]}" --master_port "$MASTER_PORT" "$ENTRY" "${SCRIPT_ARGS[@]}"
