"""Chat SFT data: token ids with labels only on the assistant replies, and packing without
contamination between conversations.

Which tokens are trained: the assistant replies and the end-of-turn token that closes each
(`<|im_end|>` for ChatML); system, user and template tokens get -100. How they are found:
dstrain/data/chat_template.py.

Length. A conversation longer than max_length is cut after the last assistant reply that
fits whole; one whose first reply does not fit is dropped. Both are counted, with the first
of each by file and line, in the build report the data audit reads (dstrain/audit/).

Provenance. Every conversation keeps `source` ("path:line"); a packed row keeps `sources`, one
per conversation in it, in order. The Trainer leaves these columns out of the batches
(`remove_unused_columns`, on by default: they are no argument of the model's forward).

Packing. Conversations are placed into rows of at most max_length tokens (best fit,
longest first); each row carries position_ids that restart at every conversation, from which
transformers' models build a mask so attention never crosses a boundary (only when the
forward pass builds no KV cache: the collator asks for use_cache=False). With flash attention
the collator flattens a batch into one padding-free row (see PackedRowsCollator).
"""

import json
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Sequence, Value
from transformers import DataCollatorForSeq2Seq

from dstrain.data.cache import (
    DataSpec,
    ProcessedDatasets,
    cap_validation,
    list_lengths,
    processed_datasets,
    skipped_records,
    split_by_marks,
)
from dstrain.data.chat_format import iter_conversations
from dstrain.data.chat_template import IGNORE, tokenize_conversation
from dstrain.data.records import ReadStats
from dstrain.data.token_store import token_dtype
from dstrain.distributed import print0
from dstrain.errors import UserError


def assistant_spans(labels) -> list[tuple[int, int]]:
    """[start, end) of each run of trained tokens."""
    trained = np.concatenate([[False], np.asarray(labels) != IGNORE, [False]])
    edges = np.nonzero(np.diff(trained.astype(np.int8)))[0]
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def fit_to_length(ids: list[int], labels: list[int], max_length: int):
    """Cut after the last assistant reply that fits whole; None if not even the first fits."""
    if len(ids) <= max_length:
        return ids, labels
    ends = [end for _, end in assistant_spans(labels) if end <= max_length]
    if not ends:
        return None
    return ids[:ends[-1]], labels[:ends[-1]]


class _Rooms:
    """The rooms (free tokens) of the open rows, for best fit: the smallest room that holds a length,
    in O(log max_length) (a segment tree over room sizes keeping each range's largest room present),
    and, per room size, the rows that have it, oldest first."""

    def __init__(self, max_length: int):
        self.size = 1 << max(1, (max_length - 1).bit_length())
        self.tree = [0] * (2 * self.size)
        self.rows: dict[int, deque] = {}

    def _set(self, room: int, present: bool) -> None:
        node = self.size + room - 1
        self.tree[node] = room if present else 0
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def take(self, length: int) -> tuple[int, int] | None:
        """(row, its room) of the oldest row with the smallest room >= length, taken out; or None."""
        if self.tree[1] < length:
            return None
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= length else 2 * node + 1
        room = self.tree[node]
        row = self.rows[room].popleft()
        if not self.rows[room]:
            self._set(room, False)
        return row, room

    def put(self, row: int, room: int) -> None:
        if room > 0:
            if not self.rows.setdefault(room, deque()):
                self._set(room, True)
            self.rows[room].append(row)


