"""Tokenize once: the build every stage's data goes through, and its cache.

A stage describes its data with a frozen `DataSpec` (the input files, the held-out share, its own
settings) and says how to read one file list (`read`) and how to turn what was read into the
splits training sees (`build`). `processed_datasets` does the rest, the same way for every stage:
the cache key, reading with validation marks, the build, the save.

The key holds each input file's path, size and modification time, the tokenizer and the spec's
settings, so a changed file or setting builds anew and an unchanged one is loaded. The first
process of each node builds while the others wait (`main_process_first`); the result is
written beside its final place and renamed, so a crash, or a second node racing on a shared
file system, never leaves a half-written cache that a later run would trust.

Beside the splits the cache keeps a small build report (`ProcessedDatasets.report`): what the
build counted that the rows themselves no longer show (conversations dropped or cut to fit,
documents and tokens before packing), so a run that reuses the cache can still audit them.
"""

import hashlib
import json
import os
import random
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, load_from_disk
from datasets.exceptions import DatasetGenerationError

from dstrain.data.records import ReadStats, expand_inputs
from dstrain.distributed import print0
from dstrain.errors import UserError

REPORT_FILE = "build_report.json"


class ProcessedDatasets(DatasetDict):
    """The splits training reads, plus `report`: a JSON-able dict per split of what building them
    counted (see lm_data and sft_data), saved with the cache and loaded with it."""

    def __init__(self, splits=(), report: dict | None = None):
        super().__init__(splits)
        self.report = report or {}


def file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def tokenizer_identity(tokenizer) -> str:
    content = tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template or "") + str(tokenizer.eos_token_id)
    return hashlib.sha256(content.encode()).hexdigest()


@dataclass(frozen=True)
class DataSpec:
    """What one stage's processed datasets are made from. Every field is part of the cache key except
    those declared with compare=False (how the build runs, not what it makes). A stage subclasses it
    with its settings, its `kind`, its cache `layout` version, `read` and `build`."""

    kind: ClassVar[str]
    layout: ClassVar[str]  # bump when what `build` makes changes, so caches of the old layout are not reused

    train_files: tuple[Path, ...]
    validation_files: tuple[Path, ...]
    validation_percentage: float  # drawn from the training records when there are no validation files
    skip_bad_records: bool
    seed: int
    cache_dir: str = field(compare=False)
    # A filter every record passes as it is read, or None: the contamination check (--decontaminate_against,
    # dstrain/eval/contamination.py). Its identity() is part of the cache key, its report() is saved with the cache.
    record_filter: object = field(default=None, compare=False)

    @classmethod
    def from_arguments(cls, data_args, seed: int, **settings) -> "DataSpec":
        """The spec of --train_files / --validation_files (CorpusArguments) with the stage's `settings`."""
        train = expand_inputs(data_args.train_files, "--train_files")
        validation = expand_inputs(data_args.validation_files, "--validation_files") if data_args.validation_files else []
        record_filter = data_args.record_filter() if hasattr(data_args, "record_filter") else None
        return cls(tuple(train), tuple(validation), 0.0 if validation else data_args.validation_split_percentage,
                   data_args.skip_bad_records, seed, data_args.data_cache_dir, record_filter, **settings)

    @property
    def holds_out(self) -> bool:
        """Whether there is a validation split."""
        return self.validation_percentage > 0 or bool(self.validation_files)

    def read(self, files: tuple[Path, ...], stats: ReadStats) -> Iterator[dict]:
        """One dict per usable record of `files` (bad ones raise BadRecord, or are counted in `stats`)."""
        raise NotImplementedError

    def build(self, tokenizer, records, scratch: Path) -> "ProcessedDatasets":
        """The splits training reads, from every record read (a Dataset with an `is_validation` column)."""
        raise NotImplementedError

    def cache_identity(self, tokenizer) -> dict:
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.compare}
        return {**settings, "kind": self.kind, "layout": self.layout,
                "train_files": [file_identity(p) for p in self.train_files],
                "validation_files": [file_identity(p) for p in self.validation_files],
                "tokenizer": tokenizer_identity(tokenizer)} | (
                    {} if self.record_filter is None else {"record_filter": self.record_filter.identity()})


def processed_datasets(spec: DataSpec, tokenizer, main_process_first) -> "ProcessedDatasets":
    """The datasets `spec` describes: loaded from the cache, or read and built there first (by the
    first process of each node while the others wait: `main_process_first`)."""
    def read_then_build(scratch: Path) -> ProcessedDatasets:
        stats = {"train": ReadStats(), "validation": ReadStats()}
        records = records_dataset(_marked_records, scratch, spec=spec, stats=stats)
        problems = stats["train"].problems + stats["validation"].problems
        if problems:
            print0(f"Skipped {len(problems)} bad records (--skip_bad_records); first: {problems[0]}")
        built = spec.build(tokenizer, records, scratch)
        if spec.record_filter is not None:
            built.report["contamination"] = spec.record_filter.report()
        return built

    return cached_datasets(spec.cache_dir, spec.cache_identity(tokenizer), read_then_build, main_process_first)


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


def cached_datasets(cache_root: str, identity: dict, build: Callable[[Path], ProcessedDatasets],
                    main_process_first) -> ProcessedDatasets:
    """Load the datasets cached for `identity`, building them with `build(scratch_dir)` if absent."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    cache_dir = Path(cache_root) / key
    with main_process_first(desc="preparing the data"):
        if (cache_dir / "dataset_dict.json").exists():
            print0(f"Reusing tokenized data from {cache_dir}")
        else:
            _build_into(cache_dir, build)
        report = cache_dir / REPORT_FILE
        return ProcessedDatasets(load_from_disk(str(cache_dir)),
                                 json.loads(report.read_text()) if report.exists() else {})


def _build_into(cache_dir: Path, build: Callable[[Path], ProcessedDatasets]) -> None:
    staging = cache_dir.with_name(f"{cache_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        built = build(staging / "scratch")
        built.save_to_disk(str(staging / "done"))
        (staging / "done" / REPORT_FILE).write_text(json.dumps(getattr(built, "report", {})))
        try:
            os.replace(staging / "done", cache_dir)
        except OSError:
            if not (cache_dir / "dataset_dict.json").exists():  # not another node winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
