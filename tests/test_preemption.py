"""Preemption on 2 CPU ranks, as SLURM and Kubernetes do it, and the provenance record of the runs.

One chain in one output folder, through launch/slurm.sbatch with the stand-in srun of test_launch.py
(2 nodes of 1 rank, over loopback) and a stand-in scontrol that records what it is asked:
  A. SIGTERM to the whole job step (every process of it, as SLURM does) at a random step: every rank
     finishes the step, checkpoint-S1 is written, exit code 75, and the script requeues the job;
  B. the requeued job (SLURM_RESTART_COUNT=1) resumes from checkpoint-S1 by itself; at a later random
     step SIGTERM goes to node 0's launch script alone (as Kubernetes signals only a pod's first
     process; the other node hears nothing and learns it at the step boundary): checkpoint-S2, 75, requeue;
  C. requeued again: resumes from checkpoint-S2 and finishes.
Every step's loss then equals conftest's uninterrupted 2-rank run with the same flags. The phase-pause
fault (dstrain/train/faults.py) holds rank 0 inside the chosen step until the signal comes, so the
signal lands mid-step at that step without racing a 0.2 s step.

The fast tests check launch/supervise.py's forwarding on a stand-in process tree, and the flag.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dstrain.data.cache import tokenizer_identity
from dstrain.data.records import input_fingerprint
from dstrain.distributed import free_port
from dstrain.errors import PREEMPTED_EXIT_CODE
from dstrain.train.checkpoints import checkpoint_folders, incomplete_reason
from dstrain.train.preemption import parse_signals
from dstrain.train.provenance import sha256_file
from tests.helpers import (
    REPO,
    assert_clean_error,
    assert_succeeded,
    kill_all,
    logged_losses,
    require_slow,
    run_main_in_process,
    train_flags,
)
from tests.test_launch import FAKE_SRUN, launcher_env

JOB_ID = "4242"
SEED = random.randrange(10**6)
STEPS = random.Random(SEED)
S1 = STEPS.randint(2, 5)
S2 = STEPS.randint(S1 + 1, 10)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer_dir, docs_corpus):
    """What the chain's three submissions share: the flags (conftest's zero2_run's, on a private copy of
    the corpus that the provenance test may change), the stand-in srun and scontrol, the environment."""
    folder = tmp_path_factory.mktemp("preempt")
    corpus = folder / "corpus.jsonl"
    corpus.write_bytes(docs_corpus.read_bytes())
    (folder / "srun").write_text(FAKE_SRUN)
    (folder / "scontrol").write_text('#!/usr/bin/env bash\necho "$@" >> "$(dirname "$0")/scontrol.log"\n')
    for tool in ("srun", "scontrol"):
        (folder / tool).chmod(0o755)
    flags = ["--deepspeed", REPO / "ds_configs/zero2.json",
             *train_flags(tokenizer_dir, corpus, folder / "out", folder / "cache")]
    return {"folder": folder, "out": folder / "out", "corpus": corpus, "flags": [str(f) for f in flags]}


def submit(job, restart: int, fault: str | None = None):
    """slurm.sbatch as SLURM would start it (restart > 0: a requeued job), in the background."""
    require_slow("runs slurm.sbatch")
    env = launcher_env(SLURM_JOB_ID=JOB_ID, SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,node-b",
                       SLURM_GPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(REPO), SLURM_RESTART_COUNT=str(restart),
                       SRUN=str(job["folder"] / "srun"), SCONTROL=str(job["folder"] / "scontrol"),
                       STEP_PID_FILE=str(job["folder"] / "step.pid"),
                       DSTRAIN_PREEMPTED_MARK=str(job["folder"] / "preempted.mark"), MASTER_PORT=str(free_port()))
    if fault:
        env["DSTRAIN_FAULT"] = fault
    log = job["folder"] / f"submission{restart}.log"
    with log.open("w") as handle:
        submission = subprocess.Popen(["bash", REPO / "launch/slurm.sbatch", "pretrain.py", *job["flags"]], cwd=REPO,
                                      stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    submission.log = log
    return submission


def wait_for_pause(job, step: int, submission) -> None:
    """Until rank 0 says it pauses in `step` (its log, written by the launch scripts)."""
    log, deadline = job["out"] / "logs" / "rank0.log", time.monotonic() + 300
    while not (log.exists() and f"pauses in step {step} " in log.read_text()):
        assert submission.poll() is None, f"ended before step {step}: {Path(submission.log).read_text()[-3000:]}"
        assert time.monotonic() < deadline, "rank 0 never reached the pause"
        time.sleep(0.5)


def finish(job, submission) -> tuple[int, str]:
    try:
        code = submission.wait(timeout=300)
    except subprocess.TimeoutExpired:
        kill_all(psutil.Process(submission.pid).children(recursive=True))
        os.killpg(int((job["folder"] / "step.pid").read_text()), signal.SIGKILL)
        os.killpg(submission.pid, signal.SIGKILL)
        pytest.fail(f"{submission.log} did not end within 300 s")
    return code, Path(submission.log).read_text()


def supervisor_of_node(job, node: int) -> psutil.Process:
    """Node `node`'s launch script (no_ssh.sh, exec'd into launch/supervise.py) of this job."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(process.info["cmdline"] or [])
            if "launch/supervise.py" in command and str(job["out"]) in command \
                    and process.environ().get("NODE_RANK") == str(node):
                return process
        except psutil.Error:
            continue
    raise AssertionError(f"no launch script of node {node} found")