def packing_plan(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best fit decreasing: (the conversations in row order, each row's first position in that order,
    plus the end). Longest first, each into the open row whose room fits it most tightly, a new row
    when none does; within a row, in the order they were placed. Never cuts a conversation.
    TRL's pack_dataset (also best fit decreasing) is not used: it packs each map batch of 1,000 on its
    own, needs every column to be a token list (not our `source` strings) and gives no position_ids."""
    lengths = np.asarray(lengths, dtype=np.int64)
    placed = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(lengths), dtype=np.int64)
    rooms, rows = _Rooms(max_length), 0
    for index in placed.tolist():
        length = int(lengths[index])
        taken = rooms.take(length)
        if taken is None:
            row, room = rows, max_length
            rows += 1
        else:
            row, room = taken
        row_of[index] = row
        rooms.put(row, room - length)
    order = placed[np.argsort(row_of[placed], kind="stable")]
    return order, np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))])


def pack_into_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices grouped into rows of at most max_length tokens (packing_plan as lists)."""
    order, starts = packing_plan(np.asarray(lengths), max_length)
    return [order[starts[row]:starts[row + 1]].tolist() for row in range(len(starts) - 1)]


def packed_rows(examples: Dataset, max_length: int, batch_rows: int = 1000) -> Dataset:
    """The conversations of `examples` packed by packing_plan: input_ids and labels concatenated,
    position_ids restarting at each conversation, `sources` (with a `source` column), written to Arrow
    a batch of rows at a time from the lengths alone (no Python list of the whole split)."""
    order, starts = packing_plan(list_lengths(examples), max_length)
    columns = ["input_ids", "labels"] + (["source"] if "source" in examples.column_names else [])
    features = {"input_ids": examples.features["input_ids"], "labels": examples.features["labels"],
                "position_ids": Sequence(Value("int32"))} | ({"sources": Sequence(Value("string"))}
                                                              if "source" in columns else {})
    numpy_rows = examples.select_columns(columns).with_format("numpy", columns=["input_ids", "labels"],
                                                              output_all_columns=True)

    def rows():
        for first in range(0, len(starts) - 1, batch_rows):
            last = min(first + batch_rows, len(starts) - 1)
            members = numpy_rows[order[starts[first]:starts[last]]]
            for row in range(first, last):
                within = slice(int(starts[row] - starts[first]), int(starts[row + 1] - starts[first]))
                ids = members["input_ids"][within]
                packed = {"input_ids": np.concatenate(ids), "labels": np.concatenate(members["labels"][within]),
                          "position_ids": np.concatenate([np.arange(len(part), dtype=np.int32) for part in ids])}
                if "source" in columns:
                    packed["sources"] = list(members["source"][within])
                yield packed

    return Dataset.from_generator(rows, features=Features(features))


@dataclass
class PackedRowsCollator:
    """Batch packed rows, keeping each conversation's restarting position_ids.

    With flash attention the batch is flattened into one padding-free row: its kernels take
    the sequence boundaries from the position_ids, but only for a batch of one row. Other
    attention kernels (sdpa, eager) get a mask built from the position_ids per row, and cost
    the square of the row length, so rows stay separate and are padded to the longest; the
    padding is a segment of its own (positions restart) with labels -100.
    transformers' DataCollatorWithFlattening is not used: it recomputes position_ids per
    example, which would merge the conversations inside a packed row; nor is tokenizer.pad: it
    pads neither labels (-100) nor position_ids (a segment of their own).
    Labels of every conversation start with -100 (the template's opening tokens), so no token
    is trained to predict the next conversation's first token.
    """

    pad_token_id: int = 0
    flatten: bool = False
    # --sequence_parallel_size: every rank takes an equal slice of each row, and the SP ranks' batches are
    # gathered together, which gloo allows only for equal shapes: rows are padded to `length` (max_length),
    # a flattened row to a multiple of the size.
    pad_to_multiple_of: int = 1
    length: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        if self.flatten:
            batch = {key: [v for row in rows for v in row[key]] for key in ("input_ids", "labels", "position_ids")}
            n = -len(batch["input_ids"]) % self.pad_to_multiple_of
            batch["input_ids"] += [self.pad_token_id] * n
            batch["labels"] += [IGNORE] * n
            batch["position_ids"] += list(range(n))
            batch = {key: torch.tensor([values]) for key, values in batch.items()}
        else:
            longest = self.length or max(len(row["input_ids"]) for row in rows)
            longest += -longest % self.pad_to_multiple_of
            gap = [longest - len(row["input_ids"]) for row in rows]
            batch = {
                "input_ids": torch.tensor([row["input_ids"] + [self.pad_token_id] * n for row, n in zip(rows, gap)]),
                "labels": torch.tensor([row["labels"] + [IGNORE] * n for row, n in zip(rows, gap)]),
                "position_ids": torch.tensor([row["position_ids"] + list(range(n)) for row, n in zip(rows, gap)]),
            }
        # transformers derives the per-conversation mask from the restarting position_ids only
        # when the forward pass creates no KV cache; with a cache, attention would cross
        # conversations. Asking here keeps the guarantee with the packed batch itself.
        batch["use_cache"] = False
        return batch


def sft_collator(tokenizer, packing: bool, attn_implementation: str | None = None, sequence_parallel_size: int = 1,
                 max_length: int | None = None):
    if packing:
        flash = "flash" in (attn_implementation or "")
        split = sequence_parallel_size > 1
        return PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, flatten=flash,
                                  pad_to_multiple_of=sequence_parallel_size, length=max_length if split else None)
    # Dynamic padding to the longest conversation of the batch, never to max_length.
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)


