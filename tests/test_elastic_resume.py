"""Elastic resume (dstrain/train/elastic.py): a ZeRO-2 or ZeRO-3 run checkpointed by 2 ranks continues on
1 rank, and a checkpoint written by that 1 rank continues on 2 again, through DeepSpeed's
universal checkpoints.

Each chain is compared with the uninterrupted 2-rank run (conftest's zero2_run / zero3_run, 12
steps of 4 x 2 x 2 = 16 sequences). Keeping the global batch gives every step the same samples
(dstrain/train/elastic.py explains why), so the resumed losses must follow the uninterrupted ones; measured,
they agree to 1e-6 under both stages. The tolerance is tight enough to catch optimizer state that
was not carried over: a far smaller fault, DeepSpeed's ZeRO-3 loader advancing Adam's step counter
twice per step (worked around in dstrain/train/elastic.py), already moved the loss by 0.003 within 3 steps.
"""

import json
import shutil
from pathlib import Path

import pytest

from dstrain.errors import UserError
from dstrain.train.elastic import accumulation_for
from tests.helpers import (
    PRETRAIN_SAVE_EVERY,
    PRETRAIN_STEPS,
    REPO,
    assert_clean_error,
    assert_succeeded,
    logged_losses,
    run_deepspeed,
    run_main_in_process,
    train_flags,
)

# The uninterrupted runs save every 4 steps, and a resumed run keeps that (HF restores save_steps from
# the checkpoint): 2 ranks -> checkpoint-4 -> 1 rank -> its checkpoint-8 -> 2 ranks -> step 12.
STEPS, FIRST_SAVE, SECOND_SAVE = PRETRAIN_STEPS, PRETRAIN_SAVE_EVERY, 2 * PRETRAIN_SAVE_EVERY
LOSS_TOLERANCE = 1e-4


def log_history(output_dir: Path) -> dict[int, dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def resume(checkpoint: Path, output_dir: Path, ranks: int, stage: str, tokenizer_dir, docs_corpus, cache_dir,
           **overrides):
    """Copy one checkpoint into a fresh output_dir and re-run the uninterrupted run's command there on `ranks`."""
    output_dir.mkdir(parents=True)
    shutil.copytree(checkpoint, output_dir / checkpoint.name)
    result = run_deepspeed("pretrain.py", "--deepspeed", REPO / f"ds_configs/{stage}.json",
                           *train_flags(tokenizer_dir, docs_corpus, output_dir, cache_dir, **overrides),
                           "--resume_from_checkpoint", "last", ranks=ranks)
    assert_succeeded(result)
    return result


def assert_continues(full_dir: Path, resumed_dir: Path, after_step: int) -> None:
    """Same steps, same learning rates, and losses within LOSS_TOLERANCE of the uninterrupted run."""
    full, resumed = log_history(full_dir), log_history(resumed_dir)
    assert [step for step in resumed if step > after_step] == list(range(after_step + 1, STEPS + 1))
    for step in range(after_step + 1, STEPS + 1):
        assert resumed[step]["learning_rate"] == pytest.approx(full[step]["learning_rate"], rel=1e-6), step
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], abs=LOSS_TOLERANCE), (
            step, logged_losses(full_dir), logged_losses(resumed_dir))
        assert resumed[step]["grad_norm"] == pytest.approx(full[step]["grad_norm"], abs=LOSS_TOLERANCE), step


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def elastic_chain(request, tmp_path_factory, tokenizer_dir, docs_corpus, cache_dir):
    """2 ranks (the uninterrupted run's checkpoint-4) -> 1 rank, which saves at step 8 -> 2 ranks."""
    stage = request.param
    full_dir, _ = request.getfixturevalue(f"{stage}_run")
    workdir = tmp_path_factory.mktemp(f"elastic-{stage}")
    one_rank = resume(full_dir / f"checkpoint-{FIRST_SAVE}", workdir / "one-rank", 1, stage,
                      tokenizer_dir, docs_corpus, cache_dir)
    two_ranks = resume(workdir / "one-rank" / f"checkpoint-{SECOND_SAVE}", workdir / "two-ranks", 2, stage,
                       tokenizer_dir, docs_corpus, cache_dir, gradient_accumulation_steps=4)
    return full_dir, workdir, one_rank, two_ranks


