#!/usr/bin/env bash
# The README's first command: from nothing to a pretrained model that writes text.
#   1. make the project's environment (first run only)
#   2. write Python's own documentation as a corpus (every CPython carries it: no download)
#   3. train a 4,096-token BPE tokenizer on it
#   4. pretrain the 2.3M-parameter demo model under DeepSpeed ZeRO-2 on every GPU, or on
#      2 CPU ranks where there is none (about 4 minutes on 2 cores)
#   5. print a generation from the trained model
#   6. make a small chat set from the same documentation and fine-tune on it (chat SFT,
#      ZeRO-3, packed, loss on the assistant replies only: about 2 minutes on 2 cores)
#   7. ask the fine-tuned model one question through its chat template
#   8. score it on the shipped benchmark tasks through lm-evaluation-harness (eval_tasks/: made from
#      the running Python, no network), and check those benchmarks against its training data
# Everything lands in out/demo/. NGPU=1 bash scripts/demo.sh picks the number of ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
else
  NGPU=${NGPU:-2}   # CPU ranks: DeepSpeed's CPU accelerator with the gloo backend
fi
MASTER_PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}

python data.py python-docs --output out/demo/corpus.jsonl
python tokenizer.py --train_files out/demo/corpus.jsonl --output_dir out/demo/tok --vocab_size 4096
deepspeed --num_gpus "$NGPU" --master_port "$MASTER_PORT" pretrain.py configs/pretrain_demo.json
echo "----- a generation from out/demo/pt -----"
python generate.py --model out/demo/pt --prompt "The for statement" --max_new_tokens 60 --temperature 0.7

python data.py python-docs-chat --output out/demo/chat.jsonl
deepspeed --num_gpus "$NGPU" --master_port "$MASTER_PORT" sft.py configs/sft_demo.json
echo "----- one chat turn with out/demo/sft -----"
python generate.py --model out/demo/sft --chat "What does str.upper() do?" --max_new_tokens 60 --temperature 0.3

echo "----- benchmarks (lm-evaluation-harness, the shipped tasks: no network) -----"
python eval.py --model out/demo/sft --tasks python_local --limit 100 --output out/demo/sft/eval.json
echo "----- are those benchmarks in the training data? -----"
python audit.py configs/sft_demo.json --contamination python_local