FIRST_DROPPED = 10  # how many dropped conversations the build report names
KEPT, TRUNCATED, DROPPED = 0, 1, 2  # what fitting to max_length did to a conversation


@dataclass(frozen=True)
class ChatSpec(DataSpec):
    """SFT data: conversations tokenized with the assistant mask, fitted to max_length, maybe packed."""

    kind = "sft"
    layout = "3"  # 3: compact types; token counts in the build report

    data_format: str = "auto"
    system_prompt: str | None = None
    max_length: int = 2048
    packing: bool = False

    def read(self, files: tuple[Path, ...], stats: ReadStats):
        for messages, source in iter_conversations(list(files), self.data_format, self.system_prompt,
                                                   self.skip_bad_records, stats, with_sources=True):
            yield {"messages": messages, "source": source}

    def build(self, tokenizer, records, scratch: Path) -> ProcessedDatasets:
        return _tokenize_fit_pack(self, tokenizer, records)


def sft_datasets(data_args, tokenizer, seed: int) -> ProcessedDatasets:
    """Tokenized (and, with --packing, packed) train and validation datasets for SFT."""
    spec = ChatSpec.from_arguments(data_args, seed, data_format=data_args.data_format,
                                   system_prompt=data_args.system_prompt, max_length=data_args.max_length,
                                   packing=data_args.packing)
    data = processed_datasets(spec, tokenizer)
    if (skipped := skipped_records(data.report)) is not None:
        print0(skipped)
    print0(describe(data, spec.max_length, spec.packing))
    return data


def _tokenize_fit_pack(spec: ChatSpec, tokenizer, conversations: Dataset) -> ProcessedDatasets:
    fitted = conversations.map(
        _tokenize_and_fit, batched=True, batch_size=256, num_proc=_processes(spec.workers, len(conversations)),
        fn_kwargs={"tokenizer": tokenizer, "max_length": spec.max_length}, remove_columns=["messages"],
        features=Features({"input_ids": Sequence(Value(np.dtype(token_dtype(len(tokenizer))).name)),
                           "labels": Sequence(Value("int32")), "source": Value("string"),
                           "is_validation": Value("bool"), "fit": Value("int8"), "first_reply_end": Value("int32")}),
        desc="Tokenizing conversations")
    reports = _length_reports(fitted)
    kept, truncated, dropped = (sum(report[key] for report in reports.values())
                                for key in ("kept", "truncated", "dropped"))
    if kept == 0:
        raise UserError(f"every conversation is longer than --max_length {spec.max_length} "
                        "before its first reply ends; raise --max_length")
    splits = fitted_splits(fitted, spec)
    if spec.packing:
        splits = {name: packed_rows(split, spec.max_length) for name, split in splits.items()}
    for name, split in splits.items():
        reports[name] |= _token_counts(split)
    return ProcessedDatasets(splits, report={name: reports[name] for name in splits})


def _processes(workers: int | None, rows: int) -> int | None:
    """Worker processes for datasets' map: every core for large sets, none for small ones (starting them
    costs more than tokenizing a few thousand conversations)."""
    if rows < 20_000:
        return None
    return workers or len(os.sched_getaffinity(0))


def fitted_splits(fitted, spec) -> dict:
    """The conversations that fit (kept or truncated), validation capped to --max_validation_tokens, split
    into train/validation by their marks (text and image-text chats alike)."""
    fitted = fitted.filter(lambda fits: [fit != DROPPED for fit in fits], input_columns="fit", batched=True)
    fitted = cap_validation(fitted.remove_columns(["fit", "first_reply_end"]), spec.max_validation_tokens)
    splits = split_by_marks(fitted, with_validation=spec.holds_out)
    if "validation" in splits and len(splits["validation"]) == 0:
        raise UserError("the validation split holds no conversation: raise --validation_split_percentage "
                        "or give --validation_files")
    return splits


