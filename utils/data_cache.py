"""Tokenize once: processed datasets cached under a key of their inputs.

The key holds each input file's path, size and modification time, the tokenizer and the
settings, so a changed file or setting builds anew and an unchanged one is loaded. The first
process of each node builds while the others wait (`main_process_first`); the result is
written beside its final place and renamed, so a crash, or a second node racing on a shared
file system, never leaves a half-written cache that a later run would trust.
"""

import hashlib
import json
import os
import random
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, load_from_disk
from datasets.exceptions import DatasetGenerationError

from utils.distributed import print0
from utils.errors import UserError


def file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def tokenizer_identity(tokenizer) -> str:
    content = tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template or "") + str(tokenizer.eos_token_id)
    return hashlib.sha256(content.encode()).hexdigest()


def cached_datasets(cache_root: str, identity: dict, build: Callable[[Path], DatasetDict],
                    main_process_first) -> DatasetDict:
    """Load the datasets cached for `identity`, building them with `build(scratch_dir)` if absent."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    cache_dir = Path(cache_root) / key
    with main_process_first(desc="preparing the data"):
        if (cache_dir / "dataset_dict.json").exists():
            print0(f"Reusing tokenized data from {cache_dir}")
        else:
            _build_into(cache_dir, build)
        return load_from_disk(str(cache_dir))


def _build_into(cache_dir: Path, build: Callable[[Path], DatasetDict]) -> None:
    staging = cache_dir.with_name(f"{cache_dir.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        build(staging / "scratch").save_to_disk(str(staging / "done"))
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
