"""Reading input files, the one way every stage does.

Inputs people have, named directly, by glob or by folder:
  JSON Lines          .jsonl  .json (a .json file is one JSON array when its first character is `[`)
  compressed          .jsonl.gz  .jsonl.zst  (and .json/.txt/.md with .gz or .zst)
  plain text          .txt  .text  .md: a sample per line
  Parquet             .parquet: a record per row
  saved datasets      a folder written by `datasets`' save_to_disk (its --dataset_split of a DatasetDict)
  datasets by name    hf:NAME or hf:/local/folder, through datasets.load_dataset (--dataset_config,
                      --dataset_split); hub names need the network, local folders do not
A file a glob reaches that is none of these is refused by name, never read as text. Everything is
streamed, so a corpus larger than memory works (a JSON array file is the exception: it is one value),
and every problem is reported as `file:line: what is wrong` (`file: row N` for Parquet and datasets,
`file: record N` for JSON arrays): a BadRecord, which --skip_bad_records skips and counts.

`read_records` hands each record to a stage's own converter (a conversation, a preference pair, a
question) with the place to name in its errors; `iter_texts` reads the text samples of a corpus.
"""

import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from dstrain.errors import BadRecord, UserError

JSON_SUFFIXES = {".jsonl", ".json"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
COMPRESSIONS = {".gz", ".zst"}
CORPUS_SUFFIXES = JSON_SUFFIXES | TEXT_SUFFIXES | {".parquet"}
MAX_PROBLEMS_KEPT = 100  # skipped records named in a report; the count goes on


@dataclass(frozen=True)
class DatasetInput:
    """A dataset read through the `datasets` library: a folder saved by save_to_disk, or hf:NAME."""

    location: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return self.location if Path(self.location).is_dir() else f"hf:{self.location}"


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def input_kind(path: Path) -> str | None:
    """jsonl, text, parquet (each possibly compressed) or None for a file this module cannot read."""
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSIONS else path.suffixes[-1:]
    base = suffixes[0] if suffixes else ""
    if path.suffix == ".parquet":
        return "parquet"
    if base in JSON_SUFFIXES:
        return "jsonl"
    if base in TEXT_SUFFIXES:
        return "text"
    return None


def expand_inputs(patterns: list[str], what: str = "--train_files", dataset_config: str | None = None,
                  dataset_split: str = "train") -> list:
    """Files named directly, matched by a glob, or found (recursively) in a folder; a saved dataset
    folder or hf:NAME as a DatasetInput."""
    if not patterns:
        raise UserError(f"{what}: no input files given")
    inputs: list = []
    for pattern in patterns:
        if pattern.startswith("hf:"):
            inputs.append(DatasetInput(pattern[3:], dataset_config, dataset_split))
            continue
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{what}: no files match '{pattern}'")
            unknown = [path for path in matches if input_kind(path) is None]
            if unknown:
                raise UserError(f"{what}: '{pattern}' reaches {unknown[0]}, which is no input kind this toolkit "
                                "reads (.jsonl, .json, .txt, .md, .parquet, optionally .gz or .zst)")
            inputs.extend(matches)
        elif is_saved_dataset(Path(pattern)):
            inputs.append(DatasetInput(pattern, dataset_config, dataset_split))
        elif os.path.isdir(pattern):
            found = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and input_kind(p) is not None)
            if not found:
                suffixes = " ".join(sorted(CORPUS_SUFFIXES))
                raise UserError(f"{what}: folder '{pattern}' holds no corpus files ({suffixes}, .gz, .zst)")
            inputs.extend(found)
        elif os.path.isfile(pattern):
            if input_kind(Path(pattern)) is None:
                raise UserError(f"{what}: {pattern} is no input kind this toolkit reads (.jsonl, .json, .txt, "
                                ".md, .parquet, optionally .gz or .zst; or a saved dataset folder, or hf:NAME)")
            inputs.append(Path(pattern))
        else:
            raise UserError(f"{what}: file not found: {pattern} (a dataset by name is hf:{pattern})")
    unique: dict = {}  # an input named twice (by any spelling) is read once, first place kept
    for item in inputs:
        unique.setdefault(item.resolve() if isinstance(item, Path) else item, item)
    return list(unique.values())


