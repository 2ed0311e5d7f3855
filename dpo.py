"""Direct preference optimisation (DPO): make a chat model prefer the chosen reply over the rejected
one, measured against a frozen reference copy of itself (TRL's DPOTrainer).

One node, ZeRO-3:
    deepspeed dpo.py --deepspeed ds_configs/zero3.json --model_name_or_path out/sft \
        --train_files prefs.jsonl --beta 0.1 --max_length 1024 --learning_rate 5e-7 --output_dir out/dpo
Adapters only (the reference is then the base with the adapter off, no second copy): --use_lora true
Other losses: --loss_type ipo (or any TRL loss); reference log-probs once, up front: --precompute_ref_log_probs true
Every argument in one file: deepspeed dpo.py configs/dpo_demo.json

Data as reward.py's (dstrain/data/pairs.py). Logged: rewards/accuracies (how often the chosen
reply gains more log-probability over the reference than the rejected one), rewards/margins.
The output is a plain HF causal LM (or a PEFT adapter) that stops at the end of its turn.
"""

from transformers import set_seed

from dstrain.arguments import DPOTrainingArguments, ModelArguments, PreferenceDataArguments, PreferenceLoraArguments
from dstrain.audit import audit_before_training
from dstrain.cli import cli_entry, parse_args
from dstrain.data.chat_template import configure_chat_generation, require_chat_template
from dstrain.data.pairs import preference_datasets
from dstrain.distributed import finish
from dstrain.errors import UserError
from dstrain.model.adapters import quantization_config
from dstrain.model.loading import build_model, load_tokenizer, model_config_for
from dstrain.train.preference import dpo_trainer
from dstrain.train.resume import apply_resume_plan, plan_resume
from dstrain.train.run import start_run
from dstrain.train.steps import evaluate_and_record, train_and_save

ARGUMENTS = (ModelArguments, PreferenceDataArguments, PreferenceLoraArguments, DPOTrainingArguments)


def main(model_args, data_args, lora_args, training_args) -> None:
    # ===== 0. this process joins the run; where it continues from =====
    run = start_run(training_args, model_args, data_args, lora_args)
    set_seed(training_args.seed)
    if not model_args.model_name_or_path:
        raise UserError("DPO starts from a trained (usually SFT) model: give --model_name_or_path")
    resume = plan_resume(training_args)
    apply_resume_plan(training_args, resume)

    # ===== 1. tokenizer with its chat template, and the model's config =====
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    require_chat_template(tokenizer, model_args.tokenizer_name)
    config = model_config_for(model_args, tokenizer)

    # ===== 2. pairs: checked, rendered identically on both sides, fitted to --max_length =====
    data = preference_datasets(data_args, tokenizer, training_args.seed)

    # ===== 3. the policy and its frozen reference copy (none with LoRA or precomputed); the data audit =====
    quantization = quantization_config(lora_args.quantization_bit)
    model = build_model(model_args, config, quantization)
    configure_chat_generation(model, tokenizer)
    needs_reference_copy = not (lora_args.use_lora or training_args.precompute_ref_log_probs)
    reference = build_model(model_args, config, quantization) if needs_reference_copy else None
    audit_before_training("preference", data, tokenizer, model, data_args, training_args)

    # ===== 4. train, save (model + tokenizer + stop tokens), evaluate: reward accuracy and margins =====
    trainer = dpo_trainer(model, reference, tokenizer, data, training_args, lora_args)
    train_and_save(run, trainer, tokenizer, resume)
    if "validation" in data:
        evaluate_and_record(trainer)
    finish()


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args(ARGUMENTS)))()
