"""chat.py: one question, a file of questions in batches, and the interactive chat through a stdin
script, on a tiny model taught known replies in-process (tests/tiny_chat_models.py)."""

import io
import json
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import assert_clean_error, assert_succeeded, run_main_in_process
from tests.tiny_chat_models import (
    NAME_QUESTION,
    NAME_REPLY_WITH_HISTORY,
    NAME_REPLY_WITHOUT,
    NAME_TURNS,
    QUESTION,
    REPLIES,
    trained_models,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = ["--temperature", "0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_model):
    return trained_models(base_model, tmp_path_factory.mktemp("inference-models"))


def test_one_question(models):
    result = run_main_in_process("chat.py", "--model", models["chat"], "--question", QUESTION, *GREEDY)
    assert_succeeded(result)
    assert result.stdout == REPLIES["base"] + "\n"


def test_an_adapter_folder_is_loaded_on_its_base(models):
    result = run_main_in_process("chat.py", "--model", models["pirate"], "--question", QUESTION, *GREEDY)
    assert_succeeded(result)
    assert result.stdout == REPLIES["pirate"] + "\n"
    result = run_main_in_process("chat.py", "--model", models["terse"], "--base", models["chat"],
                                 "--question", QUESTION, *GREEDY)
    assert result.stdout == REPLIES["terse"] + "\n"


def test_a_model_without_chat_template_continues_the_text(models):
    """The answer is the plain greedy continuation transformers itself gives for the same text."""
    prompt = "The for statement"
    result = run_main_in_process("chat.py", "--model", models["plain"], "--question", prompt, *GREEDY,
                                 "--max_new_tokens", "12")
    assert_succeeded(result)
    tokenizer = AutoTokenizer.from_pretrained(models["plain"])
    model = AutoModelForCausalLM.from_pretrained(models["plain"])
    ids = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert result.stdout == tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"


def test_interactive_chat_keeps_history_until_reset(models, monkeypatch):
    """A script on stdin: the second question is answered from the first turn; after /reset it is not;
    /exit ends the session before the line after it is read."""
    script = "\n".join(["My name is Ada.", NAME_QUESTION, "/reset", NAME_QUESTION, "/exit", QUESTION]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # input() reads it as it would a pipe
    result = run_main_in_process("chat.py", "--model", models["chat"], *GREEDY)
    assert_succeeded(result)
    replies = [line.split("assistant: ", 1)[1] for line in result.stdout.splitlines() if "assistant: " in line]
    assert replies == [NAME_TURNS[1]["content"], NAME_REPLY_WITH_HISTORY, NAME_REPLY_WITHOUT]
    assert "(conversation reset)" in result.stdout
    assert result.stdout.rstrip().endswith("user:")  # /exit: the last question was never answered


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_batch_answers_every_kind_of_record_in_order(models, tmp_path):
    questions = write(tmp_path / "q.json", json.dumps([
        QUESTION,
        {"id": "name", "messages": NAME_TURNS + [{"role": "user", "content": NAME_QUESTION}]},
        {"question": NAME_QUESTION},
        {"id": 4, "question": "Say hi."},
        {"question": QUESTION, "system": "You answer questions about Python briefly."},
    ]))
    output = tmp_path / "out" / "answers.json"
    result = run_main_in_process("chat.py", "--model", models["chat"], "--questions", questions, "--output", output,
                                 "--batch_size", "2", *GREEDY)
    assert_succeeded(result)
    report = json.loads(output.read_text())
    answers = report["answers"]
    assert [a["answer"] for a in answers[:4]] == [REPLIES["base"], NAME_REPLY_WITH_HISTORY, NAME_REPLY_WITHOUT, "Hi!"]
    assert answers[1]["id"] == "name" and answers[3]["id"] == 4 and answers[0]["question"] == QUESTION
    assert all(a["finish_reason"] == "stop" and a["completion_tokens"] > 0 and a["prompt_tokens"] > 0
               for a in answers[:4])
    assert answers[4]["prompt_tokens"] > answers[0]["prompt_tokens"]  # the system message went in
    settings, timing = report["settings"], report["timing"]
    assert settings["temperature"] == 0 and settings["batch_size"] == 2 and settings["max_new_tokens"] == 256
    assert timing["questions"] == 5 and timing["seconds"] > 0
    assert timing["completion_tokens"] == sum(a["completion_tokens"] for a in answers)
    assert f"wrote {output}" in result.stdout


def test_batch_over_jsonl_through_an_adapter_matches_single_answers(models, tmp_path):
    """Left-padded batches give the same greedy answers as one question at a time."""
    questions = write(tmp_path / "q.jsonl", "\n".join(json.dumps(q) for q in [
        {"question": QUESTION}, {"question": "Say hi."}, {"question": NAME_QUESTION},
    ]) + "\n\n")
    answers = {}
    for batch_size in ("4", "1"):
        output = tmp_path / f"answers-{batch_size}.json"
        assert_succeeded(run_main_in_process("chat.py", "--model", models["pirate"], "--questions", questions,
                                             "--output", output, "--batch_size", batch_size, *GREEDY,
                                             "--max_new_tokens", "24"))
        answers[batch_size] = [a["answer"] for a in json.loads(output.read_text())["answers"]]
    assert answers["4"][0] == REPLIES["pirate"]
    assert answers["4"] == answers["1"]


@pytest.mark.parametrize("name, content, fragment", [
    ("q.jsonl", '{"question": "a"}\n{"question": "b"\n', "q.jsonl:2: malformed JSON"),
    ("q.jsonl", '{"question": "a"}\n{"text": "b"}\n', "q.jsonl:2: no 'question' string and no 'messages' list"),
    ("q.jsonl", '{"question": "a"}\n[1, 2]\n', "q.jsonl:2: expected a JSON object"),
    ("q.json", '["a", 3]', "q.json: record 2: expected a string or an object"),
    ("q.json", '[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]',
     "q.json: record 1: the last message must be the user's question"),
    ("q.json", '[{"messages": [{"role": "robot", "content": "a"}]}]', "q.json: record 1: message 0 needs a role"),
    ("q.json", '["a",\n "b",\n}', "q.json:3: malformed JSON"),
    ("q.json", "", "q.json: no questions"),
], ids=["truncated-line", "no-question", "array-line", "number-record", "ends-with-assistant", "bad-role",
        "broken-list", "empty"])
def test_bad_questions_files_are_one_line_errors_and_keep_old_answers(models, tmp_path, name, content, fragment):
    questions = write(tmp_path / name, content)
    output = write(tmp_path / "answers.json", '{"earlier": "answers"}')
    result = run_main_in_process("chat.py", "--model", models["chat"], "--questions", questions, "--output", output)
    assert_clean_error(result, fragment)
    assert output.read_text() == '{"earlier": "answers"}'


def test_invalid_utf8_and_mode_errors(models, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b'{"question": "a"}\n{"question": "\xff\xfe"}\n')
    result = run_main_in_process("chat.py", "--model", models["chat"], "--questions", questions,
                                 "--output", tmp_path / "a.json")
    assert_clean_error(result, "q.jsonl:2: invalid UTF-8")
    assert_clean_error(run_main_in_process("chat.py", "--model", models["chat"], "--questions", questions),
                       "--questions and --output go together")
    assert_clean_error(run_main_in_process("chat.py", "--model", models["chat"], "--question", "a",
                                           "--temperature", "-1"), "--temperature")
    assert_clean_error(run_main_in_process("chat.py", "--model", tmp_path / "nothing", "--question", "a"),
                       "not found")