# ---------------------------------------------------------------- fingerprints (the cache key's view of an input)


SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def input_fingerprint(item) -> list:
    """What identifies an input's content, cheaply: its path, size and a hash of 16 slices of 64 KiB
    spread over it (the whole file when smaller), so a rewritten or appended file is a new input even
    where its modification time lies (a copy, an rsync), without reading hundreds of GB on every run.
    An edit that keeps the size and touches none of the slices goes unseen: delete the cache then."""
    if isinstance(item, DatasetInput):
        return [str(item), item.config, item.split, load_input_dataset(item)._fingerprint]
    path, digest = Path(item), hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= SAMPLES * SAMPLE_BYTES:
            digest.update(handle.read())
        else:
            for i in range(SAMPLES):
                handle.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(handle.read(SAMPLE_BYTES))
    return [str(path.resolve()), size, digest.hexdigest()[:32]]


# ---------------------------------------------------------------- opening each kind


def open_binary(path: Path):
    """The file's bytes, decompressed when it is .gz or .zst."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard  # noqa: PLC0415 - an optional dependency, needed for .zst inputs only

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def is_json_array(path: Path) -> bool:
    """A .json file whose first character is `[` (a .jsonl file is JSON Lines whatever its first line)."""
    if ".json" not in path.suffixes[-2:] or input_kind(path) != "jsonl":
        return False
    with open_binary(path) as handle:
        start = handle.read(4096).lstrip()
    return start.startswith(b"[")


def load_input_dataset(item: DatasetInput):
    from datasets import load_dataset, load_from_disk  # noqa: PLC0415 - heavy; datasets inputs only

    try:
        if Path(item.location).is_dir() and is_saved_dataset(Path(item.location)):
            loaded = load_from_disk(item.location)
        else:
            return load_dataset(item.location, item.config, split=item.split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UserError(f"{item}: cannot load it ({str(error).splitlines()[0]})") from None
    if hasattr(loaded, "keys"):  # a DatasetDict
        if item.split not in loaded:
            raise UserError(f"{item}: no split '{item.split}' (it has {', '.join(loaded)}); see --dataset_split")
        loaded = loaded[item.split]
    return loaded


def decode_line(raw: bytes, path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord(f"{path}:{line_no}: invalid UTF-8 at byte {error.start} of the line") from None


def parse_json_line(raw: bytes, path, line_no: int, kinds: tuple[type, ...] = (dict,)):
    """The JSON value on one line of a JSON Lines file (an object unless `kinds` says otherwise),
    or None for a blank line."""
    line = decode_line(raw, path, line_no).strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadRecord(f"{path}:{line_no}: malformed JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, kinds):
        raise BadRecord(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def text_of(record, where: str, text_field: str) -> str:
    """A record's text field, checked."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(f"{where}: no '{text_field}' field (keys: {keys}); see --text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadRecord(f"{where}: field '{text_field}' is {type(text).__name__}, not a string")
    return text


