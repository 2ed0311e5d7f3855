"""Chat corpora: read conversations in the common formats and check them.

Formats (detected per record, or forced with --data_format):
  messages  {"messages": [{"role": "system|user|assistant", "content": "..."}]}
  sharegpt  {"system": "...", "conversations": [{"from": "human|user|gpt|assistant", "value": "..."}]}
  alpaca    {"instruction": "...", "input": "...", "output": "...", "system": "..."}
Every conversation becomes a `messages` list: an optional system turn, then user and assistant
turns alternating, starting with the user and ending with the assistant.
"""

from pathlib import Path

from dstrain.data.records import ReadStats, read_records
from dstrain.errors import BadRecord

FORMATS = ("auto", "messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _turns_from_messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{where}: 'messages' must be a non-empty list, got {_describe(messages)}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord(f"{where}: message {i} must be an object with 'role' and 'content'")
        turns.append({"role": message["role"], "content": message["content"]})
    return turns


def _turns_from_sharegpt(record: dict, where: str) -> list[dict]:
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise BadRecord(f"{where}: 'conversations' must be a non-empty list, got {_describe(conversation)}")
    turns = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise BadRecord(f"{where}: conversation turn {i} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(message["from"]) if isinstance(message["from"], str) else None
        if role is None:
            known = ", ".join(SHAREGPT_ROLES)
            raise BadRecord(f"{where}: turn {i} is from unknown speaker '{message['from']}' (known: {known})")
        turns.append({"role": role, "content": message["value"]})
    return turns


def _turns_from_alpaca(record: dict, where: str) -> list[dict]:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise BadRecord(f"{where}: '{key}' must be a string, got {_describe(record.get(key))}")
    prompt = record["instruction"]
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord(f"{where}: 'input' must be a string, got {_describe(extra)}")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    turns = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return turns + [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


READERS = {"messages": _turns_from_messages, "sharegpt": _turns_from_sharegpt, "alpaca": _turns_from_alpaca}


def check_turn_order(turns: list[dict], where: str) -> None:
    """system? (user assistant)+ ; every content a non-empty string."""
    for i, turn in enumerate(turns):
        if turn["role"] not in ("system", "user", "assistant"):
            raise BadRecord(f"{where}: message {i} has unknown role '{turn['role']}' (use system, user, assistant)")
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            raise BadRecord(f"{where}: message {i} ({turn['role']}) has empty or non-string content")
    body = turns[1:] if turns[0]["role"] == "system" else turns
    if not any(turn["role"] == "assistant" for turn in body):
        raise BadRecord(f"{where}: no assistant turn, so nothing to train on")
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            offset = len(turns) - len(body)
            raise BadRecord(f"{where}: roles out of order: message {i + offset} is '{turn['role']}' where "
                            f"'{expected}' was expected (system first, then user and assistant alternating)")
    if body[-1]["role"] != "assistant":
        raise BadRecord(f"{where}: the conversation ends with a user turn; the last turn must be the assistant's")


def conversation_from_record(record: dict, where: str, data_format: str = "auto",
                             default_system: str | None = None) -> list[dict]:
    chosen = detect_format(record) if data_format == "auto" else data_format
    if chosen is None:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(f"{where}: not a chat record (keys: {keys}); expected 'messages', 'conversations', "
                        "or 'instruction'+'output'")
    turns = READERS[chosen](record, where)
    if default_system and turns and turns[0].get("role") != "system":
        turns = [{"role": "system", "content": default_system}] + turns
    check_turn_order(turns, where)
    return turns


def iter_conversations(files: list[Path], data_format: str = "auto", default_system: str | None = None,
                       skip_bad_records: bool = False, stats: ReadStats | None = None, with_sources: bool = False):
    """Yield each record's checked `messages` list (with `with_sources`, as (messages, "file:line"));
    bad records stop the run or are skipped and counted."""
    def convert(record: dict, where: str):
        messages = conversation_from_record(record, where, data_format, default_system)
        return (messages, where) if with_sources else messages

    return read_records(files, convert, skip_bad_records, stats, "conversations")


def _describe(value) -> str:
    if value is None:
        return "nothing"
    return f"an empty {type(value).__name__}" if value == [] or value == "" else type(value).__name__
