"""dstrain/data/chat_format.py and sft.py's reading of chat files: the three record formats, per-record
detection, --data_format, --system_prompt, every kind of bad record (as a BadRecord naming
file:line, and as sft.py's one clean `error:` line), --skip_bad_records, and a model whose
tokenizer has no chat template.

sft.py runs in this process (`run_main_in_process`) with --preview, so it reads, checks and
tokenizes the data exactly as a training run would, then stops before building a Trainer.
"""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dstrain.data.chat_format import iter_conversations
from dstrain.data.records import BadRecord, ReadStats
from tests.helpers import assert_clean_error, assert_succeeded, run_main_in_process

SYSTEM = {"role": "system", "content": "You are concise."}
USER = {"role": "user", "content": "Translate to French:\n\nGood morning"}
ASSISTANT = {"role": "assistant", "content": "Bonjour."}
CONVERSATION = [SYSTEM, USER, ASSISTANT]

# The same conversation in every format and spelling the readers accept.
SAME_CONVERSATION = {
    "messages": {"messages": CONVERSATION},
    "sharegpt_human_gpt": {"system": SYSTEM["content"], "conversations": [
        {"from": "human", "value": USER["content"]}, {"from": "gpt", "value": ASSISTANT["content"]}]},
    "sharegpt_user_assistant_system_turn": {"conversations": [
        {"from": "system", "value": SYSTEM["content"]}, {"from": "user", "value": USER["content"]},
        {"from": "assistant", "value": ASSISTANT["content"]}]},
    "alpaca": {"system": SYSTEM["content"], "instruction": "Translate to French:", "input": "Good morning",
               "output": ASSISTANT["content"]},
}

# Alpaca without a usable input: the user turn is the instruction alone.
ALPACA_NO_INPUT = {
    "empty_input": {"instruction": "Name a colour.", "input": "", "output": "Red."},
    "blank_input": {"instruction": "Name a colour.", "input": "  \n ", "output": "Red."},
    "no_input_key": {"instruction": "Name a colour.", "output": "Red."},
}
NO_INPUT_MESSAGES = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]

GOOD = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]}


def turns(*spec) -> list[dict]:
    """turns(("user", "Hi"), ("assistant", "Hello")) -> a messages list."""
    return [{"role": role, "content": content} for role, content in spec]


def msgs(*spec) -> dict:
    return {"messages": turns(*spec)}


BAD_RECORDS = {  # case -> (record, fragments its error names after "file:line: ")
    "system_and_user_only": (msgs(("system", "Be nice."), ("user", "Hi")), ["no assistant turn"]),
    "user_only": (msgs(("user", "Hi")), ["no assistant turn"]),
    "system_only": (msgs(("system", "Be nice.")), ["no assistant turn"]),
    "user_user_assistant": (msgs(("user", "Hi"), ("user", "There?"), ("assistant", "Yes.")),
                            ["roles out of order: message 1 is 'user' where 'assistant' was expected"]),
    "user_assistant_assistant": (msgs(("user", "Hi"), ("assistant", "Yes."), ("assistant", "Again.")),
                                 ["roles out of order: message 2 is 'assistant' where 'user' was expected"]),
    "two_system_messages": (msgs(("system", "A."), ("system", "B."), ("user", "Hi"), ("assistant", "Yo.")),
                            ["roles out of order: message 1 is 'system' where 'user' was expected"]),
    "system_not_first": (msgs(("user", "Hi"), ("system", "Late."), ("assistant", "Yo.")),
                         ["roles out of order: message 1 is 'system' where 'assistant' was expected"]),
    "role_human_in_messages": (msgs(("human", "Hi"), ("assistant", "Yo.")),
                               ["message 0 has unknown role 'human'"]),
    "role_wrong_case": (msgs(("user", "Hi"), ("Assistant", "Yo.")), ["message 1 has unknown role 'Assistant'"]),
    "unknown_sharegpt_speaker": (
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo."}]},
        ["turn 1 is from unknown speaker 'bot'"]),
    "empty_content": (msgs(("user", "Hi"), ("assistant", "")),
                      ["message 1 (assistant) has empty or non-string content"]),
    "whitespace_content": (msgs(("user", " \n\t "), ("assistant", "Yo.")),
                           ["message 0 (user) has empty or non-string content"]),
    "non_string_content": (msgs(("user", "Hi"), ("assistant", 42)),
                           ["message 1 (assistant) has empty or non-string content"]),
    "list_content": (msgs(("user", [{"type": "text", "text": "Hi"}]), ("assistant", "Yo.")),
                     ["message 0 (user) has empty or non-string content"]),
    "empty_alpaca_output": ({"instruction": "Say hi.", "output": "  "},
                            ["message 1 (assistant) has empty or non-string content"]),
    "messages_empty_list": ({"messages": []}, ["'messages' must be a non-empty list, got an empty list"]),
    "messages_a_string": ({"messages": "a string instead of a list"}, ["'messages' must be a non-empty list, got str"]),
    "messages_missing": ({"conversation": GOOD["messages"]},
                         ["not a chat record (keys: conversation)", "expected 'messages'"]),
    "message_not_an_object": ({"messages": ["Hi", "Yo."]}, ["message 0 must be an object with 'role' and 'content'"]),
    "ends_with_user": (msgs(("user", "Hi"), ("assistant", "Yo."), ("user", "And?")),
                       ["the conversation ends with a user turn"]),
}


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def read_all(path: Path, **options) -> list[list[dict]]:
    return list(iter_conversations([path], **options))


def preview_run(model: Path, train_file: Path, work: Path, *extra):
    """sft.py --preview in this process: reads and checks every record, trains nothing."""
    return run_main_in_process(
        "sft.py", "--model_name_or_path", model, "--train_files", train_file, "--max_length", "128",
        "--preview", "1", "--output_dir", work / "out", "--data_cache_dir", work / "cache",
        "--validation_split_percentage", "0", *extra)


def init_base_model(tokenizer: Path, output_dir: Path) -> Path:
    assert_succeeded(run_main_in_process("init_model.py", "--tokenizer_name", tokenizer, "--config_name", "tiny",
                                         "--output_dir", output_dir))
    return output_dir


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("name", SAME_CONVERSATION)
def test_every_format_becomes_the_same_messages(tmp_path, name):
    """messages, ShareGPT (human/gpt or user/assistant, system field or turn) and Alpaca
    (instruction + input) records all read as the one `messages` list."""
    path = write_jsonl(tmp_path / "one.jsonl", [SAME_CONVERSATION[name]])
    assert read_all(path) == [CONVERSATION]


@pytest.mark.parametrize("name", ALPACA_NO_INPUT)
def test_alpaca_without_input_is_just_the_instruction(tmp_path, name):
    """An empty, blank or absent Alpaca `input` adds nothing to the instruction (no trailing blank lines)."""
    path = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA_NO_INPUT[name]])
    assert read_all(path) == [NO_INPUT_MESSAGES]


def test_formats_are_detected_per_record_in_one_mixed_file(tmp_path):
    """One file mixing all formats (and a multi-turn ShareGPT record) reads in order, each record
    in its own format; a blank line is not a record."""
    multi_turn = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
                                    {"from": "user", "value": "Bye"}, {"from": "assistant", "value": "Bye!"}]}
    records = [*SAME_CONVERSATION.values(), ALPACA_NO_INPUT["empty_input"], multi_turn]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    path.write_text(path.read_text() + "\n", encoding="utf-8")
    stats = ReadStats()
    assert read_all(path, stats=stats) == [CONVERSATION] * len(SAME_CONVERSATION) + [
        NO_INPUT_MESSAGES, turns(("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Bye!"))]
    assert (stats.samples, stats.skipped) == (len(records), 0)


def test_data_format_forces_the_reader(tmp_path):
    """--data_format picks the reader regardless of detection: a record with both `messages` and
    Alpaca fields reads as messages under auto and as Alpaca when forced; a record of another
    format is then a bad record naming the missing field."""
    both = {"messages": turns(("user", "From messages."), ("assistant", "M.")),
            "instruction": "From alpaca.", "output": "A."}
    path = write_jsonl(tmp_path / "both.jsonl", [both])
    assert read_all(path) == [both["messages"]]
    assert read_all(path, data_format="messages") == [both["messages"]]
    assert read_all(path, data_format="alpaca") == [turns(("user", "From alpaca."), ("assistant", "A."))]

    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [GOOD, SAME_CONVERSATION["sharegpt_human_gpt"]])
    with pytest.raises(BadRecord, match=r"sharegpt\.jsonl:2: 'messages' must be a non-empty list, got nothing"):
        read_all(sharegpt, data_format="messages")
    with pytest.raises(BadRecord, match=r"sharegpt\.jsonl:1: 'conversations' must be a non-empty list, got nothing"):
        read_all(sharegpt, data_format="sharegpt")
    with pytest.raises(BadRecord, match=r"sharegpt\.jsonl:1: 'instruction' must be a string, got nothing"):
        read_all(sharegpt, data_format="alpaca")


