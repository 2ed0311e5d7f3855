"""Tokenize once: the build every stage's data goes through, and its cache.

A stage describes its data with a frozen `DataSpec` (the inputs, the held-out share, its own
settings) and says how to make the processed splits into a folder (`make`) and how to load them
(`load`). `processed_datasets` does the rest, the same way for every stage: the cache key, one
process building while every other waits (dstrain.distributed.build_once: a marker file, no
collective that could time out), and loading. `python data.py prepare` runs the same call before
the job, with every core.

The key holds each input's content fingerprint (dstrain/data/records.input_fingerprint), the
tokenizer and the spec's settings, so a changed input or setting builds anew and an unchanged
one is loaded. The result is written beside its final place and renamed, so a crash, or a second
node racing on a shared file system, never leaves a half-written cache that a later run would trust.

Beside the splits the cache keeps a small build report (`ProcessedDatasets.report`): what the
build counted that the rows themselves no longer show (conversations dropped or cut to fit,
documents and tokens before packing), so a run that reuses the cache can still audit them.
"""

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, load_from_disk
from datasets.exceptions import DatasetGenerationError

from dstrain.data.records import ReadStats, expand_inputs, input_fingerprint
from dstrain.distributed import build_once, print0
from dstrain.errors import UserError

REPORT_FILE = "build_report.json"
DEFAULT_MAX_VALIDATION_TOKENS = 4_000_000


class ProcessedDatasets(dict):
    """The splits training reads (name -> dataset), plus `report`: a JSON-able dict per split of what
    building them counted (see blocks.py, sft.py, pairs.py), saved with the cache and loaded with it."""

    def __init__(self, splits=(), report: dict | None = None, folder: Path | None = None):
        super().__init__(splits)
        self.report = report or {}
        self.folder = folder  # the cache folder it was loaded from, if any


def skipped_records(report: dict) -> str | None:
    """The line saying how many bad records the build skipped (--skip_bad_records), if it skipped any."""
    train = report.get("train", {})
    if not train.get("skipped"):
        return None
    return f"Skipped {train['skipped']} bad records (--skip_bad_records); first: {train['skipped_first']}"


