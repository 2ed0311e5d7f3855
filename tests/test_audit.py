"""dstrain/audit/ and audit.py: each check catches a dataset built to violate it (the real tokenizer,
its ChatML template or a broken variant of it, the real data pipeline), names the offending record
by file:line and fails the run; clean data passes with the summary printed.
"""

import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dstrain.arguments import ChatDataArguments, DataArguments, PreferenceDataArguments
from dstrain.audit import audit, planned_generation_config
from dstrain.data.blocks import pretraining_datasets
from dstrain.data.cache import ProcessedDatasets
from dstrain.data.chat_template import IGNORE, closing_token
from dstrain.data.pairs import preference_datasets
from dstrain.data.sft import sft_datasets
from dstrain.data.tokenizer import CHATML_TEMPLATE
from tests.helpers import REPO, assert_clean_error, assert_succeeded, run_deepspeed, run_main_in_process

REPLY_BLOCK = "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
LONG_REPLY = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)  # far over 64 tokens


def chat(*pairs) -> dict:
    messages = []
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


CLEAN_CHATS = [chat(("What does str.upper() do?", "It returns an upper-case copy.")),
               chat(("Hi", "Hello."), ("How are you?", "Well, thanks.")),
               chat(("What is 2 + 2?", "4.")),
               chat(("Name a list method.", "append"), ("Another?", "extend"), ("One more?", "pop"))]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def only_once(desc):
    return nullcontext()


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def with_template(tokenizer_dir, template: str):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template
    return tokenizer


def chat_data(tmp_path, tokenizer, records, **options):
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    args = ChatDataArguments(train_files=[str(path)], data_cache_dir=str(tmp_path / "cache"),
                             validation_split_percentage=0, **options)
    return path, sft_datasets(args, tokenizer, seed=1)


def audit_chats(data, tokenizer, base_model, model=None, generation_config=None, **options):
    """The audit as the training scripts run it, on the session's tiny model's config."""
    config = AutoConfig.from_pretrained(base_model)
    generation_config = generation_config or planned_generation_config(str(base_model), config, tokenizer, chat=True)
    return audit("sft", data, tokenizer, config, generation_config, model, **options)


def problems(result, check: int) -> list:
    return [finding for finding in result.findings if finding.check == check]


# ---------------------------------------------------------------- clean data, summary (check 7)


@pytest.mark.parametrize("packing", [False, True], ids=["one-per-row", "packed"])
def test_clean_chats_pass_and_the_summary_counts_them(tmp_path, tok, base_model, packing):
    """No problem on clean chats; the summary's counts equal those taken from the rows themselves."""
    _, data = chat_data(tmp_path, tok, CLEAN_CHATS, max_length=128, packing=packing)
    result = audit_chats(data, tok, base_model, max_length=128)
    assert result.findings == []
    rows = data["train"]
    tokens = sum(len(ids) for ids in rows["input_ids"])
    trained = sum(label != IGNORE for labels in rows["labels"] for label in labels)
    summary = result.splits["train"]
    assert (summary["samples"], summary["rows"], summary["tokens"], summary["trained_tokens"]) == \
        (len(CLEAN_CHATS), len(rows), tokens, trained)
    assert (summary["truncated"], summary["dropped"]) == (0, 0)
    assert sum(summary["lengths"].values()) == len(CLEAN_CHATS)
    table = result.render()
    assert table.startswith("Data audit (sft): 0 problems")
    assert f"{trained:,} ({trained / tokens:.1%})" in table and "lengths (train, tokens per sample): <=" in table


# ---------------------------------------------------------------- check 1: a trained token survives


def test_a_conversation_whose_first_reply_does_not_fit_is_named_and_dropped_only_on_request(tmp_path, tok,
                                                                                            base_model):
    records = [CLEAN_CHATS[0], chat(("Tell a story.", LONG_REPLY)), CLEAN_CHATS[1], chat(("Again?", LONG_REPLY))]
    path, data = chat_data(tmp_path, tok, records, max_length=64)
    result = audit_chats(data, tok, base_model, max_length=64)
    [finding] = result.findings
    assert finding.check == 1 and finding.count == 2
    assert [record.split(" (")[0] for record in finding.records] == [f"{path}:2", f"{path}:4"]
    assert "--max_length 64" in finding.problem and "--drop_too_long" in finding.fix
    assert result.error_line().startswith(f"{path}:2: data audit: ")

    allowed = audit_chats(data, tok, base_model, max_length=64, drop_too_long=True)
    assert allowed.findings == [] and allowed.splits["train"]["dropped"] == 2


