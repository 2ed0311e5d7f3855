"""Plan a run before paying for it: per-GPU memory (weights, gradients, optimizer states, activations)
under ZeRO-2, ZeRO-3 or offload, whether it fits, tokens/s and time at an assumed MFU, GPU-hours, and
the compute-optimal token count for the model's size. Nothing is built or downloaded: the model is
counted on PyTorch's meta device.

    python plan.py --config_name llama-1b --gpu H100 --num_gpus 8 --zero_stage 2 \
        --per_device_train_batch_size 8 --block_size 2048
    python plan.py --config_name llama-1b --gpu 4090 --num_gpus 1 --zero_stage 3 --offload true \
        --gradient_checkpointing true --tokens 2e10 --mfu 0.35
    python plan.py --config_name out/pt --gpu A100-80GB --num_gpus 16     # a trained model folder
    python plan.py --list_gpus

The vocabulary comes from --tokenizer_name when given (as pretrain.py derives it), else --vocab_size.
"""

from dataclasses import dataclass, field

from dstrain.cli import cli_entry, parse_args
from dstrain.errors import UserError
from dstrain.train.plan import GPUS, describe, gpu_table, make_plan, model_size, steps_for


@dataclass
class PlanArguments:
    config_name: str = field(default="llama-120m", metadata={"help": "A preset (configs/models/), a config JSON "
                                                                     "or a model folder."})
    config_overrides: str | None = field(default=None, metadata={"help": "e.g. 'num_hidden_layers=32'."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder: its vocabulary sizes the model."})
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary size without --tokenizer_name."})
    gpu: str = field(default="H100", metadata={"help": f"GPU kind: {', '.join(GPUS)}."})
    gpu_memory_gb: float | None = field(default=None, metadata={"help": "Override the GPU's memory (GB)."})
    num_gpus: int = field(default=8, metadata={"help": "World size (all nodes)."})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage: 2 or 3.", "choices": [2, 3]})
    offload: bool = field(default=False, metadata={"help": "Offload the optimizer (and under ZeRO-3 the weights) "
                                                           "to CPU memory (ds_configs/zero3_offload.json)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Micro batch per GPU."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro batches per optimizer step."})
    block_size: int = field(default=2048, metadata={"help": "Sequence length in tokens."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing."})
    mfu: float = field(default=0.4, metadata={"help": "Assumed model FLOPs utilisation for the time estimate."})
    tokens: float | None = field(default=None, metadata={"help": "Token budget (default: compute-optimal, "
                                                                 "about 20 per parameter)."})
    list_gpus: bool = field(default=False, metadata={"help": "Print the GPU table and stop."})

    def __post_init__(self):
        if self.gpu not in GPUS:
            raise UserError(f"--gpu {self.gpu}: not in the table ({', '.join(GPUS)}); pick the closest and pass "
                            "--gpu_memory_gb")
        if not 0 < self.mfu <= 1:
            raise UserError(f"--mfu must be in (0, 1], got {self.mfu}")
        for name in ("num_gpus", "per_device_train_batch_size", "gradient_accumulation_steps", "block_size",
                     "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens <= 0:
            raise UserError(f"--tokens must be positive, got {self.tokens}")


ARGUMENTS = (PlanArguments,)


def model_config(args: PlanArguments):
    """The config pretrain.py would build: a preset or JSON (its vocabulary from the tokenizer or
    --vocab_size), or a model folder's own."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dstrain.model.config import derive_model_config

    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    else:  # a stand-in of the asked size: only len() and the special ids (none) are read from it
        from tokenizers import Tokenizer, models

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            {f"t{i}": i for i in range(args.vocab_size)}, unk_token="t0")))
    return derive_model_config(tokenizer, args.config_name, args.config_overrides)


def main(args: PlanArguments) -> None:
    if args.list_gpus:
        print(gpu_table())
        return
    # ===== 1. the model's exact size, counted on the meta device =====
    size = model_size(model_config(args))
    # ===== 2. memory, speed and time =====
    plan = make_plan(size, args.gpu, args.num_gpus, args.zero_stage, args.offload, args.per_device_train_batch_size,
                     args.block_size, args.gradient_checkpointing, args.mfu, args.tokens, args.gpu_memory_gb)
    print(describe(plan, args.mfu, args.per_device_train_batch_size, args.block_size, args.gradient_checkpointing))
    steps = steps_for(plan.tokens, args.num_gpus, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                      args.block_size)
    print(f"Optimizer steps: {steps:,} of {args.num_gpus * args.per_device_train_batch_size * args.gradient_accumulation_steps}"
          f" x {args.block_size} tokens (--max_steps {steps})")


if __name__ == "__main__":
    cli_entry(lambda: main(*parse_args(ARGUMENTS)))()