def tokenizer_identity(tokenizer) -> str:
    content = tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template or "") + str(tokenizer.eos_token_id)
    return hashlib.sha256(content.encode()).hexdigest()


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class DataSpec:
    """What one stage's processed datasets are made from. Every field is part of the cache key except
    those declared with compare=False (how the build runs, not what it makes). A stage subclasses it
    with its settings, its `kind`, its cache `layout` version, and `read` + `build` (records read in
    one process, then built), or `make` + `load` of its own (pretraining's token stores)."""

    kind: ClassVar[str]
    layout: ClassVar[str]  # bump when what the build makes changes, so caches of the old layout are not reused

    train_files: tuple
    validation_files: tuple
    validation_percentage: float  # drawn from the training records when there are no validation files
    max_validation_tokens: int  # the drawn validation split stops growing here; later draws train
    skip_bad_records: bool
    seed: int
    cache_dir: str = field(compare=False)
    workers: int | None = field(default=None, compare=False)
    # A filter every record passes as it is read, or None: the contamination check (--decontaminate_against,
    # dstrain/eval/contamination.py). Its identity() is part of the cache key, its report() is saved with the cache.
    record_filter: object = field(default=None, compare=False)

    @classmethod
    def from_arguments(cls, data_args, seed: int, **settings) -> "DataSpec":
        """The spec of --train_files / --validation_files (CorpusArguments) with the stage's `settings`."""
        where = {"dataset_config": data_args.dataset_config, "dataset_split": data_args.dataset_split}
        weighted = [pattern for pattern in data_args.train_files if has_weight(pattern)]
        if weighted:
            raise UserError(f"--train_files {weighted[0]}: weighted sources mix pretraining data (pretrain.py, lora.py "
                            "--stage pretrain); give chat and preference files without weights")
        train = expand_inputs(data_args.train_files, "--train_files", **where)
        validation = (expand_inputs(data_args.validation_files, "--validation_files", **where)
                      if data_args.validation_files else [])
        return cls(tuple(train), tuple(validation), 0.0 if validation else data_args.validation_split_percentage,
                   data_args.max_validation_tokens, data_args.skip_bad_records, seed, data_args.data_cache_dir,
                   data_args.preprocessing_num_workers, record_filter(data_args), **settings)

    @property
    def holds_out(self) -> bool:
        """Whether there is a validation split."""
        return self.validation_percentage > 0 or bool(self.validation_files)

    def read(self, files: tuple, stats: ReadStats) -> Iterator[dict]:
        """One dict per usable record of `files` (bad ones raise BadRecord, or are counted in `stats`)."""
        raise NotImplementedError

    def build(self, tokenizer, records: Dataset, scratch: Path) -> "ProcessedDatasets":
        """The splits training reads, from every record read (a Dataset with an `is_validation` column)."""
        raise NotImplementedError

    def make(self, tokenizer, folder: Path) -> None:
        """Write the processed splits into `folder` (records read, then built, then saved)."""
        stats = {"train": ReadStats(), "validation": ReadStats()}
        records = records_dataset(_marked_records, folder / "scratch", spec=self, stats=stats)
        built = self.build(tokenizer, records, folder / "scratch")
        if self.record_filter is not None:
            built.report["contamination"] = self.record_filter.report()
        skipped = stats["train"].skipped + stats["validation"].skipped
        if skipped:  # every run prints it from the report (skipped_records), not just the one that built
            built.report["train"]["skipped"] = skipped
            built.report["train"]["skipped_first"] = (stats["train"].problems + stats["validation"].problems)[0]
        DatasetDict(built).save_to_disk(str(folder / "splits"), num_proc=None)
        (folder / REPORT_FILE).write_text(json.dumps(built.report))
        shutil.rmtree(folder / "scratch", ignore_errors=True)

    def load(self, folder: Path) -> "ProcessedDatasets":
        report = folder / REPORT_FILE
        return ProcessedDatasets(load_from_disk(str(folder / "splits")),
                                 json.loads(report.read_text()) if report.exists() else {})

    def cache_identity(self, tokenizer) -> dict:
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        return {**settings, "kind": self.kind, "layout": self.layout,
                "train_files": [input_fingerprint(p) for p in self.train_files],
                "validation_files": [input_fingerprint(p) for p in self.validation_files],
                "tokenizer": tokenizer_identity(tokenizer)} | (
                    {} if self.record_filter is None else {"record_filter": self.record_filter.identity()})


def processed_datasets(spec: DataSpec, tokenizer) -> "ProcessedDatasets":
    """The datasets `spec` describes: loaded from the cache, or built there first (by one process
    while the others wait, see dstrain.distributed.build_once)."""
    folder = Path(spec.cache_dir).expanduser() / cache_key(spec.cache_identity(tokenizer))
    if folder.exists():
        print0(f"Reusing tokenized data from {folder}")
    build_once(folder, lambda staging: spec.make(tokenizer, staging), f"the {spec.kind} data cache {folder}")
    data = spec.load(folder)
    data.folder = folder  # where findings about it (the data audit's) are kept too
    return data


def record_filter(data_args):
    """The contamination check the data arguments ask for (--decontaminate_against), or None."""
    return data_args.record_filter() if hasattr(data_args, "record_filter") else None


def has_weight(pattern: str) -> bool:
    """Whether a --train_files pattern ends with a source weight (web/:0.7) rather than naming a path."""
    head, sep, tail = pattern.rpartition(":")
    if not sep or Path(pattern).exists() or pattern.startswith("hf:") and ":" not in pattern[3:]:
        return False
    try:
        float(tail)
    except ValueError:
        return False
    return True


