"""--eval_tasks during real 2-rank DeepSpeed runs (CPU ranks): harness scores logged beside eval_loss at
every evaluation (trainer_state.json, WandB offline, eval_results.json), equal to eval.py's on the saved
model, under ZeRO-3 (every rank evaluates everything) and ZeRO-2 (data parallel); the training itself
unchanged by them; and --decontaminate dropping, at the start of the ZeRO-2 run, the documents that
hold a benchmark's text."""

import json
import re

import pytest

from tests import wandb_offline
from tests.helpers import (
    REPO,
    assert_clean_error,
    assert_succeeded,
    logged_losses,
    run_deepspeed,
    run_main_in_process,
    train_flags,
)

pytestmark = pytest.mark.slow

TASKS = "python_docstring_perplexity,python_docstrings"
LIMIT = 4
EVAL_FLAGS = ["--eval_strategy", "steps", "--eval_steps", "6", "--per_device_eval_batch_size", "4",
              "--eval_tasks", TASKS, "--eval_tasks_limit", str(LIMIT)]
SCORES = ["eval_python_docstring_perplexity/bits_per_byte", "eval_python_docstring_perplexity/word_perplexity",
          "eval_python_docstrings/acc", "eval_python_docstrings/acc_norm"]


def train(stage: int, folder, tokenizer_dir, corpus, cache_dir, *extra):
    output_dir = folder / "out"
    flags = train_flags(tokenizer_dir, corpus, output_dir, cache_dir, save_steps=12, report_to="wandb")
    result = run_deepspeed("pretrain.py", "--deepspeed", REPO / f"ds_configs/zero{stage}.json", *flags, *EVAL_FLAGS,
                           *extra)
    assert_succeeded(result)
    return output_dir, result


@pytest.fixture(scope="module")
def zero3_eval_run(tmp_path_factory, tokenizer_dir, docs_corpus, cache_dir):
    return train(3, tmp_path_factory.mktemp("zero3-eval"), tokenizer_dir, docs_corpus, cache_dir)


@pytest.fixture(scope="module")
def planted_benchmark(tmp_path_factory, docs_corpus):
    """Three sentences of 20 words copied from three documentation topics, as a benchmark file."""
    texts = [json.loads(line)["text"] for line in docs_corpus.read_text().splitlines()]
    items = []
    long_ones = [i for i, text in enumerate(texts) if len(text.split()) >= 80]
    for index in long_ones[5::20][:3]:
        words = " ".join(texts[index].split()).split(" ")
        items.append({"question": " ".join(words[40:60]), "answer": "planted"})
    path = tmp_path_factory.mktemp("bench") / "planted.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="module")
def zero2_eval_run(tmp_path_factory, tokenizer_dir, docs_corpus, cache_dir, planted_benchmark):
    return train(2, tmp_path_factory.mktemp("zero2-eval"), tokenizer_dir, docs_corpus, cache_dir,
                 "--decontaminate_against", planted_benchmark, "--decontaminate", "true")


def harness_entries(output_dir) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if SCORES[0] in entry]


def check_logged_beside_eval_loss(output_dir, result):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    eval_steps = [entry["step"] for entry in state["log_history"] if "eval_loss" in entry]
    entries = harness_entries(output_dir)
    assert eval_steps == [6, 12] and [entry["step"] for entry in entries] == [6, 12]
    for entry in entries:
        assert set(SCORES) <= set(entry) and entry["eval_tasks_runtime"] > 0
    # A continuous score follows the weights from one evaluation to the next; rank 0 alone prints it.
    assert entries[0][SCORES[0]] != entries[1][SCORES[0]]
    assert len(re.findall(r"Benchmarks at step 6: ", result.stdout)) == 1
    # The final evaluation (after training, on the same weights as step 12) adds them to eval_results.json.
    final = json.loads((output_dir / "eval_results.json").read_text())
    assert {name: final[name] for name in SCORES} == pytest.approx({name: entries[1][name] for name in SCORES})
    return final


