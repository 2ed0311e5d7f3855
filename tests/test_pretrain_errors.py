"""pretrain.py refuses bad input with one clear line, a non-zero exit and no traceback (run in this
process, as `python pretrain.py` would run, but without an interpreter start each; the 2-rank cases
are real DeepSpeed jobs)."""

import json
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_clean_error, run_deepspeed, run_main_in_process

QUICK = ["--config_name", "tiny", "--block_size", "32", "--per_device_train_batch_size", "2",
         "--max_steps", "2", "--report_to", "none", "--validation_split_percentage", "0"]


def pretrain(tmp_path, tokenizer_dir, *flags):
    return run_main_in_process("pretrain.py", "--tokenizer_name", tokenizer_dir, "--output_dir", tmp_path / "out",
                               "--data_cache_dir", tmp_path / "cache", *flags)


def write_lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def good_record(i: int) -> str:
    return json.dumps({"text": f"Record {i} says the for statement iterates over the items of a sequence. " * 3})


def test_block_size_larger_than_the_model_context(tmp_path, tokenizer_dir, docs_corpus):
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", docs_corpus, "--block_size", "1024")
    assert_clean_error(result, "--block_size 1024", "max_position_embeddings=512")


def test_model_and_tokenizer_that_disagree(tmp_path, tokenizer_dir, base_model, docs_corpus):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens([f"extra{i}" for i in range(50)])
    other.save_pretrained(tmp_path / "bigger_tok")
    result = run_main_in_process("pretrain.py", "--model_name_or_path", base_model, "--tokenizer_name",
                                 tmp_path / "bigger_tok", "--train_files", docs_corpus, "--output_dir",
                                 tmp_path / "out", "--max_steps", "1", "--report_to", "none")
    assert_clean_error(result, "vocab_size 1000", "1050 tokens")


# Broken corpora (truncated JSON, no text field, invalid UTF-8, empty file): tests/test_bad_inputs.py.


def test_missing_corpus_file(tmp_path, tokenizer_dir):
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", tmp_path / "nowhere.jsonl")
    assert_clean_error(result, "file not found", "nowhere.jsonl")


def test_skip_bad_records_trains_on_the_rest_and_says_how_many(tmp_path, tokenizer_dir):
    corpus = write_lines(tmp_path / "mixed.jsonl", *[good_record(i) for i in range(40)], "[1, 2]", "{broken",
                         good_record(99))
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", corpus, "--skip_bad_records")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped 2 bad records" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_existing_checkpoints_are_not_trained_over(tmp_path, tokenizer_dir, docs_corpus):
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-3" / "keep.txt").write_text("precious")
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", docs_corpus)
    assert_clean_error(result, "checkpoint-3", "--resume_from_checkpoint last")
    assert (tmp_path / "out" / "checkpoint-3" / "keep.txt").read_text() == "precious"


def test_resume_from_a_checkpoint_that_does_not_exist(tmp_path, tokenizer_dir, docs_corpus):
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", docs_corpus,
                      "--resume_from_checkpoint", tmp_path / "checkpoint-99")
    assert_clean_error(result, "checkpoint-99")


def test_validation_split_too_small_for_one_block(tmp_path, tokenizer_dir):
    corpus = write_lines(tmp_path / "small.jsonl", *[good_record(i) for i in range(20)])
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", corpus,
                      "--validation_split_percentage", "1", "--block_size", "256")
    assert_clean_error(result, "validation split", "fewer than one block")


def test_bf16_without_a_gpu_is_refused_clearly(tmp_path, tokenizer_dir, docs_corpus):
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", docs_corpus, "--bf16")
    assert_clean_error(result, "bf16")


def test_unknown_flag(tmp_path, tokenizer_dir, docs_corpus):
    result = pretrain(tmp_path, tokenizer_dir, *QUICK, "--train_files", docs_corpus, "--learning_rat", "1e-3")
    assert_clean_error(result, "--learning_rat")


@pytest.mark.slow
def test_deepspeed_config_contradicting_the_flags_on_two_ranks(tmp_path, tokenizer_dir, docs_corpus):
    config = json.loads((REPO / "ds_configs/zero2.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 8
    (tmp_path / "ds.json").write_text(json.dumps(config))
    result = run_deepspeed("pretrain.py", "--deepspeed", tmp_path / "ds.json", "--tokenizer_name", tokenizer_dir,
                           *QUICK, "--train_files", docs_corpus, "--output_dir", tmp_path / "out")
    assert_clean_error(result, "ds.json", "train_micro_batch_size_per_gpu=8", "per_device_train_batch_size=2")


@pytest.mark.slow
def test_bad_corpus_on_two_ranks_stops_every_rank_cleanly(tmp_path, tokenizer_dir):
    corpus = write_lines(tmp_path / "bad.jsonl", good_record(1), good_record(2), "not json")
    result = run_deepspeed("pretrain.py", "--deepspeed", REPO / "ds_configs/zero2.json", "--tokenizer_name",
                           tokenizer_dir, *QUICK, "--train_files", corpus, "--output_dir", tmp_path / "out",
                           "--data_cache_dir", tmp_path / "cache")
    assert_clean_error(result, "bad.jsonl:3", "malformed JSON")
    # No cache a later run could trust: only the failure's marks (the corpus's store, the split plan over
    # it), which told the waiting rank the error.
    left = [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]
    assert left and all(path.suffix == ".error" and "bad.jsonl:3" in path.read_text() for path in left), left
