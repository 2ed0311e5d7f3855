"""Audit training data before paying for a run: the checks every training script runs at its start
(dstrain/audit/), on their own, on any machine, without a GPU or a launcher.

Chat data for sft.py / lora.py (the same flags as the run: --max_length, --packing, --data_format ...):
    python audit.py --model_name_or_path out/pt --train_files sft.jsonl --stage sft --max_length 2048
Preference pairs for reward.py / dpo.py:
    python audit.py --model_name_or_path out/sft --train_files prefs.jsonl --stage preference --max_length 1024
Plain text for pretrain.py (or lora.py --stage pretrain):
    python audit.py --tokenizer_name tok --config_name llama-120m --train_files corpus/ \
        --stage pretrain --block_size 2048
A training run's own config (its training flags, --learning_rate and the like, are ignored):
    python audit.py configs/sft_demo.json --stage sft
Is a benchmark in the training data? (eval files or lm-evaluation-harness task names; n-gram overlap,
dstrain/eval/contamination.py; training scripts take the same check as --decontaminate_against):
    python audit.py configs/sft_demo.json --contamination python_local mmlu my_test.jsonl

Prints a summary per split (samples, tokens, trained share, truncated and dropped, lengths) and every
problem with the first offending records by file:line; exits 2 with one `error:` line on a problem
(0 with --audit warn). The processed data goes to the run's cache (--data_cache_dir), so the
training run that follows reuses it. The model's weights are not loaded: the checks on the embedding
weights run at the start of training.
"""

from dstrain.arguments import (
    AuditDataArguments,
    DPOTrainingArguments,
    LoraArguments,
    ModelArguments,
    PreferenceLoraArguments,
    RewardTrainingArguments,
    TrainingArguments,
)
from dstrain.audit import STAGES, audit, planned_generation_config
from dstrain.cli import CommandLine, build, cli_entry, parse_known, refuse_unknown
from dstrain.errors import UserError
from dstrain.stages import stage_data

ARGUMENTS = (ModelArguments, AuditDataArguments)
# The training flags a stage's scripts take besides the data's, accepted (and ignored but for the seed)
# so that audit.py reads a training run's own command line or JSON config with that script's parser.
TRAINING_ARGUMENTS = {
    "sft": [(TrainingArguments, LoraArguments)],
    "pretrain": [(TrainingArguments, LoraArguments)],
    "preference": [(RewardTrainingArguments, PreferenceLoraArguments), (DPOTrainingArguments, PreferenceLoraArguments)],
}


def parse_audit_args(argv: list[str] | None = None) -> tuple[ModelArguments, AuditDataArguments, int]:
    """The model and data arguments, and the training run's seed (it draws the validation split)."""
    command = CommandLine.read(argv)
    namespace, keys, flags = parse_known(ARGUMENTS, command)
    data_args = build(AuditDataArguments, namespace)
    rest = CommandLine(flags, keys, command.config_path)
    for training_types in TRAINING_ARGUMENTS[data_args.stage]:  # reward.py's or dpo.py's, for preference pairs
        training, unknown_keys, unknown_flags = parse_known(training_types, rest)
        if not (unknown_keys or unknown_flags):
            break
    refuse_unknown(rest, unknown_keys, unknown_flags)
    return build(ModelArguments, namespace), data_args, training.seed


def main(model_args: ModelArguments, data_args: AuditDataArguments, seed: int) -> None:
    # ===== 1. the tokenizer, the model config and the processed data, as the training script makes them =====
    # (the data goes to the run's cache, --data_cache_dir, so the training run that follows reuses it)
    tokenizer, config, data = stage_data(data_args.stage, model_args, data_args, seed)
    chat = STAGES[data_args.stage].chat

    # ===== 2. the checks, the summary, the verdict =====
    generation_config = planned_generation_config(model_args.model_name_or_path, config, tokenizer, chat)
    result = audit(data_args.stage, data, tokenizer, config, generation_config, None,
                   data_args.max_length, data_args.drop_too_long)
    print(result.render())
    if result.findings and data_args.audit == "error":
        raise UserError(result.error_line())


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_audit_args()))()
