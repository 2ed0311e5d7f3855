"""LoRA / QLoRA fine-tuning through PEFT: chat SFT by default, continued pretraining with --stage pretrain.

One node, ZeRO-2:
    deepspeed lora.py --deepspeed ds_configs/zero2.json --model_name_or_path out/pt \
        --train_files sft.jsonl --lora_r 8 --lora_alpha 32 --lora_dropout 0.1 \
        --lora_target_modules q_proj,v_proj --learning_rate 1e-4 --output_dir out/lora
All linear layers: --lora_target_modules all-linear. QLoRA (CUDA GPU + bitsandbytes): --quantization_bit 4.
Plain text instead of chat: --stage pretrain --block_size 1024 (--text_field as in pretrain.py).
Every argument in one file: deepspeed lora.py configs/lora_sft.json
Fold the adapter into a plain model afterwards: python export.py --adapter out/lora --output_dir out/merged

Image-text models (LLaVA-style): adapters on the language model only, the vision tower and projector frozen
(records with images: dstrain/data/multimodal.py).
Chat data, masks, length policy and packing are sft.py's (dstrain/data/sft.py). The output folder
is a standard PEFT adapter (adapter_config.json, adapter_model.safetensors) with the tokenizer.
"""

from transformers import set_seed

from dstrain.arguments import AdapterDataArguments, LoraArguments, ModelArguments, TrainingArguments
from dstrain.audit import audit_before_training
from dstrain.cli import cli_entry, parse_args
from dstrain.data.blocks import block_collator, pretraining_datasets
from dstrain.data.chat_template import configure_chat_generation, require_chat_template
from dstrain.data.multimodal import image_collator
from dstrain.data.sft import sft_collator
from dstrain.distributed import finish
from dstrain.errors import UserError
from dstrain.model.adapters import apply_lora, quantization_config
from dstrain.model.image_text import chat_data, check_freeze_flags, freeze_parts, model_class
from dstrain.model.loading import build_model, choose_block_size, load_tokenizer, model_config_for
from dstrain.train.resume import apply_resume_plan, plan_resume
from dstrain.train.run import start_run
from dstrain.train.sequence_parallel import check_chat_rows, check_sequence_length
from dstrain.train.steps import train_save_evaluate

ARGUMENTS = (ModelArguments, AdapterDataArguments, LoraArguments, TrainingArguments)


def main(model_args, data_args, lora_args, training_args) -> None:
    # ===== 0. this process joins the run; where it continues from =====
    run = start_run(training_args, model_args, data_args, lora_args)
    set_seed(training_args.seed)
    if not model_args.model_name_or_path:
        raise UserError("LoRA adapts a trained model: give --model_name_or_path")
    quantization = quantization_config(lora_args.quantization_bit)
    resume = plan_resume(training_args)
    apply_resume_plan(training_args, resume)

    # ===== 1. tokenizer and the base model's config =====
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    config = model_config_for(model_args, tokenizer)
    check_freeze_flags(model_args, config)
    processor = None

    # ===== 2. data: chat conversations (as sft.py) or plain text blocks (as pretrain.py) =====
    if data_args.stage == "sft":
        require_chat_template(tokenizer, model_args.tokenizer_name)
        check_chat_rows(training_args.sequence_parallel_size, data_args.packing, data_args.max_length)
        data, processor = chat_data(model_args, data_args, tokenizer, config, training_args.seed, training_args)
    else:
        block_size = choose_block_size(data_args.block_size, config, model_args.model_name_or_path,
                                       follow_context=model_args.extends_context())
        check_sequence_length(block_size, training_args.sequence_parallel_size, "--block_size")
        data = pretraining_datasets(data_args, tokenizer, block_size, training_args.seed)

    # ===== 3. frozen base model + adapters; the data audit =====
    model = build_model(model_args, config, quantization, auto_class=model_class(config))
    # Under LoRA every base weight is frozen anyway and adapters go on the language model only
    # (dstrain/model/adapters.py); the flags are accepted so one config serves sft.py and lora.py.
    freeze_parts(model, model_args.freeze_vision_tower, model_args.freeze_projector)
    if data_args.stage == "sft":
        configure_chat_generation(model, tokenizer)
    model = apply_lora(model, lora_args, training_args.activation_checkpointing)
    audit_before_training(data_args.stage, data, tokenizer, model, data_args, training_args)
    collator = (image_collator(processor, tokenizer) if processor else
                sft_collator(tokenizer, data_args.packing, model.config._attn_implementation,
                             training_args.sequence_parallel_size, data_args.max_length)
                if data_args.stage == "sft" else block_collator)

    # ===== 4. train, save the adapter (+ tokenizer, generation config), evaluate =====
    train_save_evaluate(run, model, tokenizer, data, collator, resume, processor)
    finish()


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args(ARGUMENTS)))()
