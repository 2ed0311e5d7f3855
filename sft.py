"""Supervised fine-tuning on chat data: full parameters, loss on the assistant replies only.

One node (all its GPUs), ZeRO-3:
    deepspeed sft.py --deepspeed ds_configs/zero3.json --model_name_or_path out/pt \
        --train_files sft.jsonl --max_length 2048 --packing true \
        --learning_rate 1e-5 --num_train_epochs 3 --bf16 --gradient_checkpointing \
        --report_to wandb --output_dir out/sft
See exactly which tokens will be trained, before paying for a run (writes out/sft/preview.jsonl):
    python sft.py --model_name_or_path out/pt --train_files sft.jsonl --preview 5 --output_dir out/sft
Every argument in one JSON file: deepspeed sft.py configs/sft_demo.json
Two CPU ranks, no GPU: deepspeed --num_gpus 2 sft.py ...

Image-text models (LLaVA-style, AutoModelForImageTextToText): the same command on their folder, records with
images (dstrain/data/multimodal.py), --freeze_vision_tower / --freeze_projector; no --packing.
    deepspeed sft.py configs/multimodal_sft.json

Data: {"messages": [...]}, ShareGPT {"conversations": [...]} or Alpaca {"instruction", "input",
"output"} records, detected per record (--data_format to insist). How the loss mask, the length
limit and packing work: dstrain/data/sft.py.
"""

from pathlib import Path

from transformers import set_seed

from dstrain.arguments import ChatDataArguments, ModelArguments, TrainingArguments
from dstrain.audit import audit_before_training
from dstrain.cli import cli_entry, parse_args
from dstrain.data.chat_template import configure_chat_generation, require_chat_template
from dstrain.data.multimodal import image_collator
from dstrain.data.sft import sft_collator, write_preview
from dstrain.distributed import finish
from dstrain.errors import UserError
from dstrain.model.image_text import chat_data, check_freeze_flags, freeze_parts, model_class
from dstrain.model.loading import build_model, context_length, load_tokenizer, model_config_for
from dstrain.train.resume import apply_resume_plan, plan_resume
from dstrain.train.run import start_run
from dstrain.train.sequence_parallel import check_chat_rows
from dstrain.train.steps import train_save_evaluate

ARGUMENTS = (ModelArguments, ChatDataArguments, TrainingArguments)


def main(model_args: ModelArguments, data_args: ChatDataArguments, training_args: TrainingArguments) -> None:
    # ===== 0. this process joins the run =====
    run = start_run(training_args, model_args, data_args)
    set_seed(training_args.seed)

    # ===== 1. tokenizer with its chat template, and the model config =====
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    require_chat_template(tokenizer, model_args.tokenizer_name)
    check_chat_rows(training_args.sequence_parallel_size, data_args.packing, data_args.max_length)
    config = model_config_for(model_args, tokenizer)
    check_freeze_flags(model_args, config)
    context = context_length(config)
    if context and data_args.max_length > context:
        raise UserError(f"--max_length {data_args.max_length} is larger than the model's context ({context})")

    # ===== 2. conversations: checked, tokenized with the assistant mask, fitted, packed =====
    # (an image-text model's conversations carry images: dstrain/data/multimodal.py; processor is None otherwise)
    data, processor = chat_data(model_args, data_args, tokenizer, config, training_args.seed, training_args)
    if data_args.preview:
        write_preview(data["train"], tokenizer, data_args.preview, Path(training_args.output_dir) / "preview.jsonl")
        finish()
        return

    # ===== 3. where it continues from; the model, stopping at the end of an assistant turn; the data audit =====
    resume = plan_resume(training_args)
    apply_resume_plan(training_args, resume)
    model = build_model(model_args, config, auto_class=model_class(config))
    freeze_parts(model, model_args.freeze_vision_tower, model_args.freeze_projector)
    configure_chat_generation(model, tokenizer)
    audit_before_training("sft", data, tokenizer, model, data_args, training_args)

    # ===== 4. train, save a plain HF folder (with the chat template), evaluate =====
    collator = image_collator(processor, tokenizer) if processor else sft_collator(
        tokenizer, data_args.packing, model.config._attn_implementation, training_args.sequence_parallel_size,
        data_args.max_length)
    train_save_evaluate(run, model, tokenizer, data, collator, resume, processor)
    finish()


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args(ARGUMENTS)))()
