#!/usr/bin/env bash
# The GPU throughput table: pretrain.py against a plain HF Trainer script on the same settings.
#
#   bash bench/gpu.sh                                   # 1 GPU, both presets, the Python docs as corpus
#   NGPU=8 CORPUS=corpus.jsonl STEPS=50 bash bench/gpu.sh
#   PRESETS=llama-1b ZERO="3" DRY_RUN=1 bash bench/gpu.sh   # print the commands only
#
# For each preset (llama-120m, llama-1b) and ZeRO stage (2, 3): pretrain.py with sdpa, with flash
# attention 2, with Liger's kernels, with torch.compile, and with all three; the plain Trainer script
# (bench/train_throughput.py --plain) with sdpa and with flash. Every run is bf16, STEPS steps of
# NGPU x BATCH x BLOCK tokens, logging every step. Then bench/gpu_table.py prints one table: tokens/s,
# MFU, HFU (with recomputation; equal to MFU here, no activation checkpointing), peak memory, and
# each run against the plain script with the same preset, stage and attention. Runs that fail
# (e.g. flash-attn or liger-kernel missing: pip install -e '.[gpu]') are listed, their logs kept.
# The default corpus (Python's documentation, no download) gives a small vocabulary; pass CORPUS
# and VOCAB for a realistic output layer.
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-1}
PRESETS=${PRESETS:-"llama-120m llama-1b"}
ZERO=${ZERO:-"2 3"}
STEPS=${STEPS:-30}
BATCH=${BATCH:-8}
BLOCK=${BLOCK:-2048}
VOCAB=${VOCAB:-8000}
WORK=${WORK:-bench_gpu_runs}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

if [[ "$DRY_RUN" != 1 ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: bench/gpu.sh needs a CUDA GPU ($PYTHON's torch sees none here); bench/train_throughput.py is the CPU benchmark" >&2
    exit 2
fi

run() {  # echo, or run (DRY_RUN=1 only echoes)
    echo "+ $*"
    [[ "$DRY_RUN" == 1 ]] || "$@"
}

run mkdir -p "$WORK/runs"
if [[ -z "${CORPUS:-}" ]]; then
    CORPUS="$WORK/pydoc.jsonl"
    run "$PYTHON" -c "import json; from dstrain.data.python_docs import documentation_texts; open('$CORPUS', 'w').write(''.join(json.dumps({'text': t}) + '\n' for t in documentation_texts()))"
fi
[[ -d "$WORK/tok" ]] || run "$PYTHON" tokenizer.py --train_files "$CORPUS" --output_dir "$WORK/tok" --vocab_size "$VOCAB"

for preset in $PRESETS; do
    # The model config both scripts build (the preset over the tokenizer), and its FLOPs per token for the table.
    run "$PYTHON" -c "
from transformers import AutoTokenizer
from dstrain.model.config import derive_model_config
derive_model_config(AutoTokenizer.from_pretrained('$WORK/tok'), '$preset').save_pretrained('$WORK/config-$preset')"
    for zero in $ZERO; do
        variants=("sdpa false false ours" "flash_attention_2 false false ours" "sdpa true false ours"
                  "sdpa false true ours" "flash_attention_2 true true ours" "sdpa false false plain"
                  "flash_attention_2 false false plain")
        for variant in "${variants[@]}"; do
            read -r attention liger compile script <<<"$variant"
            name="$preset-zero$zero-$attention-liger_$liger-compile_$compile-$script"
            out="$WORK/runs/$name"
            run rm -rf "$out"
            run mkdir -p "$out"
            run "$PYTHON" -c "
import json
from transformers import AutoConfig
from dstrain.train.plan import flops_per_token, model_size
import torch
from dstrain.train.monitoring import peak_tflops_for
peak = peak_tflops_for(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
json.dump({'preset': '$preset', 'zero': $zero, 'attention': '$attention', 'liger': '$liger', 'compile': '$compile',
           'script': '$script', 'steps': $STEPS, 'tokens_per_step': $NGPU * $BATCH * $BLOCK, 'peak_tflops': peak,
           'flops_per_token': flops_per_token(model_size(AutoConfig.from_pretrained('$WORK/config-$preset')), $BLOCK)},
          open('$out/meta.json', 'w'))"
            common=(--deepspeed "ds_configs/zero$zero.json" --bf16 --block_size "$BLOCK" --seed 0)
            if [[ "$script" == ours ]]; then
                cmd=(deepspeed --num_gpus "$NGPU" pretrain.py "${common[@]}" --tokenizer_name "$WORK/tok"
                     --config_name "$WORK/config-$preset/config.json" --train_files "$CORPUS"
                     --per_device_train_batch_size "$BATCH" --max_steps "$STEPS" --learning_rate 3e-4
                     --logging_steps 1 --save_strategy no --validation_split_percentage 0 --report_to none
                     --disable_tqdm true --data_cache_dir "$WORK/cache" --attn_implementation "$attention"
                     --use_liger_kernel "$liger" --torch_compile "$compile" --output_dir "$out")
                if [[ "$DRY_RUN" == 1 ]]; then
                    echo "+ ${cmd[*]}"
                else
                    "${cmd[@]}" >"$out/log" 2>&1 || echo "failed: $name (see $out/log)"
                fi
            else
                plain=(--attn_implementation "$attention")
                [[ "$liger" == true ]] && plain+=(--use_liger_kernel)
                [[ "$compile" == true ]] && plain+=(--torch_compile)
                if [[ "$DRY_RUN" == 1 ]]; then
                    echo "+ deepspeed --num_gpus $NGPU bench/train_throughput.py --plain ... ${plain[*]}"
                elif deepspeed --num_gpus "$NGPU" bench/train_throughput.py --plain "${common[@]}" \
                        --tokenizer "$WORK/tok" --model_config "$WORK/config-$preset" --train_files "$CORPUS" \
                        --batch_size "$BATCH" --steps "$STEPS" --learning_rate 3e-4 --output_dir "$out" \
                        "${plain[@]}" >"$out/log" 2>&1; then
                    grep -h '^RESULT ' "$out/log" | tail -1 | cut -d' ' -f2- >"$out/result.json"
                else
                    echo "failed: $name (see $out/log)"
                fi
            fi
        done
    done
done
[[ "$DRY_RUN" == 1 ]] || "$PYTHON" bench/gpu_table.py "$WORK"
