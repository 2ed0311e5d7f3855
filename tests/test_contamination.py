"""The contamination check: every planted overlap found (verbatim, re-cased and re-punctuated, Chinese
with full-width punctuation, inside a conversation), no false hit on clean data or on a near miss one
word short, hash collisions never counted, and --decontaminate removing exactly the planted records
from the processed data, with the audit's report naming them."""

import json
import random

import numpy as np
import pytest

import dstrain.eval.contamination as contamination
from dstrain.arguments import AuditDataArguments, ChatDataArguments
from dstrain.data.python_docs import documentation_chats, documentation_texts
from dstrain.data.sft import sft_datasets
from dstrain.eval.contamination import BenchmarkIndex, ContaminationFilter, items_from_file, normalised_words
from dstrain.model.loading import load_tokenizer
from tests.helpers import assert_succeeded, run_main_in_process

# Words no Python documentation uses together: the synthetic benchmark's items are clean against it.
VOCABULARY = ("amber basalt cobalt dune ember fjord glacier heron iris juniper kelp lagoon meadow nectar opal "
              "prairie quartz reef sierra tundra umber vale willow yarrow zephyr").split()


def synthetic_items(count: int = 12, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(16, 30))).capitalize() + "."
            for _ in range(count)]


CHINESE = "中国的首都是北京，它有三千多年的建城史和八百多年的建都史。"
SHORT = "Amber basalt cobalt dune."  # 4 words: shorter than any n-gram checked here


def planted_records(items: list[str]) -> dict[str, dict]:
    """Training records (as the readers give them, with their `source`) holding benchmark text in every
    way the check must see through; the keys say which."""
    noisy = items[1].upper().replace(" ", "  ,").replace(".", "!!")
    return {
        "verbatim": {"text": f"Some introduction. {items[0]} And then the document goes on.", "source": "t:1"},
        "recased": {"text": f"Noise first: {noisy}", "source": "t:2"},
        "chinese": {"text": "前言。" + CHINESE.replace("，", ",").replace("。", "．") + "后记", "source": "t:3"},
        "conversation": {"messages": [{"role": "user", "content": "Tell me."},
                                      {"role": "assistant", "content": items[2]}], "source": "t:4"},
    }


def near_miss(items: list[str], n: int) -> dict:
    """n - 1 consecutive words of an item: no n-gram in common."""
    return {"text": " ".join(items[3].split()[:n - 1]) + " and something else entirely", "source": "t:5"}


@pytest.fixture
def benchmark(tmp_path):
    items = synthetic_items()
    path = tmp_path / "bench.jsonl"
    records = [{"question": item, "answer": "yes"} for item in items] + [{"question": CHINESE}, {"question": SHORT}]
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path, items


def test_normalised_words():
    assert normalised_words("Hello,  WORLD!! It's ＡＢＣ１２３.") == ["hello", "world", "it", "s", "abc123"]
    assert normalised_words("北京，2008年") == ["北", "京", "2008", "年"]
    assert normalised_words("snake_case and-dash") == ["snake", "case", "and", "dash"]


@pytest.mark.parametrize("n", [13, 8])
def test_every_planted_overlap_is_found_and_clean_data_has_none(benchmark, n):
    path, items = benchmark
    check = ContaminationFilter([str(path)], n=n, drop=True)
    clean = [{"text": text, "source": f"docs:{i}"} for i, text in enumerate(documentation_texts())]
    planted = planted_records(items)
    kept = [record["source"] for record in clean + list(planted.values()) + [near_miss(items, n)]
            if check.keep(record, is_validation=False)]
    assert kept == [record["source"] for record in clean] + ["t:5"]  # every planted one dropped, nothing else
    report = check.report()
    found = report["benchmarks"][str(path)]
    assert found["items"] == len(items) + 2 and found["too_short"] == 1
    assert found["contaminated_items"] == 4 and found["training_records"] == 4
    assert {example["training"] for example in found["examples"]} == {"t:1", "t:2", "t:3", "t:4"}
    assert {example["benchmark"] for example in found["examples"]} == {f"{path}:{line}" for line in (1, 2, 3, 13)}
    assert report["contaminated"]["train"] == report["dropped"]["train"] == 4
    assert report["records"]["train"] == len(clean) + 5


def test_hash_collisions_are_never_counted(benchmark, monkeypatch):
    """With a hash that keeps only an n-gram's last word, nearly every n-gram is a candidate: the
    word-for-word confirmation must leave exactly the true overlaps."""
    path, items = benchmark
    monkeypatch.setattr(contamination, "_MULTIPLIER", np.uint64(0))
    check = ContaminationFilter([str(path)], n=13, drop=True)
    records = list(planted_records(items).values()) + [near_miss(items, 13)] + [
        {"text": " ".join(reversed(items[5].split())), "source": "t:6"}]  # the same words, no common 13-gram
    assert [r["source"] for r in records if check.keep(r, False)] == ["t:5", "t:6"]