def test_an_empty_assistant_mask_is_named_per_record(tmp_path, tokenizer_dir, base_model):
    """A template whose {% generation %} block wraps nothing trains no token at all."""
    broken = with_template(tokenizer_dir, CHATML_TEMPLATE.replace(
        REPLY_BLOCK, "{{- message['content'] + '<|im_end|>' }}{% generation %}{% endgeneration %}"))
    path, data = chat_data(tmp_path, broken, CLEAN_CHATS[:2], max_length=64)
    result = audit_chats(data, broken, base_model, max_length=64)
    [untrained] = problems(result, 1)
    assert untrained.count == 2 and untrained.records == [f"{path}:1", f"{path}:2"]
    assert any("marks no token" in finding.problem for finding in problems(result, 2))


# ---------------------------------------------------------------- check 2: the end of a turn is trained


def test_end_of_turn_left_outside_the_mask_is_named_with_the_fix(tmp_path, tokenizer_dir, base_model):
    """{% endgeneration %} before <|im_end|>: the template, each record, and the stop ids all fail."""
    broken = with_template(tokenizer_dir, CHATML_TEMPLATE.replace(
        REPLY_BLOCK, "{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>' }}"))
    path, data = chat_data(tmp_path, broken, CLEAN_CHATS, max_length=64)
    result = audit_chats(data, broken, base_model, max_length=64)
    template, stops, records = problems(result, 2)
    assert "move {% endgeneration %} after <|im_end|>" in template.fix
    assert records.count == len(CLEAN_CHATS) and records.records[0] == f"{path}:1"
    assert "<|im_end|> (4)" in records.problem
    assert "generation stops at [2]" in stops.problem  # configure_chat_generation fell back to eos alone


def test_a_template_with_no_end_of_turn_token_is_refused(tokenizer_dir, base_model):
    plain = with_template(tokenizer_dir, (
        "{%- for message in messages %}{{- message['role'] + ': ' }}"
        "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] }}{% endgeneration %}"
        "{%- else %}{{- message['content'] }}{%- endif %}{{- '\\n\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"))
    assert closing_token(plain) is None
    result = audit_chats(ProcessedDatasets({}), plain, base_model)
    [finding] = result.findings
    assert finding.check == 2 and "no special token" in finding.problem and "<|im_end|>" in finding.fix


def test_stop_ids_without_the_end_of_turn_token_are_named(tmp_path, tok, base_model):
    _, data = chat_data(tmp_path, tok, CLEAN_CHATS, max_length=64)
    result = audit_chats(data, tok, base_model, generation_config=GenerationConfig(eos_token_id=2, pad_token_id=0))
    [finding] = result.findings
    assert finding.check == 2 and "not at the end-of-turn token <|im_end|> (4)" in finding.problem


# ---------------------------------------------------------------- check 3: model and tokenizer agree


def test_tokens_past_the_embedding_and_mismatched_special_ids_are_named(tmp_path, tokenizer_dir, base_model):
    """A tokenizer that gained tokens the model never got rows for, used in record 2."""
    grown = AutoTokenizer.from_pretrained(tokenizer_dir)
    grown.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=True)
    path, data = chat_data(tmp_path, grown, [CLEAN_CHATS[0], chat(("Call it.", "<tool_call>f()</tool_call>"))],
                           max_length=64)
    generation_config = planned_generation_config(str(base_model), AutoConfig.from_pretrained(base_model), grown, True)
    generation_config.bos_token_id = 3
    result = audit_chats(data, grown, base_model, generation_config=generation_config)
    messages = [finding.problem for finding in problems(result, 3)]
    assert f"the tokenizer has {len(grown):,} tokens but the model's embedding only 1,000 rows" in messages
    assert "the model's generation_config.bos_token_id is 3 but the tokenizer's is 1" in messages
    [past] = [finding for finding in problems(result, 3) if "past the model's 1000 embedding rows" in finding.problem]
    assert past.records == [f"{path}:2"]