def _marked_records(spec: DataSpec, stats: dict):
    """Every record of the training and validation files, each marked `is_validation`."""
    train = spec.read(spec.train_files, stats["train"])
    validation = spec.read(spec.validation_files, stats["validation"]) if spec.validation_files else []
    kept = 0
    for record, is_validation in with_validation_marks(train, validation, spec.validation_percentage, spec.seed):
        if spec.record_filter is None or spec.record_filter.keep(record, is_validation):
            kept += 1
            yield {**record, "is_validation": is_validation}
    if kept == 0 and spec.record_filter is not None:
        raise UserError("--decontaminate dropped every training record: each overlaps a benchmark of "
                        "--decontaminate_against (python audit.py ... --contamination ... names them)")


def records_dataset(generate: Callable, scratch: Path, **kwargs) -> Dataset:
    """A Dataset written to disk from a generator of records, streamed (memory stays flat).

    datasets wraps any error raised in the generator; a UserError (a bad record, an empty
    corpus) is unwrapped so it reaches the user as the one line it is.
    """
    # tuples, not lists: datasets would try to shard list arguments across processes
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
    try:
        return Dataset.from_generator(generate, gen_kwargs=kwargs, cache_dir=str(scratch))
    except DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, UserError):
            raise cause from None
        raise


def with_validation_marks(train_items, validation_items, validation_percentage: float, seed: int):
    """(item, is_validation) for every item: a seeded draw per training item, or the validation files.

    Drawn per document or conversation, before any packing, so nothing feeds both sides.
    """
    draw = random.Random(seed)
    for item in train_items:
        yield item, draw.random() * 100 < validation_percentage
    for item in validation_items:
        yield item, True


def validation_draws(count: int, validation_percentage: float, seed: int) -> np.ndarray:
    """The same seeded draw as with_validation_marks, for `count` items at once (a bool per item)."""
    draw = random.Random(seed)
    return np.fromiter((draw.random() * 100 < validation_percentage for _ in range(count)), dtype=bool, count=count)


def cap_validation(records: Dataset, max_tokens: int, column: str = "input_ids") -> Dataset:
    """Validation rows past the first `max_tokens` tokens (of `column`) of the split train instead (0: no cap)."""
    marks = records.select_columns(["is_validation"]).with_format("numpy")[:]["is_validation"]
    if not max_tokens or not marks.any():
        return records
    lengths = list_lengths(records, column)
    over = marks & (np.cumsum(np.where(marks, lengths, 0)) > max_tokens)
    if not over.any():
        return records
    return records.remove_columns("is_validation").add_column("is_validation", marks & ~over)


def split_by_marks(dataset: Dataset, with_validation: bool) -> dict:
    """{"train": ..., "validation": ...} from a dataset whose rows carry `is_validation`."""
    splits = {"train": dataset.filter(lambda marks: [not m for m in marks], input_columns="is_validation",
                                      batched=True).remove_columns("is_validation")}
    if with_validation:
        splits["validation"] = dataset.filter(lambda marks: marks, input_columns="is_validation",
                                              batched=True).remove_columns("is_validation")
    return splits


def list_lengths(dataset: Dataset, column: str = "input_ids", batch_size: int = 10_000) -> np.ndarray:
    """Length of every row's list in `column`, read in Arrow batches (no Python list per row)."""
    parts = [pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False)
             for table in dataset.with_format("arrow").iter(batch_size=batch_size)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Counts per power-of-two bucket, keyed by the bucket's upper bound: {"64": n, "128": m, ...}
    (a length of 100 counts under "128"); the smallest bucket is "16"."""
    if len(lengths) == 0:
        return {}
    exponents = np.maximum(np.ceil(np.log2(np.maximum(lengths, 1))), 4).astype(np.int64)
    counts = np.bincount(exponents)
    return {str(2 ** e): int(n) for e, n in enumerate(counts) if n}
