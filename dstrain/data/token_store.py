"""Pretraining's tokenized documents: one store per input, written once, read memory-mapped.

A store folder holds
  tokens.bin   every document's token ids, each followed by eos, concatenated: uint16 when the
               vocabulary has fewer than 65,536 ids, else uint32 (2 or 4 bytes a token, and nothing else)
  offsets.bin  int64, documents + 1: document i is tokens[offsets[i]:offsets[i + 1]]
  rows.bin     int64, documents: the line (or row, or record) of the input each document came from
  meta.json    the input, how its places are named, the dtype, the counts, the largest id, how often the
               pad id occurs, and the bad records skipped (the first ones named)
Labels and attention masks are not stored: the collator makes them (they equal the ids, and all
ones). Blocks are not stored either: dstrain/data/blocks.py cuts them from the stores at read time.

Building reads the input in chunks of about 4 MB in this process and tokenizes them in worker
processes (every core; `TOKENIZERS_PARALLELISM` off in each, so W workers use W cores), at most
2 x W chunks in flight, writing each result in input order as it comes back: memory stays flat
whatever the corpus size, and the result is the same whatever the number of workers.
"""

import itertools
import json
import multiprocessing
import os
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dstrain.data.records import (
    DatasetInput,
    ReadStats,
    decode_line,
    input_kind,
    is_json_array,
    load_input_dataset,
    open_binary,
    parse_json_line,
    raise_if_nothing_read,
    raw_rows,
    text_of,
)
from dstrain.errors import BadRecord, UserError

CHUNK_BYTES = 4 << 20
ROWS_PER_CHUNK = 4_000
INLINE_BELOW_BYTES = 8 << 20  # smaller inputs are tokenized in this process: starting workers costs more


def token_dtype(vocabulary_size: int):
    return np.uint16 if vocabulary_size <= 1 << 16 else np.uint32


@dataclass
class TokenStore:
    """A built store, memory-mapped on first use (so that it pickles cheaply into dataloader workers)."""

    folder: Path

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._tokens = self._offsets = self._rows = None

    def __getstate__(self):
        return {"folder": self.folder, "meta": self.meta, "_tokens": None, "_offsets": None, "_rows": None}

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.folder / "tokens.bin", dtype=self.meta["dtype"], mode="r")
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.memmap(self.folder / "offsets.bin", dtype=np.int64, mode="r")
        return self._offsets

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.memmap(self.folder / "rows.bin", dtype=np.int64, mode="r")
        return self._rows

    @property
    def documents(self) -> int:
        return self.meta["documents"]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def place(self, document: int) -> str:
        """Where document `document` came from: "file:line", "file: row N" or "file: record N"."""
        row, source = int(self.rows[document]), self.meta["input"]
        return {"line": f"{source}:{row}", "row": f"{source}: row {row}", "record": f"{source}: record {row}"}[
            self.meta["places"]]


# ---------------------------------------------------------------- reading an input in chunks (this process)


def _chunks(item, text_field: str):
    """("lines", path, first line number, raw lines) or ("texts", place kind, name, first row, texts),
    each about CHUNK_BYTES or ROWS_PER_CHUNK rows, in input order."""
    if isinstance(item, DatasetInput):
        dataset = load_input_dataset(item)
        if text_field not in dataset.column_names:
            raise UserError(f"{item}: no '{text_field}' column (columns: {', '.join(dataset.column_names)}); "
                            "see --text_field")
        for start, batch in zip(itertools.count(0, ROWS_PER_CHUNK),
                                dataset.select_columns([text_field]).iter(batch_size=ROWS_PER_CHUNK)):
            yield ("texts", "row", str(item), start, batch[text_field])
        return
    path = Path(item)
    if input_kind(path) == "parquet":
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise UserError(f"{path}: no '{text_field}' column (columns: {', '.join(parquet.schema_arrow.names)}); "
                            "see --text_field")
        start = 0
        for batch in parquet.iter_batches(batch_size=ROWS_PER_CHUNK, columns=[text_field]):
            texts = batch.column(0).to_pylist()
            yield ("texts", "row", str(path), start, texts)
            start += len(texts)
    elif is_json_array(path):
        records = [value for _, value in ((where, read()) for where, read in raw_rows(path))]
        for start in range(0, len(records), ROWS_PER_CHUNK):
            yield ("records", "record", str(path), start + 1, records[start:start + ROWS_PER_CHUNK])
    else:
        with open_binary(path) as handle:
            lines, size, first = [], 0, 1
            for line_no, raw in enumerate(handle, start=1):
                lines.append(raw)
                size += len(raw)
                if size >= CHUNK_BYTES:
                    yield ("lines", str(path), first, lines)
                    lines, size, first = [], 0, line_no + 1
            if lines:
                yield ("lines", str(path), first, lines)


# ---------------------------------------------------------------- tokenizing a chunk (a worker process)


_WORKER = {}


def _start_worker(tokenizer_json: str, eos: int, text_field: str, skip_bad_records: bool, dtype: str,
                  pad: int | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    from tokenizers import Tokenizer  # noqa: PLC0415 - in the worker

    _WORKER.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, text_field=text_field,
                   skip=skip_bad_records, dtype=np.dtype(dtype), pad=pad)


def _start_pool_worker(*settings) -> None:
    # The run's preemption handler came with the fork: here it would keep a worker alive through the
    # SIGTERM of `Pool.terminate()` (the pool's way out on an error), and the parent would wait forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _start_worker(*settings)


