"""Crash and resume on 2 CPU ranks: one run directory survives a chain of real SIGKILLs (during
training and at two points inside a save) and two numerical faults (a NaN loss, NaN gradients), each
followed by `--resume_from_checkpoint last`, and ends exactly where an uninterrupted run with the same
seed ends. Then the cheaper checks: the disk estimate, a finished run's folder, --nonfinite_loss skip,
fp16 loss-scale collapse.

The faults are made deterministic by DSTRAIN_FAULT (dstrain/train/faults.py): the chosen rank sends
SIGKILL to itself at the chosen point, so no poller races a 50 ms save on two shared cores.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dstrain.errors import UserError
from dstrain.train.checkpoints import check_free_space, checkpoint_bytes_estimate, checkpoint_folders, incomplete_reason
from dstrain.train.faults import FAULT_ENV, loss_scale_collapse
from tests.helpers import (
    REPO,
    assert_clean_error,
    assert_succeeded,
    logged_losses,
    run_deepspeed,
    run_main_in_process,
    script_env,
    train_flags,
)

STEPS, SAVE_EVERY = 12, 2

# (DSTRAIN_FAULT, the checkpoint the *next* run resumes from, the incomplete checkpoint it must skip)
CHAIN = [
    ("rank:1,step:3,phase:train", 2, None),  # rank 1 dies after step 3: checkpoint-2 is the last one
    ("rank:0,step:4,phase:save", 2, 4),  # rank 0 dies inside the save of 4, after DeepSpeed wrote global_step4
    ("rank:1,step:6,phase:shard", 4, 6),  # rank 1 dies right after writing its own optimizer shard of 6
    ("rank:0,step:7,phase:nan", 6, None),  # a NaN loss on rank 0 at step 7 stops both ranks cleanly
    ("rank:1,step:9,phase:grad", 8, None),  # NaN gradients, finite loss: DeepSpeed's grad norm (inf) stops both
    ("rank:1,step:10,phase:save", 8, 10),
    ("rank:0,step:11,phase:train", 10, None),
]
STOPS = {"phase:nan": "step 7: the training loss is nan on rank 0", "phase:grad": "step 9: the gradient norm is "}
KILLS = sum(fault.split(",")[-1] not in STOPS for fault, _, _ in CHAIN)


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
                                     env=script_env(DSTRAIN_FAULT=fault), timeout=450))
    results.append(run_deepspeed("pretrain.py", *flags(output_dir), "--resume_from_checkpoint", "last", timeout=450))
    return output_dir, results


@pytest.mark.slow
def test_every_fault_ends_its_run_and_the_next_run_resumes_from_the_last_complete_checkpoint(chain):
    output_dir, results = chain
    for (fault, _, _), result in zip(CHAIN, results):
        assert result.returncode != 0, (fault, result.stdout[-2000:])
        if fault.split(",")[-1] in STOPS:
            assert_clean_error(result, STOPS[fault.split(",")[-1]])
            assert "kills itself" not in result.stdout
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
    print(f"{KILLS} SIGKILLs + {len(CHAIN) - KILLS} NaN stops, {len(CHAIN)} resumes: all passed")


@pytest.mark.slow
def test_the_resumed_chain_matches_the_uninterrupted_run(chain, uninterrupted):
    """Same global step, and every step's loss equal: the data order and the optimizer state carried over."""
    output_dir, _ = chain
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    resumed, full = logged_losses(output_dir), logged_losses(uninterrupted)
    assert sorted(resumed) == sorted(full) == list(range(1, STEPS + 1))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-4), (step, full, resumed)


@pytest.mark.slow
def test_rotation_kept_only_complete_checkpoints_and_set_the_broken_ones_aside(chain):
    output_dir, _ = chain
    assert [p.name for p in checkpoint_folders(output_dir)] == [f"checkpoint-{STEPS}"]
    assert incomplete_reason(output_dir / f"checkpoint-{STEPS}") is None
    set_aside = sorted(p.name for p in output_dir.glob("incomplete-checkpoint-*"))
    assert set_aside == ["incomplete-checkpoint-10", "incomplete-checkpoint-4", "incomplete-checkpoint-6"]
    for folder in output_dir.glob("incomplete-checkpoint-*"):
        assert not (folder / "trainer_state.json").exists()  # each was really cut short


