"""Argument dataclasses shared by the entry scripts, and the one parser they all use.

Every script accepts one JSON file with all its arguments, flags, or both; flags win:
    deepspeed pretrain.py configs/pretrain_tiny.json --learning_rate 1e-3
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
import trl
from transformers import HfArgumentParser

from dstrain.data.chat_format import FORMATS
from dstrain.distributed import (check_no_stale_build_locks, dump_stacks_on_sigusr1, prepare_cpu_ranks,
                               release_shared_memory_names)
from dstrain.errors import UserError
from dstrain.train.monitoring import configure_reporting


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A trained model folder to start from (continued pretraining, fine-tuning)."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder; defaults to model_name_or_path."}
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Model sizes for a new model: a preset in configs/models/ (e.g. tiny, llama-120m), "
                          "a JSON file with a model_type, or a model folder. Vocab and special ids come from the tokenizer."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Override preset values, e.g. 'num_hidden_layers=4,hidden_size=128'."}
    )
    pad_vocab_size_to_multiple_of: int = field(
        default=1, metadata={"help": "Round the vocab size up to this multiple (64 suits GPUs); 1 keeps it exact."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: eager, sdpa, flash_attention_2 (GPU only)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model folder. Off unless you trust its source."}
    )

    def __post_init__(self):
        if self.model_name_or_path and self.config_name:
            raise UserError("give either --model_name_or_path (start from trained weights) or --config_name "
                            "(a new model), not both")
        if not self.model_name_or_path and not self.config_name:
            raise UserError("no model: give --config_name (a preset such as tiny) or --model_name_or_path")
        self.tokenizer_name = self.tokenizer_name or self.model_name_or_path
        if not self.tokenizer_name:
            raise UserError("--tokenizer_name is required with --config_name (train one with tokenizer.py)")
        if self.pad_vocab_size_to_multiple_of < 1:
            raise UserError("--pad_vocab_size_to_multiple_of must be at least 1")


@dataclass
class CorpusArguments:
    """What every training stage reads: files, a held-out split, bad-record handling, the cache."""

    train_files: list[str] = field(
        default_factory=list, metadata={"help": "JSONL or text files, folders, or globs."}
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out files; without them a split of the training data is held out."}
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of training records held out when no validation_files (0: none)."}
    )
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip malformed records (and report how many) instead of stopping."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize."}
    )
    data_cache_dir: str = field(
        default=os.path.join("~", ".cache", "dstrain", "tokenized"),
        metadata={"help": "Where tokenized data is kept so the next run with the same inputs reuses it."},
    )
    audit: str = field(
        default="error",
        metadata={"help": "Data audit before training (dstrain/audit/, also: python audit.py): error stops the run "
                          "on a problem, warn prints it and trains anyway, off skips it.",
                  "choices": ["error", "warn", "off"]},
    )

    def __post_init__(self):
        if not self.train_files:
            raise UserError("--train_files is required")
        if not 0 <= self.validation_split_percentage < 100:
            raise UserError("--validation_split_percentage must be in [0, 100)")
        self.data_cache_dir = os.path.expanduser(self.data_cache_dir)


@dataclass
class DataArguments(CorpusArguments):
    """Pretraining: plain text packed into fixed blocks."""

    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSONL records."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training sample; defaults to the model's context (at most 2048)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.block_size is not None and self.block_size < 2:
            raise UserError("--block_size must be at least 2")


@dataclass
class ChatDataArguments(CorpusArguments):
    """SFT: conversations with a loss on the assistant replies."""

    data_format: str = field(
        default="auto", metadata={"help": "messages, sharegpt, alpaca, or auto (detected per record).",
                                  "choices": list(FORMATS)}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message for conversations that have none."}
    )
    max_length: int = field(
        default=2048, metadata={"help": "Longest conversation in tokens; longer ones are cut after the last "
                                        "assistant reply that fits (or dropped if the first does not)."}
    )
    packing: bool = field(
        default=False, metadata={"help": "Pack several conversations per row of max_length tokens, attention "
                                         "kept inside each; otherwise pad each batch to its longest."}
    )
    drop_too_long: bool = field(
        default=False, metadata={"help": "Train without the conversations whose first reply ends after max_length "
                                         "(the audit names them) instead of stopping the run."}
    )
    preview: int = field(
        default=0, metadata={"help": "Write the first N processed rows to output_dir/preview.jsonl and stop."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 8:
            raise UserError("--max_length must be at least 8")


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "Rank of the LoRA update matrices."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling: the update is multiplied by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma list of linear layer names (q_proj,v_proj) or all-linear."}
    )
    quantization_bit: int | None = field(
        default=None, metadata={"help": "4 (QLoRA) or 8: load the frozen base weights quantized (CUDA only)."}
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise UserError("--lora_r must be at least 1")


@dataclass
class ChatOrTextDataArguments(ChatDataArguments):
    """Chat data, or with --stage pretrain plain text (lora.py; audit.py, whose --stage has more choices)."""

    text_field: str = field(default="text", metadata={"help": "--stage pretrain: the text field of JSONL records."})
    block_size: int | None = field(default=None, metadata={"help": "--stage pretrain: tokens per block."})


@dataclass
class AdapterDataArguments(ChatOrTextDataArguments):
    """LoRA reads chat data (the SFT path) or, with --stage pretrain, plain text."""

    stage: str = field(
        default="sft", metadata={"help": "sft: chat data, loss on assistant replies; pretrain: plain text "
                                         "(continued pretraining), packed into blocks.", "choices": ["sft", "pretrain"]}
    )


@dataclass
class PreferenceLoraArguments(LoraArguments):
    """reward.py and dpo.py train every weight unless --use_lora."""

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (the lora_* flags) instead of every weight."})


@dataclass
class PreferenceDataArguments(CorpusArguments):
    """Preference pairs: {"prompt", "chosen", "rejected"} as strings or chat messages (dstrain/data/pairs.py).
    Their length limit is --max_length, with the training arguments."""


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF's TrainingArguments plus the names users' scripts still pass, and the CPU-rank set-up."""

    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warmup as a fraction of total steps (kept for older scripts; maps to warmup_steps)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train from scratch even if output_dir already holds checkpoints."}
    )
    # Elastic resume (dstrain/train/elastic.py)
    keep_global_batch_size: bool = field(
        default=True, metadata={"help": "Resuming on another number of ranks: recompute gradient accumulation so the "
                                        "global batch stays the checkpoint's (false: keep the flags as given)."}
    )
    # Monitoring (dstrain/train/monitoring.py)
    wandb_project: str | None = field(
        default=None, metadata={"help": "WandB project (default: $WANDB_PROJECT, else dstrain). The run's name is --run_name."}
    )
    wandb_group: str | None = field(default=None, metadata={"help": "WandB run group (or $WANDB_RUN_GROUP)."})
    wandb_tags: str | None = field(default=None, metadata={"help": "Comma-separated WandB tags (or $WANDB_TAGS)."})
    peak_tflops: float | None = field(
        default=None, metadata={"help": "Peak TFLOPs of one device for the MFU estimate; GPUs in dstrain/train/monitoring.py's "
                                        "table are known, CPU runs log MFU only with this flag."}
    )
    sample_every: int = field(
        default=0, metadata={"help": "Every N steps, continue the --sample_prompts greedily and log the text (0: never)."}
    )
    sample_prompts: list[str] | None = field(
        default=None, metadata={"help": "Prompts for --sample_every, or one .txt (a prompt per line) or .json (a list) file."}
    )
    sample_max_new_tokens: int = field(default=24, metadata={"help": "Tokens generated per sample prompt."})
    # Reliability (dstrain/train/faults.py, dstrain/train/checkpoints.py)
    nonfinite_loss: str = field(
        default="stop", metadata={"help": "A NaN/inf training loss on any rank: stop stops every rank with a line "
                                          "naming the step; skip trains that micro-batch with zero gradient and "
                                          "counts it (nonfinite_skipped in train_results.json).",
                                  "choices": ["stop", "skip"]}
    )
    check_disk_space: bool = field(
        default=True, metadata={"help": "Before training, refuse to start when output_dir's filesystem has no room "
                                        "for one checkpoint (weights + optimizer states)."}
    )

    def __post_init__(self):
        dump_stacks_on_sigusr1()
        if self.deepspeed:
            check_no_stale_build_locks()  # before DeepSpeed's first op build (its CPU comm op, at set-up)
        # transformers 5 dropped --warmup_ratio but reads a float warmup_steps < 1 as a ratio.
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        # Users pass the old name; take it as the new one without a deprecation warning each run.
        if self.gradient_checkpointing is not None and self.activation_checkpointing is None:
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        if not torch.cuda.is_available():
            if self.bf16 or self.fp16:
                # HF's own message here suggests --use_cpu, which silently drops DeepSpeed.
                raise UserError("--bf16/--fp16 need a GPU; on CPU leave them out (CPU runs train in fp32)")
            self.dataloader_pin_memory = False  # pinning needs an accelerator; it only warns on CPU
        if prepare_cpu_ranks():
            config = self.accelerator_config or {}
            if isinstance(config, str):
                config = json.loads(config) if config.startswith("{") else json.load(open(config))
            self.accelerator_config = {**config, "use_configured_state": True}
        # WandB writes its run files (offline runs included) beside the run, not into the cwd.
        if "wandb" in (self.report_to if isinstance(self.report_to, list) else [self.report_to or ""]):
            os.environ.setdefault("WANDB_DIR", os.path.abspath(os.path.expanduser(self.output_dir or ".")))
        configure_reporting(self)  # WandB project/group/tags, SwanLab present, sample prompts
        try:
            super().__post_init__()
        except ValueError as error:
            raise UserError(f"invalid training arguments: {str(error).splitlines()[0]}") from None
        release_shared_memory_names()  # DeepSpeed's CPU comm buffers exist from here on; before any check can stop us
        check_deepspeed_config_agrees(self)