def check_equal_to_eval_py(output_dir, final, tmp_path):
    """eval.py on the saved model, alone, gives the scores the run logged last."""
    output = tmp_path / "eval.json"
    assert_succeeded(run_main_in_process("eval.py", "--model", output_dir, "--tasks", TASKS, "--limit", LIMIT,
                                         "--batch_size", 4, "--output", output))
    results = json.loads(output.read_text())["results"]
    assert final["eval_python_docstring_perplexity/bits_per_byte"] == pytest.approx(
        results["python_docstring_perplexity"]["bits_per_byte,none"], rel=1e-5)
    assert final["eval_python_docstring_perplexity/word_perplexity"] == pytest.approx(
        results["python_docstring_perplexity"]["word_perplexity,none"], rel=1e-4)
    assert final["eval_python_docstrings/acc"] == results["python_docstrings"]["acc,none"]
    assert final["eval_python_docstrings/acc_norm"] == results["python_docstrings"]["acc_norm,none"]


def choices_scored_on_rank0(result) -> set[str]:
    """The totals of the harness's progress bars for the multiple-choice requests (4 items x 4 choices)."""
    return set(re.findall(r"Running loglikelihood requests: 100%\|\S+\| (\d+/\d+)", result.stderr)) - {"4/4", "2/2"}


def test_zero3_logs_scores_beside_eval_loss_equal_to_eval_py(zero3_eval_run, tmp_path):
    output_dir, result = zero3_eval_run
    final = check_logged_beside_eval_loss(output_dir, result)
    check_equal_to_eval_py(output_dir, final, tmp_path)
    assert choices_scored_on_rank0(result) == {"16/16"}  # every rank scores every choice


def test_zero3_scores_reach_wandb_as_curves(zero3_eval_run):
    output_dir, _ = zero3_eval_run
    [run_file] = (output_dir / "wandb").glob("offline-run-*/run-*.wandb")
    key = "eval/python_docstring_perplexity/bits_per_byte"  # HF's WandB callback turns eval_x into eval/x
    rows = [row for row in wandb_offline.logged_rows(run_file) if key in row]
    assert [row["train/global_step"] for row in rows] == [6, 12, 12]  # two during training, the final one
    entries = harness_entries(output_dir)
    assert [row[key] for row in rows[:2]] == \
        pytest.approx([entry[SCORES[0]] for entry in entries])


def test_benchmarks_leave_the_training_unchanged(zero3_eval_run, zero3_run):
    """The same run without --eval_tasks (the session's ZeRO-3 run: same data, seed and flags) has
    the same loss at every step: the harness's seeding and its forward passes change nothing."""
    assert logged_losses(zero3_eval_run[0]) == logged_losses(zero3_run[0])


def test_zero2_evaluates_data_parallel_and_decontaminates(zero2_eval_run, tmp_path):
    output_dir, result = zero2_eval_run
    final = check_logged_beside_eval_loss(output_dir, result)
    check_equal_to_eval_py(output_dir, final, tmp_path)
    assert choices_scored_on_rank0(result) == {"8/8"}  # each rank scores half of the 16 choices
    # The data audit's report: the three planted sentences found, each in its own document, which was dropped.
    assert re.search(r"contamination \(13-grams\): records overlapping a benchmark: train (\d+) of \d+, "
                     r"validation (\d+) of \d+, dropped: train \1, validation \2", result.stdout), result.stdout[-3000:]
    found = re.search(r"planted\.jsonl: (\d+) of 3 items found in (\d+) training records", result.stdout)
    assert found and found.group(1) == "3", result.stdout[-3000:]


def test_eval_tasks_flags_are_checked_before_any_work(tokenizer_dir, docs_corpus, tmp_path):
    flags = train_flags(tokenizer_dir, docs_corpus, tmp_path / "out", tmp_path / "cache")
    result = run_main_in_process("pretrain.py", *flags, "--eval_tasks", "python_docstrings")
    assert_clean_error(result, "--eval_tasks runs at each evaluation", "--eval_strategy")
    result = run_main_in_process("pretrain.py", *flags, *EVAL_FLAGS[:6], "--eval_tasks", "python_docstringz")
    assert_clean_error(result, "no task, group or tag named 'python_docstringz'", "python_docstrings")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