def test_a_trained_pad_token_is_named_with_the_fix(tmp_path, tokenizer_dir, base_model):
    """pad = <|im_end|>: every reply trains the pad id, and a padding-masking collator would hide the stop."""
    shared = AutoTokenizer.from_pretrained(tokenizer_dir)
    shared.pad_token = "<|im_end|>"
    path, data = chat_data(tmp_path, shared, CLEAN_CHATS[:2], max_length=64)
    result = audit_chats(data, shared, base_model, generation_config=GenerationConfig(eos_token_id=[4, 2],
                                                                                        pad_token_id=4))
    [finding] = [finding for finding in problems(result, 3) if "pad token" in finding.problem]
    assert finding.records == [f"{path}:1", f"{path}:2"]
    assert "also the end-of-turn token" in finding.fix and "its own pad token" in finding.fix


def test_all_zero_embedding_rows_are_named(tmp_path, tok, base_model):
    """What a resize under ZeRO-3 outside GatheredParameters leaves: rows of zeros for real tokens."""
    model = AutoModelForCausalLM.from_pretrained(base_model)
    model.get_input_embeddings().weight.data[[10, 11]] = 0
    _, data = chat_data(tmp_path, tok, CLEAN_CHATS[:1], max_length=64)
    result = audit_chats(data, tok, base_model, model=model, generation_config=model.generation_config)
    zero = [finding for finding in result.findings if "all-zero rows" in finding.problem]
    assert len(zero) == 1 and zero[0].count == 2
    assert zero[0].records == [f"{tok.convert_ids_to_tokens(i)} ({i})" for i in (10, 11)]


# ---------------------------------------------------------------- check 4: packed rows keep samples apart


@pytest.fixture
def packed(tmp_path, tok):
    """Packed chats, and the first row holding at least two conversations."""
    path, data = chat_data(tmp_path, tok, CLEAN_CHATS, max_length=128, packing=True)
    row = next(i for i, sources in enumerate(data["train"]["sources"]) if len(sources) >= 2)
    return path, data, row


def tampered(data, row: int, change):
    train = data["train"].map(lambda example, index: change(example) if index == row else example, with_indices=True)
    return ProcessedDatasets({"train": train}, data.report)


def test_positions_that_do_not_restart_at_a_conversation_are_named(tok, base_model, packed):
    path, data, row = packed
    sources = data["train"][row]["sources"]
    counted_through = tampered(data, row, lambda example: {"position_ids": list(range(len(example["input_ids"])))})
    [finding] = audit_chats(counted_through, tok, base_model, max_length=128).findings
    assert finding.check == 4 and finding.count == 1
    assert finding.records[0].startswith(", ".join(sources[:3])) and f"train row {row}" in finding.records[0]


def test_a_trained_label_across_a_boundary_is_named(tok, base_model, packed):
    """The second conversation's first token trained: the first conversation's last token would predict it."""
    path, data, row = packed
    first_length = data["train"][row]["position_ids"].index(0, 1)
    second = data["train"][row]["sources"][1]

    def train_the_boundary(example):
        labels = list(example["labels"])
        labels[first_length] = example["input_ids"][first_length]
        return {"labels": labels}

    result = audit_chats(tampered(data, row, train_the_boundary), tok, base_model, max_length=128)
    [finding] = [finding for finding in result.findings if "first token is trained" in finding.problem]
    assert finding.records == [second] and second.startswith(f"{path}:")


# ---------------------------------------------------------------- check 5: pretraining blocks


def pretraining_data(tmp_path, tokenizer, texts, block_size: int, validation_percentage: float = 0):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for text in texts])
    args = DataArguments(train_files=[str(path)], data_cache_dir=str(tmp_path / "cache"),
                         validation_split_percentage=validation_percentage)
    return path, pretraining_datasets(args, tokenizer, block_size, seed=1)


def audit_blocks(data, tokenizer, base_model):
    return audit("pretrain", data, tokenizer, AutoConfig.from_pretrained(base_model))


def test_clean_blocks_pass_with_documents_and_dropped_tokens_counted(tmp_path, tok, base_model, docs_corpus):
    texts = [json.loads(line)["text"] for line in docs_corpus.read_text().splitlines()[:40]]
    _, data = pretraining_data(tmp_path, tok, texts, block_size=64, validation_percentage=10)
    result = audit_blocks(data, tok, base_model)
    assert result.findings == []
    corpus_tokens = sum(len(tok.encode(text, add_special_tokens=False)) + 1 for text in texts)  # + eos each
    summaries = result.splits.values()
    assert sum(summary["samples"] for summary in summaries) == len(texts)
    assert sum(summary["tokens"] + summary["dropped_tokens"] for summary in summaries) == corpus_tokens
    assert all(summary["tokens"] == summary["rows"] * 64 == summary["trained_tokens"] for summary in summaries)
    assert "Data audit (pretrain): 0 problems" in result.render()


