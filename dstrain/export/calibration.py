"""A sample of the user's own data for 4-bit calibration: GPTQ and AWQ choose each layer's rounding
from the activations these samples produce, so they should look like what the model will serve.

Each JSONL record is a conversation (messages, ShareGPT, Alpaca: rendered through the chat
template, as SFT trains on it) or a text record (`--text_field`); text files give one sample per
line. The sample is drawn uniformly from the whole stream with a seeded reservoir, so a corpus of
any size is read once and only the chosen records are kept and tokenized.
"""

import random
from pathlib import Path

from dstrain.data.chat_format import conversation_from_record, detect_format
from dstrain.data.chat_template import render
from dstrain.data.records import JSON_SUFFIXES, expand_inputs, iter_texts, read_records
from dstrain.errors import BadRecord, UserError


def calibration_samples(patterns: list[str], tokenizer, count: int, max_length: int, text_field: str = "text",
                        seed: int = 0, min_tokens: int = 10) -> list[dict]:
    """Up to `count` samples as {"input_ids", "attention_mask"} lists, each cut to `max_length` tokens;
    samples shorter than `min_tokens` teach the quantizer little and are left out."""
    files = expand_inputs(patterns, "--calibration_files")
    chosen = _reservoir(_records(files, tokenizer, text_field), count, random.Random(seed))
    samples = []
    for item in chosen:
        if isinstance(item, list):
            ids = render(tokenizer, item, add_generation_prompt=False)[:max_length]
        else:
            ids = tokenizer(item, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= min_tokens:
            samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    if not samples:
        raise UserError(f"--calibration_files: no sample of at least {min_tokens} tokens in "
                        f"{', '.join(map(str, files[:3]))}")
    return samples


def _records(files: list[Path], tokenizer, text_field: str):
    """Each file's samples: a conversation's messages, or a text."""
    def convert(record: dict, where: str):
        if detect_format(record) is not None:
            if not tokenizer.chat_template:
                raise BadRecord(f"{where}: a conversation, but the model's tokenizer has no chat template")
            return conversation_from_record(record, where)
        text = record.get(text_field)
        if not isinstance(text, str):
            keys = ", ".join(sorted(record)) or "none"
            raise BadRecord(f"{where}: neither a conversation nor a '{text_field}' string (keys: {keys})")
        return text if text.strip() else None

    for path in files:
        if path.suffix in JSON_SUFFIXES:
            yield from read_records([path], convert, what="calibration samples")
        else:
            yield from iter_texts([path], text_field)


def _reservoir(items, count: int, rng: random.Random) -> list:
    """A uniform sample of `count` items from a stream of unknown length (Algorithm R)."""
    kept = []
    for seen, item in enumerate(items):
        if seen < count:
            kept.append(item)
        elif (slot := rng.randrange(seen + 1)) < count:
            kept[slot] = item
    return kept
