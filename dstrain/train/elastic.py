"""Elastic resume: continue a DeepSpeed ZeRO run on a different number of ranks.

ZeRO checkpoints are partitioned by world size: `global_stepN/` holds one optimizer shard per
rank, and DeepSpeed refuses to load them into another world size. DeepSpeed's own answer is the
universal checkpoint (`deepspeed.checkpoint.ds_to_universal`): every parameter's fp32 weights and
Adam moments gathered into one file each, which `"checkpoint": {"load_universal": true}` loads
into any world size. This module only decides when that is needed and wires it up; the
conversion and the loading are DeepSpeed's.

The rules, at `--resume_from_checkpoint` when the checkpoint's world size differs from the
current one:
- The global batch (sequences per optimizer step) is kept: gradient accumulation is recomputed
  as saved_global_batch / (per_device_train_batch_size * world_size), and the run says so.
  Where that does not divide, the run stops with the choices. `--keep_global_batch_size false`
  keeps the flags as given instead (a new global batch: the step count and LR schedule go on,
  but the data position is then only approximate, see below).
- Data position: HF Trainer draws one seeded permutation of the training set and gives every
  optimizer step the next `global batch` samples of it, whatever the world size and the
  per-device / accumulation split (accelerate hands base batches to ranks round-robin). With
  the global batch kept, the resumed run therefore sees exactly the samples the uninterrupted
  run would have, step for step; only their order inside a step, and so the float summation
  order, changes. The one unavoidable difference: at the end of an epoch whose sample count does
  not divide into world_size * per_device batches, accelerate pads the last batches by repeating
  samples, and which ones depends on the world size.
- The converted checkpoint is written beside the original (`global_stepN_universal/` and a
  `latest_universal` tag file, as DeepSpeed's tools expect) and reused on the next resume; the
  original shards are never modified.
"""

import argparse
import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DeepSpeedPlugin
from deepspeed.checkpoint import ds_to_universal
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

from dstrain.distributed import build_once, print0
from dstrain.errors import UserError
from dstrain.train.run import check_deepspeed_config_agrees

UNIVERSAL_TAG_FILE = "latest_universal"


@dataclass(frozen=True)
class SavedTopology:
    """What a DeepSpeed checkpoint says about the run that wrote it."""

    world_size: int
    global_batch: int
    per_device_batch: int
    gradient_accumulation: int
    zero_stage: int
    tag: str  # global_stepN


def deepspeed_tag(checkpoint: Path) -> str | None:
    """The DeepSpeed tag (global_stepN) a HF checkpoint folder holds, from DeepSpeed's `latest` file."""
    latest = checkpoint / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (checkpoint / tag).is_dir():
            return tag
    steps = sorted(path.name for path in checkpoint.glob("global_step*") if not path.name.endswith("_universal"))
    return steps[-1] if steps else None


