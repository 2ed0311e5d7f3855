"""The steps every training script shares after its data and model are ready."""

import math
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from utils.distributed import print0
from utils.elastic import adapt_to_world_size
from utils.errors import UserError
from utils.monitoring import add_monitoring

RESUME_LAST = {"last", "true", "True", "latest"}


def resume_checkpoint(args) -> str | None:
    """Which checkpoint to resume from, if any; one written by another number of ranks is made
    loadable here (utils/elastic.py), before the Trainer reads the batch arguments."""
    checkpoint = choose_checkpoint(args)
    adapt_to_world_size(args, checkpoint)
    return checkpoint


def choose_checkpoint(args) -> str | None:
    """Which checkpoint to resume from, if any.

    `--resume_from_checkpoint last` continues from the newest checkpoint in output_dir and
    starts fresh when there is none, so the same command can be re-submitted after a crash.
    A run that would silently train over existing checkpoints is refused.
    """
    requested = args.resume_from_checkpoint
    existing = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if requested in RESUME_LAST:
        if existing is None:
            print0(f"No checkpoint in {args.output_dir} yet: starting from the beginning")
        return existing
    if requested:
        if not Path(requested).is_dir():
            raise UserError(f"--resume_from_checkpoint: no checkpoint folder at {requested}")
        return requested
    if existing and not args.overwrite_output_dir:
        raise UserError(f"{args.output_dir} already holds {Path(existing).name}: pass --resume_from_checkpoint last "
                        "to continue it, or --overwrite_output_dir to start again")
    return None


def train_save_evaluate(model, tokenizer, data, data_collator, args, resume_from: str | None) -> Trainer:
    """Every stage's last steps: Trainer, train (resuming if asked), save a plain HF folder with the
    tokenizer, then loss and perplexity on the validation split if there is one."""
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        data_collator=data_collator,
        processing_class=tokenizer,
    )
    train_and_save(trainer, tokenizer, resume_from)
    if "validation" in data:
        evaluate_and_record(trainer, perplexity=True)
    return trainer


def train_and_save(trainer, tokenizer, resume_from: str | None) -> None:
    # Monitoring: tokens/s, MFU, memory, eval perplexity and sample generations in every log entry.
    add_monitoring(trainer)
    if resume_from:
        print0(f"Resuming from {resume_from}")
    result = trainer.train(resume_from_checkpoint=resume_from)
    # Under ZeRO-3 this gathers the shards (stage3_gather_16bit_weights_on_model_save) into
    # one plain HF folder that loads without DeepSpeed.
    trainer.save_model()
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(trainer.args.output_dir)
        # A PEFT adapter folder holds no generation config; export.py gives the merged model these stop tokens.
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else None
        if base is not None and getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(trainer.args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


def evaluate_and_record(trainer, perplexity: bool = False) -> dict:
    """Evaluate on the validation split; print and save (eval_results.json) the metrics."""
    metrics = trainer.evaluate()
    if perplexity:
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics
