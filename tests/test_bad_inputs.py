"""Every reader of user files, fed every kind of broken input: one `error: <file>:<line>: ...` line,
a non-zero exit, no traceback, and the output folder exactly as it was (a file already there keeps
its bytes, nothing new appears). The scripts run in this process (run_main_in_process) and fail
while reading, before any model is built; serve.py's request bodies go to its real app in-process.

The broken files are made here, like the hand-written ones in the project's shared data
(bad_inputs/: truncated line, non-object line, missing field, wrong type, empty file, invalid
UTF-8, wrong roles, empty sides of a preference pair).
"""

import json
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error, run_main_in_process

USER, ASSISTANT = {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}
PAIR = {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you!", "rejected": "What do you want?"}
TEXT = {"text": "The for statement iterates over the items of any sequence, in the order they appear. " * 4}


def sft_flags(base_model, path, out):
    return ["--model_name_or_path", base_model, "--train_files", path, "--output_dir", out, "--max_length", "128",
            "--data_cache_dir", out.parent / "cache", "--validation_split_percentage", "0", "--report_to", "none"]


def pair_flags(base_model, path, out):
    return ["--model_name_or_path", base_model, "--train_files", path, "--output_dir", out,
            "--data_cache_dir", out.parent / "cache", "--validation_split_percentage", "0", "--report_to", "none"]


# reader -> (script, flags(base_model / tokenizer, broken file, output_dir), a good record, its main field)
READERS = {
    "tokenizer": ("tokenizer.py", lambda models, path, out: ["--train_files", path, "--output_dir", out,
                                                             "--vocab_size", "400"], TEXT, "text"),
    "pretrain": ("pretrain.py", lambda models, path, out: [
        "--tokenizer_name", models["tokenizer"], "--config_name", "tiny", "--train_files", path, "--output_dir", out,
        "--data_cache_dir", out.parent / "cache", "--block_size", "32", "--max_steps", "1",
        "--validation_split_percentage", "0", "--report_to", "none"], TEXT, "text"),
    "sft": ("sft.py", lambda models, path, out: sft_flags(models["base"], path, out),
            {"messages": [USER, ASSISTANT]}, "messages"),
    "lora": ("lora.py", lambda models, path, out: sft_flags(models["base"], path, out),
             {"messages": [USER, ASSISTANT]}, "messages"),
    "reward": ("reward.py", lambda models, path, out: pair_flags(models["base"], path, out), PAIR, "chosen"),
    "dpo": ("dpo.py", lambda models, path, out: pair_flags(models["base"], path, out), PAIR, "chosen"),
    "chat": ("chat.py", lambda models, path, out: ["--model", models["base"], "--questions", path,
                                                   "--output", out / "answers.json"],
             {"question": "What does str.upper() do?"}, "question"),
}


def without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def breakages(reader: str) -> dict:
    """kind -> (the broken file's lines, the line named, fragments the error must hold)."""
    _, _, good, key = READERS[reader]
    good_line = json.dumps(good)
    cases = {
        "truncated_json": ([good_line, good_line[: len(good_line) // 2], good_line], 2, ["malformed JSON"]),
        "non_object_line": ([good_line, json.dumps([1, 2])], 2, ["expected a JSON object"]),
        "missing_field": ([good_line, json.dumps(without(good, key) | {"other": "x"})], 2, [f"'{key}'"]),
        "wrong_type": ([good_line, json.dumps(good | {key: 5})], 2, [f"'{key}'"]),
        "empty_file": ([], None, []),
        "invalid_utf8": ([good_line, b'{"' + key.encode() + b'": "\xff\xfe\xfd"}', good_line], 2, ["invalid UTF-8"]),
    }
    if reader in ("sft", "lora"):
        cases["unknown_role"] = ([good_line, json.dumps({"messages": [{"role": "human", "content": "Hi"},
                                                                      {"role": "bot", "content": "Yo."}]})], 2,
                                 ["unknown role 'human'"])
        cases["roles_not_alternating"] = ([good_line, json.dumps({"messages": [USER, USER, ASSISTANT]})], 2,
                                          ["roles out of order"])
        cases["no_assistant_turn"] = ([good_line, json.dumps({"messages": [USER]})], 2, ["no assistant turn"])
    if reader == "chat":
        cases["wrong_role"] = ([good_line, json.dumps({"messages": [{"role": "robot", "content": "a"}]})], 2,
                               ["needs a role"])
        cases["ends_with_assistant"] = ([good_line, json.dumps({"messages": [USER, ASSISTANT]})], 2,
                                        ["the last message must be the user's"])
    if reader in ("reward", "dpo"):
        cases["empty_rejected"] = ([good_line, json.dumps(PAIR | {"rejected": ""})], 2, ["'rejected' is empty"])
        cases["blank_chosen"] = ([good_line, json.dumps(PAIR | {"chosen": "  \n "})], 2, ["'chosen' is empty"])
        cases["missing_prompt"] = ([good_line, json.dumps(without(PAIR, "prompt"))], 2, ["prompt"])
        cases["chat_prompt_wrong_role"] = ([good_line, json.dumps(
            {"prompt": [{"role": "bot", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "A."}],
             "rejected": [{"role": "assistant", "content": "B."}]})], 2, ["unknown role 'bot'"])
    return cases


CASES = [(reader, kind) for reader in READERS for kind in breakages(reader)]


@pytest.fixture(scope="module")
def models(tokenizer_dir, base_model):
    return {"tokenizer": tokenizer_dir, "base": base_model}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("reader, kind", CASES, ids=[f"{reader}-{kind}" for reader, kind in CASES])
def test_a_broken_file_is_one_clean_error_and_the_output_folder_is_untouched(tmp_path, models, reader, kind):
    script, flags, _, _ = READERS[reader]
    lines, line_no, fragments = breakages(reader)[kind]
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("an earlier run's notes\n")
    (output_dir / "answers.json").write_text('{"earlier": "answers"}')
    before = snapshot(output_dir)

    result = run_main_in_process(script, *flags(models, path, output_dir))

    where = f"{path}:{line_no}: " if line_no else f"{path}"
    message = assert_clean_error(result, where, *fragments)
    assert result.returncode == 2, message
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1
    if line_no is None:
        assert "empty" in message or "no " in message, message
    assert snapshot(output_dir) == before
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(cache.rglob("*.arrow")), "a tokenized cache was written for broken data"


# ---- serve.py: request bodies, sent to its real app (a tiny model behind the batching engine) ----

GOOD_REQUEST = {"model": "tiny", "messages": [USER]}
BAD_BODIES = {  # kind -> (raw body, the param the error names or None)
    "truncated_json": (json.dumps(GOOD_REQUEST)[:30].encode(), None),
    "non_object": (b'[{"model": "tiny"}]', None),
    "missing_field": (json.dumps({"model": "tiny"}).encode(), "messages"),
    "wrong_type": (json.dumps(GOOD_REQUEST | {"messages": "Hi"}).encode(), "messages"),
    "empty_body": (b"", None),
    "invalid_utf8": (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None),
    "wrong_role": (json.dumps(GOOD_REQUEST | {"messages": [{"role": "bot", "content": "Hi"}]}).encode(),
                   "messages.0.role"),
    "empty_messages": (json.dumps(GOOD_REQUEST | {"messages": []}).encode(), "messages"),
}


@pytest.fixture(scope="module")
def server_app(base_model):
    from fastapi.testclient import TestClient

    from dstrain.infer.engine import GenerationEngine
    from dstrain.infer.model_loading import load_inference_model
    from dstrain.infer.openai_api import ServerSettings, build_app

    engine = GenerationEngine(load_inference_model(str(base_model), device="cpu")).start()
    try:
        with TestClient(build_app(engine, ServerSettings({"tiny": None}))) as client:
            yield client
    finally:
        engine.stop()


@pytest.mark.parametrize("kind", BAD_BODIES)
def test_a_broken_request_body_is_a_400_with_an_openai_error_and_the_server_lives_on(server_app, kind):
    body, param = BAD_BODIES[kind]
    response = server_app.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", error
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    if param:
        assert error["param"] == param, error
    assert server_app.get("/health").status_code == 200
