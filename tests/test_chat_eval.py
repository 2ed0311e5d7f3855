"""eval.py chat: a tiny chat model answers a questions file (chat.py's batch path); the answers are scored
by exact match and a regex against references and by a tiny reward model; a LoRA adapter answers the
same prompts and the reward model's win rate is computed; every number checked by hand."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dstrain.data.chat_template import render
from dstrain.eval.chat_eval import bootstrap_interval, normalise_answer, win_scores
from tests.helpers import assert_clean_error, assert_succeeded, run_main_in_process
from tests.tiny_chat_models import (
    NAME_QUESTION,
    NAME_REPLY_WITH_HISTORY,
    NAME_REPLY_WITHOUT,
    NAME_TURNS,
    QUESTION,
    REPLIES,
    train_reward_model,
    trained_models,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = [
    {"id": 1, "question": QUESTION, "answer": REPLIES["base"]},
    {"id": 2, "messages": NAME_TURNS + [{"role": "user", "content": NAME_QUESTION}], "answer_regex": r"\bAda\b"},
    {"id": 3, "question": "Say hi.", "answer": ["hello", "hi"]},  # the model's "Hi!" matches "hi" once normalised
    {"id": 4, "question": NAME_QUESTION, "answer": NAME_REPLY_WITH_HISTORY},  # it answers "I do not know."
]
EXPECTED_ANSWERS = [REPLIES["base"], NAME_REPLY_WITH_HISTORY, "Hi!", NAME_REPLY_WITHOUT]


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_model):
    folder = tmp_path_factory.mktemp("chat-eval-models")
    found = dict(trained_models(base_model, folder))
    found["reward"] = folder / "reward"
    train_reward_model(base_model, found["reward"])
    return found


@pytest.fixture(scope="module")
def comparison(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-eval")
    questions = folder / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    output = folder / "report.json"
    result = run_main_in_process("eval.py", "chat", "--model", models["chat"], "--compare", models["pirate"],
                                 "--reward_model", models["reward"], "--questions", questions, "--output", output,
                                 "--max_new_tokens", 24, "--batch_size", 3)
    assert_succeeded(result)
    return json.loads(output.read_text()), result


@pytest.mark.slow  # trains a tiny reward model and generates: seconds
def test_answers_are_scored_against_the_references(comparison):
    report, printed = comparison
    rows = report["questions"]
    assert [row["model"]["answer"] for row in rows] == EXPECTED_ANSWERS
    assert [row["model"]["exact_match"] for row in rows] == [True, None, True, False]
    assert [row["model"]["regex_match"] for row in rows] == [None, True, None, None]
    assert [row["id"] for row in rows] == [1, 2, 3, 4] and rows[0]["reference_answer"] == REPLIES["base"]
    exact = report["summary"]["model"]["exact_match"]
    # 3 questions with "answer", 2 matched; resampling 3 values, an all-miss draw has probability 1/27 > 2.5%
    assert exact["mean"] == pytest.approx(2 / 3) and exact["questions"] == 3 and exact["interval"] == [0.0, 1.0]
    assert report["summary"]["model"]["regex_match"] == {"mean": 1.0, "interval": [1.0, 1.0], "questions": 1}
    assert rows[0]["compare"]["answer"] == REPLIES["pirate"] and rows[0]["compare"]["exact_match"] is False
    assert "model      exact_match  0.6667  (95% CI 0.0000 to 1.0000, 3 questions)" in printed.stdout


@pytest.mark.slow  # trains a tiny reward model and generates: seconds
def test_rewards_and_win_rate_equal_a_hand_computation(models, comparison):
    report, printed = comparison
    tokenizer = AutoTokenizer.from_pretrained(models["reward"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(models["reward"]).eval()
    prompts = [q.get("messages") or [{"role": "user", "content": q["question"]}] for q in QUESTIONS]

    def reward(prompt, answer):  # one at a time, no padding: the score at the last token
        ids = render(tokenizer, prompt + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        with torch.no_grad():
            return reward_model(torch.tensor([ids])).logits[0, 0].item()

    rows = report["questions"]
    mine = {label: [reward(p, row[label]["answer"]) for p, row in zip(prompts, rows)] for label in ("model", "compare")}
    for label in mine:
        assert [row[label]["reward"] for row in rows] == pytest.approx(mine[label], abs=1e-4)
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine["model"], mine["compare"])]
    comparison_summary = report["summary"]["comparison"]
    assert comparison_summary["win_rate"]["mean"] == pytest.approx(sum(wins) / len(wins))
    assert (comparison_summary["wins"], comparison_summary["ties"], comparison_summary["losses"]) == \
        (wins.count(1.0), wins.count(0.5), wins.count(0.0))
    assert wins[0] == 1.0 and rows[0]["winner"] == "model"  # the reward model was taught this preference
    low, high = comparison_summary["win_rate"]["interval"]
    assert 0 <= low <= comparison_summary["win_rate"]["mean"] <= high <= 1
    assert "win rate of model over compare by the reward model" in printed.stdout


@pytest.mark.slow  # trains a tiny reward model and generates: seconds
def test_a_bad_reference_stops_before_any_model_loads(models, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Hi?"}) + "\n" + json.dumps({"question": "x", "answer_regex": "("}))
    result = run_main_in_process("eval.py", "chat", "--model", tmp_path / "missing", "--questions", questions,
                                 "--output", tmp_path / "out.json")
    assert_clean_error(result, f"{questions}:2: 'answer_regex' is not a valid regular expression")
    result = run_main_in_process("eval.py", "chat", "--model", models["chat"], "--compare", models["pirate"],
                                 "--questions", questions, "--output", tmp_path / "out.json")
    assert_clean_error(result, "--compare needs --reward_model")
    assert not (tmp_path / "out.json").exists()


def test_scoring_helpers():
    assert normalise_answer("  Hi!  ") == "hi" and normalise_answer("ＨＥＬＬＯ,\n world.") == "hello, world"
    assert win_scores([1.0, 2.0, 3.0], [2.0, 2.0, 1.0]) == [0.0, 0.5, 1.0]
    assert bootstrap_interval([1.0] * 5) == [1.0, 1.0]
    low, high = bootstrap_interval([0.0, 1.0] * 50)
    assert 0.39 < low < 0.5 < high < 0.61  # the mean 0.5 with its standard error 0.05: about +-0.1
