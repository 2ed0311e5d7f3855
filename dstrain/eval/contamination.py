"""Contamination: which benchmark items the training data already holds, found by n-gram overlap.

    python audit.py configs/sft_demo.json --contamination python_local eval/my_test.jsonl
    deepspeed sft.py ... --decontaminate_against mmlu,gsm8k --decontaminate true

Both sides are normalised the same way (NFKC, case folded, punctuation and spacing dropped: words
are runs of letters and digits, and every CJK character is a word of its own, so Chinese benchmarks
such as C-Eval and CMMLU are checked too), and an item counts as contaminated when one of its
n-grams (13 words by default, as in the GPT-3 paper's analysis) appears in a training document or
conversation. Items shorter than n words cannot be matched; the report counts them
(`too_short`), and a smaller --contamination_ngram checks them.

The benchmark side is small (MMLU is 14,000 items): its n-grams are hashed into one sorted numpy
array. The training side streams: each record's words are looked up in the benchmarks' vocabulary
(a word the benchmarks never use ends every n-gram it is in), the n-gram hashes are computed with
numpy, and a searchsorted finds the candidates; a candidate is confirmed by comparing the words
themselves, so a hash collision never counts. Nothing per record is kept but the counts and the
first few examples.

The check runs where the training data is read (dstrain/data/cache.py applies `ContaminationFilter`
to every record, so its settings are part of the data cache's key and its report is saved with the
cache); the data audit prints the report, and `--decontaminate true` drops the records that overlap.
Benchmarks are files (JSON Lines: every string in a record, field names left out; a JSON list; or
text, an item per line) or lm-evaluation-harness task names (each item's question with its correct
answer, as the harness renders them).
"""

import itertools
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

from dstrain.data.records import JSON_SUFFIXES, expand_inputs, input_fingerprint, read_records
from dstrain.errors import BadRecord, UserError

DEFAULT_NGRAM = 13
EXAMPLES = 5  # overlapping (training record, benchmark item) pairs named per benchmark
# CJK ideographs, kana and hangul: one word per character (those scripts put no spaces between words).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORDS = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd, so the polynomial hash mixes every word in
_SKIPPED_KEYS = {"source", "role", "from", "id"}  # where a record's strings are not its text


def normalised_words(text: str) -> list[str]:
    return _WORDS.findall(unicodedata.normalize("NFKC", text).casefold())


