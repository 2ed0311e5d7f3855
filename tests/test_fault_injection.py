"""Crash and resume on 2 CPU ranks: one run directory survives a chain of real SIGKILLs (during
training and at two points inside a save) and a NaN loss, each followed by `--resume_from_checkpoint
last`, and ends exactly where an uninterrupted run with the same seed ends.

The faults are made deterministic by DSTRAIN_FAULT (utils/faults.py): the chosen rank sends
SIGKILL to itself at the chosen point, so no poller races a 50 ms save on two shared cores.
"""

import json
from pathlib import Path

import pytest

from conftest import REPO, assert_clean_error, assert_succeeded, logged_losses, run_deepspeed, script_env, train_flags
from utils.checkpoints import checkpoint_folders, incomplete_reason

STEPS, SAVE_EVERY = 12, 2

# (DSTRAIN_FAULT, the checkpoint the *next* run resumes from, the incomplete checkpoint it must skip)
CHAIN = [
    ("rank:1,step:3,phase:train", 2, None),  # rank 1 dies after step 3: checkpoint-2 is the last one
    ("rank:0,step:4,phase:save", 2, 4),  # rank 0 dies inside the save of 4, after DeepSpeed wrote global_step4
    ("rank:1,step:6,phase:shard", 4, 6),  # rank 1 dies right after writing its own optimizer shard of 6
    ("rank:0,step:7,phase:nan", 6, None),  # a NaN loss on rank 0 at step 7 stops both ranks cleanly
    ("rank:1,step:10,phase:save", 8, 10),
    ("rank:0,step:11,phase:train", 10, None),
]
KILLS = sum("phase:nan" not in fault for fault, _, _ in CHAIN)


@pytest.fixture(scope="module")
def flags(tmp_path_factory, tokenizer_dir, docs_corpus):
    cache = tmp_path_factory.mktemp("fault-cache")
    # save_total_limit 1: HF's rotation may keep only one checkpoint, and it must always be a complete one.
    return lambda output_dir: ["--deepspeed", REPO / "ds_configs/zero2.json",
                               *train_flags(tokenizer_dir, docs_corpus, output_dir, cache, max_steps=STEPS,
                                            save_steps=SAVE_EVERY, save_total_limit=1, validation_split_percentage=0)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, flags) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert_succeeded(run_deepspeed("pretrain.py", *flags(output_dir)))
    return output_dir


@pytest.fixture(scope="module")
def chain(tmp_path_factory, flags):
    """Run, fault, resume, fault, ... in one output folder; returns it and every run's result."""
    output_dir = tmp_path_factory.mktemp("chain") / "out"
    results = []
    for fault, _, _ in CHAIN:
        results.append(run_deepspeed("pretrain.py", *flags(output_dir), "--resume_from_checkpoint", "last",
                                     env=script_env(DSTRAIN_FAULT=fault), timeout=300))
    results.append(run_deepspeed("pretrain.py", *flags(output_dir), "--resume_from_checkpoint", "last", timeout=300))
    return output_dir, results


def test_every_fault_ends_its_run_and_the_next_run_resumes_from_the_last_complete_checkpoint(chain):
    output_dir, results = chain
    for (fault, _, _), result in zip(CHAIN, results):
        assert result.returncode != 0, (fault, result.stdout[-2000:])
        if "phase:nan" in fault:
            assert_clean_error(result, "step 7: the training loss is nan on ")
        else:
            assert "kills itself (SIGKILL)" in result.stdout, (fault, result.stdout[-2000:] + result.stderr[-2000:])
    assert "starting from the beginning" in results[0].stdout
    for (fault, resume_step, skipped_step), result in zip(CHAIN, results[1:]):
        assert f"Resuming from {output_dir / f'checkpoint-{resume_step}'}\n" in result.stdout, (fault, result.stdout)
        if skipped_step:
            assert f"Skipping incomplete checkpoint {output_dir / f'checkpoint-{skipped_step}'}: " in result.stdout
        else:
            assert "Skipping incomplete checkpoint" not in result.stdout
        assert "Reusing tokenized data" in result.stdout  # the same inputs are not tokenized again
        assert "Tokenizing" not in result.stdout + result.stderr
    assert_succeeded(results[-1])
    print(f"{KILLS} SIGKILL + {len(CHAIN) - KILLS} NaN faults, {len(CHAIN)} resumes: all passed")


def test_the_resumed_chain_matches_the_uninterrupted_run(chain, uninterrupted):
    """Same global step, and every step's loss equal: the data order and the optimizer state carried over."""
    output_dir, _ = chain
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    resumed, full = logged_losses(output_dir), logged_losses(uninterrupted)
    assert sorted(resumed) == sorted(full) == list(range(1, STEPS + 1))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-4), (step, full, resumed)


def test_rotation_kept_only_complete_checkpoints_and_set_the_broken_ones_aside(chain):
    output_dir, _ = chain
    assert [p.name for p in checkpoint_folders(output_dir)] == [f"checkpoint-{STEPS}"]
    assert incomplete_reason(output_dir / f"checkpoint-{STEPS}") is None
    set_aside = sorted(p.name for p in output_dir.glob("incomplete-checkpoint-*"))
    assert set_aside == ["incomplete-checkpoint-10", "incomplete-checkpoint-4", "incomplete-checkpoint-6"]
    for folder in output_dir.glob("incomplete-checkpoint-*"):
        assert not (folder / "trainer_state.json").exists()  # each was really cut short