def test_documents_joined_without_eos_are_named(tmp_path, tok, base_model):
    texts = ["First document about lists. " * 12, "Second document about dicts. " * 12, "Third about sets. " * 12]
    path, data = pretraining_data(tmp_path, tok, texts, block_size=16)
    eos, stand_in = tok.eos_token_id, tok.convert_tokens_to_ids("<s>")
    [store] = data["train"].stores  # the tokenized corpus, as the cache holds it: its eos become <s>
    tokens = np.memmap(store.folder / "tokens.bin", dtype=store.meta["dtype"], mode="r+")
    tokens[tokens == eos] = stand_in
    tokens.flush()
    [finding] = audit_blocks(data, tok, base_model).findings
    assert finding.check == 5 and "without an eos </s> (2)" in finding.problem
    assert finding.records[0].startswith(f"{path}:1, {path}:2 (train block ")


def test_a_split_that_packing_mostly_leaves_out_is_named(tmp_path, tok, base_model):
    """One document of n tokens in blocks of 0.6 n: one block, 40% of the split left out."""
    text = "A single short document about the for statement and what it iterates over."
    tokens = len(tok.encode(text, add_special_tokens=False)) + 1
    _, data = pretraining_data(tmp_path, tok, [text], block_size=int(tokens * 0.6))
    [finding] = audit_blocks(data, tok, base_model).findings
    assert finding.check == 5 and "block packing leaves out 4" in finding.problem and "--block_size" in finding.fix


# ---------------------------------------------------------------- preference pairs (check 6)


PAIRS = [{"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A rock."},
         {"prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Name a colour."}], "chosen": "Blue.", "rejected": "Loud."},
         {"prompt": "Say hello politely.", "chosen": "Hello, nice to meet you!", "rejected": "What do you want?"}]


def pair_data(tmp_path, tokenizer, records=PAIRS, max_length=64):
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    args = PreferenceDataArguments(train_files=[str(path)], data_cache_dir=str(tmp_path / "cache"),
                                   validation_split_percentage=0, max_length=max_length)
    return path, preference_datasets(args, tokenizer, seed=1)


def audit_pairs(data, tokenizer, base_model, max_length=64):
    config = AutoConfig.from_pretrained(base_model)
    return audit("preference", data, tokenizer, config, None, None, max_length)


def test_clean_pairs_pass_with_the_summary(tmp_path, tok, base_model):
    _, data = pair_data(tmp_path, tok)
    result = audit_pairs(data, tok, base_model)
    assert result.findings == []
    summary = result.splits["train"]
    train = data["train"]
    assert summary["samples"] == summary["rows"] == 3 and summary["truncated"] == summary["dropped"] == 0
    assert summary["trained_tokens"] == sum(len(c) + len(r) for c, r in zip(train["chosen_ids"], train["rejected_ids"]))
    assert "Data audit (preference): 0 problems" in result.render()


def test_identical_unclosed_and_too_long_pairs_are_named(tmp_path, tok, base_model):
    path, data = pair_data(tmp_path, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def corrupt(example, row):
        if row == 0:  # the sides made equal
            return {"rejected_ids": example["chosen_ids"]}
        if row == 1:  # a reply cut before its end of turn
            return {"chosen_ids": [t for t in example["chosen_ids"] if t != im_end]}
        return {"prompt_ids": example["prompt_ids"] * 8}  # no longer fits max_length
    broken = ProcessedDatasets({"train": data["train"].map(corrupt, with_indices=True)}, data.report)
    result = audit_pairs(broken, tok, base_model)
    found = {finding.problem: finding.records for finding in problems(result, 6)}
    assert found == {
        "pairs whose chosen and rejected replies are the same tokens": [f"{path}:1 (train pair 0)"],
        "pairs with a reply not closed by the end-of-turn token <|im_end|> (4)": [f"{path}:2 (train pair 1)"],
        "pairs longer than --max_length 64": [f"{path}:3 (train pair 2)"],
    }
    assert len(result.findings) == 3


def test_shortened_and_dropped_pairs_reach_the_summary(tmp_path, tok, base_model):
    long_turn = "word " * 40
    records = [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
               {"prompt": [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "Now?"}], "chosen": "Yes.", "rejected": "No."},
               {"prompt": long_turn, "chosen": "Yes.", "rejected": "No."}]
    _, data = pair_data(tmp_path, tok, records, max_length=32)
    result = audit_pairs(data, tok, base_model, max_length=32)
    summary = result.splits["train"]
    assert (summary["samples"], summary["truncated"], summary["dropped"]) == (2, 1, 1)
    assert result.findings == []  # what was fitted or dropped at build time fits