def record_text(record) -> str:
    """Every string in a JSON record (nested lists and objects too), field names and provenance left out."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return "\n".join(record_text(value) for key, value in record.items() if key not in _SKIPPED_KEYS)
    if isinstance(record, (list, tuple)):
        return "\n".join(record_text(value) for value in record)
    return ""


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """The polynomial hash of every run of n word ids (uint64, wrapping), one per start position."""
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    values = ids.astype(np.uint64)
    hashes = values[:count].copy()
    for k in range(1, n):
        hashes = hashes * _MULTIPLIER + values[k:k + count]
    return hashes


# ===== the benchmark side =====

class BenchmarkIndex:
    """Every n-gram of every benchmark item: hashes sorted, with the item and start position of each."""

    def __init__(self, items: list[tuple[str, str, str]], n: int):
        """`items`: (benchmark, where the item is, its text)."""
        self.n = n
        self.vocabulary: dict[str, int] = {}  # word -> id from 1; 0 is a word no benchmark uses
        self.items = []  # (benchmark, where, words)
        hashes, owners, starts = [], [], []
        for benchmark, where, text in items:
            words = normalised_words(text)
            ids = np.fromiter((self.vocabulary.setdefault(word, len(self.vocabulary) + 1) for word in words),
                              dtype=np.int64, count=len(words))
            item_hashes = ngram_hashes(ids, n)
            hashes.append(item_hashes)
            owners.append(np.full(len(item_hashes), len(self.items), dtype=np.int32))
            starts.append(np.arange(len(item_hashes), dtype=np.int32))
            self.items.append((benchmark, where, words))
        hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.owners = np.concatenate(owners)[order] if owners else np.zeros(0, dtype=np.int32)
        self.starts = np.concatenate(starts)[order] if starts else np.zeros(0, dtype=np.int32)

    def matches(self, text: str) -> list[tuple[int, int]]:
        """(item, position in the text's words) of every benchmark n-gram the text contains, confirmed word for word."""
        words = normalised_words(text)
        if len(words) < self.n or len(self.hashes) == 0:
            return []
        ids = np.fromiter(map(self.vocabulary.get, words, itertools.repeat(0)), dtype=np.int64, count=len(words))
        unknown = np.concatenate([[0], np.cumsum(ids == 0)])
        hashes = ngram_hashes(ids, self.n)
        usable = (unknown[self.n:] - unknown[:-self.n]) == 0  # no word the benchmarks never use
        positions = np.flatnonzero(usable)
        if len(positions) == 0:
            return []
        left = np.searchsorted(self.hashes, hashes[positions], side="left")
        right = np.searchsorted(self.hashes, hashes[positions], side="right")
        found = []
        for position, start, end in zip(positions[right > left], left[right > left], right[right > left]):
            ngram = words[position:position + self.n]
            for entry in range(start, end):  # the same n-gram in several items, or a collision
                item, offset = int(self.owners[entry]), int(self.starts[entry])
                if self.items[item][2][offset:offset + self.n] == ngram:
                    found.append((item, int(position)))
        return found


def items_from_file(path: Path, benchmark: str) -> list[tuple[str, str, str]]:
    """A JSON Lines file (each record's strings), a JSON list, or a text file (an item per line)."""
    raw = path.read_bytes()
    if path.suffix in JSON_SUFFIXES and raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a readable JSON list ({error})") from None
        return [(benchmark, f"{path}: record {i}", record_text(record)) for i, record in enumerate(records, start=1)]
    if path.suffix in JSON_SUFFIXES:
        def item(record, where):
            text = record_text(record)
            if not text.strip():
                raise BadRecord(f"{where}: no text in the record")
            return benchmark, where, text

        return list(read_records([path], item, kinds=(dict, str, list), what="benchmark items"))
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8") from None
    return [(benchmark, f"{path}:{number}", line) for number, line in enumerate(lines, start=1) if line.strip()]


def items_from_tasks(names: list[str], include_paths: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """The evaluation items of lm-evaluation-harness tasks (groups and tags expand to their tasks): each
    item's question (or its decontamination query, where the task names one) and its correct answer."""
    from dstrain.eval.harness import (  # lm-evaluation-harness is imported only when a task is named
        hub_reachable,
        load_tasks,
        quiet_harness,
        read_from_local_cache_only,
        task_manager_for,
    )

    quiet_harness()
    manager, all_local = task_manager_for(tuple(names), include_paths, "--decontaminate_against")
    if not all_local and not hub_reachable():
        read_from_local_cache_only()
    items = []
    for name in names:
        for task_name, task in sorted(load_tasks(manager, (name,), "--decontaminate_against")["tasks"].items()):
            for index, doc in enumerate(task.eval_docs):
                items.append((name, f"{task_name}: item {index}", _task_item_text(task, doc)))
    return items


def _task_item_text(task, doc) -> str:
    question = None
    if task.should_decontaminate():
        try:
            question = task.doc_to_decontamination_query(doc)
        except (SyntaxError, ValueError):
            # lm-eval 0.4.13 runs a templated query (ARC's "Question: {{question}}\nAnswer:") through
            # ast.literal_eval, which fails on plain text; the prompt itself is the same text.
            question = None
    if question is None:
        question = task.doc_to_text(doc)
    answer = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(answer, int) and 0 <= answer < len(choices):
            answer = choices[answer]
        elif isinstance(answer, list):
            answer = " ".join(choices[i] if isinstance(i, int) and 0 <= i < len(choices) else str(i) for i in answer)
    return "\n".join(str(part) for part in (question, answer) if part not in (None, ""))


def is_benchmark_file(name: str) -> bool:
    return Path(name).suffix in JSON_SUFFIXES | {".txt", ".text", ".md"} or Path(name).exists()


# ===== the filter the data pipeline applies =====

class ContaminationFilter:
    """Applied to every training record as it is read (dstrain/data/cache.py): counts the records that
    overlap a benchmark and, with `drop`, leaves them out. Cheap to build and to key the cache with
    (`identity`); the benchmarks are read the first time a record is checked, by the process that
    builds the data."""

    def __init__(self, benchmarks: list[str], n: int = DEFAULT_NGRAM, drop: bool = False,
                 include_paths: tuple[str, ...] = ()):
        if n < 1:
            raise UserError(f"--contamination_ngram must be at least 1, got {n}")
        self.benchmarks, self.n, self.drop, self.include_paths = list(benchmarks), n, drop, tuple(include_paths)
        self.files = {name: expand_inputs([name], "--decontaminate_against") for name in self.benchmarks
                      if is_benchmark_file(name)}
        self.index: BenchmarkIndex | None = None
        self.counts: dict | None = None

    def identity(self) -> dict:
        """What the data built with this filter depends on: each benchmark file's content fingerprint
        (dstrain/data/records.input_fingerprint), the task names (and the harness version that renders
        them), n and drop."""
        from importlib.metadata import version

        return {"benchmarks": [[input_fingerprint(p) for p in self.files[name]] if name in self.files else name
                               for name in self.benchmarks],
                "n": self.n, "drop": self.drop, "include_paths": list(self.include_paths),
                "lm_eval": version("lm_eval") if len(self.files) < len(self.benchmarks) else None}

    def _load(self) -> None:
        items = []
        for name in self.benchmarks:
            if name in self.files:
                for path in self.files[name]:
                    items += items_from_file(path, name)
            else:
                items += items_from_tasks([name], self.include_paths)
        self.index = BenchmarkIndex(items, self.n)
        self.counts = {"records": {"train": 0, "validation": 0}, "contaminated": {"train": 0, "validation": 0},
                       "dropped": {"train": 0, "validation": 0},
                       "benchmarks": {name: {"items": 0, "too_short": 0, "contaminated_items": set(),
                                             "training_records": 0, "examples": []} for name in self.benchmarks}}
        for benchmark, _, words in self.index.items:
            self.counts["benchmarks"][benchmark]["items"] += 1
            self.counts["benchmarks"][benchmark]["too_short"] += len(words) < self.n

    def keep(self, record: dict, is_validation: bool) -> bool:
        """Count the record's overlaps; False when it overlaps and `drop` (it is left out of the data)."""
        if self.index is None:
            self._load()
        split = "validation" if is_validation else "train"
        self.counts["records"][split] += 1
        matches = self.index.matches(record_text(record))
        if not matches:
            return True
        self.counts["contaminated"][split] += 1
        words = None
        for benchmark in dict.fromkeys(self.index.items[item][0] for item, _ in matches):
            counts = self.counts["benchmarks"][benchmark]
            counts["training_records"] += 1
            for item, position in matches:
                if self.index.items[item][0] != benchmark:
                    continue
                counts["contaminated_items"].add(item)
                if len(counts["examples"]) < EXAMPLES and item not in {e["item"] for e in counts["examples"]}:
                    words = words or normalised_words(record_text(record))
                    counts["examples"].append({"training": record.get("source", "?"), "item": item,
                                               "benchmark": self.index.items[item][1],
                                               "ngram": " ".join(words[position:position + self.n])})
        if self.drop:
            self.counts["dropped"][split] += 1
            return False
        return True

    def report(self) -> dict:
        """JSON-able: per benchmark its items, those too short to check, the contaminated ones, the
        training records overlapping it and the first examples; the records checked, contaminated and
        dropped per split."""
        if self.index is None:
            self._load()
        counts = self.counts
        return {
            "ngram": self.n, "drop": self.drop, "records": counts["records"], "contaminated": counts["contaminated"],
            "dropped": counts["dropped"],
            "benchmarks": {name: {"items": c["items"], "too_short": c["too_short"],
                                  "contaminated_items": len(c["contaminated_items"]),
                                  "training_records": c["training_records"],
                                  "examples": [{k: v for k, v in e.items() if k != "item"} for e in c["examples"]]}
                           for name, c in counts["benchmarks"].items()},
        }


def render_report(report: dict) -> list[str]:
    """The report as the data audit prints it."""
    splits = [split for split in ("train", "validation") if report["records"].get(split)]
    checked = ", ".join(f"{split} {report['contaminated'][split]:,} of {report['records'][split]:,}"
                        for split in splits)
    action = (", dropped: " + ", ".join(f"{split} {report['dropped'][split]:,}" for split in splits)
              if report["drop"] else " (kept: --decontaminate true drops them)")
    lines = [f"  contamination ({report['ngram']}-grams): records overlapping a benchmark: {checked or '-'}{action}"]
    for name, found in report["benchmarks"].items():
        short = (f", {found['too_short']:,} shorter than {report['ngram']} words (not checked)"
                 if found["too_short"] else "")
        lines.append(f"    {name}: {found['contaminated_items']:,} of {found['items']:,} items found in "
                     f"{found['training_records']:,} training records{short}")
        lines += [f"      {example['training']} ~ {example['benchmark']}: \"{example['ngram']}\""
                  for example in found["examples"]]
    return lines
