"""Loss-spike rollback (dstrain/train/spikes.py) on 2 CPU ranks under ZeRO-2, with WandB offline.

conftest's uninterrupted zero2_run's flags, plus --spike_rollback, and two injected faults
(DSTRAIN_FAULT): rank 0's loss times 50 at step 7 (a finite spike) and a NaN loss on rank 1 at step 10.
Each is rolled back to the newest checkpoint (4, then 8), the batches from there through the spike
and one more are skipped, the learning rate is halved for two steps, and the run finishes. The batch
trace (DSTRAIN_TRACE_BATCHES) shows the data order: every step's batches delivered once, in order,
and no forward pass on the skipped ones; the first step trained after a rollback has exactly the loss
that the restored checkpoint's weights give on its batches.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from dstrain.train.spikes import STATE_FILE, SpikeDetector
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
from tests.wandb_offline import logged_rows

SPIKE_AT, NAN_AT, STEPS = 7, 10, 12
SPIKE_FLAGS = ["--spike_rollback", "true", "--spike_window", "3", "--spike_threshold", "4",
               "--spike_skip_batches", "1", "--spike_lr_factor", "0.5", "--spike_lr_steps", "2",
               "--spike_max_rollbacks", "2"]


@pytest.fixture(scope="module")
def spiked_run(tmp_path_factory, tokenizer_dir, docs_corpus, cache_dir):
    folder = tmp_path_factory.mktemp("spikes")
    output_dir = folder / "out"
    flags = train_flags(tokenizer_dir, docs_corpus, output_dir, cache_dir, report_to="wandb")
    env = script_env(DSTRAIN_FAULT=f"rank:0,step:{SPIKE_AT},phase:spike;rank:1,step:{NAN_AT},phase:nan",
                     DSTRAIN_TRACE_BATCHES=str(folder / "trace"))
    result = run_deepspeed("pretrain.py", "--deepspeed", REPO / "ds_configs/zero2.json", *flags, *SPIKE_FLAGS,
                           env=env)
    assert_succeeded(result)
    return output_dir, result, folder / "trace"


def history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def trace(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"batches-rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_each_spike_is_rolled_back_said_and_logged_and_the_run_finishes(spiked_run):
    output_dir, result, _ = spiked_run
    assert (f"Loss spike at step {SPIKE_AT}: loss " in result.stdout
            and "standard deviations above the mean" in result.stdout), result.stdout[-3000:]
    assert ("Rollback 1 of 2: weights and optimizer of checkpoint-4; batches 5..8 of the data order skipped (4); "
            "learning rate x0.5 for steps 9..10") in result.stdout
    assert (f"Loss spike at step {NAN_AT}: a non-finite loss or gradient norm. Rollback 2 of 2: weights and "
            "optimizer of checkpoint-8; batches 9..11 of the data order skipped (3); learning rate x0.5 for "
            "steps 12..13") in result.stdout
    assert json.loads((output_dir / "train_results.json").read_text())["spike_rollbacks"] == 2
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == STEPS
    assert (output_dir / "model.safetensors").is_file()
    events = [entry for entry in history(output_dir) if "spike_rollback" in entry]
    assert [(e["step"], e["spike_rollback"], e["spike_restored_step"], e["spike_skipped_batches"]) for e in events] \
        == [(SPIKE_AT, 1, 4, 4), (NAN_AT, 2, 8, 3)]
    # ... and in WandB, as events of their own
    wandb_file = next((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = [row for row in logged_rows(wandb_file) if "train/spike_rollback" in row]
    assert [(row["train/spike_rollback"], row["train/global_step"]) for row in rows] == [(1, SPIKE_AT), (2, NAN_AT)]
    # The rollback state travels with every checkpoint, for a resumed run.
    saved = json.loads((output_dir / f"checkpoint-{STEPS}" / STATE_FILE).read_text())
    assert saved["rollbacks"] == 2 and saved["skip"] == [NAN_AT, NAN_AT + 1]


@pytest.mark.slow
def test_before_the_spike_the_run_is_the_uninterrupted_one_and_lowered_steps_log_half_the_rate(spiked_run, zero2_run):
    output_dir, _, _ = spiked_run
    spiked, full = logged_losses(output_dir), logged_losses(zero2_run[0])
    for step in range(1, SPIKE_AT):
        assert spiked[step] == pytest.approx(full[step], abs=1e-5), (step, spiked, full)
    assert spiked[SPIKE_AT] > 10 * full[SPIKE_AT]  # the injected spike, as logged
    # Skipped steps log no loss; the others do.
    assert sorted(spiked) == [s for s in range(1, STEPS + 1) if s not in (8, 11)]
    rates = {e["step"]: e["learning_rate"] for e in history(output_dir) if "learning_rate" in e}
    full_rates = {e["step"]: e["learning_rate"] for e in history(zero2_run[0]) if "learning_rate" in e}
    for step in range(1, STEPS + 1):  # the schedule's clock never went back; steps 9, 10 and 12 at half the rate
        assert rates[step] == pytest.approx(full_rates[step] * (0.5 if step in (9, 10, 12) else 1), rel=1e-6), step


@pytest.mark.slow
def test_the_skipped_window_is_visible_in_the_data_order(spiked_run):
    """Every step's batches are delivered once, in order (a rollback does not rewind the data); the skipped
    steps (8 and 11) are delivered and never trained on; the undone ones (5-7, 9-10) were trained on."""
    _, _, folder = spiked_run
    for rank in (0, 1):
        records = trace(folder, rank)
        delivered = [r["step"] for r in records if "input_ids" in r]
        trained = sorted({r["step"] for r in records if r.get("trained")})
        assert delivered == [step for step in range(1, STEPS + 1) for _ in range(2)]  # 2 micro-batches a step
        assert trained == [s for s in range(1, STEPS + 1) if s not in (8, 11)]


@pytest.mark.slow
@pytest.mark.parametrize("restored, first_trained", [(4, 9), (8, 12)])
def test_the_first_step_after_a_rollback_trains_the_restored_checkpoints_weights(spiked_run, restored, first_trained):
    """The loss logged at that step is what checkpoint-<restored>'s saved weights give on that step's batches
    (both ranks', from the trace): the weights of the undone steps are really gone."""
    from transformers import AutoModelForCausalLM

    output_dir, _, folder = spiked_run
    model = AutoModelForCausalLM.from_pretrained(output_dir / f"checkpoint-{restored}").eval()
    batches = [r["input_ids"] for rank in (0, 1) for r in trace(folder, rank)
               if r["step"] == first_trained and "input_ids" in r]
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss.item() for ids in batches]
    assert len(losses) == 4
    assert logged_losses(output_dir)[first_trained] == pytest.approx(sum(losses) / 4, abs=1e-4)