def test_audit_script_audits_pairs(tmp_path, base_model):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    result = run_main_in_process("audit.py", "--model_name_or_path", base_model, "--train_files", path,
                                 "--stage", "preference", "--max_length", 64, "--validation_split_percentage", 0,
                                 "--data_cache_dir", tmp_path / "cache")
    assert_succeeded(result)
    assert "Data audit (preference): 0 problems" in result.stdout


# ---------------------------------------------------------------- the entry scripts fail the run


@pytest.fixture
def bad_chats(tmp_path) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [CLEAN_CHATS[0], chat(("Tell a story.", LONG_REPLY)), *CLEAN_CHATS[1:]])


def test_audit_script_stops_with_one_line_naming_the_record(tmp_path, base_model, bad_chats):
    """audit.py takes a training run's own JSON config (training flags ignored), prints the summary and
    fails in one line; with --audit warn it passes."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_name_or_path": str(base_model), "train_files": [str(bad_chats)],
                                  "max_length": 64, "validation_split_percentage": 0, "learning_rate": 1e-3,
                                  "deepspeed": "ds_configs/zero3.json", "bf16": True, "lora_r": 8,
                                  "data_cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out")}))
    result = run_main_in_process("audit.py", config, "--stage", "sft")
    assert_clean_error(result, f"{bad_chats}:2: data audit: ", "--max_length 64", "--drop_too_long")
    assert result.returncode == 2
    assert "Data audit (sft): 1 problem" in result.stdout and "lengths (train" in result.stdout
    assert_succeeded(run_main_in_process("audit.py", config, "--stage", "sft", "--audit", "warn"))


def sft_flags(base_model, train_file, output_dir):
    return ["--model_name_or_path", base_model, "--train_files", train_file, "--max_length", "64",
            "--validation_split_percentage", "0", "--max_steps", "2", "--report_to", "none",
            "--output_dir", output_dir, "--data_cache_dir", output_dir.parent / "cache"]


def test_sft_stops_before_training_on_a_failed_audit(tmp_path, base_model, bad_chats):
    output_dir = tmp_path / "out"
    result = run_main_in_process("sft.py", *sft_flags(base_model, bad_chats, output_dir))
    assert_clean_error(result, f"{bad_chats}:2: data audit: ")
    assert "Data audit (sft): 1 problem" in result.stdout
    assert not (output_dir / "trainer_state.json").exists() and not list(output_dir.glob("checkpoint-*"))


@pytest.mark.slow
def test_two_ranks_under_zero3_both_stop_on_a_failed_audit(tmp_path, base_model, bad_chats):
    """Every rank audits (ZeRO-3 gathers the embedding on all of them) and all exit 2, rank 0 with the
    one line, the other quietly; the subprocess timeout would catch a rank left waiting."""
    result = run_deepspeed("sft.py", "--deepspeed", REPO / "ds_configs/zero3.json",
                           *sft_flags(base_model, bad_chats, tmp_path / "out"), timeout=240)
    assert_clean_error(result, f"{bad_chats}:2: data audit: ")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1
    assert result.stdout.count("Data audit (sft): 1 problem") == 1


def test_the_summary_goes_to_wandb(tmp_path, tok, base_model, monkeypatch):
    """Offline WandB: the run file holds the summary table and the summary values."""
    import wandb

    from dstrain.audit import log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, data = chat_data(tmp_path, tok, CLEAN_CHATS, max_length=64)
    log_to_wandb(audit_chats(data, tok, base_model), "audit-test")
    wandb.finish()
    wandb.teardown()  # stops the service process too, having written everything
    [run_file] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    content = run_file.read_bytes()
    for key in (b"data_audit/summary", b"data_audit/train/lengths", b"data_audit/train/trained_fraction"):
        assert key in content, key
