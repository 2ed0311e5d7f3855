"""Ranks: who is rank 0 (the only one that prints, `print0`), the CPU-rank set-up, the
collectives every rank must reach together, and the process-wide fixes a distributed run needs
(DeepSpeed's /dev/shm buffers, its op-build locks, stacks on SIGUSR1, per-rank logs).

Ranks other than 0 print nothing but errors.
"""

import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from accelerate import PartialState
from torch.utils import cpp_extension

from dstrain.errors import UserError


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


def join_cpu_ranks() -> bool:
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
    # DeepSpeed builds its CPU all-reduce op right here, while the process group forms: a lock
    # left by an interrupted build must stop the run before it, not make it wait forever.
    check_no_stale_build_locks()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return True


def join_data_parallel_ranks() -> torch.device | None:
    """For a command that is not training (eval.py) started by a launcher (torchrun, deepspeed, accelerate
    launch): join the process group, nccl on GPUs and gloo on CPU ranks, and return this rank's device.
    None when the process runs alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank. Every rank must call it: a decision that stops the run must
    be taken by all ranks together, or the others wait in their next collective until it times out."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    verdict = torch.tensor([int(flag)], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    return bool(verdict.item())


def free_port() -> int:
    """A TCP port nobody listens on now, on any interface (a master port, a test server)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


HEARTBEAT_SECONDS = 10
STALE_AFTER_SECONDS = 120  # a builder whose lock has not been touched for this long has died


def build_once(target: Path, build, what: str) -> None:
    """Make `target` (a folder) exist, built by exactly one process of all that share its filesystem:
    the first to create `<target>.lock` runs `build(staging)` and renames the staging folder to
    `target`; every other process (other ranks, other nodes on a shared filesystem) waits by polling
    the files, in no collective, so a build of hours cannot time out their process group. On a
    node-local disk each node builds its own; on a shared one, one process builds for all.

    The builder keeps touching the lock while it works. Its failure is written to `<target>.error`
    and ends every waiting process with that same line; a lock left untouched for minutes is the mark
    of a builder that died, and the waiting processes stop, naming it, rather than wait forever.
    """
    target = Path(target)
    lock, error = target.with_name(target.name + ".lock"), target.with_name(target.name + ".error")
    announced = False
    if not target.exists() and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        time.sleep(1)  # ranks start together: let rank 0 take the lock, so its progress bar is the one printed
    while not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _raise_if_failed_in_this_run(error, what)
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not announced:
                print0(f"{what}: waiting for {_lock_owner(lock)} to build it")
                announced = True
            _wait_for(target, lock, error, what)
            continue
        os.write(handle, f"{socket.gethostname()} pid {os.getpid()}".encode())
        os.close(handle)
        _build_holding(target, lock, error, build)


def _build_holding(target: Path, lock: Path, error: Path, build) -> None:
    error.unlink(missing_ok=True)  # a failure of an earlier run is no verdict on this one
    staging = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    beating = threading.Event()

    def heartbeat():
        while not beating.wait(HEARTBEAT_SECONDS):
            os.utime(lock)

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        build(staging)
        os.replace(staging, target)
    except BaseException as failure:
        message = str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {failure}"
        error.write_text(" ".join(message.split("\n")) or type(failure).__name__)
        raise
    finally:
        beating.set()
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)


def _raise_if_failed_in_this_run(error: Path, what: str) -> None:
    """A failure written since this process started is this run's verdict: another rank got there
    first, failed, and freed the lock. Building again would only repeat the failure, and, killed
    half-way by the launcher once that rank exits, leave a lock that holds up the next run."""
    try:
        failed_at = error.stat().st_mtime
    except FileNotFoundError:
        return
    if failed_at >= psutil.Process().create_time():
        raise _failed_elsewhere(error, what)


def _wait_for(target: Path, lock: Path, error: Path, what: str) -> None:
    """Until the lock goes (then: built, failed, or free to take) or is found stale."""
    while lock.exists() and not target.exists():
        try:
            idle = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            break
        if idle > STALE_AFTER_SECONDS:
            raise UserError(f"{what}: {lock} was left by a build that stopped ({_lock_owner(lock)}, untouched for "
                            f"{idle:.0f} s); delete it and start again")
        time.sleep(1)
    if not target.exists() and error.exists():
        raise _failed_elsewhere(error, what)


def _failed_elsewhere(error: Path, what: str) -> UserError:
    return UserError(f"{what}: the build failed on another process: {error.read_text().strip()}")


def _lock_owner(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "another process"
    except FileNotFoundError:
        return "another process"


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
    # Every rank reaches this point, so the barrier is unconditional: a decision taken rank by rank
    # (say, on whether a file exists) could send one rank into the barrier alone.
    dist.barrier()
    buffer.unlink(missing_ok=True)


STALE_LOCK_MINUTES = 30  # DeepSpeed's CPU ops build in about a minute here; CUDA ones in a few


def check_no_stale_build_locks() -> None:
    """Stop on a lock file left behind by an interrupted build of a DeepSpeed op.

    DeepSpeed compiles its ops (cpu_adam, the CPU shm all-reduce, fused Adam...) on first use
    under the PyTorch extensions folder; one rank builds while the others wait for its `lock` file
    to go. A run killed during that build leaves the file, and every later run then waits for it
    forever, printing nothing (PyTorch's FileBaton has no timeout). A lock far older than any build
    takes is such a leftover: say so, instead of hanging.
    """
    try:  # the folder torch itself builds in (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/<python>_<device>)
        root = Path(cpp_extension._get_build_directory("", verbose=False))
    except (AttributeError, TypeError):  # a private helper: if torch renames it, skip the check rather than fail
        return
    now = time.time()
    for lock in sorted(root.glob("*/lock")):
        try:
            minutes = (now - lock.stat().st_mtime) / 60
        except FileNotFoundError:  # a build just finished
            continue
        if minutes > STALE_LOCK_MINUTES:
            raise UserError(f"{lock} was left {minutes:.0f} min ago by an interrupted build of DeepSpeed's "
                            f"'{lock.parent.name}' op, and runs would wait on it forever: unless a build is "
                            f"running right now, delete it (rm {lock}) and start again")


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack to that rank's stderr, and the run goes on:
    the first thing to look at when a run seems hung (the tests do it to a run that overstays)."""
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True, chain=False)


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
    # SLURM signals every process of the step, these too: a tee killed by SIGTERM would break the rank's
    # output while it writes its preemption checkpoint. They ignore the signals (set to SIG_IGN around
    # the start, which exec keeps) and end when the rank closes their input.
    ignored = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2]
    previous = [signal.signal(sig, signal.SIG_IGN) for sig in ignored]
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            tee = subprocess.Popen(["tee", "-a", str(path)], stdin=subprocess.PIPE, stdout=os.dup(stream.fileno()))
            os.dup2(tee.stdin.fileno(), stream.fileno())
    finally:
        for sig, handler in zip(ignored, previous):
            signal.signal(sig, handler)