@pytest.mark.slow
def test_two_ranks_to_one_keeps_the_global_batch_and_continues_the_run(elastic_chain):
    full_dir, workdir, one_rank, _ = elastic_chain
    assert f"checkpoint-{FIRST_SAVE} was written by 2 ranks; this run has 1" in one_rank.stdout
    assert "Gradient accumulation 2 -> 4 keeps the global batch of 16 sequences" in one_rank.stdout
    assert_continues(full_dir, workdir / "one-rank", FIRST_SAVE)
    # DeepSpeed's converted checkpoint sits beside the original shards, which are left as they were.
    checkpoint = workdir / "one-rank" / f"checkpoint-{FIRST_SAVE}"
    assert (checkpoint / "latest_universal").read_text() == f"global_step{FIRST_SAVE}_universal"
    assert (checkpoint / f"global_step{FIRST_SAVE}_universal" / "zero").is_dir()
    assert len(list((checkpoint / f"global_step{FIRST_SAVE}").glob("*optim_states.pt"))) == 2
    # The 1-rank run's own checkpoints are ordinary 1-rank ZeRO checkpoints.
    saved = workdir / "one-rank" / f"checkpoint-{SECOND_SAVE}" / f"global_step{SECOND_SAVE}"
    assert len(list(saved.glob("*optim_states.pt"))) == 1


@pytest.mark.slow
def test_one_rank_back_to_two_recomputes_accumulation_again(elastic_chain):
    full_dir, workdir, _, two_ranks = elastic_chain
    assert f"checkpoint-{SECOND_SAVE} was written by 1 ranks; this run has 2" in two_ranks.stdout
    # The command said 4 (as the 1-rank run used); 2 ranks need 2 for the same 16 sequences.
    assert "Gradient accumulation 4 -> 2 keeps the global batch of 16 sequences" in two_ranks.stdout
    assert_continues(full_dir, workdir / "two-ranks", SECOND_SAVE)
    state = json.loads((workdir / "two-ranks" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS


def test_a_global_batch_that_cannot_be_kept_names_the_choices():
    assert accumulation_for(16, 4, 1) == 4 and accumulation_for(16, 2, 8) == 1
    with pytest.raises(UserError) as error:
        accumulation_for(16, 5, 1)
    assert str(error.value) == ("the checkpoint's global batch of 16 sequences cannot be kept on 1 ranks of 5: pass "
                                "--per_device_train_batch_size one of 1, 2, 4, 8, 16, or --keep_global_batch_size "
                                "false to train on with a new global batch")
    with pytest.raises(UserError, match="a world size that divides 16"):
        accumulation_for(16, 1, 3)


@pytest.mark.slow
def test_the_conversion_command_writes_beside_the_shards_and_is_reused(zero3_run, tmp_path):
    full_dir, _ = zero3_run
    checkpoint = tmp_path / f"checkpoint-{FIRST_SAVE}"
    shutil.copytree(full_dir / checkpoint.name, checkpoint)
    shards = {path.name: path.read_bytes() for path in (checkpoint / f"global_step{FIRST_SAVE}").iterdir()}
    first = run_main_in_process("convert_checkpoint.py", checkpoint)
    assert_succeeded(first)
    assert f"{checkpoint.name}: ZeRO-3, written by 2 ranks, global batch 16 (4 per device x 2 accumulation" in first.stdout
    universal = checkpoint / f"global_step{FIRST_SAVE}_universal"
    # One folder per parameter with its fp32 weights and both Adam moments: the optimizer state travels.
    assert {path.name for path in (universal / "zero" / "model.embed_tokens.weight").iterdir()} >= {
        "fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"}
    assert {path.name: path.read_bytes() for path in (checkpoint / f"global_step{FIRST_SAVE}").iterdir()} == shards
    again = run_main_in_process("convert_checkpoint.py", checkpoint)
    assert f"Reusing the universal checkpoint {universal}" in again.stdout
    assert_clean_error(run_main_in_process("convert_checkpoint.py", tmp_path), f"{tmp_path} is a run folder: pass one "
                       f"of its checkpoints, e.g. {checkpoint}")