def test_report_only_keeps_every_record(benchmark):
    path, items = benchmark
    check = ContaminationFilter([str(path)], n=13, drop=False)
    assert all(check.keep(record, is_validation=True) for record in planted_records(items).values())
    report = check.report()
    assert report["contaminated"]["validation"] == 4 and report["dropped"]["validation"] == 0


def test_benchmark_files_of_every_kind(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"q": "one two", "choices": ["a", "b"]}, "three four"]))
    (tmp_path / "lines.txt").write_text("first item\n\nsecond item\n")
    listed = tmp_path / "list.json"
    assert items_from_file(listed, "b") == [("b", f"{listed}: record 1", "one two\na\nb"),
                                            ("b", f"{listed}: record 2", "three four")]
    assert [where for _, where, _ in items_from_file(tmp_path / "lines.txt", "b")] == \
        [f"{tmp_path / 'lines.txt'}:1", f"{tmp_path / 'lines.txt'}:3"]
    index = BenchmarkIndex([("b", "x", "alpha beta gamma delta")], n=3)
    assert index.matches("zeta ALPHA, beta; gamma!") == [(0, 1)]
    assert index.matches("alpha beta") == []


@pytest.mark.slow  # tokenizes conversations and reads a harness task: seconds
def test_decontaminate_drops_exactly_the_planted_conversations(tmp_path, tokenizer_dir, base_model, benchmark):
    """Through the data pipeline itself (sft_datasets, as sft.py builds its data): the planted
    conversations are gone from both splits, the clean ones all there; the cache keys differ."""
    path, items = benchmark
    chats = documentation_chats()
    planted = [{"messages": [{"role": "user", "content": "Recite item."}, {"role": "assistant", "content": item}]}
               for item in items[:3]]
    train = tmp_path / "train.jsonl"
    lines = chats[:40] + planted + chats[40:80]
    train.write_text("".join(json.dumps(chat) + "\n" for chat in lines))
    planted_lines = {f"{train}:{41 + i}" for i in range(3)}
    tokenizer = load_tokenizer(str(base_model))
    common = dict(train_files=[str(train)], validation_split_percentage=20, data_cache_dir=str(tmp_path / "cache"),
                  max_length=512, drop_too_long=True)
    plain = sft_datasets(ChatDataArguments(**common), tokenizer, 1)
    cleaned = sft_datasets(ChatDataArguments(**common, decontaminate_against=[str(path)], decontaminate=True),
                           tokenizer, 1)
    sources = {name: set(split["source"]) for name, split in plain.items()}
    kept = {name: set(split["source"]) for name, split in cleaned.items()}
    assert planted_lines <= sources["train"] | sources["validation"]
    assert {name: sources[name] - planted_lines for name in sources} == kept  # splits drawn as without the filter
    report = cleaned.report["contamination"]
    assert report["dropped"]["train"] + report["dropped"]["validation"] == 3
    assert {e["training"] for e in report["benchmarks"][str(path)]["examples"]} == planted_lines
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.slow  # audit.py in-process: tokenizer, data build, the harness task's items
def test_audit_reports_contamination_per_benchmark(tmp_path, base_model, benchmark):
    path, items = benchmark
    from dstrain.eval.python_tasks import docstring_questions

    # One item of the shipped task (a docstring sentence of 13 words or more), planted in a training answer.
    question = next(q for q in docstring_questions() if len(q["summary"].split()) >= 13)
    answer = f"{question['summary']} That is {question['choices'][question['label']]}, as its docstring says."
    chats = [{"messages": [{"role": "user", "content": "Recite item."}, {"role": "assistant", "content": text}]}
             for text in (items[0], answer)] + documentation_chats()[:30]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    result = run_main_in_process("audit.py", "--model_name_or_path", base_model, "--train_files", train,
                                 "--max_length", 512, "--drop_too_long", "true", "--validation_split_percentage", 0,
                                 "--data_cache_dir", tmp_path / "cache", "--contamination", path, "python_docstrings")
    assert_succeeded(result)
    assert "contamination (13-grams): records overlapping a benchmark: train 2 of 32 (kept: --decontaminate true " \
           "drops them)" in result.stdout
    assert f"{path}: 1 of {len(items) + 2} items found in 1 training records, 1 shorter than 13 words" in result.stdout
    assert f"{train}:1 ~ {path}:1" in result.stdout
    assert "python_docstrings: 1 of " in result.stdout and f"{train}:2 ~ python_docstrings: item " in result.stdout


def test_contamination_flags_are_checked():
    with pytest.raises(Exception, match="--decontaminate true needs --decontaminate_against"):
        ChatDataArguments(train_files=["x.jsonl"], decontaminate=True)
    with pytest.raises(Exception, match="--contamination_ngram must be at least 1"):
        ChatDataArguments(train_files=["x.jsonl"], decontaminate_against=["b.jsonl"], contamination_ngram=0)
    audit_args = AuditDataArguments(train_files=["x.jsonl"], contamination=["b.jsonl", "mmlu,gsm8k"])
    assert audit_args.decontaminate_against == ["b.jsonl", "mmlu,gsm8k"] and not audit_args.decontaminate
