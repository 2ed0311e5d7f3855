"""dstrain/data/pairs.py: every record form gives the same pair, both sides share the exact prompt
tokens, over-long pairs lose whole old turns, and every kind of bad record is a one-line error naming
file and line (or is skipped and counted), in the readers and through reward.py / dpo.py.

Expected token ids come from the tokenizer's own apply_chat_template on the whole conversation, not
from the code under test.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dstrain.arguments import PreferenceDataArguments
from dstrain.data.pairs import fit_pair, iter_pairs, preference_datasets, render_pair, transcript_turns
from dstrain.data.records import BadRecord, ReadStats
from dstrain.errors import UserError
from tests.helpers import assert_clean_error, run_main_in_process


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer briefly."}
MULTI_TURN_PROMPT = [SYSTEM, user("Hi."), assistant("Hello."), user("What is 2 + 2?")]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def read(path, **kwargs) -> list[dict]:
    return list(iter_pairs([path], **kwargs))


# ---------------------------------------------------------------- record forms


def test_every_record_form_gives_the_same_pair(tmp_path):
    conversation = [user("Hi."), assistant("Hello."), user("What is 2 + 2?")]
    path = write_jsonl(tmp_path / "forms.jsonl", [
        {"prompt": "Human: Hi.\n\nAssistant: Hello.\n\nHuman: What is 2 + 2?\n\nAssistant:",
         "chosen": "4.", "rejected": "5."},
        {"prompt": conversation, "chosen": [assistant("4.")], "rejected": [assistant("5.")]},
        {"prompt": conversation, "chosen": "4.", "rejected": "5."},
        {"chosen": conversation + [assistant("4.")], "rejected": conversation + [assistant("5.")]},
    ])
    pairs = read(path)
    assert [p["source"] for p in pairs] == [f"{path}:{n}" for n in range(1, 5)]
    for pair in pairs:
        assert (pair["prompt"], pair["chosen"], pair["rejected"], pair["margin"]) == (conversation, "4.", "5.", 0.0)


def test_a_plain_string_prompt_is_one_user_turn():
    assert transcript_turns("Name a fruit.") == [user("Name a fruit.")]
    assert transcript_turns("Human: a question without the reply cue") == [user("Human: a question without the reply cue")]


def test_margin_is_read_when_given(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": 2}])
    assert read(path)[0]["margin"] == 2.0


# ---------------------------------------------------------------- rendering and fitting


def test_both_sides_share_the_prompt_tokens_and_equal_the_whole_rendering(tok):
    pair = render_pair(tok, MULTI_TURN_PROMPT, "It is 4.", "Fish.")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for side, reply in (("chosen_ids", "It is 4."), ("rejected_ids", "Fish.")):
        whole = tok.apply_chat_template(MULTI_TURN_PROMPT + [assistant(reply)], tokenize=True,
                                        return_dict=True)["input_ids"]
        assert pair["prompt_ids"] + pair[side] == list(whole)
        assert im_end in pair[side] and tok.decode(pair[side]).startswith(reply)
    assert tok.decode(pair["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_fit_keeps_a_pair_that_fits_whole(tok):
    pair = render_pair(tok, MULTI_TURN_PROMPT, "It is 4.", "Fish.")
    longest = len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
    assert fit_pair(tok, MULTI_TURN_PROMPT, "It is 4.", "Fish.", longest) == (pair, 0)


def test_fit_drops_the_oldest_exchange_and_keeps_the_system_turn(tok):
    whole = render_pair(tok, MULTI_TURN_PROMPT, "It is 4.", "Fish.")
    shorter = [SYSTEM, user("What is 2 + 2?")]
    expected = render_pair(tok, shorter, "It is 4.", "Fish.")
    limit = len(whole["prompt_ids"]) + len(whole["chosen_ids"]) - 1
    assert fit_pair(tok, MULTI_TURN_PROMPT, "It is 4.", "Fish.", limit) == (expected, 2)


def test_fit_gives_up_when_the_last_turn_and_reply_do_not_fit(tok):
    alone = render_pair(tok, [SYSTEM, user("What is 2 + 2?")], "It is 4.", "Fish.")
    limit = len(alone["prompt_ids"]) + len(alone["chosen_ids"]) - 1
    assert fit_pair(tok, MULTI_TURN_PROMPT, "It is 4.", "Fish.", limit) is None


def data_args(path, tmp_path, **overrides) -> PreferenceDataArguments:
    return PreferenceDataArguments(train_files=[str(path)], data_cache_dir=str(tmp_path / "cache"), **overrides)


def test_datasets_count_kept_shortened_and_dropped(tmp_path, tok, capsys):
    long_prompt = [user("word " * 40), assistant("ok"), user("Now?")]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": long_prompt, "chosen": "Yes.", "rejected": "No."},
        {"prompt": "word " * 60, "chosen": "Yes.", "rejected": "No."},
    ])
    data = preference_datasets(data_args(path, tmp_path, validation_split_percentage=0, max_length=32), tok, 0)
    assert "Pairs: 2 kept, 1 shortened by dropping their oldest turns and 1 dropped" in capsys.readouterr().out
    train = data["train"]
    assert len(train) == 2 and set(train.column_names) >= {"prompt_ids", "chosen_ids", "rejected_ids", "margin"}
    assert all(len(p) + max(len(c), len(r)) <= 32 for p, c, r in
               zip(train["prompt_ids"], train["chosen_ids"], train["rejected_ids"]))
    assert train["source"] == [f"{path}:1", f"{path}:2"]


# ---------------------------------------------------------------- bad records


BAD_RECORDS = {
    "missing_chosen": ({"prompt": "Name a fruit.", "rejected": "A rock."}, "no 'chosen'"),
    "missing_rejected": ({"prompt": "Name a colour.", "chosen": "Blue."}, "no 'rejected'"),
    "missing_prompt": ({"chosen": "Yes.", "rejected": "No."}, "no 'prompt'"),
    "empty_rejected": ({"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": ""}, "'rejected' is empty"),
    "blank_rejected": ({"prompt": "Name a vegetable.", "chosen": "A carrot.", "rejected": "   "}, "'rejected' is empty"),
    "empty_prompt": ({"prompt": " ", "chosen": "A.", "rejected": "B."}, "'prompt' is empty"),
    "non_string_chosen": ({"prompt": "Q?", "chosen": 42, "rejected": "B."}, "'chosen' must be a string, got int"),
    "identical": ({"prompt": "Q?", "chosen": "Same.", "rejected": " Same. "}, "identical"),
    "prompt_ends_with_assistant": ({"prompt": [user("Q?"), assistant("A.")], "chosen": "B.", "rejected": "C."},
                                   "roles out of order"),
    "unknown_role": ({"prompt": [{"role": "human", "content": "Q?"}], "chosen": "B.", "rejected": "C."},
                     "unknown role 'human'"),
    "two_replies_in_a_side": ({"prompt": "Q?", "chosen": [assistant("A."), assistant("B.")], "rejected": "C."},
                              "'chosen' must be one assistant message"),
    "implicit_prompts_differ": ({"chosen": [user("Q?"), assistant("A.")], "rejected": [user("R?"), assistant("B.")]},
                                "differ before their last turn"),
    "margin_not_a_number": ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": "big"},
                            "'margin' must be a number"),
    "truncated_json": ('{"prompt": "Q?", "chosen": "A', "malformed JSON"),
    "array_line": ('["Q?", "A.", "B."]', "expected a JSON object, got list"),
}
GOOD = {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you!", "rejected": "What do you want?"}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_named_by_file_and_line(tmp_path, case):
    record, fragment = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, record, GOOD])
    with pytest.raises(BadRecord) as error:
        read(path)
    assert str(error.value).startswith(f"{path}:2: ") and fragment in str(error.value)


def test_invalid_utf8_and_empty_file(tmp_path):
    broken = tmp_path / "utf8.jsonl"
    broken.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe", "chosen": "A.", "rejected": "B."}\n')
    with pytest.raises(BadRecord, match=f"{broken}:2: invalid UTF-8"):
        read(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="no preference pairs found"):
        read(empty)


def test_skip_bad_records_counts_them_and_keeps_the_good(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD] + [BAD_RECORDS[c][0] for c in sorted(BAD_RECORDS)] + [GOOD])
    stats = ReadStats()
    pairs = read(path, skip_bad_records=True, stats=stats)
    assert len(pairs) == 2 and stats.skipped == len(BAD_RECORDS)
    assert stats.problems[0].startswith(f"{path}:2: ")


@pytest.mark.parametrize("script", ["reward.py", "dpo.py"])
def test_scripts_stop_on_a_bad_pair_with_one_clean_line_and_write_nothing(tmp_path, base_model, script):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, BAD_RECORDS["empty_rejected"][0]])
    output_dir = tmp_path / "out"
    result = run_main_in_process(script, "--model_name_or_path", base_model, "--train_files", path,
                                 "--output_dir", output_dir, "--data_cache_dir", tmp_path / "cache",
                                 "--report_to", "none")
    assert result.returncode == 2
    assert_clean_error(result, f"{path}:2:", "'rejected' is empty")
    assert not output_dir.exists()