def _tokenize_and_fit(batch: dict, tokenizer, max_length: int) -> dict:
    """A batch of conversations: ids, labels (-100 but on the replies), fitted to max_length (KEPT,
    TRUNCATED at a turn boundary, or DROPPED: its first reply does not fit, then its ids are empty)."""
    out = {key: [] for key in ("input_ids", "labels", "fit", "first_reply_end")}
    for messages in batch["messages"]:
        ids, labels = tokenize_conversation(tokenizer, messages)
        spans = assistant_spans(labels)
        fitted = fit_to_length(ids, labels, max_length)
        out["first_reply_end"].append(spans[0][1] if spans else -1)
        if fitted is None:
            ids = labels = []
            out["fit"].append(DROPPED)
        else:
            out["fit"].append(TRUNCATED if len(fitted[0]) < len(ids) else KEPT)
            ids, labels = fitted
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out | {"source": batch["source"], "is_validation": batch["is_validation"]}


def _length_reports(fitted: Dataset) -> dict:
    """Per split: conversations kept (whole or truncated), truncated, dropped, and the first dropped by
    file:line with where their first reply ends (for the audit), read from the Arrow columns."""
    columns = fitted.select_columns(["is_validation", "fit"]).with_format("numpy")[:]
    reports = {}
    for name, in_split in (("train", ~columns["is_validation"]), ("validation", columns["is_validation"])):
        fits = columns["fit"][in_split]
        first_dropped = np.nonzero(in_split & (columns["fit"] == DROPPED))[0][:FIRST_DROPPED]
        named = fitted.select(first_dropped) if len(first_dropped) else []
        reports[name] = {"kept": int((fits != DROPPED).sum()), "truncated": int((fits == TRUNCATED).sum()),
                         "dropped": int((fits == DROPPED).sum()),
                         "dropped_first": [{"source": row["source"], "first_reply_end": row["first_reply_end"]}
                                           for row in named]}
    return reports


def _token_counts(split: Dataset) -> dict:
    """Rows, tokens and trained tokens of a split, read from its Arrow labels column."""
    tokens, trained = 0, 0
    for table in split.select_columns(["labels"]).with_format("arrow").iter(batch_size=10_000):
        labels = pc.list_flatten(table.column("labels"))
        tokens += len(labels)
        trained += int(pc.sum(pc.not_equal(labels, IGNORE)).as_py() or 0)
    return {"rows": len(split), "tokens": tokens, "trained_tokens": trained}


def describe(data: ProcessedDatasets, max_length: int, packing: bool) -> str:
    """What fitting did and what each split holds, from the build report: printed by every run, whether
    it built the data or found it in the cache."""
    report = data.report
    kept, truncated, dropped = (sum(report[name][key] for name in data) for key in ("kept", "truncated", "dropped"))
    lines = [f"Conversations: {kept:,} kept, {truncated:,} truncated at a turn boundary and {dropped:,} dropped "
             f"(first reply longer than --max_length {max_length})"]
    for name, split in ((name, report[name]) for name in data):
        shape = (f"{split['rows']:,} packed rows of at most {max_length}" if packing
                 else f"{split['rows']:,} conversations")
        lines.append(f"Data: {name} {shape}, {split['tokens']:,} tokens, {split['trained_tokens']:,} of them trained "
                     f"({split['trained_tokens'] / max(split['tokens'], 1):.0%})")
    return "\n".join(lines)


def write_preview(dataset: Dataset, tokenizer, count: int, path: Path) -> None:
    """The first `count` rows exactly as training will see them, one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in dataset.select(range(min(count, len(dataset)))):
            ids = row["input_ids"]
            preview = {
                "input_ids": ids,
                "labels": row["labels"],
                "position_ids": row.get("position_ids") or list(range(len(ids))),
                "tokens": [tokenizer.decode([token]) for token in ids],
                "trained_text": tokenizer.decode([label for label in row["labels"] if label != IGNORE]),
            }
            handle.write(json.dumps(preview, ensure_ascii=False) + "\n")
    print0(f"Wrote {min(count, len(dataset))} preview rows to {path}")
