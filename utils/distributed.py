"""Rank awareness and the CPU-rank set-up, kept in one place.

Ranks other than 0 print nothing but errors; `print0` is how scripts talk to the user.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def launched_on_cpu_ranks() -> bool:
    """True when a launcher (deepspeed, torchrun) started this process and there is no GPU."""
    return "LOCAL_RANK" in os.environ and not torch.cuda.is_available()


def prepare_cpu_ranks() -> bool:
    """Make HF Trainer + DeepSpeed work on CPU ranks; a no-op where a GPU exists.

    Out of the box accelerate's PartialState gets backend None on CPU ranks, reports
    world_size 1, and DeepSpeed then fails its batch-size assertion (`--use_cpu` silently
    drops DeepSpeed instead). Initialising the state ourselves with gloo and telling
    TrainingArguments to keep it (`use_configured_state`) gives a real multi-rank run.
    This must happen before TrainingArguments is constructed: it sets up devices in
    `__post_init__`. Returns True when the caller must set `use_configured_state`.
    """
    if not launched_on_cpu_ranks():
        return False
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return True


def release_shared_memory_names() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has opened it.

    On CPU ranks DeepSpeed's shm comm op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (66 MB each) and never removes it: every run, finished or killed, left its buffers behind, and
    a day of test runs filled this machine's /dev/shm (RAM) with 21 GB until runs hung. Each rank
    opens its peers' buffers while DeepSpeed initialises, so after a barrier the names are no longer
    needed; unlinking them then lets the memory go when the processes end, however they end.
    """
    if not (launched_on_cpu_ranks() and dist.is_available() and dist.is_initialized()):
        return
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    buffer = Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}")
    if not buffer.exists():
        return
    dist.barrier()
    buffer.unlink(missing_ok=True)


def finish() -> None:
    """End a distributed run cleanly.

    ZeRO-3 on CPU ranks sometimes aborted after the work was done ("terminate called
    without an active exception", 6 of 15 runs); a final barrier and an explicit
    destroy_process_group made 20 of 20 runs exit cleanly.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def copy_output_to_rank_log() -> None:
    """Where DSTRAIN_LOG_DIR is set (the launch/ scripts set it), copy this rank's stdout and
    stderr into <dir>/rank<N>.log, still printing them as before.

    DeepSpeed's own --enable_each_rank_log sends a rank's output only to its file, which would
    leave the console of an interactive run silent.
    """
    log_dir = os.environ.get("DSTRAIN_LOG_DIR")
    if not log_dir or "RANK" not in os.environ:
        return
    path = Path(log_dir) / f"rank{os.environ['RANK']}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        tee = subprocess.Popen(["tee", "-a", str(path)], stdin=subprocess.PIPE, stdout=os.dup(stream.fileno()))
        os.dup2(tee.stdin.fileno(), stream.fileno())