@pytest.fixture(scope="module")
def chain(job):
    print(f"random steps (seed {SEED}): SIGTERM to the job step at {S1}, to node 0's launch script at {S2}")
    results = {}
    submission = submit(job, 0, f"rank:0,step:{S1},phase:pause")
    wait_for_pause(job, S1, submission)
    os.killpg(int((job["folder"] / "step.pid").read_text()), signal.SIGTERM)  # every process of the step
    results["A"] = finish(job, submission)

    submission = submit(job, 1, f"rank:0,step:{S2},phase:pause")
    wait_for_pause(job, S2, submission)
    supervisor_of_node(job, 0).send_signal(signal.SIGTERM)
    results["B"] = finish(job, submission)

    results["C"] = finish(job, submit(job, 2))
    return results


@pytest.mark.slow
def test_a_signal_to_every_process_of_the_step_ends_in_a_checkpoint_at_that_step_and_a_requeue(job, chain):
    code, text = chain["A"]
    assert code == PREEMPTED_EXIT_CODE, text[-4000:]
    assert "Resuming" not in text
    assert f"Preempted: stopped by SIGTERM after step {S1} of 12: checkpoint-{S1} is complete" in text
    assert incomplete_reason(job["out"] / f"checkpoint-{S1}") is None
    assert json.loads((job["out"] / f"checkpoint-{S1}" / "trainer_state.json").read_text())["global_step"] == S1
    assert "Traceback" not in text
    assert (job["folder"] / "scontrol.log").read_text().splitlines()[0] == f"requeue {JOB_ID}"


@pytest.mark.slow
def test_the_requeued_job_resumes_by_itself_and_a_signal_to_one_launch_script_stops_every_node(job, chain):
    code, text = chain["B"]
    assert code == PREEMPTED_EXIT_CODE, text[-4000:]
    assert "Requeued job (restart 1): adding --resume_from_checkpoint last" in text
    assert f"Resuming from {job['out'] / f'checkpoint-{S1}'}\n" in text
    # Node 0's rank heard the signal; node 1's learnt it at the step boundary: both saved step S2.
    assert f"Preempted: stopped by SIGTERM after step {S2} of 12: checkpoint-{S2} is complete" in text
    assert incomplete_reason(job["out"] / f"checkpoint-{S2}") is None
    assert "launch/supervise.py: forwarded SIGTERM to 1 rank(s)" in text  # node 0's only
    assert (job["folder"] / "scontrol.log").read_text().splitlines() == [f"requeue {JOB_ID}"] * 2


@pytest.mark.slow
def test_the_chain_finishes_with_the_uninterrupted_runs_losses(job, chain, zero2_run):
    code, text = chain["C"]
    assert_succeeded(subprocess.CompletedProcess([], code, text, ""))
    assert f"Resuming from {job['out'] / f'checkpoint-{S2}'}\n" in text
    assert len((job["folder"] / "scontrol.log").read_text().splitlines()) == 2  # no requeue after success
    full, resumed = logged_losses(zero2_run[0]), logged_losses(job["out"])
    assert sorted(resumed) == sorted(full) == list(range(1, 13))
    for step in full:  # 2 nodes of 1 rank against 1 node of 2 ranks: test_launch shows they agree this closely
        assert resumed[step] == pytest.approx(full[step], abs=1e-4), (step, S1, S2, full, resumed)


# ---- provenance: written in every checkpoint and the final folder, read back, a changed input found ----

