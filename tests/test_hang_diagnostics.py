"""What a user sees when a run hangs instead of failing: the ranks' stacks on SIGUSR1, and a clear
error, not an endless wait, for the leftover lock of an interrupted DeepSpeed op build."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dstrain.distributed import STALE_LOCK_MINUTES, check_no_stale_build_locks
from dstrain.errors import UserError
from tests.helpers import REPO, assert_clean_error, run_job, run_main_in_process, script_env, stale_build_lock

WAITS_THEN_FINISHES = """
import sys, time
from dstrain.distributed import dump_stacks_on_sigusr1
dump_stacks_on_sigusr1()

def waiting_for_a_peer(seconds):
    print("ready", flush=True)  # from inside: a signal sent on "ready" finds this frame on the stack
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)

waiting_for_a_peer(float(sys.argv[1]))
print("finished", flush=True)
"""


def test_sigusr1_prints_the_stack_and_the_run_goes_on():
    job = subprocess.Popen([sys.executable, "-c", WAITS_THEN_FINISHES, "4"], cwd=REPO, env=script_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert job.stdout.readline() == "ready\n"
    os.kill(job.pid, signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 0 and stdout == "finished\n"
    assert "waiting_for_a_peer" in stderr and "Current thread" in stderr


def test_a_job_that_overstays_fails_with_its_ranks_stacks_and_leaves_no_process():
    # "--local_rank=0" makes the process look like a rank DeepSpeed's launcher started.
    command = [sys.executable, "-c", WAITS_THEN_FINISHES, "600", "--local_rank=0"]
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_job(command, timeout=3)
    assert time.monotonic() - started < 30
    assert "did not end within 3 s" in str(failure.value) and "waiting_for_a_peer" in str(failure.value)
    survivors = subprocess.run(["pgrep", "-f", "WAITS_THEN|waiting_for_a_peer"], capture_output=True, text=True)
    assert survivors.stdout == ""


def test_only_a_lock_older_than_any_build_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale_build_lock(tmp_path, "cpu_adam", minutes_old=1)  # a build in progress: wait for it, as DeepSpeed does
    check_no_stale_build_locks()
    stale = stale_build_lock(tmp_path, "deepspeed_shm_comm", minutes_old=STALE_LOCK_MINUTES + 60)
    with pytest.raises(UserError, match="interrupted build of DeepSpeed's 'deepspeed_shm_comm' op") as error:
        check_no_stale_build_locks()
    assert f"rm {stale}" in str(error.value)


def test_pretrain_with_deepspeed_refuses_a_stale_build_lock(tmp_path, tokenizer_dir, docs_corpus, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    lock = stale_build_lock(tmp_path / "extensions", "cpu_adam", minutes_old=24 * 60)
    result = run_main_in_process("pretrain.py", "--deepspeed", REPO / "ds_configs/zero3_offload.json",
                                 "--tokenizer_name", tokenizer_dir, "--config_name", "tiny",
                                 "--train_files", docs_corpus, "--output_dir", tmp_path / "out", "--max_steps", "1")
    assert_clean_error(result, str(lock), "'cpu_adam' op")
    assert not (tmp_path / "out").exists()
