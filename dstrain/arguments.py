"""The argument dataclasses of every entry script: the flags, their defaults and help, and the
checks on their values. Building them checks values and nothing else, with one exception that HF's
TrainingArguments forces (see `TrainingArguments.__post_init__`); starting the run is a step of its
own at the top of each training script (dstrain/train/run.py). Parsed by dstrain/cli.py.
"""

import json
import os
from dataclasses import dataclass, field, fields
from importlib.util import find_spec

import torch
import transformers
import trl

from dstrain.data.cache import DEFAULT_MAX_VALIDATION_TOKENS
from dstrain.data.chat_format import FORMATS
from dstrain.distributed import join_cpu_ranks
from dstrain.errors import UserError
from dstrain.model.kernels import check_liger
from dstrain.train.monitoring import load_prompts
from dstrain.train.preemption import DEFAULT_SIGNALS, parse_signals
from dstrain.train.sequence_parallel import check_sizes, parallelism_config


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
        default="auto", metadata={"help": "Attention kernel: auto (flash_attention_3/2 when the package and a GPU "
                                          "that supports it are present, else sdpa; the run says which), sdpa, "
                                          "eager, flash_attention_2, flash_attention_3."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model folder. Off unless you trust its source."}
    )
    # Context extension (dstrain/model/config.py: extend_context)
    rope_scaling: str | None = field(
        default=None, metadata={"help": "RoPE scaling for a longer context: TYPE:FACTOR (linear:2, dynamic:2, yarn:4) "
                                        "or a JSON object of transformers' rope_parameters. The context becomes the "
                                        "model's times the factor unless --max_position_embeddings says otherwise."}
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "The model's new context in tokens; --block_size then defaults to it."}
    )

    # Image-text models (AutoModelForImageTextToText, dstrain/model/image_text.py): sft.py and lora.py
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Image-text models: do not train the vision tower (the image encoder)."}
    )
    freeze_projector: bool = field(
        default=False, metadata={"help": "Image-text models: do not train the projector from image features to the "
                                         "language model's embeddings."}
    )

    def extends_context(self) -> bool:
        return bool(self.rope_scaling or self.max_position_embeddings)

    def __post_init__(self):
        if self.max_position_embeddings is not None and self.max_position_embeddings < 2:
            raise UserError(f"--max_position_embeddings must be at least 2, got {self.max_position_embeddings}")
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
        default_factory=list, metadata={"help": "Files (.jsonl, .json, .txt, .md, .parquet, also .gz/.zst), folders, "
                                                "globs, saved datasets, or hf:NAME. Pretraining mixes sources by "
                                                "token share when each ends with a weight: web/:0.7 code/:0.3."}
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
        default=None, metadata={"help": "Processes used to tokenize (default: every core)."}
    )
    max_validation_tokens: int = field(
        default=DEFAULT_MAX_VALIDATION_TOKENS,
        metadata={"help": "The held-out split stops growing at this many tokens (later draws train; 0: no cap), "
                          "so that evaluating a 5% split of a huge corpus does not cost hours."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "For hf:NAME inputs: the dataset's configuration (load_dataset's name)."}
    )
    dataset_split: str = field(
        default="train", metadata={"help": "For hf:NAME inputs and saved DatasetDicts: the split to read."}
    )
    data_cache_dir: str = field(
        default=os.path.join("~", ".cache", "dstrain", "tokenized"),
        metadata={"help": "Where tokenized data is kept so the next run with the same inputs reuses it."},
    )
    decontaminate_against: list[str] | None = field(
        default=None,
        metadata={"help": "Benchmarks to check the training data against: eval files (JSONL, JSON, text) or "
                          "lm-evaluation-harness task names (mmlu, gsm8k, python_local), comma- or space-separated. "
                          "Records sharing an n-gram with a benchmark item are reported by the data audit, per "
                          "benchmark with file:line examples (dstrain/eval/contamination.py)."}
    )
    decontaminate: bool = field(
        default=False, metadata={"help": "Drop the training records that overlap a --decontaminate_against benchmark "
                                         "(counted in the data audit)."}
    )
    contamination_ngram: int = field(
        default=13, metadata={"help": "Words per n-gram of the contamination check (13, as in the GPT-3 paper)."}
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
        if self.max_validation_tokens < 0:
            raise UserError("--max_validation_tokens must be 0 (no cap) or more")
        self.data_cache_dir = os.path.expanduser(self.data_cache_dir)
        if self.decontaminate and not self.decontaminate_against:
            raise UserError("--decontaminate true needs --decontaminate_against: the benchmarks to check against")
        if self.contamination_ngram < 1:
            raise UserError(f"--contamination_ngram must be at least 1, got {self.contamination_ngram}")

    def record_filter(self):
        """The contamination check --decontaminate_against asks for (a ContaminationFilter), applied as
        the data is read (dstrain/data/cache.py), or None."""
        # Imported here, where the data is built: it brings in datasets, which the launch pre-flight and
        # everything else that only parses arguments need not load.
        from dstrain.eval.contamination import ContaminationFilter

        names = [name.strip() for value in self.decontaminate_against or [] for name in value.split(",")
                 if name.strip()]
        return ContaminationFilter(names, self.contamination_ngram, self.decontaminate) if names else None


@dataclass
class DataArguments(CorpusArguments):
    """Pretraining: plain text packed into fixed blocks."""

    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSONL records."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training sample; defaults to the model's context (at most 2048)."}
    )

    document_mask: bool = field(
        default=False, metadata={"help": "Attention never crosses documents inside a block: position ids restart "
                                         "after each eos (flash attention's varlen path, or a per-document mask)."}
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
        default=2048, metadata={"help": "Longest sample in tokens (a conversation; for preference pairs, the prompt and "
                                        "the longer reply). Longer conversations are cut after the last assistant reply "
                                        "that fits (dropped if the first does not); longer pairs lose their oldest "
                                        "turns (dropped if the last question and reply do not fit)."}
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
        check_max_length(self.max_length)


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
    --max_length means what it means for chats (the help above), with TRL's default of 1024."""

    max_length: int = field(default=1024, metadata={"help": ChatDataArguments.__dataclass_fields__["max_length"]
                                                    .metadata["help"]})

    def __post_init__(self):
        super().__post_init__()
        check_max_length(self.max_length)


def check_max_length(max_length) -> None:
    if max_length is None or max_length < 8:
        raise UserError(f"--max_length must be at least 8, got {max_length}")


@dataclass
class AuditDataArguments(ChatOrTextDataArguments):
    """audit.py: the data flags of the training stage it checks for, with that stage's own defaults."""

    stage: str = field(default="sft", metadata={"help": "Which training the data is for: sft (sft.py, lora.py), "
                                                        "pretrain (pretrain.py, lora.py --stage pretrain) or "
                                                        "preference (reward.py, dpo.py).",
                                                "choices": ["sft", "pretrain", "preference"]})
    max_length: int | None = field(default=None, metadata={"help": "As in the training script (default: that "
                                                                   "stage's, 2048 for sft, 1024 for preference)."})
    contamination: list[str] | None = field(
        default=None, metadata={"help": "Benchmarks (eval files or lm-evaluation-harness task names) to look for in "
                                        "the training data: --decontaminate_against's check, reported on its own."}
    )

    def __post_init__(self):
        if self.contamination:
            self.decontaminate_against = (self.decontaminate_against or []) + self.contamination
        if self.max_length is None:
            stage_arguments = PreferenceDataArguments if self.stage == "preference" else ChatDataArguments
            self.max_length = next(f.default for f in fields(stage_arguments) if f.name == "max_length")
        super().__post_init__()


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF's TrainingArguments plus the names users' scripts still pass, and the CPU-rank set-up."""

    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warmup as a fraction of total steps (kept for older scripts; maps to warmup_steps)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train from scratch even if output_dir already holds checkpoints."}
    )
    # Long context (dstrain/train/sequence_parallel.py)
    sequence_parallel_size: int = field(
        default=1, metadata={"help": "Split each sequence across this many ranks (DeepSpeed Ulysses: attention heads "
                                     "exchanged by all-to-all); data parallel over the remaining ranks. Needs "
                                     "--deepspeed, a world size it divides, and sequence lengths and attention heads "
                                     "it divides (pretrain.py, lora.py; sft.py with --packing)."}
    )
    tiled_mlp: bool = field(
        default=False, metadata={"help": "ALST's tiled MLP (dstrain/train/tiled_compute.py): each MLP block runs over "
                                         "the sequence in shards and recomputes them in backward, so its intermediate "
                                         "activations are held for one shard only (pretrain.py, sft.py, lora.py)."}
    )
    tiled_loss: bool = field(
        default=False, metadata={"help": "ALST's tiled loss (dstrain/train/tiled_compute.py): the output head's logits "
                                         "and the loss in shards of the sequence, never the whole sequence's logits "
                                         "at once (pretrain.py, sft.py, lora.py)."}
    )
    tiled_mlp_shards: int | None = field(
        default=None, metadata={"help": "Shards per sequence for --tiled_mlp (default: the longest row, per rank, in "
                                        "tiles of about hidden_size tokens, as ALST does; at least 2)."}
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
    # Benchmarks at each evaluation (dstrain/train/eval_tasks.py, through lm-evaluation-harness)
    eval_tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated lm-evaluation-harness tasks run at every evaluation (e.g. "
                                        "python_local, the shipped ones, or arc_easy); their scores are logged beside "
                                        "eval_loss as eval_<task>/<metric>. Needs --eval_strategy steps or epoch."}
    )
    eval_tasks_limit: float | None = field(
        default=None, metadata={"help": "Items per --eval_tasks task (below 1: a fraction); keep the set small."}
    )
    eval_tasks_num_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples per --eval_tasks prompt (default: each task's own, else 0)."}
    )
    eval_tasks_batch_size: int | None = field(
        default=None, metadata={"help": "Requests scored together per rank (default: --per_device_eval_batch_size)."}
    )
    eval_tasks_include_path: list[str] | None = field(
        default=None, metadata={"help": "Folders of your own task YAMLs for --eval_tasks."}
    )
    eval_tasks_chat_template: bool = field(
        default=False, metadata={"help": "Put the --eval_tasks prompts through the tokenizer's chat template."}
    )
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
    # Preemption (dstrain/train/preemption.py)
    preemption_signals: str = field(
        default=DEFAULT_SIGNALS,
        metadata={"help": "Signals that stop the run after the current optimizer step with a complete checkpoint and "
                          "exit code 75 (SLURM's --signal and time limit, Kubernetes' termination notice); "
                          "comma-separated, or none to let them end the run at once."}
    )
    # Loss-spike rollback (dstrain/train/spikes.py)
    spike_rollback: bool = field(
        default=False, metadata={"help": "On a loss spike (a step's loss more than --spike_threshold standard "
                                         "deviations above the last --spike_window steps', or a non-finite loss or "
                                         "gradient norm), reload the last checkpoint's weights and optimizer and go on."}
    )
    spike_window: int = field(default=50, metadata={"help": "Steps whose losses a spike is measured against."})
    spike_threshold: float = field(default=6.0, metadata={"help": "A spike is this many standard deviations above "
                                                                 "the window's mean loss."})
    spike_skip_batches: int = field(
        default=0, metadata={"help": "After a rollback, also skip this many batches after the spike (the batches "
                                     "from the checkpoint through the spike are always skipped)."}
    )
    spike_lr_factor: float = field(default=1.0, metadata={"help": "After a rollback, multiply the learning rate "
                                                                 "by this for --spike_lr_steps steps."})
    spike_lr_steps: int = field(default=0, metadata={"help": "Steps of lowered learning rate after a rollback."})
    spike_max_rollbacks: int = field(default=3, metadata={"help": "Rollbacks allowed; the next spike stops the run."})

    def __post_init__(self):
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
        self._check_monitoring_flags()
        check_liger(self.use_liger_kernel)  # a GPU-only kernel: one line on CPU, not a Triton error mid-run
        self._check_reliability_flags()
        check_sizes(self.sequence_parallel_size, int(os.environ.get("WORLD_SIZE", "1")), self.deepspeed)
        if self.tiled_mlp_shards is not None and self.tiled_mlp_shards < 2:
            raise UserError(f"--tiled_mlp_shards must be at least 2 (1 is no tiling), got {self.tiled_mlp_shards}")
        if self.sequence_parallel_size > 1:  # the flag, as HF's Trainer and accelerate take it
            self.parallelism_config = parallelism_config(self.sequence_parallel_size)
        # The one side effect of building the arguments, and why it cannot wait for start_run: HF's
        # TrainingArguments sets up its devices while it is built (super().__post_init__), and on CPU
        # ranks that only works when accelerate's state already holds a gloo process group, which the
        # arguments must then be told to keep (use_configured_state; see join_cpu_ranks).
        if join_cpu_ranks():
            config = self.accelerator_config or {}
            if isinstance(config, str):
                config = json.loads(config) if config.startswith("{") else json.load(open(config))
            self.accelerator_config = {**config, "use_configured_state": True}
        try:
            super().__post_init__()
        except ValueError as error:
            raise UserError(f"invalid training arguments: {str(error).splitlines()[0]}") from None

    def _check_monitoring_flags(self) -> None:
        if "swanlab" in self.reporting_targets() and find_spec("swanlab") is None:
            raise UserError("--report_to swanlab needs the swanlab package: pip install swanlab")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise UserError(f"--peak_tflops must be positive, got {self.peak_tflops}")
        if self.sample_every < 0 or self.sample_max_new_tokens < 1:
            raise UserError("--sample_every must be 0 (off) or more, and --sample_max_new_tokens at least 1")
        if self.sample_every:  # a prompts file is read here, so a bad one stops the run before any work
            self.sample_prompts = load_prompts(self.sample_prompts)
        if self.eval_tasks is not None:
            if not self.eval_tasks.strip(", "):
                raise UserError("--eval_tasks: give one or more task names, comma-separated")
            if self.eval_strategy in (None, "no", transformers.IntervalStrategy.NO):
                raise UserError("--eval_tasks runs at each evaluation: set --eval_strategy steps (with --eval_steps) "
                                "or epoch")
            if self.eval_tasks_limit is not None and self.eval_tasks_limit <= 0:
                raise UserError(f"--eval_tasks_limit must be positive, got {self.eval_tasks_limit}")
            if self.eval_tasks_batch_size is not None and self.eval_tasks_batch_size < 1:
                raise UserError(f"--eval_tasks_batch_size must be at least 1, got {self.eval_tasks_batch_size}")

    def _check_reliability_flags(self) -> None:
        parse_signals(self.preemption_signals)
        if self.spike_window < 2 or self.spike_threshold <= 0:
            raise UserError("--spike_window must be at least 2 and --spike_threshold positive")
        if self.spike_skip_batches < 0 or self.spike_lr_steps < 0 or self.spike_max_rollbacks < 0:
            raise UserError("--spike_skip_batches, --spike_lr_steps and --spike_max_rollbacks cannot be negative")
        if not 0 < self.spike_lr_factor <= 1:
            raise UserError(f"--spike_lr_factor must be in (0, 1], got {self.spike_lr_factor}")

    def reporting_targets(self) -> list[str]:
        """--report_to as a list, whichever way it was given."""
        if not self.report_to:
            return []
        return [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)


@dataclass
class _PreferenceTrainingDefaults:
    """TRL's defaults are kept (its learning rates, logging every 10 steps) except where a flag would
    then mean something else than in the other stages: bf16 and activation checkpointing only when
    asked (TRL turns both on, and CPU refuses bf16), and the length limit, which is the data's."""

    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (GPU only)."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of --activation_checkpointing: recompute activations to save memory.",
                                "nargs": "?", "const": True}
    )
    # --trust_remote_code is ModelArguments'; the scripts build every model themselves, so TRL never reads it.
    trust_remote_code: bool = field(default=False, init=False)
    # --max_length is PreferenceDataArguments': the pairs are fitted to it (oldest turns dropped) when they
    # are built, so TRL must not cut them again (its collators cut at max_length when it is set).
    max_length: int | None = field(default=None, init=False)

    def __post_init__(self):
        refuse_sequence_parallel(self)
        super().__post_init__()


