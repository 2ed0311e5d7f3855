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

Prints a summary per split (samples, tokens, trained share, truncated and dropped, lengths) and every
problem with the first offending records by file:line; exits 2 with one `error:` line on a problem
(0 with --audit warn). The processed data goes to the run's cache (--data_cache_dir), so the
training run that follows reuses it. The model's weights are not loaded: the checks on the embedding
weights run at the start of training.
"""

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

from dstrain.arguments import ChatOrTextDataArguments, ModelArguments, parse_args
from dstrain.audit import STAGES, audit, planned_generation_config, without_training_flags
from dstrain.errors import UserError, cli_entry
from dstrain.data.blocks import pretraining_datasets
from dstrain.model.loading import choose_block_size, load_tokenizer, model_config_for
from dstrain.data.pairs import preference_datasets
from dstrain.data.chat_template import require_chat_template
from dstrain.data.sft import sft_datasets


@dataclass
class AuditArguments:
    stage: str = field(default="sft", metadata={"help": "Which training the data is for.", "choices": list(STAGES)})
    seed: int = field(default=42, metadata={"help": "The training run's seed: it draws the validation split."})


def main(model_args: ModelArguments, data_args: ChatOrTextDataArguments, audit_args: AuditArguments) -> None:
    # ===== 1. tokenizer and model config, as the training script loads them =====
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    config = model_config_for(model_args, tokenizer)
    chat = STAGES[audit_args.stage].chat

    # ===== 2. the processed data, as the training script builds it (and caches it for that run) =====
    single_process = lambda desc: nullcontext()  # noqa: E731
    if audit_args.stage == "preference":
        require_chat_template(tokenizer, model_args.tokenizer_name)
        data = preference_datasets(data_args, tokenizer, data_args.max_length, audit_args.seed, single_process)
    elif chat:
        require_chat_template(tokenizer, model_args.tokenizer_name)
        data = sft_datasets(data_args, tokenizer, audit_args.seed, single_process)
    else:
        block_size = choose_block_size(data_args.block_size, config,
                                       model_args.config_name or model_args.model_name_or_path)
        data = pretraining_datasets(data_args, tokenizer, block_size, audit_args.seed, single_process)

    # ===== 3. the checks, the summary, the verdict =====
    generation_config = planned_generation_config(model_args.model_name_or_path, config, tokenizer, chat)
    result = audit(audit_args.stage, data, tokenizer, config, generation_config, None,
                   data_args.max_length, data_args.drop_too_long)
    print(result.render())
    if result.findings and data_args.audit == "error":
        raise UserError(result.error_line())


ARGUMENTS = (ModelArguments, ChatOrTextDataArguments, AuditArguments)

if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args(ARGUMENTS, without_training_flags(sys.argv[1:], ARGUMENTS))))()
