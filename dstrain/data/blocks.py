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
from pathlib import Path

from dstrain.data.records import ReadStats, _line_text, iter_parsed_lines, raise_if_nothing_read
from dstrain.data.cache import (ProcessedDatasets, corpus_datasets, length_histogram, list_lengths, records_dataset,
                              with_validation_marks)
from dstrain.distributed import print0
from dstrain.errors import UserError

CACHE_LAYOUT_VERSION = "3"  # bump when the packing below changes, so old caches are not reused


def pretraining_datasets(data_args, tokenizer, block_size: int, seed: int, main_process_first) -> ProcessedDatasets:
    """Train (and, if any, validation) datasets of packed blocks: input_ids, attention_mask, labels, sources."""
    settings = {"text_field": data_args.text_field, "block_size": block_size, "seed": seed}
    packed = corpus_datasets(data_args, "pretrain", CACHE_LAYOUT_VERSION, tokenizer, settings,
                             lambda train, validation, settings, scratch: _tokenize_and_pack(
                                 train, validation, tokenizer, settings, data_args.preprocessing_num_workers, scratch),
                             main_process_first)
    print0(_describe(packed, block_size))
    return packed


def _texts_with_sources(files, text_field, skip_bad_records, stats):
    """(text, "path:line") for every document: corpus.iter_texts, keeping where each came from."""
    def parse(raw, path, line_no):
        text = _line_text(raw, path, line_no, text_field)
        return (text, f"{path}:{line_no}") if text and text.strip() else None

    yield from iter_parsed_lines(files, parse, skip_bad_records, stats)
    raise_if_nothing_read(files, stats)


def _documents(train_files, validation_files, text_field, skip_bad_records, validation_percentage, seed, stats):
    train = _texts_with_sources(train_files, text_field, skip_bad_records, stats["train"])
    validation = (_texts_with_sources(validation_files, text_field, skip_bad_records, stats["validation"])
                  if validation_files else [])
    for (text, source), is_validation in with_validation_marks(train, validation, validation_percentage, seed):
        yield {"text": text, "source": source, "is_validation": is_validation}


def _tokenize_and_pack(train_files, validation_files, tokenizer, settings, num_proc,
                       scratch: Path) -> ProcessedDatasets:
    block_size, eos = settings["block_size"], tokenizer.eos_token_id
    stats = {"train": ReadStats(), "validation": ReadStats()}
    documents = records_dataset(
        _documents, scratch, train_files=train_files, validation_files=validation_files,
        text_field=settings["text_field"], skip_bad_records=settings["skip_bad_records"],
        validation_percentage=settings["validation_percentage"], seed=settings["seed"], stats=stats,
    )
    problems = stats["train"].problems + stats["validation"].problems
    if problems:
        print0(f"Skipped {len(problems)} bad records (--skip_bad_records); first: {problems[0]}")

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

    tokenized = documents.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"], desc="Tokenizing")
    splits = split_by_marks(tokenized, with_validation=settings["validation_percentage"] > 0 or bool(validation_files))
    documents_report = {}
    for name, split in splits.items():
        lengths = list_lengths(split)
        documents_report[name] = {"documents": len(lengths), "tokens": int(lengths.sum()),
                                  "length_histogram": length_histogram(lengths)}
    packed = ProcessedDatasets({
        name: split.map(pack, batched=True, num_proc=num_proc, remove_columns=split.column_names,
                        desc=f"Packing {name} into blocks of {block_size}")
        for name, split in splits.items()
    }, report=documents_report)
    for name, split in packed.items():
        if len(split) == 0:
            tokens = sum(len(ids) for ids in splits[name]["input_ids"])
            hint = ("lower --block_size or add data" if name == "train"
                    else "raise --validation_split_percentage, give --validation_files, or lower --block_size")
            raise UserError(f"the {name} split holds {tokens} tokens, fewer than one block of {block_size}: {hint}")
    return packed


def split_by_marks(dataset, with_validation: bool) -> dict:
    """{"train": ..., "validation": ...} from a dataset whose rows carry `is_validation`."""
    splits = {"train": dataset.filter(lambda marks: [not m for m in marks], input_columns="is_validation",
                                      batched=True).remove_columns("is_validation")}
    if with_validation:
        splits["validation"] = dataset.filter(lambda marks: marks, input_columns="is_validation",
                                              batched=True).remove_columns("is_validation")
    return splits


def _describe(packed: ProcessedDatasets, block_size: int) -> str:
    sizes = ", ".join(f"{name} {len(split):,} blocks ({len(split) * block_size:,} tokens)" for name, split in packed.items())
    return f"Data: {sizes} of {block_size} tokens"
