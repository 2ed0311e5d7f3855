"""launch/: the tiny pretraining of conftest's zero2_run as two nodes of one rank (slurm.sbatch with a
stand-in srun starting launch/no_ssh.sh on each "node" of this machine), pre-flight refusals, and
single_node.sh's per-rank logs and a dying rank ending the job."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    assert_clean_error,
    assert_succeeded,
    free_port,
    logged_losses,
    require_slow,
    run_job,
    script_env,
    stale_build_lock,
    train_flags,
)

LAUNCH = REPO / "launch"


def launcher_env(**extra) -> dict:
    env = script_env(**extra)
    env["PATH"] = f"{Path(os.sys.executable).parent}:{env['PATH']}"  # deepspeed and python of this venv
    return env


def run_launcher(script, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    require_slow("runs a launch script")
    return run_job(["bash", LAUNCH / script, *args], timeout=timeout, env=env or launcher_env())


@pytest.fixture(scope="module")
def flags(tmp_path_factory, tokenizer_dir, docs_corpus):
    cache = tmp_path_factory.mktemp("launch-cache")
    return lambda output_dir, **overrides: ["--deepspeed", REPO / "ds_configs/zero2.json",
                                            *train_flags(tokenizer_dir, docs_corpus, output_dir, cache, **overrides)]


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for SLURM's srun on one machine: runs the task once per node of the allocation, with
# SLURM_NODEID set, in a process group of its own (the job step, which SLURM signals as a whole; its
# id is written to $STEP_PID_FILE), outlives the signals SLURM sends the step as srun does, and exits
# with the highest exit code of its tasks.
if [ -z "${IN_STEP:-}" ]; then IN_STEP=1 exec setsid "$0" "$@"; fi
echo $$ > "${STEP_PID_FILE:-/dev/null}"
trap : TERM USR2
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do
  while ! wait "$pid" && kill -0 "$pid" 2>/dev/null; do :; done  # a trapped signal ends the wait early
  wait "$pid"; code=$?
  if [ "$code" -gt "$status" ]; then status=$code; fi
done
exit $status
"""


@pytest.mark.slow
def test_slurm_script_runs_two_nodes_that_match_one_node_of_two(tmp_path, flags, zero2_run):
    """slurm.sbatch run as SLURM would run it on a 2-node allocation (a stand-in srun, no scontrol):
    it derives nodes, master and ranks and starts launch/no_ssh.sh once per node, so this is also the
    test of two no-ssh nodes of one rank each. Same flags as conftest's 2-rank zero2_run, same losses."""
    srun = tmp_path / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    output_dir = tmp_path / "out"
    env = launcher_env(SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,node-b", SLURM_GPUS_ON_NODE="1",
                       SLURM_SUBMIT_DIR=str(REPO), SRUN=str(srun), MASTER_PORT=str(free_port()))
    result = run_launcher("slurm.sbatch", "pretrain.py", *flags(output_dir), env=env)
    assert_succeeded(result)
    assert sorted(p.name for p in (output_dir / "logs").glob("rank*.log")) == ["rank0.log", "rank1.log"]
    single_node_dir, _ = zero2_run
    assert logged_losses(output_dir) == pytest.approx(logged_losses(single_node_dir), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("setup, fragment", [
    ("missing_entry", "entry script not found"),
    ("contradicting_config", "train_batch_size is 64"),
    ("unwritable_output", "is not writable"),
    ("bad_hostfile", "expected 'hostname slots=N'"),
    ("stale_build_lock", "interrupted build of DeepSpeed's 'cpu_adam' op"),
])
def test_preflight_refuses_a_job_that_cannot_work(tmp_path, flags, setup, fragment):
    entry, env, output_dir = "pretrain.py", launcher_env(NGPU="2"), tmp_path / "out"
    script = "single_node.sh"
    extra = []
    if setup == "missing_entry":
        entry = "pretrian.py"
    elif setup == "contradicting_config":
        config = json.loads((REPO / "ds_configs/zero2.json").read_text()) | {"train_batch_size": 64}
        (tmp_path / "ds.json").write_text(json.dumps(config))
        extra = ["--deepspeed", tmp_path / "ds.json"]
    elif setup == "unwritable_output":
        (tmp_path / "file").write_text("not a folder")
        output_dir = tmp_path / "file" / "out"
    elif setup == "stale_build_lock":  # left by a build killed a day ago: every run would wait on it forever
        stale_build_lock(tmp_path / "extensions", "cpu_adam", minutes_old=24 * 60)
        env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    else:
        (tmp_path / "hosts").write_text("node-a slots=1\nnode-b 1\n")
        script, env = "multi_node.sh", launcher_env(HOSTFILE=str(tmp_path / "hosts"))
    started = time.monotonic()
    result = run_launcher(script, entry, *flags(output_dir), *extra, env=env)
    assert_clean_error(result, fragment)
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_single_node_logs_each_rank_and_a_killed_rank_ends_the_job_promptly(tmp_path, flags):
    """single_node.sh keeps a log per rank; SIGKILL one rank mid-run: the launcher stops the other and
    exits non-zero within seconds."""
    output_dir = tmp_path / "out"
    job = subprocess.Popen(["bash", str(LAUNCH / "single_node.sh"), "pretrain.py",
                            *map(str, flags(output_dir, max_steps=100000, save_steps=100000))],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=launcher_env(NGPU="2"), start_new_session=True)
    logs = [output_dir / "logs" / f"rank{rank}.log" for rank in (0, 1)]

    def training_started() -> bool:  # each rank creates its own log, so either may come first
        return all(log.exists() for log in logs) and "it/s" in logs[0].read_text()

    try:
        deadline = time.monotonic() + 300
        while not training_started():
            assert time.monotonic() < deadline and job.poll() is None, "training never started"
            time.sleep(1)
        # This job's ranks only (its output folder is in their command lines): other jobs may be running.
        rank1 = subprocess.run(["pgrep", "-f", f"pretrain.py --local_rank=1 .*{output_dir}"], capture_output=True,
                               text=True)
        os.kill(int(rank1.stdout.split()[0]), signal.SIGKILL)
        killed = time.monotonic()
        returncode = job.wait(timeout=60)
        assert returncode != 0
        assert time.monotonic() - killed < 30
        assert subprocess.run(["pgrep", "-f", f"pretrain.py --local_rank=.*{output_dir}"]).returncode == 1  # no survivors
        assert "Data: train" in logs[0].read_text()  # rank 0 talks; rank 1 prints nothing but errors
        assert "Data: train" not in logs[1].read_text()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
