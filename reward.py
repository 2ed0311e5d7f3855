"""Pairwise reward model: a one-score head on a trained (usually SFT) model, taught that the chosen
reply beats the rejected one (loss -log sigmoid(r_chosen - r_rejected - margin)); then score replies.

One node, ZeRO-2:
    deepspeed reward.py --deepspeed ds_configs/zero2.json --model_name_or_path out/sft \
        --train_files prefs.jsonl --max_length 1024 --learning_rate 1e-5 --output_dir out/rm
Adapters only: add --use_lora true (--lora_r, --lora_target_modules as in lora.py).
Every argument in one file: deepspeed reward.py configs/reward_demo.json
Score replies, or both sides of pairs (prints the pairwise accuracy):
    python reward.py score --model out/rm --input answers.jsonl --output scored.jsonl

Data: {"prompt", "chosen", "rejected"} as strings or chat messages, checked and fitted to
--max_length by dstrain/data/pairs.py. Eval reports pairwise accuracy and the mean margin.
The output folder loads with AutoModelForSequenceClassification (or, with --use_lora, is a PEFT
adapter: python export.py --adapter out/rm --output_dir out/rm-merged).
"""

import argparse
import json
import sys

from transformers import AutoModelForSequenceClassification, set_seed

from dstrain.arguments import ModelArguments, PreferenceDataArguments, PreferenceLoraArguments, RewardTrainingArguments
from dstrain.audit import audit_before_training
from dstrain.cli import cli_entry, parse_args
from dstrain.data.chat_template import require_chat_template
from dstrain.data.pairs import preference_datasets
from dstrain.distributed import finish
from dstrain.errors import UserError
from dstrain.infer.scoring import score_file
from dstrain.model.adapters import quantization_config
from dstrain.model.loading import build_model, load_tokenizer, model_config_for
from dstrain.train.preference import reward_config, reward_trainer
from dstrain.train.resume import apply_resume_plan, plan_resume
from dstrain.train.run import start_run
from dstrain.train.steps import evaluate_and_record, train_and_save

ARGUMENTS = (ModelArguments, PreferenceDataArguments, PreferenceLoraArguments, RewardTrainingArguments)


def main(model_args, data_args, lora_args, training_args) -> None:
    # ===== 0. this process joins the run; where it continues from =====
    run = start_run(training_args, model_args, data_args, lora_args)
    set_seed(training_args.seed)
    if not model_args.model_name_or_path:
        raise UserError("a reward model starts from a trained model: give --model_name_or_path")
    resume = plan_resume(training_args)
    apply_resume_plan(training_args, resume)

    # ===== 1. tokenizer with its chat template; the model's config with a one-score head =====
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    require_chat_template(tokenizer, model_args.tokenizer_name)
    config = reward_config(model_config_for(model_args, tokenizer))

    # ===== 2. pairs: checked, rendered identically on both sides, fitted to --max_length =====
    data = preference_datasets(data_args, tokenizer, training_args.seed)

    # ===== 3. the body with a new score head (LoRA adapters added by the trainer); the data audit =====
    model = build_model(model_args, config, quantization_config(lora_args.quantization_bit),
                        auto_class=AutoModelForSequenceClassification)
    audit_before_training("preference", data, tokenizer, model, data_args, training_args)

    # ===== 4. train, save (model + tokenizer), evaluate: pairwise accuracy and margin =====
    trainer = reward_trainer(model, tokenizer, data, training_args, lora_args)
    train_and_save(run, trainer, tokenizer, resume)
    if "validation" in data:
        evaluate_and_record(trainer)
    finish()


@cli_entry
def score(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="reward.py score", description="Score replies with a trained reward model.")
    parser.add_argument("--model", required=True, help="a reward.py output folder (full model or LoRA adapter)")
    parser.add_argument("--input", required=True, help='JSONL of {"prompt", "response"} or {"prompt", "chosen", "rejected"}')
    parser.add_argument("--output", required=True, help="JSONL: each input record with its reward(s) added")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    summary = score_file(args.model, args.input, args.output, args.batch_size)
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["score"]:
        score(sys.argv[2:])
    else:
        cli_entry(lambda: main(*parse_args(ARGUMENTS)))()