@pytest.mark.slow
def test_the_disk_estimate_covers_a_real_checkpoint(chain):
    """checkpoint_bytes_estimate against the bytes of the chain's last real ZeRO-2 checkpoint."""
    from transformers import AutoModelForCausalLM

    output_dir, _ = chain
    written = sum(p.stat().st_size for p in (output_dir / f"checkpoint-{STEPS}").rglob("*") if p.is_file())
    estimate = checkpoint_bytes_estimate(AutoModelForCausalLM.from_pretrained(output_dir))
    assert written * 0.9 <= estimate <= written * 1.5, (estimate, written)


def test_no_room_for_a_checkpoint_is_refused_before_training(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "out" / "not-yet", free // 2)  # a folder still to be made: its parent's filesystem
    with pytest.raises(UserError, match=r"--output_dir .*not-yet: [\d.]+ GiB free .* needs about [\d.]+ GiB"):
        check_free_space(tmp_path / "out" / "not-yet", free + 2**40)


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path, tokenizer_dir, docs_corpus, resume):
    """An output_dir holding a final model (no checkpoints: save_steps beyond max_steps, or pruned) is refused,
    also with --resume_from_checkpoint last, which has nothing to resume; its files keep their bytes."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"weights of an earlier run")
    flags = train_flags(tokenizer_dir, docs_corpus, output_dir, tmp_path / "cache")
    result = run_main_in_process("pretrain.py", *flags, *(["--resume_from_checkpoint", "last"] if resume else []))
    assert_clean_error(result, str(output_dir), "model.safetensors", "--overwrite_output_dir")
    assert (output_dir / "model.safetensors").read_bytes() == b"weights of an earlier run"
    assert sorted(p.name for p in output_dir.iterdir()) == ["model.safetensors"]


def test_nonfinite_loss_skip_trains_on_and_counts_the_skipped_batch(tmp_path, tokenizer_dir, docs_corpus,
                                                                    monkeypatch):
    """--nonfinite_loss skip, one process (no DeepSpeed, in this process): the NaN micro-batch is named and
    counted, training finishes, and every weight and logged loss stays finite."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, "rank:0,step:2,phase:nan")
    result = run_main_in_process("pretrain.py", *train_flags(tokenizer_dir, docs_corpus, output_dir, tmp_path / "cache",
                                                             max_steps=3, save_steps=3, validation_split_percentage=0),
                                 "--nonfinite_loss", "skip")
    assert_succeeded(result)
    # Read once per optimizer step (no sync per micro-batch), so the line comes at the step's end and only the
    # rank that saw the NaN zeroes its micro-batch (the others' gradients were finite and are kept).
    assert ("step 2: the training loss is nan on rank 0; that micro-batch trained with zero gradient "
            "(1 skipped so far)") in result.stdout
    assert json.loads((output_dir / "train_results.json").read_text())["nonfinite_skipped"] == 1
    losses = logged_losses(output_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(loss) for loss in losses.values()), losses
    assert all(torch.isfinite(t).all() for t in load_file(output_dir / "model.safetensors").values())


def test_fp16_loss_scale_collapse_is_reported_from_deepspeeds_own_scaler():
    """The report reads DeepSpeed's real DynamicLossScaler (an fp16 run itself needs a GPU); bf16/fp32 runs
    carry a static scaler and are never reported."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    def optimizer_with(scaler):
        return type("Optimizer", (), {"loss_scaler": scaler})()

    dynamic = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=1,
                                consecutive_hysteresis=False)
    assert loss_scale_collapse(optimizer_with(dynamic), 0, 5) is None
    dynamic.cur_scale = dynamic.min_scale  # where 16 overflows in a row leave it
    message = loss_scale_collapse(optimizer_with(dynamic), 16, 21)
    assert message.startswith("step 21: the fp16 loss scale has fallen to its minimum (1) after 16 steps skipped")
    assert loss_scale_collapse(optimizer_with(LossScaler(scale=1)), 0, 5) is None
    assert loss_scale_collapse(None, 0, 5) is None
