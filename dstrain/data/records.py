"""Reading input files, the one way every stage does: JSONL (a record per line) and plain text (a
sample per line), named directly, by glob or by folder.

Everything is streamed line by line, so a corpus larger than memory works, and every problem is
reported as `file:line: what is wrong` (a BadRecord, which --skip_bad_records skips and counts).
`read_records` hands each JSON record to a stage's own converter (a conversation, a preference
pair, a question) with the `file:line` to name in its errors; `iter_texts` reads plain text.
"""

import glob
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dstrain.errors import BadRecord, UserError

JSON_SUFFIXES = {".jsonl", ".json"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
CORPUS_SUFFIXES = JSON_SUFFIXES | TEXT_SUFFIXES


def expand_inputs(patterns: list[str], what: str = "--train_files") -> list[Path]:
    """Files named directly, matched by a glob, or found (recursively) in a folder."""
    if not patterns:
        raise UserError(f"{what}: no input files given")
    files: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{what}: no files match '{pattern}'")
            files.extend(matches)
        elif os.path.isdir(pattern):
            found = sorted(p for p in Path(pattern).rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
            if not found:
                suffixes = " ".join(sorted(CORPUS_SUFFIXES))
                raise UserError(f"{what}: folder '{pattern}' holds no corpus files ({suffixes})")
            files.extend(found)
        elif os.path.isfile(pattern):
            files.append(Path(pattern))
        else:
            raise UserError(f"{what}: file not found: {pattern}")
    unique: dict[Path, Path] = {}  # a file named twice (by any spelling) is read once, first place kept
    for path in files:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord(f"{path}:{line_no}: invalid UTF-8 at byte {error.start} of the line") from None


def parse_json_line(raw: bytes, path: Path, line_no: int, kinds: tuple[type, ...] = (dict,)):
    """The JSON value on one line of a JSON Lines file (an object unless `kinds` says otherwise),
    or None for a blank line."""
    line = _decode_line(raw, path, line_no).strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadRecord(f"{path}:{line_no}: malformed JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, kinds):
        raise BadRecord(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def _line_text(raw: bytes, path: Path, line_no: int, text_field: str) -> str | None:
    """The sample one line holds: a JSONL record's text field, or a text file's line."""
    if path.suffix not in JSON_SUFFIXES:
        return _decode_line(raw, path, line_no).rstrip("\r\n")
    record = parse_json_line(raw, path, line_no)
    if record is None:
        return None
    if text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(f"{path}:{line_no}: no '{text_field}' field (keys: {keys}); see --text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise BadRecord(f"{path}:{line_no}: field '{text_field}' is {type(text).__name__}, not a string")
    return text


@dataclass
class ReadStats:
    """What a pass over the corpus found; filled in while reading."""

    files: int = 0
    samples: int = 0
    characters: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def read_lines(files: list[Path], parse, skip_bad_records: bool = False, stats: ReadStats | None = None):
    """Yield `parse(raw_line, path, line_no)` for every line of every file, None results left out.

    `parse` raises BadRecord for a bad line: that stops the run with its file and line, unless
    `skip_bad_records`, in which case it is counted in `stats` and left out.
    """
    stats = stats if stats is not None else ReadStats()
    for path in files:
        stats.files += 1
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    sample = parse(raw, path, line_no)
                except BadRecord as problem:
                    if not skip_bad_records:
                        raise
                    stats.skipped += 1
                    stats.problems.append(str(problem))
                    continue
                if sample is not None:
                    stats.samples += 1
                    yield sample


def raise_if_nothing_read(files: list[Path], stats: ReadStats, what: str = "text") -> None:
    if stats.samples:
        return
    names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
    if stats.skipped:
        raise UserError(f"no usable {what} in {names}: all {stats.skipped} records were bad, first: {stats.problems[0]}")
    raise UserError(f"no {what} found in {names}: the corpus is empty")


def read_records(files: list[Path], convert: Callable[[object, str], object], skip_bad_records: bool = False,
                 stats: ReadStats | None = None, what: str = "records", kinds: tuple[type, ...] = (dict,),
                 require_some: bool = True) -> Iterator:
    """Yield `convert(record, "file:line")` for every JSON record of every JSONL file (blank lines and
    None results left out); `convert` raises BadRecord naming that place for a record it cannot use.
    Records are JSON objects unless `kinds` admits more. Files with nothing usable in them are an
    error naming `what` was expected (unless `require_some` is False: the caller says it its way)."""
    stats = stats if stats is not None else ReadStats()

    def parse(raw: bytes, path: Path, line_no: int):
        record = parse_json_line(raw, path, line_no, kinds)
        return None if record is None else convert(record, f"{path}:{line_no}")

    yield from read_lines(files, parse, skip_bad_records, stats)
    if require_some:
        raise_if_nothing_read(files, stats, what)


def iter_texts(files: list[Path], text_field: str = "text", skip_bad_records: bool = False,
               stats: ReadStats | None = None, with_sources: bool = False) -> Iterator:
    """Yield every non-empty sample: a JSONL record's text field, or a line of a text file; with
    `with_sources`, as (text, "file:line"). A corpus with no text at all is an error; bad records as
    in `read_lines`."""
    stats = stats if stats is not None else ReadStats()

    def parse(raw, path, line_no):
        text = _line_text(raw, path, line_no, text_field)
        return text if text and text.strip() else None

    def parse_with_source(raw, path, line_no):
        text = parse(raw, path, line_no)
        return (text, f"{path}:{line_no}") if text is not None else None

    for sample in read_lines(files, parse_with_source if with_sources else parse, skip_bad_records, stats):
        stats.characters += len(sample[0] if with_sources else sample)
        yield sample
    raise_if_nothing_read(files, stats)


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