# ---- fast ----

def test_a_spike_is_a_jump_of_k_deviations_over_a_full_window():
    detector = SpikeDetector(window=4, threshold=3.0)
    for step, loss in enumerate([5.0, 4.9, 5.1, 5.0], start=1):
        assert detector.verdict(loss * 3) is None  # no verdict before the window is full
        detector.add(step, loss)
    assert detector.verdict(5.2) is None  # 2.8 deviations (0.0707) above 5.0
    assert "standard deviations above the mean 5.0000 of the last 4 steps" in detector.verdict(5.25)
    assert detector.verdict(float("nan")) == "the loss is nan" and detector.verdict(math.inf) == "the loss is inf"
    flat = SpikeDetector(window=3, threshold=3.0, history=[(1, 2.0), (2, 2.0), (3, 2.0)])
    assert flat.verdict(2.05) is None  # the deviation is floored at 1% of the mean: 3 x 0.02 = 0.06
    assert flat.verdict(2.07) is not None
    detector.forget_after(2)
    assert [step for step, _ in detector.history] == [1, 2] and detector.verdict(100.0) is None


def test_the_rollback_goes_to_the_newest_complete_checkpoint_before_the_spike(tmp_path):
    """Not an incomplete one, nor a later one an earlier run (--overwrite_output_dir) left beside it."""
    from dstrain.train.spikes import _agreed_checkpoint

    for step, complete in [(2, True), (4, False), (6, True)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "rng_state.pth").write_bytes(b"rng")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert _agreed_checkpoint(tmp_path, 5) == tmp_path / "checkpoint-2"
    assert _agreed_checkpoint(tmp_path, 7) == tmp_path / "checkpoint-6"
    assert _agreed_checkpoint(tmp_path, 2) is None


@pytest.mark.slow  # a real (in-process) training run with two checkpoints: 4-5 s
def test_after_the_last_allowed_rollback_the_next_spike_stops_the_run_in_one_line(tmp_path, tokenizer_dir, docs_corpus,
                                                                                  cache_dir, monkeypatch):
    """One process, no DeepSpeed (HF's own loading): the spike at step 3 is rolled back to checkpoint-2,
    the one at step 5 is one too many."""
    monkeypatch.setenv("DSTRAIN_FAULT", "rank:0,step:3,phase:spike;rank:0,step:5,phase:spike")
    result = run_main_in_process("pretrain.py", *train_flags(tokenizer_dir, docs_corpus, tmp_path / "out", cache_dir,
                                                             validation_split_percentage=0, max_steps=6, save_steps=2),
                                 "--spike_rollback", "true", "--spike_window", "2", "--spike_max_rollbacks", "1")
    assert "Loss spike at step 3: " in result.stdout and "weights and optimizer of checkpoint-2" in result.stdout
    assert_clean_error(result, "step 5: loss spike (loss ", "after 1 rollbacks (--spike_max_rollbacks 1); stopping")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--spike_lr_factor", "2", "--spike_lr_factor must be in (0, 1]"),
    ("--spike_window", "1", "--spike_window must be at least 2"),
])
def test_spike_flags_are_checked(tmp_path, tokenizer_dir, docs_corpus, flag, value, fragment):
    result = run_main_in_process("pretrain.py", *train_flags(tokenizer_dir, docs_corpus, tmp_path / "out",
                                                             tmp_path / "cache"), flag, value)
    assert_clean_error(result, fragment)
