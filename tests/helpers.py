"""What the tests share besides fixtures: running the entry scripts as a user would (a subprocess,
or in-process for speed), with exit code and output, and the tiny pretraining run's flags."""

import importlib.util
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import psutil
import pytest

from dstrain.distributed import free_port

REPO = Path(__file__).resolve().parent.parent

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def script_env(**extra) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               **extra)
    for inherited in ("CUDA_VISIBLE_DEVICES", "WANDB_DIR"):  # each run decides these for itself
        env.pop(inherited, None)
    return env


class Tier:
    """Whether the running test is marked slow (conftest sets it before each test's set-up)."""

    slow = True


def require_slow(what: str) -> None:
    """The fast tier (`-m "not slow"`) starts no DeepSpeed ranks and no server: a test, or a fixture
    it uses, that does must be marked slow, or it fails here instead of slowing the tier down."""
    if not Tier.slow:
        pytest.fail(f"this test {what}: mark it @pytest.mark.slow (the fast tier starts no DeepSpeed ranks "
                    "and no server)", pytrace=False)


def run_job(command, cwd=REPO, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run a command (and whatever it starts: DeepSpeed's launcher starts one process per rank) to
    its end, output captured. One that overstays `timeout` fails the test with each rank's Python
    stacks (the scripts print them on SIGUSR1), and none of its processes outlives it: a
    subprocess.run timeout kills the launcher alone and would leave hung ranks spinning for the
    rest of the session."""
    with subprocess.Popen(list(map(str, command)), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env or script_env(), start_new_session=True) as job:
        try:
            stdout, stderr = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Every descendant, also those in a session of their own (the stand-in srun's job step).
            tree = psutil.Process(job.pid).children(recursive=True)
            for process in tree:
                if any(arg.startswith("--local_rank=") for arg in _cmdline(process)):
                    process.send_signal(signal.SIGUSR1)
            time.sleep(2)  # faulthandler writes at once; the pipes need a moment
            os.killpg(job.pid, signal.SIGKILL)
            kill_all(tree)
            stdout, stderr = job.communicate()
            pytest.fail(f"{' '.join(map(str, command[:6]))} ... did not end within {timeout} s; killed. The ranks' "
                        f"stacks and the output's end:\n{stdout[-3000:]}\n{stderr[-12000:]}", pytrace=False)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def _cmdline(process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def kill_all(processes) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def run_script(*args, cwd=REPO, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run `python <args>` in the repo; returns the finished process (output captured)."""
    return run_job([sys.executable, *args], cwd=cwd, timeout=timeout, env=env)


def run_main_in_process(script: str, *args) -> subprocess.CompletedProcess:
    """`python <script> <args>` without a new interpreter: the script's `__main__` block runs here with
    that argv; its exit code, stdout and stderr come back as a subprocess would give them, and an
    exception that escapes the script is printed as the traceback a real process would show."""
    argv = [str(REPO / script), *map(str, args)]
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    # The scripts set process-wide variables (WANDB_DIR, ACCELERATE_USE_DEEPSPEED) and signal handlers
    # (the preemption signals) as a real run would; they must not leak into later tests or the
    # subprocesses those start.
    saved_argv, saved_environ, sys.argv = sys.argv, dict(os.environ), argv
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)}
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as exit_:
                returncode = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:  # noqa: BLE001 - reported like an uncaught error, then asserted on
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environ)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, returncode, stdout.getvalue(), stderr.getvalue())


def import_script(script: str):
    """An entry script as a module (its `__main__` block not run), to test its functions."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


PRETRAIN_STEPS, PRETRAIN_SAVE_EVERY = 12, 4


def train_flags(tokenizer_dir, corpus, output_dir, cache_dir, **overrides) -> list[str]:
    """pretrain.py flags for a seconds-long tiny run that still learns (loss logged every step)."""
    flags = {
        "tokenizer_name": tokenizer_dir, "config_name": "tiny", "train_files": corpus,
        "block_size": 64, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "learning_rate": 5e-3, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "weight_decay": 0.1,
        "max_steps": PRETRAIN_STEPS, "logging_steps": 1, "save_steps": PRETRAIN_SAVE_EVERY, "validation_split_percentage": 10,
        "report_to": "none", "output_dir": output_dir, "data_cache_dir": cache_dir, "seed": 7,
    } | overrides
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def logged_losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def run_deepspeed(script, *args, ranks=2, cwd=REPO, timeout=600, env=None) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script ...`: N CPU ranks here, N GPUs where there are some."""
    require_slow("starts DeepSpeed ranks")
    command = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *args]
    return run_job(command, cwd=cwd, timeout=timeout, env=env)


def kill_and_resume(script, *args, kill_after: int, timeout=600) -> tuple:
    """A training stage's resume chain: the run's rank 1 SIGKILLs itself once step `kill_after` is done
    (DSTRAIN_FAULT), then the same command continues with --resume_from_checkpoint last. `args` are the
    script's (with its --output_dir); returns both results, the second checked."""
    killed = run_deepspeed(script, *args, env=script_env(DSTRAIN_FAULT=f"rank:1,step:{kill_after},phase:train"),
                           timeout=timeout)
    assert killed.returncode != 0 and "kills itself (SIGKILL)" in killed.stdout, killed.stdout[-3000:]
    resumed = run_deepspeed(script, *args, "--resume_from_checkpoint", "last", timeout=timeout)
    assert_succeeded(resumed)
    return killed, resumed


def assert_same_losses(full_dir: Path, chain_dir: Path, steps: int, tolerance: float = 1e-4) -> None:
    """Every step 1..steps logged a loss in both runs, and they agree; and the losses moved (a run that
    trained nothing would agree too)."""
    full, chain = logged_losses(full_dir), logged_losses(chain_dir)
    assert sorted(full) == sorted(chain) == list(range(1, steps + 1)), (full, chain)
    for step in full:
        assert chain[step] == pytest.approx(full[step], abs=tolerance), (step, full, chain)
    assert len({round(loss, 4) for loss in full.values()}) > steps // 2, full


def stale_build_lock(extensions_dir: Path, op: str, minutes_old: float) -> Path:
    """The `lock` file an interrupted build of DeepSpeed op `op` leaves, dated `minutes_old` ago."""
    lock = extensions_dir / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    then = time.time() - minutes_old * 60
    os.utime(lock, (then, then))
    return lock


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with one `error:` line naming what is wrong, and no traceback."""
    assert result.returncode != 0, f"expected a failure, got rc 0:\n{result.stdout[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, f"no 'error:' line in stderr:\n{result.stderr[-3000:]}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


