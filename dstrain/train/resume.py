"""Where a run continues from: the newest complete checkpoint in output_dir (or the one named), and,
when another number of ranks wrote it, how to load it here. Planning decides and says what it
decided; applying the plan (converting the checkpoint, changing the accumulation) is a step of its
own in the recipe, before the Trainer reads the arguments.
"""

from dataclasses import dataclass
from pathlib import Path

from dstrain.distributed import is_main_process, print0
from dstrain.errors import UserError
from dstrain.train import provenance
from dstrain.train.checkpoints import checkpoint_folders, choose_resume_point, finished_model_files, set_aside
from dstrain.train.elastic import SavedTopology, accumulation_for, load_on_this_world_size, saved_topology

RESUME_LAST = {"last", "true", "True", "latest"}


@dataclass(frozen=True)
class ResumePlan:
    """What `plan_resume` decided."""

    checkpoint: str | None = None  # the checkpoint folder to continue; None: start from the beginning
    written_by: SavedTopology | None = None  # set when another number of ranks wrote it
    gradient_accumulation_steps: int | None = None  # what keeps its global batch here (None: the flags')


def plan_resume(args) -> ResumePlan:
    """The checkpoint to continue (dstrain/train/checkpoints.py says which are complete) and, for one
    written by another world size, the gradient accumulation that keeps its global batch
    (dstrain/train/elastic.py has the rules). Refuses to train over another run's checkpoints or model."""
    checkpoint = choose_checkpoint(args)
    if checkpoint is not None:
        check_same_sequence_split(args, checkpoint)
    if checkpoint is None or not args.deepspeed:
        return ResumePlan(checkpoint)
    saved = saved_topology(checkpoint)
    if saved is None or saved.world_size == args.world_size:
        return ResumePlan(checkpoint)
    if getattr(args, "sequence_parallel_size", 1) > 1:
        # The universal-checkpoint path keeps the global batch by world size; under SP it is per SP group.
        raise UserError(f"{checkpoint} was written by {saved.world_size} ranks; this run has {args.world_size}. "
                        "Resuming on another number of ranks is not supported with --sequence_parallel_size: "
                        f"launch {saved.world_size} ranks")
    print0(f"{Path(checkpoint).name} was written by {saved.world_size} ranks; this run has {args.world_size}: "
           "resuming from a universal checkpoint")
    if not args.keep_global_batch_size:
        new_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        print0(f"Global batch {saved.global_batch} -> {new_batch} sequences (--keep_global_batch_size false): "
               "steps and the LR schedule go on, the data position is approximate")
        return ResumePlan(checkpoint, saved)
    accumulation = accumulation_for(saved.global_batch, args.per_device_train_batch_size, args.world_size)
    if accumulation != args.gradient_accumulation_steps:
        print0(f"Gradient accumulation {args.gradient_accumulation_steps} -> {accumulation} keeps the global "
               f"batch of {saved.global_batch} sequences ({args.per_device_train_batch_size} per device x "
               f"{accumulation} x {args.world_size} ranks)")
    return ResumePlan(checkpoint, saved, accumulation)


def apply_resume_plan(args, plan: ResumePlan) -> None:
    """Make the plan's checkpoint loadable by this run: a no-op unless another world size wrote it.
    Then rank 0 converts it to a universal checkpoint (the others wait), the accumulation becomes the
    plan's, and DeepSpeed is told to load the universal checkpoint."""
    if plan.written_by is not None:
        load_on_this_world_size(args, plan.checkpoint, plan.written_by.tag, plan.gradient_accumulation_steps)


def check_same_sequence_split(args, checkpoint: str) -> None:
    """A run continues with the --sequence_parallel_size it was saved with. Another size changes how many
    sequences one optimizer step takes (micro-batches per data-parallel group), and DeepSpeed's
    checkpoint records only the world size (its dp_world_size is the SP x DP group), so a mismatch
    would load and then train on another data order and batch: refused. Checkpoints written before the
    flag existed (no value in provenance.json) count as 1."""
    record = provenance.read(checkpoint, quiet=True) or {}
    saved = int((record.get("arguments") or {}).get("TrainingArguments", {}).get("sequence_parallel_size") or 1)
    wanted = getattr(args, "sequence_parallel_size", 1)
    if saved != wanted:
        raise UserError(f"{checkpoint} was trained with --sequence_parallel_size {saved}; this run asks for {wanted}. "
                        f"Resume with --sequence_parallel_size {saved} (changing it mid-run is not supported)")


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


