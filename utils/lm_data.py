"""Pretraining data: read documents, tokenize them, pack the tokens into fixed blocks.

Documents are joined with an end-of-sequence token between them and cut into
`block_size` blocks whose labels equal their inputs (the model shifts them). The
validation split is drawn per document, before packing, so no document feeds both sides.

Tokenizing is done once: the result is cached under a key made of the input files (path,
size, modification time), the tokenizer and the settings. The first process on each node
builds it while the others wait; later runs with the same inputs load it.
"""

import hashlib
import json
import os
import random
import shutil
import socket
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk
from datasets.exceptions import DatasetGenerationError

from utils.corpus import ReadStats, expand_inputs, iter_texts
from utils.distributed import print0
from utils.errors import UserError

CACHE_LAYOUT_VERSION = "1"  # bump when the packing below changes, so old caches are not reused


def pretraining_datasets(data_args, tokenizer, block_size: int, seed: int, main_process_first) -> DatasetDict:
    """Train (and, if any, validation) datasets of packed blocks: input_ids, attention_mask, labels."""
    train_files = expand_inputs(data_args.train_files, "--train_files")
    validation_files = expand_inputs(data_args.validation_files, "--validation_files") if data_args.validation_files else []
    validation_percentage = 0.0 if validation_files else data_args.validation_split_percentage
    settings = {
        "text_field": data_args.text_field,
        "block_size": block_size,
        "validation_percentage": validation_percentage,
        "seed": seed,
        "skip_bad_records": data_args.skip_bad_records,
    }
    cache_dir = Path(data_args.data_cache_dir) / cache_key(train_files, validation_files, tokenizer, settings)
    with main_process_first(desc="tokenizing the corpus"):
        if (cache_dir / "dataset_dict.json").exists():
            print0(f"Reusing tokenized data from {cache_dir}")
        else:
            _build_and_cache(train_files, validation_files, tokenizer, settings, data_args, cache_dir)
        packed = load_from_disk(str(cache_dir))
    print0(_describe(packed, block_size))
    return packed


def cache_key(train_files, validation_files, tokenizer, settings) -> str:
    def file_identity(path: Path) -> list:
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]

    identity = {
        "version": CACHE_LAYOUT_VERSION,
        "train": [file_identity(p) for p in train_files],
        "validation": [file_identity(p) for p in validation_files],
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "eos": tokenizer.eos_token_id,
        **settings,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _documents(train_files, validation_files, text_field, skip_bad_records, validation_percentage, seed, stats):
    """Every document once, marked for the training or the validation side."""
    draw = random.Random(seed)
    for text in iter_texts(train_files, text_field, skip_bad_records, stats["train"]):
        yield {"text": text, "is_validation": draw.random() * 100 < validation_percentage}
    if validation_files:
        for text in iter_texts(validation_files, text_field, skip_bad_records, stats["validation"]):
            yield {"text": text, "is_validation": True}


def _build_and_cache(train_files, validation_files, tokenizer, settings, data_args, cache_dir: Path) -> None:
    # Written beside the final place, then renamed: a crash or a second node never leaves
    # a half-written cache that a later run would trust.
    staging = cache_dir.with_name(f"{cache_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        packed = _tokenize_and_pack(train_files, validation_files, tokenizer, settings, data_args, staging)
        packed.save_to_disk(str(staging / "packed"))
        try:
            os.replace(staging / "packed", cache_dir)
        except OSError:
            if not (cache_dir / "dataset_dict.json").exists():  # not another node winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tokenize_and_pack(train_files, validation_files, tokenizer, settings, data_args, staging: Path) -> DatasetDict:
    block_size, eos = settings["block_size"], tokenizer.eos_token_id
    stats = {"train": ReadStats(), "validation": ReadStats()}
    try:
        documents = Dataset.from_generator(
            _documents,
            gen_kwargs={
                # tuples, not lists: datasets would try to shard lists across processes
                "train_files": tuple(train_files), "validation_files": tuple(validation_files),
                "text_field": settings["text_field"], "skip_bad_records": settings["skip_bad_records"],
                "validation_percentage": settings["validation_percentage"], "seed": settings["seed"], "stats": stats,
            },
            cache_dir=str(staging / "raw"),
        )
    except DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, UserError):
            raise cause from None
        raise
    skipped = stats["train"].skipped + stats["validation"].skipped
    if skipped:
        print0(f"Skipped {skipped} bad records (--skip_bad_records); first: {(stats['train'].problems + stats['validation'].problems)[0]}")

    def tokenize(batch):
        # The Rust tokenizer directly: batched in parallel, and no warnings about documents
        # longer than the model's context (they are cut into blocks below).
        encodings = tokenizer.backend_tokenizer.encode_batch(batch["text"], add_special_tokens=False)
        return {"input_ids": [enc.ids + [eos] for enc in encodings], "is_validation": batch["is_validation"]}

    def pack(batch):
        # The tail shorter than a block is dropped from each batch of 1,000 documents,
        # as run_clm.py does: at most block_size - 1 tokens per batch.
        stream = [token for doc in batch["input_ids"] for token in doc]
        usable = len(stream) - len(stream) % block_size
        blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    num_proc = data_args.preprocessing_num_workers
    tokenized = documents.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"],
                              desc="Tokenizing")
    splits = {"train": tokenized.filter(lambda marks: [not m for m in marks], input_columns="is_validation", batched=True)}
    if settings["validation_percentage"] > 0 or validation_files:
        splits["validation"] = tokenized.filter(lambda marks: marks, input_columns="is_validation", batched=True)
    packed = DatasetDict({
        name: split.map(pack, batched=True, num_proc=num_proc, remove_columns=split.column_names,
                        desc=f"Packing {name} into blocks of {block_size}")
        for name, split in splits.items()
    })
    for name, split in packed.items():
        if len(split) == 0:
            tokens = sum(len(ids) for ids in splits[name]["input_ids"])
            hint = ("lower --block_size or add data" if name == "train"
                    else "raise --validation_split_percentage, give --validation_files, or lower --block_size")
            raise UserError(f"the {name} split holds {tokens} tokens, fewer than one block of {block_size}: {hint}")
    return packed


def _describe(packed: DatasetDict, block_size: int) -> str:
    sizes = ", ".join(f"{name} {len(split):,} blocks ({len(split) * block_size:,} tokens)" for name, split in packed.items())
    return f"Data: {sizes} of {block_size} tokens"