def raw_rows(item, kinds: tuple[type, ...] = (dict,), text_lines: bool = False
             ) -> Iterator[tuple[str, Callable[[], object]]]:
    """(place, read) for every row of an input: `read()` gives the record (None for a blank line),
    raising BadRecord when the row is unusable, so that it runs inside the reader's skip logic.
    With `text_lines`, a text file's lines are its samples; otherwise every line file is JSON Lines."""
    if isinstance(item, DatasetInput):
        row = 0
        for batch in load_input_dataset(item).iter(batch_size=1000):
            for values in zip(*batch.values()):
                record = dict(zip(batch.keys(), values))
                yield f"{item}: row {row}", (lambda record=record: record)
                row += 1
        return
    path = Path(item)
    kind = input_kind(path)
    if kind == "parquet":
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            for record in batch.to_pylist():
                yield f"{path}: row {row}", (lambda record=record: record)
                row += 1
    elif is_json_array(path):
        with open_binary(path) as handle:
            try:
                records = json.load(handle)
            except UnicodeDecodeError as error:
                raise UserError(f"{path}: invalid UTF-8 at byte {error.start}") from None
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{error.lineno}: malformed JSON ({error.msg}, column {error.colno})") from None
        for number, record in enumerate(records, start=1):
            yield f"{path}: record {number}", (lambda record=record, number=number: _kind_checked(
                record, f"{path}: record {number}", kinds))
    else:
        with open_binary(path) as handle:
            for line_no, raw in enumerate(handle, start=1):
                if text_lines and kind == "text":
                    yield f"{path}:{line_no}", (lambda raw=raw, line_no=line_no: decode_line(
                        raw, path, line_no).rstrip("\r\n"))
                else:
                    yield f"{path}:{line_no}", (lambda raw=raw, line_no=line_no: parse_json_line(
                        raw, path, line_no, kinds))


def _kind_checked(record, where: str, kinds: tuple[type, ...]):
    if not isinstance(record, kinds):
        raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


# ---------------------------------------------------------------- the readers


@dataclass
class ReadStats:
    """What a pass over the corpus found; filled in while reading."""

    files: int = 0
    samples: int = 0
    characters: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT; `skipped` counts them all

    def skip(self, problem: BadRecord) -> None:
        self.skipped += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(str(problem))


def read_records(files: list, convert: Callable[[object, str], object], skip_bad_records: bool = False,
                 stats: ReadStats | None = None, what: str = "records", kinds: tuple[type, ...] = (dict,),
                 require_some: bool = True) -> Iterator:
    """Yield `convert(record, place)` for every record of every input (blank lines and None results
    left out); `convert` raises BadRecord naming that place for a record it cannot use. Records are
    JSON objects unless `kinds` admits more. Inputs with nothing usable in them are an error naming
    `what` was expected (unless `require_some` is False: the caller says it its way)."""
    stats = stats if stats is not None else ReadStats()
    for item in files:
        stats.files += 1
        for where, read in raw_rows(item, kinds):
            try:
                record = read()
                item_ = None if record is None else convert(record, where)
            except BadRecord as problem:
                if not skip_bad_records:
                    raise
                stats.skip(problem)
                continue
            if item_ is not None:
                stats.samples += 1
                yield item_
    if require_some:
        raise_if_nothing_read(files, stats, what)


def iter_texts(files: list, text_field: str = "text", skip_bad_records: bool = False,
               stats: ReadStats | None = None, with_sources: bool = False) -> Iterator:
    """Yield every non-empty sample: a record's text field, or a line of a text file; with
    `with_sources`, as (text, place). A corpus with no text at all is an error; bad records as in
    `read_records`."""
    stats = stats if stats is not None else ReadStats()
    for item in files:
        stats.files += 1
        plain = isinstance(item, Path) and input_kind(item) == "text"
        for where, read in raw_rows(item, text_lines=True):
            try:
                value = read()
                text = value if plain or value is None else text_of(value, where, text_field)
            except BadRecord as problem:
                if not skip_bad_records:
                    raise
                stats.skip(problem)
                continue
            if text and text.strip():
                stats.samples += 1
                stats.characters += len(text)
                yield (text, where) if with_sources else text
    raise_if_nothing_read(files, stats)


def raise_if_nothing_read(files: list, stats: ReadStats, what: str = "text") -> None:
    if stats.samples:
        return
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    if stats.skipped:
        raise UserError(f"no usable {what} in {names}: all {stats.skipped} records were bad, first: {stats.problems[0]}")
    raise UserError(f"no {what} found in {names}: the corpus is empty")


def write_jsonl_atomically(output: Path, records, what: str) -> int:
    """Write to a temporary file and rename it, so a failure (or no records at all) never
    replaces or truncates what the output held before."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(staging, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise UserError(f"no text found in {what}: nothing written")
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return count
