"""Causal-LM pretraining under DeepSpeed (ZeRO-2/3), from a tokenizer + model preset or a trained model.

One GPU / one node (all its GPUs):
    deepspeed pretrain.py --deepspeed ds_configs/zero2.json \
        --tokenizer_name tok --config_name configs/models/llama-120m.json \
        --train_files corpus/*.jsonl --block_size 2048 \
        --per_device_train_batch_size 16 --gradient_accumulation_steps 4 \
        --learning_rate 5e-4 --warmup_ratio 0.01 --lr_scheduler_type cosine --weight_decay 0.1 \
        --num_train_epochs 1 --bf16 --gradient_checkpointing --report_to wandb --output_dir out/pt
Every argument in one JSON file (flags after it override it):
    deepspeed pretrain.py configs/pretrain_tiny.json
Many nodes: the same arguments through launch/ (hostfile, no-ssh, SLURM).
Two CPU ranks, no GPU (tests, laptops): deepspeed --num_gpus 2 pretrain.py ...
Continued pretraining: --model_name_or_path out/pt instead of --tokenizer_name/--config_name.
Resume after a crash: add --resume_from_checkpoint last.
Long sequences: --sequence_parallel_size N splits each across N ranks; --rope_scaling yarn:4 extends a
trained model's context (README, "Long context").
"""

from transformers import set_seed

from dstrain.arguments import DataArguments, ModelArguments, TrainingArguments
from dstrain.audit import audit_before_training
from dstrain.cli import cli_entry, parse_args
from dstrain.data.blocks import pretraining_collator, pretraining_datasets
from dstrain.distributed import finish
from dstrain.model.loading import build_model, choose_block_size, load_tokenizer, model_config_for
from dstrain.train.resume import apply_resume_plan, plan_resume
from dstrain.train.run import start_run
from dstrain.train.sequence_parallel import check_sequence_length
from dstrain.train.steps import train_save_evaluate

ARGUMENTS = (ModelArguments, DataArguments, TrainingArguments)


def main(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    # ===== 0. this process joins the run; where it continues from =====
    run = start_run(training_args, model_args, data_args)
    set_seed(training_args.seed)
    resume = plan_resume(training_args)
    apply_resume_plan(training_args, resume)

    # ===== 1. tokenizer, and the model config it implies =====
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    config = model_config_for(model_args, tokenizer)
    block_size = choose_block_size(data_args.block_size, config,
                                   model_args.config_name or model_args.model_name_or_path,
                                   follow_context=model_args.extends_context())  # --rope_scaling: the new context
    check_sequence_length(block_size, training_args.sequence_parallel_size, "--block_size")  # --sequence_parallel_size

    # ===== 2. data: tokenized once (first process per node), packed into blocks =====
    data = pretraining_datasets(data_args, tokenizer, block_size, training_args.seed)

    # ===== 3. model; then the data audit (dstrain/audit/) before any step is paid for =====
    model = build_model(model_args, config)
    audit_before_training("pretrain", data, tokenizer, model, data_args, training_args)

    # ===== 4. train, save a plain HF folder, evaluate =====
    collator = pretraining_collator(data_args.document_mask, tokenizer, model.config._attn_implementation)
    train_save_evaluate(run, model, tokenizer, data, collator, resume)
    finish()


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args(ARGUMENTS)))()