@pytest.mark.slow
def test_every_checkpoint_and_the_final_folder_hold_their_provenance(job, chain, tokenizer_dir):
    from transformers import AutoTokenizer

    out = job["out"]
    for folder in [*checkpoint_folders(out), out]:
        record = json.loads((folder / "provenance.json").read_text())
        step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
        assert record["step"] == step, folder
    record = json.loads((out / "provenance.json").read_text())
    command = record["command"]
    assert command["script"] == "pretrain.py" and command["cwd"] == str(REPO)
    assert command["args"] == [*job["flags"], "--resume_from_checkpoint", "last"]  # as slurm.sbatch ran it
    assert (command["world_size"], command["nodes"], command["ranks_per_node"]) == (2, 2, 1)
    assert record["reproduce"].startswith("deepspeed --num_nodes 2 --num_gpus 1 pretrain.py --deepspeed ")
    inputs = record["inputs"]
    corpus = str(job["corpus"].resolve())
    assert inputs["train_files"] == {corpus: json.loads(json.dumps(input_fingerprint(job["corpus"])))}
    assert inputs["tokenizer"]["fingerprint"] == tokenizer_identity(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert inputs["deepspeed_config"]["fingerprint"] == sha256_file(REPO / "ds_configs/zero2.json")
    assert inputs["model_config"]["source"] == "tiny"
    assert record["deepspeed_config"]["train_batch_size"] == 16  # "auto" resolved: 4 x 2 accumulation x 2 ranks
    assert record["arguments"]["TrainingArguments"]["learning_rate"] == 5e-3
    assert record["arguments"]["DataArguments"]["block_size"] == 64
    assert record["model_config"]["hidden_size"] == 64
    assert record["packages"]["deepspeed"] == "0.19.8" and record["packages"]["torch"].startswith("2.13.0")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert record["toolkit"]["commit"] == git.stdout.strip()
    # The two earlier submissions, each until its preemption checkpoint.
    assert [segment["until_step"] for segment in record["earlier_segments"]] == [S1, S2]


@pytest.mark.slow
def test_reproduce_prints_the_command_and_finds_a_changed_input(job, chain):
    result = run_main_in_process("reproduce.py", job["out"], "--output_dir", job["folder"] / "again")
    assert result.returncode == 0, result.stdout + result.stderr
    expected = f"deepspeed --num_nodes 2 --num_gpus 1 pretrain.py --deepspeed {REPO / 'ds_configs/zero2.json'}"
    assert expected in result.stdout
    assert f"--output_dir {job['folder'] / 'again'}" in result.stdout
    for name in ("train_files", "tokenizer", "model_config", "deepspeed_config"):
        assert f"same     {name}: " in result.stdout, result.stdout
    assert "Every input matches the run's" in result.stdout
    original, stat = job["corpus"].read_bytes(), job["corpus"].stat()
    try:
        job["corpus"].write_bytes(original.replace(b"Python", b"Pyth0n", 1))
        changed = run_main_in_process("reproduce.py", job["out"] / f"checkpoint-{S1}")
    finally:
        job["corpus"].write_bytes(original)
        os.utime(job["corpus"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert f"changed  train_files: {job['corpus'].resolve()}" in changed.stdout
    assert "same     tokenizer: " in changed.stdout
    assert "1 input(s) differ from the run's" in changed.stdout


# ---- fast: the forwarding, on stand-in processes; the flag ----

STAND_IN_LAUNCHER = """
import signal, subprocess, sys, time
if sys.argv[1] == "runner":  # the `deepspeed` command: starts the node launcher
    sys.exit(subprocess.run([sys.executable, __file__, "deepspeed.launcher.launch", *sys.argv[2:]]).returncode)
elif sys.argv[1] == "deepspeed.launcher.launch":  # the node launcher: two ranks; its own exit code theirs
    ranks = [subprocess.Popen([sys.executable, __file__, "rank", sys.argv[2], str(r)]) for r in range(2)]
    sys.exit(max(rank.wait() for rank in ranks))
else:  # a rank: notes when it hears SIGTERM, then exits 75
    signal.signal(signal.SIGTERM, lambda *_: (open(f"{sys.argv[2]}/rank{sys.argv[3]}", "w").write(str(time.time())),
                                               sys.exit(75)))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    open(f"{sys.argv[2]}/ready{sys.argv[3]}", "w").close()
    time.sleep(60)
    sys.exit(1)
"""


@pytest.mark.parametrize("who", ["wrapper", "group"])
def test_the_launch_wrapper_sends_sigterm_to_every_rank_at_once_and_returns_their_code(tmp_path, who):
    """What DeepSpeed's own launcher would not do. Kubernetes (`wrapper`: only the first process hears it):
    the SIGTERM reaches both ranks together. SLURM (`group`: every process hears it): the launcher
    processes, started with SIGTERM blocked, neither die of it nor kill the ranks; they live on to
    report the ranks' exit code, 75."""
    stand_in = tmp_path / "launcher.py"
    stand_in.write_text(STAND_IN_LAUNCHER)
    wrapper = subprocess.Popen([sys.executable, REPO / "launch/supervise.py", "--signals", "TERM USR2", "--",
                                sys.executable, stand_in, "runner", tmp_path], stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline and wrapper.poll() is None
        time.sleep(0.05)
    if who == "wrapper":
        wrapper.send_signal(signal.SIGTERM)
    else:
        os.killpg(wrapper.pid, signal.SIGTERM)
    assert wrapper.wait(timeout=30) == 75
    heard = [float((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert abs(heard[0] - heard[1]) < 1.0  # together, not one after the other's exit
    told = "2 rank(s)" if who == "wrapper" else ""  # in a group the ranks may be gone before it forwards
    assert f"forwarded SIGTERM to {told}" in wrapper.stderr.read()


def test_preemption_signals_are_checked_when_the_arguments_are_built(tmp_path, tokenizer_dir, docs_corpus):
    assert parse_signals("SIGTERM,USR2") == [signal.SIGTERM, signal.SIGUSR2]
    assert parse_signals("none") == []
    for bad, fragment in [("SIGUSR1", "prints the stacks"), ("KILL", "cannot be caught"), ("SIGBOGUS", "unknown")]:
        result = run_main_in_process("pretrain.py", *train_flags(tokenizer_dir, docs_corpus, tmp_path / "out",
                                                                 tmp_path / "cache"), "--preemption_signals", bad)
        assert_clean_error(result, "--preemption_signals", fragment)