def test_system_prompt_is_added_only_where_there_is_none(tmp_path):
    """--system_prompt becomes the first turn of conversations without a system turn, in every
    format, and never replaces or doubles a conversation's own system message."""
    default = "Default system."
    records = [*SAME_CONVERSATION.values(), ALPACA_NO_INPUT["empty_input"], GOOD,
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    added = {"role": "system", "content": default}
    assert read_all(path, default_system=default) == [CONVERSATION] * len(SAME_CONVERSATION) + [
        [added, *NO_INPUT_MESSAGES], [added, *GOOD["messages"]], [added, *turns(("user", "Hi"), ("assistant", "Yo."))]]


# ---------------------------------------------------------------- bad records


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_record_is_named_by_file_and_line(tmp_path, case):
    """Each kind of bad record stops reading with a BadRecord '<file>:<line>: <what is wrong>'."""
    record, fragments = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [GOOD, record, GOOD])
    with pytest.raises(BadRecord) as raised:
        read_all(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:2: "), message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_sft_cli_stops_on_a_bad_record_with_one_clean_error(tmp_path, base_model, case):
    """sft.py reports the same bad record as one `error:` line naming file:line, exit code 2, no traceback."""
    record, fragments = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [GOOD, record, GOOD])
    result = preview_run(base_model, path, tmp_path)
    assert result.returncode == 2
    assert_clean_error(result, f"{path}:2: ", *fragments)
    assert not (tmp_path / "out" / "preview.jsonl").exists()


def test_non_string_sharegpt_speaker_is_a_clean_bad_record(tmp_path, base_model):
    """A ShareGPT `from` that is not a string (here a list) is an unknown speaker: a BadRecord and
    one clean CLI error, not a TypeError traceback."""
    record = {"conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "Yo."}]}
    path = write_jsonl(tmp_path / "speaker.jsonl", [GOOD, record])
    with pytest.raises(BadRecord, match=r"speaker\.jsonl:2: turn 0 is from unknown speaker"):
        read_all(path)
    assert_clean_error(preview_run(base_model, path, tmp_path), f"{path}:2: ", "unknown speaker")


@pytest.fixture
def file_with_bad_records(tmp_path):
    """GOOD on odd lines, one of every bad record kind on even lines: (path, good count, bad line numbers)."""
    lines = []
    for record, _ in BAD_RECORDS.values():
        lines += [GOOD, record]
    lines.append(SAME_CONVERSATION["alpaca"])
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    return path, len(BAD_RECORDS) + 1, list(range(2, 2 * len(BAD_RECORDS) + 1, 2))


def test_skip_bad_records_counts_them_and_keeps_the_good(file_with_bad_records):
    """With skip_bad_records every bad record is left out and counted in ReadStats (skipped, one
    problem per bad line naming it); every good record is still read, in order."""
    path, good, bad_lines = file_with_bad_records
    stats = ReadStats()
    conversations = read_all(path, skip_bad_records=True, stats=stats)
    assert conversations == [GOOD["messages"]] * (good - 1) + [CONVERSATION]
    assert (stats.samples, stats.skipped, stats.files) == (good, len(bad_lines), 1)
    assert [problem.split(": ")[0] for problem in stats.problems] == [f"{path}:{line}" for line in bad_lines]


def test_sft_cli_skip_bad_records(tmp_path, base_model, file_with_bad_records):
    """sft.py stops at the first bad line without --skip_bad_records; with it, the run goes on,
    says how many it skipped, and keeps every good conversation."""
    path, good, bad_lines = file_with_bad_records
    assert_clean_error(preview_run(base_model, path, tmp_path / "strict"), f"{path}:2: ")
    result = preview_run(base_model, path, tmp_path / "skip", "--skip_bad_records", "true")
    assert_succeeded(result)
    assert f"Skipped {len(bad_lines)} bad records (--skip_bad_records); first: {path}:2: " in result.stdout
    assert f"Conversations: {good} kept, 0 truncated" in result.stdout


def test_every_record_bad_is_a_clean_error_even_when_skipping(tmp_path, base_model):
    """A file of nothing but bad records leaves nothing to train on: a clean error, even with skipping."""
    path = write_jsonl(tmp_path / "all_bad.jsonl", [BAD_RECORDS["user_only"][0], BAD_RECORDS["ends_with_user"][0]])
    result = preview_run(base_model, path, tmp_path, "--skip_bad_records", "true")
    assert_clean_error(result, "no usable conversations", "all 2 records were bad", f"{path}:1: ")


# ---------------------------------------------------------------- tokenizer without a chat template


def test_model_whose_tokenizer_has_no_chat_template_is_refused(tmp_path, tokenizer_dir):
    """sft.py on a model whose tokenizer has no chat template stops with a clean error naming the
    folder, before reading any data."""
    plain_tokenizer = tmp_path / "tok_plain"
    shutil.copytree(tokenizer_dir, plain_tokenizer)
    (plain_tokenizer / "chat_template.jinja").unlink()  # transformers 5 keeps the template here
    assert "chat_template" not in json.loads((plain_tokenizer / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(plain_tokenizer).chat_template is None
    model = init_base_model(plain_tokenizer, tmp_path / "model")
    assert not (model / "chat_template.jinja").exists()

    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD])
    result = preview_run(model, path, tmp_path)
    assert result.returncode == 2
    assert_clean_error(result, f"{model}: the tokenizer has no chat template")
    assert not (tmp_path / "cache").exists()
