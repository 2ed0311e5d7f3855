"""Which checkpoints can be resumed from, and whether there is room to write the next one.

What HF Trainer (transformers 5.23, `Trainer._save_checkpoint`) + DeepSpeed write into
checkpoint-N/, in this order:
  1. `save_model`: rank 0 writes the weights (model.safetensors or an adapter) and config;
  2. DeepSpeed's `engine.save_checkpoint`: every rank writes its share of global_stepN/
     (`*model_states.pt`, one `*_optim_states.pt` per rank), rank 0 then writes `latest`
     ("global_stepN") and `zero_to_fp32.py`, and all ranks meet at a barrier;
  3. every rank writes its RNG state (`rng_state_<rank>.pth`; `rng_state.pth` alone);
  4. rank 0 writes `trainer_state.json`, then deletes old checkpoints (save_total_limit).
HF's `get_last_checkpoint` takes the highest-numbered folder whatever its state, so a kill
during a save would make `--resume_from_checkpoint last` pick a folder that cannot load. A
checkpoint is complete here when trainer_state.json names its step and every file of steps
2-3 is there for each rank. Step 3 has no barrier after it in HF, so rank 0 could write
trainer_state.json while another rank is still writing its RNG file: `wait_for_every_rank_to_save`
adds that barrier, which makes trainer_state.json the last write of a complete checkpoint and
lets the rotation in step 4 run only once the new checkpoint is whole.
"""

import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from dstrain.errors import UserError

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
SET_ASIDE_PREFIX = "incomplete-"  # not "checkpoint-*": HF's rotation and get_last_checkpoint never see it
OPTIMIZER_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
FINAL_MODEL_FILES = ("trainer_state.json", "model.safetensors", "model.safetensors.index.json",
                     "adapter_model.safetensors", "pytorch_model.bin")


def checkpoint_folders(output_dir) -> list[Path]:
    """checkpoint-N folders, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def incomplete_reason(checkpoint) -> str | None:
    """None when `checkpoint` holds everything a resume reads; otherwise what is missing."""
    checkpoint = Path(checkpoint)
    step = int(CHECKPOINT_NAME.match(checkpoint.name).group(1))
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (the save did not finish)"
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    if state.get("global_step") != step:
        return f"trainer_state.json is for step {state.get('global_step')}, not {step}"
    rng_files = sorted(checkpoint.glob("rng_state*.pth"))
    if (checkpoint / "latest").exists() or list(checkpoint.glob("global_step*")):
        tag = (checkpoint / "latest").read_text().strip() if (checkpoint / "latest").is_file() else None
        if tag != f"global_step{step}" or not (checkpoint / tag).is_dir():
            return f"DeepSpeed's 'latest' does not name a global_step{step} folder"
        shards = sorted(int(m.group(1)) for p in (checkpoint / tag).iterdir() if (m := OPTIMIZER_SHARD.search(p.name)))
        if not shards or shards != list(range(len(shards))):
            return f"{tag} holds optimizer shards of ranks {shards}, not 0..N-1"
        if not list((checkpoint / tag).glob("*model_states.pt")):
            return f"{tag} has no model states"
        world_size = len(shards)
        expected_rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
        missing = [name for name in expected_rng if not (checkpoint / name).is_file()]
        if missing:
            return f"missing {', '.join(missing)}"
    elif not rng_files:
        return "no RNG state file"
    empty = [p.name for p in [*rng_files, *checkpoint.glob("global_step*/*.pt")] if p.stat().st_size == 0]
    if empty:
        return f"empty files: {', '.join(empty)}"
    return None


def choose_resume_point(output_dir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in output_dir, and the (folder, reason) of each incomplete
    one newer than it (elastic resume starts from the same choice)."""
    skipped = []
    for folder in reversed(checkpoint_folders(output_dir)):
        try:
            reason = incomplete_reason(folder)
        except OSError as error:  # e.g. rank 0 is setting this very folder aside while another rank looks
            reason = f"unreadable ({error.strerror})"
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def set_aside(folder: Path) -> Path:
    """Rename an incomplete checkpoint-N to incomplete-checkpoint-N (rank 0 only). Left in place,
    HF would later write step N into a folder holding stale files, and its rotation (which sorts
    by step number when mtimes are within a second) would keep the stale, higher-numbered folder
    as "the most recent" and could delete every good one."""
    target = folder.with_name(SET_ASIDE_PREFIX + folder.name)
    if target.exists():
        shutil.rmtree(target)
    folder.rename(target)
    return target


def finished_model_files(output_dir) -> list[str]:
    """Files a finished run leaves directly in output_dir (the final save), which a new run would overwrite."""
    return [name for name in FINAL_MODEL_FILES if (Path(output_dir) / name).is_file()]


def wait_for_every_rank_to_save(trainer, write_extras=None) -> None:
    """Make every rank finish its part of a checkpoint before rank 0 writes trainer_state.json
    (the completion mark) and rotates old checkpoints: a barrier after HF's per-rank RNG save.
    `write_extras(checkpoint_dir)` (every rank calls it; rank 0 writes) adds files of our own
    (provenance.json, the spike-rollback state) before that barrier, so a complete checkpoint has them."""
    save_rng_state = trainer._save_rng_state

    def save_rng_state_then_wait(output_dir):
        save_rng_state(output_dir)
        if write_extras is not None:
            write_extras(output_dir)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    trainer._save_rng_state = save_rng_state_then_wait


# ---- disk space ----------------------------------------------------------------------------

def checkpoint_bytes_estimate(model) -> int:
    """Bytes one checkpoint takes: the weights twice (HF's model file and DeepSpeed's model
    states) in their dtype, plus Adam's fp32 master copy and two moments (12 bytes) for each
    trainable parameter: about 16 bytes per parameter for a bf16 model under ZeRO; plus 10% for the
    files beside them (tokenizer, RNG and scheduler states, DeepSpeed's scripts), which weigh most
    in small models (measured on the tests' tiny model: the estimate is 97% of the written bytes)."""
    total = trainable = weight_bytes = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 keeps only a shard in .numel()
        total += count
        weight_bytes += count * parameter.element_size()
        trainable += count if parameter.requires_grad else 0
    return int(1.1 * (2 * weight_bytes + 12 * trainable))


def check_free_space(output_dir, needed_bytes: int) -> None:
    """Refuse to start a run whose first checkpoint cannot fit on output_dir's filesystem."""
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise UserError(f"--output_dir {output_dir}: {free / 2**30:.2f} GiB free on its filesystem, but one "
                        f"checkpoint needs about {needed_bytes / 2**30:.2f} GiB (weights + optimizer states); "
                        "free some space or choose another --output_dir")
