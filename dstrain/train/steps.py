"""The steps every training script shares after its data and model are ready: train (resuming if
planned), save a plain HF folder with the tokenizer, evaluate."""

import math

from transformers import Trainer

from dstrain.distributed import is_main_process, print0
from dstrain.errors import UserError
from dstrain.train import provenance, sequence_parallel, tiled_compute
from dstrain.train.checkpoints import check_free_space, checkpoint_bytes_estimate, wait_for_every_rank_to_save
from dstrain.train.faults import LOSS_SCALE_AT_MINIMUM, NonFiniteGuard, NumericalHealthCallback, install_faults
from dstrain.train.monitoring import add_monitoring
from dstrain.train.preemption import PreemptionCallback
from dstrain.train.resume import ResumePlan
from dstrain.train.run import Run
from dstrain.train.spikes import SpikeRollback


def train_save_evaluate(run: Run, model, tokenizer, data, data_collator, resume: ResumePlan,
                        processor=None) -> Trainer:
    """Every stage's last steps: Trainer, train (resuming if planned), save a plain HF folder with the
    tokenizer (an image-text model's whole `processor` when given), then loss and perplexity on the
    validation split if there is one."""
    trainer_class = Trainer
    if run.args.tiled_mlp or run.args.tiled_loss:  # ALST's tiled compute: dstrain/train/tiled_compute.py
        tiled_compute.apply(run.args, model, longest_row(run, data))
    if run.args.sequence_parallel_size > 1:  # DeepSpeed Ulysses: dstrain/train/sequence_parallel.py
        sequence_parallel.prepare_model(run.args, model)
        trainer_class = sequence_parallel.SequenceParallelTrainer
        data_collator = sequence_parallel.WithPositionIds(data_collator)
    trainer = trainer_class(
        model=model,
        args=run.args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        data_collator=data_collator,
        processing_class=tokenizer,
    )
    train_and_save(run, trainer, tokenizer, resume, processor)
    if "validation" in data:
        evaluate_and_record(trainer, perplexity=True)
    return trainer


def longest_row(run: Run, data) -> int:
    """The longest row the run trains on: pretraining blocks' size, else the chat data's --max_length."""
    blocks = getattr(data["train"], "block_size", None)
    if blocks:
        return blocks
    return next(arguments.max_length for arguments in run.logged_arguments if getattr(arguments, "max_length", None))


def train_and_save(run: Run, trainer, tokenizer, resume: ResumePlan, processor=None) -> None:
    # Monitoring: tokens/s, MFU, memory, eval perplexity and sample generations in every log entry.
    add_monitoring(trainer, run.logged_arguments)
    if run.eval_tasks is not None:  # --eval_tasks: benchmark scores beside eval_loss at every evaluation
        from dstrain.train.eval_tasks import add_harness_evaluation  # imports lm-evaluation-harness: only when asked

        add_harness_evaluation(trainer, run.eval_tasks)
    if resume.checkpoint:
        print0(f"Resuming from {resume.checkpoint}")
    # Reliability: fault injection (tests, DSTRAIN_FAULT only), non-finite loss / grad norm / fp16 loss scale
    # (faults.py), loss-spike rollback (spikes.py), preemption signals (preemption.py), checkpoints complete
    # on every rank before they count (checkpoints.py), each with its provenance.json (provenance.py).
    install_faults(trainer, run.stop)
    spikes = SpikeRollback(trainer) if trainer.args.spike_rollback else None
    if spikes:
        spikes.restore(resume.checkpoint)
    nonfinite = NonFiniteGuard(trainer, trainer.args.nonfinite_loss, spikes)
    trainer.add_callback(nonfinite)  # before the gradient-norm check: a NaN loss is the cause to name
    trainer.add_callback(NumericalHealthCallback(trainer, spikes))
    if spikes:
        trainer.add_callback(spikes)  # after the gradient-norm check, which reports to it
    preemption = PreemptionCallback(run.stop)
    trainer.add_callback(preemption)
    record = provenance.collect(trainer.args, run.logged_arguments, tokenizer, trainer.model, resume.checkpoint) \
        if is_main_process() else None

    def write_extras(checkpoint_dir):
        if is_main_process():
            provenance.write(checkpoint_dir, record, trainer.state.global_step)
            if spikes:
                spikes.save(checkpoint_dir)

    wait_for_every_rank_to_save(trainer, write_extras)
    if trainer.args.check_disk_space:  # every rank, so all stop together (each writes a shard)
        check_free_space(trainer.args.output_dir, checkpoint_bytes_estimate(trainer.model))
    try:
        result = trainer.train(resume_from_checkpoint=resume.checkpoint)
    except Exception as error:  # DeepSpeed raises a bare Exception for this; any other error passes through
        if LOSS_SCALE_AT_MINIMUM not in str(error):
            raise
        raise UserError(f"step {trainer.state.global_step + 1}: the fp16 loss scale collapsed ({error}); lower the "
                        "learning rate or train in bf16") from None
    stopped = preemption.preempted(trainer.state)
    if stopped:  # every rank: the checkpoint is written; cli_entry says so and ends the process (exit code 75)
        raise stopped
    if nonfinite.skipped:
        result.metrics["nonfinite_skipped"] = nonfinite.skipped
    if spikes and spikes.rollbacks:
        result.metrics["spike_rollbacks"] = spikes.rollbacks
    # Under ZeRO-3 this gathers the shards (stage3_gather_16bit_weights_on_model_save) into
    # one plain HF folder that loads without DeepSpeed.
    trainer.save_model()
    if trainer.is_world_process_zero():
        (processor or tokenizer).save_pretrained(trainer.args.output_dir)
        provenance.write(trainer.args.output_dir, record, trainer.state.global_step)
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
