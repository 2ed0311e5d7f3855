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

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq

from dstrain.data.cache import DataSpec, ProcessedDatasets, processed_datasets, split_by_marks
from dstrain.data.chat_format import iter_conversations
from dstrain.data.chat_template import IGNORE, tokenize_conversation
from dstrain.data.records import ReadStats
from dstrain.distributed import print0
from dstrain.errors import UserError


def assistant_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained tokens."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def fit_to_length(ids: list[int], labels: list[int], max_length: int):
    """Cut after the last assistant reply that fits whole; None if not even the first fits."""
    if len(ids) <= max_length:
        return ids, labels
    ends = [end for _, end in assistant_spans(labels) if end <= max_length]
    if not ends:
        return None
    return ids[:ends[-1]], labels[:ends[-1]]


def pack_into_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices grouped into rows of at most max_length tokens: best fit, longest first, over the whole
    split. TRL's pack_dataset (also best fit decreasing) is not used: it packs each map batch of 1,000
    on its own, needs every column to be a token list (not our `source` strings) and gives no position_ids."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), kept sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            rows.append([index])
            room, row = max_length - lengths[index], len(rows) - 1
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            room -= lengths[index]
        bisect.insort(free, (room, row))
    return rows


def packed_rows(examples: Dataset, max_length: int) -> Dataset:
    rows = pack_into_rows([len(ids) for ids in examples["input_ids"]], max_length)
    input_ids, labels = examples["input_ids"], examples["labels"]
    packed = {
        "input_ids": [[t for i in row for t in input_ids[i]] for row in rows],
        "labels": [[t for i in row for t in labels[i]] for row in rows],
        "position_ids": [[p for i in row for p in range(len(input_ids[i]))] for row in rows],
    }
    if "source" in examples.column_names:
        sources = examples["source"]
        packed["sources"] = [[sources[i] for i in row] for row in rows]
    return Dataset.from_dict(packed)


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

    def __call__(self, rows: list[dict]) -> dict:
        if self.flatten:
            batch = {key: torch.tensor([[v for row in rows for v in row[key]]])
                     for key in ("input_ids", "labels", "position_ids")}
        else:
            longest = max(len(row["input_ids"]) for row in rows)
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


def sft_collator(tokenizer, packing: bool, attn_implementation: str | None = None):
    if packing:
        flash = "flash" in (attn_implementation or "")
        return PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, flatten=flash)
    # Dynamic padding to the longest conversation of the batch, never to max_length.
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)


FIRST_DROPPED = 10  # how many dropped conversations the build report names


@dataclass
class LengthReport:
    """What fitting to max_length did to one split; `dropped_first` names the first few dropped."""

    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_first: list = field(default_factory=list)  # {"source": "path:line", "first_reply_end": tokens}

    def count(self, source: str, ids: list[int], labels: list[int], fitted) -> None:
        if fitted is None:
            self.dropped += 1
            if len(self.dropped_first) < FIRST_DROPPED:
                spans = assistant_spans(labels)
                self.dropped_first.append({"source": source, "first_reply_end": spans[0][1] if spans else None})
            return
        self.kept += 1
        self.truncated += len(fitted[0]) < len(ids)


@dataclass(frozen=True)
class ChatSpec(DataSpec):
    """SFT data: conversations tokenized with the assistant mask, fitted to max_length, maybe packed."""

    kind = "sft"
    layout = "2"  # 2: source / sources columns and the build report

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
    return processed_datasets(spec, tokenizer)


def _tokenize_fit_pack(spec: ChatSpec, tokenizer, conversations) -> ProcessedDatasets:
    reports = {"train": LengthReport(), "validation": LengthReport()}
    rows = {"input_ids": [], "labels": [], "source": [], "is_validation": []}
    for record in conversations:
        ids, labels = tokenize_conversation(tokenizer, record["messages"])
        fitted = fit_to_length(ids, labels, spec.max_length)
        reports["validation" if record["is_validation"] else "train"].count(record["source"], ids, labels, fitted)
        if fitted is None:
            continue
        rows["input_ids"].append(fitted[0])
        rows["labels"].append(fitted[1])
        rows["source"].append(record["source"])
        rows["is_validation"].append(record["is_validation"])
    kept, truncated, dropped = (sum(getattr(report, key) for report in reports.values())
                                for key in ("kept", "truncated", "dropped"))
    print0(f"Conversations: {kept:,} kept, {truncated:,} truncated at a turn boundary and "
           f"{dropped:,} dropped (first reply longer than --max_length {spec.max_length})")
    if kept == 0:
        raise UserError(f"every conversation is longer than --max_length {spec.max_length} "
                        "before its first reply ends; raise --max_length")

    splits = split_by_marks(Dataset.from_dict(rows), with_validation=spec.holds_out)
    if "validation" in splits and len(splits["validation"]) == 0:
        raise UserError("the validation split holds no conversation: raise --validation_split_percentage "
                        "or give --validation_files")
    if spec.packing:
        splits = {name: packed_rows(split, spec.max_length) for name, split in splits.items()}
    for name, split in splits.items():
        print0(_describe(name, split, spec.max_length, spec.packing))
    return ProcessedDatasets(splits, report={name: asdict(reports[name]) for name in splits})


def _describe(name: str, split: Dataset, max_length: int, packing: bool) -> str:
    tokens = sum(len(ids) for ids in split["input_ids"])
    trained = sum(sum(1 for label in labels if label != IGNORE) for labels in split["labels"])
    shape = f"{len(split):,} packed rows of at most {max_length}" if packing else f"{len(split):,} conversations"
    return f"Data: {name} {shape}, {tokens:,} tokens, {trained:,} of them trained ({trained / max(tokens, 1):.0%})"


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
