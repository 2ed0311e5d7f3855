"""Pretraining data: read documents, tokenize them, pack the tokens into fixed blocks.

Documents are joined with an end-of-sequence token between them and cut into
`block_size` blocks whose labels equal their inputs (the model shifts them). The
validation split is drawn per document, before packing, so no document feeds both sides.
Each block keeps `sources`, the documents ("path:line") its tokens come from, and the build
report counts the documents and tokens of each split before packing, for the data audit.

Tokenizing is done once (dstrain/data/cache.py): later runs with the same inputs load the result.
"""

import bisect
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from dstrain.data.cache import (
    DataSpec,
    ProcessedDatasets,
    length_histogram,
    list_lengths,
    processed_datasets,
    split_by_marks,
)
from dstrain.data.records import ReadStats, iter_texts
from dstrain.distributed import print0
from dstrain.errors import UserError


@dataclass(frozen=True)
class BlockSpec(DataSpec):
    """Pretraining data: documents joined with eos and cut into blocks of `block_size` tokens."""

    kind = "pretrain"
    layout = "3"  # bump when the packing below changes

    text_field: str = "text"
    block_size: int = 2048
    num_proc: int | None = field(default=None, compare=False)

    def read(self, files: tuple[Path, ...], stats: ReadStats):
        for text, source in iter_texts(list(files), self.text_field, self.skip_bad_records, stats, with_sources=True):
            yield {"text": text, "source": source}

    def build(self, tokenizer, records, scratch: Path) -> ProcessedDatasets:
        return _tokenize_and_pack(self, tokenizer, records)


def pretraining_datasets(data_args, tokenizer, block_size: int, seed: int, main_process_first) -> ProcessedDatasets:
    """Train (and, if any, validation) datasets of packed blocks: input_ids, attention_mask, labels, sources."""
    spec = BlockSpec.from_arguments(data_args, seed, text_field=data_args.text_field, block_size=block_size,
                                    num_proc=data_args.preprocessing_num_workers)
    packed = processed_datasets(spec, tokenizer, main_process_first)
    print0(_describe(packed, block_size))
    return packed


def _tokenize_and_pack(spec: BlockSpec, tokenizer, documents) -> ProcessedDatasets:
    block_size, eos = spec.block_size, tokenizer.eos_token_id

    def tokenize(batch):
        # The Rust tokenizer directly: batched in parallel, and no warnings about documents
        # longer than the model's context (they are cut into blocks below).
        encodings = tokenizer.backend_tokenizer.encode_batch(batch["text"], add_special_tokens=False)
        return {"input_ids": [enc.ids + [eos] for enc in encodings], "source": batch["source"],
                "is_validation": batch["is_validation"]}

    def pack(batch):
        # The tail shorter than a block is dropped from each batch of 1,000 documents,
        # as run_clm.py does: at most block_size - 1 tokens per batch.
        stream = [token for doc in batch["input_ids"] for token in doc]
        usable = len(stream) - len(stream) % block_size
        starts = range(0, usable, block_size)
        blocks = [stream[i:i + block_size] for i in starts]
        ends = list(itertools.accumulate(len(doc) for doc in batch["input_ids"]))  # each document's end in stream
        sources = [batch["source"][bisect.bisect_right(ends, i):bisect.bisect_left(ends, i + block_size) + 1]
                   for i in starts]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks,
                "sources": sources}

    tokenized = documents.map(tokenize, batched=True, num_proc=spec.num_proc, remove_columns=["text"],
                              desc="Tokenizing")
    splits = split_by_marks(tokenized, with_validation=spec.holds_out)
    documents_report = {}
    for name, split in splits.items():
        lengths = list_lengths(split)
        documents_report[name] = {"documents": len(lengths), "tokens": int(lengths.sum()),
                                  "length_histogram": length_histogram(lengths)}
    packed = ProcessedDatasets({
        name: split.map(pack, batched=True, num_proc=spec.num_proc, remove_columns=split.column_names,
                        desc=f"Packing {name} into blocks of {block_size}")
        for name, split in splits.items()
    }, report=documents_report)
    for name, split in packed.items():
        if len(split) == 0:
            tokens = documents_report[name]["tokens"]
            hint = ("lower --block_size or add data" if name == "train"
                    else "raise --validation_split_percentage, give --validation_files, or lower --block_size")
            raise UserError(f"the {name} split holds {tokens} tokens, fewer than one block of {block_size}: {hint}")
    return packed


def _describe(packed: ProcessedDatasets, block_size: int) -> str:
    sizes = ", ".join(f"{name} {len(split):,} blocks ({len(split) * block_size:,} tokens)" for name, split in packed.items())
    return f"Data: {sizes} of {block_size} tokens"