def saved_topology(checkpoint: str | Path) -> SavedTopology | None:
    """Read the world size and batch shape from DeepSpeed's model-states file; None when the
    folder is not a DeepSpeed checkpoint (a plain HF or DDP checkpoint is world-size free)."""
    checkpoint = Path(checkpoint)
    tag = deepspeed_tag(checkpoint)
    if tag is None:
        return None
    # ZeRO-1/2 write one mp_rank_00 file, ZeRO-3 one per rank; rank 0's holds the same fields.
    candidates = [checkpoint / tag / "mp_rank_00_model_states.pt",
                  checkpoint / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    states_file = next((path for path in candidates if path.is_file()), None)
    if states_file is None:
        raise UserError(f"{checkpoint / tag}: no DeepSpeed model-states file (mp_rank_00_model_states.pt); "
                        "the checkpoint is incomplete")
    # mmap: only the few small fields below are read, not the weights the file also holds.
    try:
        states = torch.load(states_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UserError(f"{states_file}: cannot be read ({str(error).splitlines()[0]})") from None
    config = states.get("ds_config") or {}
    return SavedTopology(
        world_size=int(states["dp_world_size"]),
        global_batch=int(config.get("train_batch_size", 0)),
        per_device_batch=int(config.get("train_micro_batch_size_per_gpu", 0)),
        gradient_accumulation=int(config.get("gradient_accumulation_steps", 1)),
        zero_stage=int((config.get("zero_optimization") or {}).get("stage", 0)),
        tag=tag,
    )


def accumulation_for(global_batch: int, per_device_batch: int, world_size: int) -> int:
    """Gradient accumulation that keeps `global_batch` on `world_size` ranks, or a UserError with the options."""
    per_step = per_device_batch * world_size
    if global_batch % per_step == 0:
        return global_batch // per_step
    fitting = [size for size in range(1, global_batch + 1) if global_batch % (size * world_size) == 0]
    options = (f"--per_device_train_batch_size one of {', '.join(map(str, fitting[-6:]))}" if fitting
               else f"a world size that divides {global_batch}")
    raise UserError(f"the checkpoint's global batch of {global_batch} sequences cannot be kept on {world_size} "
                    f"ranks of {per_device_batch}: pass {options}, or --keep_global_batch_size false "
                    "to train on with a new global batch")


def load_on_this_world_size(args, checkpoint: str, tag: str, gradient_accumulation_steps: int | None) -> None:
    """Load `checkpoint` (written by another world size) in this run: the accumulation that keeps its
    global batch (None: the flags' own), the universal checkpoint made by one process while the
    others wait (polling, in no collective: a long conversion cannot time them out), and DeepSpeed
    told to load it."""
    if gradient_accumulation_steps is not None:
        args.gradient_accumulation_steps = gradient_accumulation_steps
    convert_to_universal(checkpoint, tag)
    load_universal_checkpoint(args)


def universal_is_ready(checkpoint: Path, tag: str) -> bool:
    tag_file = checkpoint / UNIVERSAL_TAG_FILE
    return tag_file.is_file() and tag_file.read_text().strip() == f"{tag}_universal" \
        and (checkpoint / f"{tag}_universal" / "zero").is_dir()


def convert_to_universal(checkpoint: str | Path, tag: str | None = None, workers: int = 1) -> Path:
    """DeepSpeed's ds_to_universal on checkpoint/<tag>, written beside it as <tag>_universal with the
    `latest_universal` tag file. Written under a temporary name and renamed, so a conversion killed
    half way is redone, never loaded."""
    checkpoint = Path(checkpoint)
    tag = tag or deepspeed_tag(checkpoint)
    if tag is None:
        raise UserError(f"{checkpoint}: not a DeepSpeed checkpoint (no global_step* folder)")
    target = checkpoint / f"{tag}_universal"
    if universal_is_ready(checkpoint, tag):
        print0(f"Reusing the universal checkpoint {target}")
        return target
    build_once(target, lambda staging: _convert(checkpoint, tag, staging, workers),
               f"the universal checkpoint {target}")
    tag_file = checkpoint / UNIVERSAL_TAG_FILE
    staged_tag = tag_file.with_name(f"{tag_file.name}.tmp-{os.getpid()}")
    staged_tag.write_text(target.name)
    os.replace(staged_tag, tag_file)
    return target


def _convert(checkpoint: Path, tag: str, output: Path, workers: int) -> None:
    print0(f"Converting {checkpoint / tag} to a universal checkpoint (DeepSpeed's ds_to_universal)")
    options = argparse.Namespace(
        input_folder=str(checkpoint / tag), output_folder=str(output), num_extract_workers=workers,
        num_merge_workers=workers, keep_temp_folder=False, strict=True,
        # HF Trainer's engine does not record universal_checkpoint_info; DeepSpeed adds its default.
        inject_missing_state=True,
    )
    # ds_to_universal narrates every step and draws progress bars: keep them off the training log.
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(options)
    except Exception as error:  # noqa: BLE001 - DeepSpeed raises asserts and RuntimeErrors alike
        raise UserError(f"{checkpoint / tag}: DeepSpeed could not convert it to a universal checkpoint "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'})") from None


def load_universal_checkpoint(args) -> None:
    """Rebuild the DeepSpeed config from the (possibly changed) arguments with
    `checkpoint.load_universal` on. TrainingArguments resolved the "auto" batch values when it was
    built, with the old accumulation; this is the same step it runs (training_args.py, DeepSpeed
    part of __post_init__), run again."""
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.config.setdefault("checkpoint", {})["load_universal"] = True
    args.hf_deepspeed_config.trainer_config_process(args)
    check_deepspeed_config_agrees(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    keep_each_param_groups_hyperparameters()


def keep_each_param_groups_hyperparameters() -> None:
    """Work around a DeepSpeed 0.19.8 bug in ZeRO-3's universal load.

    `DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3` makes two
    mistakes that ZeRO-2's loader does not (its resumed runs match the uninterrupted ones exactly):
    - it copies the hyperparameters of the checkpoint's FIRST param group into every group. HF's
      Trainer makes two groups, with and without weight decay, so the norm weights got decayed too;
    - it gives every group the same `step` tensor object, which torch's Adam increments in place
      once per group: with two groups the bias correction ran two steps per step.
    Together they made the resumed tiny test run drift from the uninterrupted one by 0.006 in loss
    within 5 steps. This wrapper gives each group back its own hyperparameters as this run built
    them (the same flags; the learning rate, shared by HF's groups, stays the loaded one) and its
    own step counter after DeepSpeed's load; the tensors loaded are DeepSpeed's.
    """
    load = DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3
    if getattr(load, "keeps_param_groups", False):
        return

    def load_keeping_param_groups(optimizer, checkpoint_dir):
        groups = optimizer.optimizer.param_groups
        own = [{key: value for key, value in group.items() if key not in ("params", "lr")} for group in groups]
        load(optimizer, checkpoint_dir)
        for group, values in zip(groups, own):
            group.update(values)
        for state in optimizer.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    load_keeping_param_groups.keeps_param_groups = True
    DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = load_keeping_param_groups