@dataclass
class _PreferenceTrainingDefaults:
    """TRL's defaults are kept (its learning rates, logging every 10 steps) except where a flag would
    then mean something else than in the other stages: bf16 and activation checkpointing only when
    asked (TRL turns both on, and CPU refuses bf16)."""

    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (GPU only)."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of --activation_checkpointing: recompute activations to save memory.",
                                "nargs": "?", "const": True}
    )
    # --trust_remote_code is ModelArguments'; the scripts build every model themselves, so TRL never reads it.
    trust_remote_code: bool = field(default=False, init=False)
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest prompt + reply in tokens. Longer pairs lose their oldest turns until "
                                        "they fit; a pair whose last user turn and reply do not fit is dropped."}
    )


@dataclass
class RewardTrainingArguments(_PreferenceTrainingDefaults, trl.RewardConfig, TrainingArguments):
    """reward.py: the training arguments above plus TRL's reward ones (e.g. --center_rewards_coefficient)."""

    def __post_init__(self):
        check_pair_length(self.max_length)
        super().__post_init__()


@dataclass
class DPOTrainingArguments(_PreferenceTrainingDefaults, trl.DPOConfig, TrainingArguments):
    """dpo.py: the training arguments above plus TRL's DPO ones (--beta, --loss_type, --precompute_ref_log_probs)."""

    def __post_init__(self):
        check_pair_length(self.max_length)
        super().__post_init__()