def _chunk_texts(chunk) -> tuple[list[str], list[int], list[str], int]:
    """The chunk's non-empty texts, their row numbers, the problems of the records skipped, how many."""
    texts, rows, problems, skipped = [], [], [], 0
    kind = chunk[0]
    if kind == "lines":
        _, path, first, lines = chunk
        plain = input_kind(Path(path)) == "text"
        values = (((lambda raw=raw, n=n: decode_line(raw, path, n).rstrip("\r\n")) if plain else
                   (lambda raw=raw, n=n: parse_json_line(raw, path, n)), n, f"{path}:{n}")
                  for n, raw in enumerate(lines, start=first))
    else:
        _, places, name, first, items = chunk
        label = {"row": "row", "record": "record"}[places]
        values = (((lambda item=item: item), n, f"{name}: {label} {n}")
                  for n, item in enumerate(items, start=first))
        plain = False
    for read, row, where in values:
        try:
            value = read()
            if kind == "texts" and not isinstance(value, str):
                raise BadRecord(f"{where}: field '{_WORKER['text_field']}' is {type(value).__name__}, not a string")
            text = value if plain or kind == "texts" or value is None else text_of(value, where, _WORKER["text_field"])
        except BadRecord as problem:
            if not _WORKER["skip"]:
                raise
            skipped += 1
            problems.append(str(problem))
            continue
        if text and text.strip():
            texts.append(text)
            rows.append(row)
    return texts, rows, problems, skipped


def _tokenize_chunk(chunk) -> dict:
    texts, rows, problems, skipped = _chunk_texts(chunk)
    encodings = _WORKER["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)
    ids = [encoding.ids + [_WORKER["eos"]] for encoding in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=_WORKER["dtype"], count=int(lengths.sum()))
    read = sum(map(len, chunk[3])) if chunk[0] == "lines" else sum(len(text or "") for text in texts)
    return {"tokens": tokens, "lengths": lengths, "rows": np.asarray(rows, dtype=np.int64), "problems": problems[:10],
            "bytes": read,
            "skipped": skipped, "characters": sum(map(len, texts)),
            "max_id": int(tokens.max()) if len(tokens) else -1,
            "pad": int(np.count_nonzero(tokens == _WORKER["pad"])) if _WORKER["pad"] is not None else 0}


# ---------------------------------------------------------------- building a store


def input_bytes(item) -> int:
    """About how many bytes of text an input holds (compressed files count 4x their size)."""
    if isinstance(item, DatasetInput):
        return load_input_dataset(item).data.nbytes
    size = Path(item).stat().st_size
    return size * 4 if Path(item).suffix in (".gz", ".zst") else size


def build_store(item, tokenizer, text_field: str, skip_bad_records: bool, workers: int | None, folder: Path,
                show_progress: bool = True) -> None:
    """Tokenize `item` into a store written in `folder` (which must not exist yet), with a progress bar
    (bytes read, tokens/s, time left) when `show_progress`.

    """
    folder.mkdir(parents=True)
    progress = tqdm(total=input_bytes(item), unit="B", unit_scale=True, desc=f"Tokenizing {Path(str(item)).name}",
                    disable=not show_progress, mininterval=2, leave=False)
    dtype = token_dtype(len(tokenizer))
    settings = (tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id, text_field, skip_bad_records,
                np.dtype(dtype).name, tokenizer.pad_token_id)
    workers = workers or len(os.sched_getaffinity(0))
    stats = ReadStats(files=1)
    totals = {"documents": 0, "tokens": 0, "max_id": -1, "pad": 0, "problems": []}
    with progress, open(folder / "tokens.bin", "wb") as tokens, open(folder / "offsets.bin", "wb") as offsets, \
            open(folder / "rows.bin", "wb") as rows:
        np.zeros(1, dtype=np.int64).tofile(offsets)

        def write(result: dict) -> None:
            progress.update(result["bytes"])
            progress.set_postfix(tokens_per_s=f"{totals['tokens'] / max(progress.format_dict['elapsed'], 1e-9):,.0f}",
                                 refresh=False)
            result["tokens"].tofile(tokens)
            (totals["tokens"] + np.cumsum(result["lengths"])).tofile(offsets)
            result["rows"].tofile(rows)
            totals["documents"] += len(result["lengths"])
            totals["tokens"] += int(result["lengths"].sum())
            totals["max_id"] = max(totals["max_id"], result["max_id"])
            totals["pad"] += result["pad"]
            stats.samples += len(result["lengths"])
            stats.characters += result["characters"]
            stats.skipped += result["skipped"]
            stats.problems += result["problems"][:max(0, 100 - len(stats.problems))]

        if workers == 1 or input_bytes(item) < INLINE_BELOW_BYTES:
            _start_worker(*settings)
            for chunk in _chunks(item, text_field):
                write(_tokenize_chunk(chunk))
        else:
            # fork, as datasets' map does: spawn would import the entry script (torch, transformers) in every
            # worker. The workers use numpy and the tokenizer only, never the parent's threads or CUDA.
            context = multiprocessing.get_context("fork")
            with context.Pool(workers, initializer=_start_pool_worker, initargs=settings) as pool:
                pending = deque()
                for chunk in _chunks(item, text_field):
                    pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
                    if len(pending) >= 2 * workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
    raise_if_nothing_read([item], stats)
    places = "row" if isinstance(item, DatasetInput) or input_kind(Path(item)) == "parquet" else \
        "record" if is_json_array(Path(item)) else "line"
    meta = {"input": str(item), "places": places, "dtype": np.dtype(dtype).name, "documents": totals["documents"],
            "tokens": totals["tokens"], "characters": stats.characters, "max_id": totals["max_id"],
            "pad_tokens": totals["pad"], "eos": tokenizer.eos_token_id, "skipped": stats.skipped,
            "problems": stats.problems}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