def refuse_sequence_parallel(args) -> None:
    # TRL's preference and GRPO losses gather per-sequence log-probabilities over whole sequences: the
    # Ulysses data adapter would hand them slices of each sequence.
    if getattr(args, "sequence_parallel_size", 1) > 1:
        raise UserError("--sequence_parallel_size: reward.py, dpo.py and grpo.py score whole sequences and cannot "
                        "split them across ranks; it is for pretrain.py, sft.py and lora.py")
    if getattr(args, "tiled_mlp", False) or getattr(args, "tiled_loss", False):  # wired into train_save_evaluate
        raise UserError("--tiled_mlp and --tiled_loss are for pretrain.py, sft.py and lora.py (reward.py, dpo.py and "
                        "grpo.py compute their losses through TRL)")


@dataclass
class RewardTrainingArguments(_PreferenceTrainingDefaults, trl.RewardConfig, TrainingArguments):
    """reward.py: the training arguments above plus TRL's reward ones (e.g. --center_rewards_coefficient)."""


@dataclass
class DPOTrainingArguments(_PreferenceTrainingDefaults, trl.DPOConfig, TrainingArguments):
    """dpo.py: the training arguments above plus TRL's DPO ones (--beta, --loss_type, --precompute_ref_log_probs)."""


@dataclass
class PromptDataArguments(CorpusArguments):
    """grpo.py: prompts as strings or message lists, with any other fields for the rewards (dstrain/data/prompts.py)."""

    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompts longer than this many tokens (rendered, with the assistant's opening) "
                                        "are dropped and counted (default: the model's context less "
                                        "--max_completion_length)."}
    )
    answer_field: str = field(
        default="answer", metadata={"help": "The record field the exact_answer and math_answer rewards compare with."}
    )
    validation_split_percentage: float = field(
        default=0.0, metadata={"help": "Percent of prompts held out for evaluation (each generates and is scored; "
                                       "0: none)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise UserError(f"--max_prompt_length must be at least 1, got {self.max_prompt_length}")


@dataclass
class GRPOTrainingArguments(trl.GRPOConfig, TrainingArguments):
    """grpo.py: the training arguments above plus TRL's GRPO ones (--num_generations, --max_completion_length,
    --temperature, --beta, --loss_type grpo|dapo|dr_grpo|..., --reward_weights, --use_vllm, ...). TRL's defaults
    are kept except bf16 and activation checkpointing, which are off unless asked (as in the other stages)."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Rewards, summed with --reward_weights: exact_answer, math_answer, format, length (built-in, "
                          "see dstrain/train/rewards.py), module:function or file.py:function (TRL's signature "
                          "f(prompts, completions, **fields) -> list of numbers), or a reward model folder (reward.py)."}
    )
    format_pattern: str = field(
        default=r"<think>.*?</think>\s*<answer>.*?</answer>",
        metadata={"help": "The regex the whole completion must match for the format reward."}
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (GPU only)."})
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of --activation_checkpointing: recompute activations to save memory.",
                                "nargs": "?", "const": True}
    )
    log_completions: bool = field(
        default=True, metadata={"help": "Log sample completions with their rewards every logging step (a WandB "
                                        "table with --report_to wandb)."}
    )
    num_completions_to_print: int | None = field(
        default=4, metadata={"help": "Completions printed to the console with --log_completions."}
    )
    # --trust_remote_code is ModelArguments'; the script builds every model itself.
    trust_remote_code: bool = field(default=False, init=False)

    def __post_init__(self):
        refuse_sequence_parallel(self)
        if self.use_vllm:
            # TRL would fail later, inside the trainer, with an ImportError or a CUDA error.
            if find_spec("vllm") is None:
                raise UserError("--use_vllm needs vLLM, which is not installed (pip install vllm; it needs a GPU); "
                                "leave it out to generate with transformers")
            if not torch.cuda.is_available():
                raise UserError("--use_vllm needs a GPU; leave it out to generate with transformers")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise UserError(f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                            "--reward_funcs: give one weight per reward")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise UserError("--max_completion_length must be at least 1")
        try:  # GRPOConfig's own checks (batch sizes against --num_generations) raise ValueError
            super().__post_init__()
        except ValueError as error:
            raise UserError(f"invalid GRPO arguments: {str(error).splitlines()[0]}") from None
