"""The steps every training script shares after its data and model are ready."""

import math
from pathlib import Path

from transformers import Trainer

from dstrain.train.checkpoints import (check_free_space, checkpoint_bytes_estimate, checkpoint_folders, choose_resume_point,
                               finished_model_files, set_aside, wait_for_every_rank_to_save)
from dstrain.distributed import is_main_process, print0
from dstrain.train.elastic import adapt_to_world_size
from dstrain.errors import UserError
from dstrain.train.faults import LOSS_SCALE_AT_MINIMUM, NonFiniteGuard, NumericalHealthCallback, install_fault
from dstrain.train.monitoring import add_monitoring

RESUME_LAST = {"last", "true", "True", "latest"}


def resume_checkpoint(args) -> str | None:
    """Which checkpoint to resume from, if any; one written by another number of ranks is made
    loadable here (dstrain/train/elastic.py), before the Trainer reads the batch arguments."""
    checkpoint = choose_checkpoint(args)
    adapt_to_world_size(args, checkpoint)
    return checkpoint


def choose_checkpoint(args) -> str | None:
    """Which checkpoint to resume from, if any.

    `--resume_from_checkpoint last` continues from the newest *complete* checkpoint in output_dir
    (dstrain/train/checkpoints.py; a save cut short by a crash is skipped, named, and set aside) and
    starts fresh when there is none, so the same command can be re-submitted after a crash.
    A run that would silently train over another run's checkpoints or final model is refused.
    """
    requested = args.resume_from_checkpoint
    if requested in RESUME_LAST:
        finished = finished_model_files(args.output_dir)
        chosen, skipped = choose_resume_point(args.output_dir)
        for folder, reason in skipped:
            print0(f"Skipping incomplete checkpoint {folder}: {reason}")
        if is_main_process():
            for folder, _ in skipped:
                set_aside(folder)
        if chosen is None and finished and not args.overwrite_output_dir:
            raise UserError(f"{args.output_dir} holds a finished model ({', '.join(finished)}) and no complete "
                            "checkpoint to resume: pass --overwrite_output_dir to train it again from scratch")
        if chosen is None:
            print0(f"No complete checkpoint in {args.output_dir} yet: starting from the beginning")
        return str(chosen) if chosen else None
    if requested:
        if not Path(requested).is_dir():
            raise UserError(f"--resume_from_checkpoint: no checkpoint folder at {requested}")
        return requested
    if args.overwrite_output_dir:
        return None
    existing = checkpoint_folders(args.output_dir)
    if existing:
        raise UserError(f"{args.output_dir} already holds {existing[-1].name}: pass --resume_from_checkpoint last "
                        "to continue it, or --overwrite_output_dir to start again")
    finished = finished_model_files(args.output_dir)
    if finished:
        raise UserError(f"{args.output_dir} already holds a trained model ({', '.join(finished)}): choose another "
                        "--output_dir, or pass --overwrite_output_dir to replace it")
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
    # Reliability (dstrain/train/faults.py, dstrain/train/checkpoints.py): fault injection (tests, DSTRAIN_FAULT only),
    # non-finite loss / grad norm / fp16 loss scale, checkpoints complete on every rank before they count.
    install_fault(trainer)
    nonfinite = NonFiniteGuard(trainer, getattr(trainer.args, "nonfinite_loss", "stop"))
    trainer.add_callback(NumericalHealthCallback(trainer))
    wait_for_every_rank_to_save(trainer)
    if getattr(trainer.args, "check_disk_space", True):  # every rank, so all stop together (each writes a shard)
        check_free_space(trainer.args.output_dir, checkpoint_bytes_estimate(trainer.model))
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as error:  # DeepSpeed raises a bare Exception for this; any other error passes through
        if LOSS_SCALE_AT_MINIMUM not in str(error):
            raise
        raise UserError(f"step {trainer.state.global_step + 1}: the fp16 loss scale collapsed ({error}); lower the "
                        "learning rate or train in bf16") from None
    if nonfinite.skipped:
        result.metrics["nonfinite_skipped"] = nonfinite.skipped
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