def check_pair_length(max_length) -> None:
    if max_length is None or max_length < 8:
        raise UserError(f"--max_length must be at least 8, got {max_length}")


def check_deepspeed_config_agrees(args: TrainingArguments) -> None:
    """Stop at start-up, not after the model is built, when the DeepSpeed JSON contradicts the flags.

    HF's own comparison (`trainer_config_process`) has already run; it only raises later.
    """
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not config.mismatches:
        return
    source = args.deepspeed if isinstance(args.deepspeed, str) else "the DeepSpeed config"
    clashes = "; ".join(line.lstrip("- ") for line in config.mismatches)
    raise UserError(f"{source} contradicts the flags: {clashes}. Set those values to \"auto\" or make them agree")


def json_to_argv(path: str) -> list[str]:
    """Turn a JSON run config into flags, so flags given after it override it."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object of arguments")
    argv = []
    for key, value in values.items():
        if key.startswith("_"):  # "_comment": config files explain their arithmetic
            continue
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(item) for item in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        elif isinstance(value, bool):
            argv.append(str(value).lower())
        else:
            argv.append(str(value))
    return argv


def parse_args(dataclass_types, argv: list[str] | None = None):
    """Parse a JSON config (if the first argument is one) followed by overriding flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher puts --local_rank=N before the user's arguments.
    launcher_flags = [arg for arg in argv[:1] if arg.startswith("--local_rank=")]
    argv = argv[len(launcher_flags):]
    if argv and argv[0].endswith(".json"):
        argv = json_to_argv(argv[0]) + argv[1:]
    argv = launcher_flags + argv
    # No abbreviations: a mistyped flag such as --learning_rat must fail, not match a longer one.
    parser = HfArgumentParser(dataclass_types, allow_abbrev=False)
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # HF reports unknown flags this way
        raise UserError(str(error).splitlines()[0]) from None
    for arguments in parsed:  # the monitor logs every dataclass of the run as its config (dstrain/train/monitoring.py)
        if isinstance(arguments, TrainingArguments):
            arguments.run_arguments = [other for other in parsed if other is not arguments]
    return parsed
