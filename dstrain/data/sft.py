"""Chat SFT data: token ids with labels only on the assistant replies, and packing without
contamination between conversations.

Which tokens are trained. The assistant replies and the end-of-turn token that closes each
(`<|im_end|>` for ChatML); system, user and template tokens get -100. Two ways to find them:
- templates with `{% generation %}` markers (this project's tokenizers, and any whose template
  has them): the template's own mask, `apply_chat_template(return_assistant_tokens_mask=True)`;
- other templates (most published ones, e.g. Qwen2.5, Llama 3, Mistral): each assistant turn's
  tokens are found by rendering the conversation up to that turn with the generation prompt
  and again with the reply; the tokens in between, up to and including the last special token
  among them (the end-of-turn token), are the reply. A template whose rendering of a prefix is
  not a prefix of the whole (it rewrites earlier turns) is refused with a clear error.
Both find the reply by position, never by searching the text, so content that looks like
template markup (`<|im_start|>assistant`) cannot move the mask.

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

from dstrain.data.chat_format import conversation_from_record
from dstrain.data.records import ReadStats, iter_parsed_lines, parse_json_line, raise_if_nothing_read
from dstrain.data.cache import ProcessedDatasets, corpus_datasets, records_dataset, with_validation_marks
from dstrain.distributed import print0
from dstrain.errors import UserError
from dstrain.data.blocks import split_by_marks

IGNORE = -100
CACHE_LAYOUT_VERSION = "2"  # 2: source / sources columns and the build report
# Conversations longer than the model are fitted below; the tokenizer's warning that a sequence
# exceeds model_max_length would only mislead.
QUIET = {"verbose": False}


def has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "generation %}" in template and "endgeneration" in template


def require_chat_template(tokenizer, where: str) -> None:
    if not tokenizer.chat_template:
        raise UserError(f"{where}: the tokenizer has no chat template; train one with tokenizer.py (ChatML) "
                        "or use a model that ships one")


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 outside the assistant replies."""
    if has_generation_markers(tokenizer):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True, tokenizer_kwargs=QUIET)
        ids = list(encoded["input_ids"])
        return ids, [token if keep else IGNORE for token, keep in zip(ids, encoded["assistant_masks"])]
    return _tokenize_by_prefixes(tokenizer, messages)


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tokenizer_kwargs=QUIET,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def _tokenize_by_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    special = set(tokenizer.all_special_ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], add_generation_prompt=True)
        through = _render(tokenizer, messages[:turn + 1], add_generation_prompt=False)
        if ids[:len(before)] != before or ids[:len(through)] != through:
            raise UserError("the chat template renders a conversation's beginning differently from the whole "
                            "conversation, so the assistant tokens cannot be located; use a template with "
                            "{% generation %} markers")
        reply = list(range(len(before), len(through)))
        closing = [i for i in reply if ids[i] in special]
        end = closing[-1] + 1 if closing else len(through)  # through the end-of-turn token, not past it
        for i in range(len(before), end):
            labels[i] = ids[i]
    return ids, labels


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
    """Indices grouped into rows of at most max_length tokens: best fit, longest first."""
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
    example, which would merge the conversations inside a packed row.
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


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant reply (<|im_end|> for ChatML), read off the template."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    _, labels = tokenize_conversation(tokenizer, probe)
    trained = [label for label in labels if label != IGNORE]
    special = set(tokenizer.all_special_ids)
    return trained[-1] if trained and trained[-1] in special else tokenizer.eos_token_id


def configure_chat_generation(model, tokenizer) -> None:
    """Make `generate` stop at the end of an assistant turn, not only at eos, in the saved model."""
    set_chat_stops(model.generation_config, tokenizer)


def set_chat_stops(generation_config, tokenizer) -> None:
    generation_config.eos_token_id = list(dict.fromkeys([end_of_turn_id(tokenizer), tokenizer.eos_token_id]))
    generation_config.pad_token_id = tokenizer.pad_token_id


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


def sft_datasets(data_args, tokenizer, seed: int, main_process_first) -> ProcessedDatasets:
    """Tokenized (and, with --packing, packed) train and validation datasets for SFT."""
    settings = {"data_format": data_args.data_format, "system_prompt": data_args.system_prompt,
                "max_length": data_args.max_length, "packing": data_args.packing, "seed": seed}
    return corpus_datasets(data_args, "sft", CACHE_LAYOUT_VERSION, tokenizer, settings,
                           lambda train, validation, settings, scratch: _build(train, validation, tokenizer, settings,
                                                                               scratch),
                           main_process_first)


def _conversations_with_sources(files, data_format, system_prompt, skip_bad_records, stats):
    """(messages, "path:line") per record: chat_data.iter_conversations, keeping where each came from."""
    def parse(raw, path, line_no):
        record = parse_json_line(raw, path, line_no)
        if record is None:
            return None
        return conversation_from_record(record, f"{path}:{line_no}", data_format, system_prompt), f"{path}:{line_no}"

    yield from iter_parsed_lines(files, parse, skip_bad_records, stats)
    raise_if_nothing_read(files, stats, "conversations")


def _conversations(train_files, validation_files, data_format, system_prompt, skip_bad_records,
                   validation_percentage, seed, stats):
    read = lambda files, key: _conversations_with_sources(files, data_format, system_prompt, skip_bad_records,
                                                          stats[key])
    validation = read(validation_files, "validation") if validation_files else []
    for (messages, source), is_validation in with_validation_marks(read(train_files, "train"), validation,
                                                                   validation_percentage, seed):
        yield {"messages": messages, "source": source, "is_validation": is_validation}


def _build(train_files, validation_files, tokenizer, settings, scratch: Path) -> ProcessedDatasets:
    stats = {"train": ReadStats(), "validation": ReadStats()}
    conversations = records_dataset(
        _conversations, scratch, train_files=train_files, validation_files=validation_files,
        data_format=settings["data_format"], system_prompt=settings["system_prompt"],
        skip_bad_records=settings["skip_bad_records"], validation_percentage=settings["validation_percentage"],
        seed=settings["seed"], stats=stats,
    )
    problems = stats["train"].problems + stats["validation"].problems
    if problems:
        print0(f"Skipped {len(problems)} bad records (--skip_bad_records); first: {problems[0]}")

    reports = {"train": LengthReport(), "validation": LengthReport()}
    rows = {"input_ids": [], "labels": [], "source": [], "is_validation": []}
    for record in conversations:
        ids, labels = tokenize_conversation(tokenizer, record["messages"])
        fitted = fit_to_length(ids, labels, settings["max_length"])
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
           f"{dropped:,} dropped (first reply longer than --max_length {settings['max_length']})")
    if kept == 0:
        raise UserError(f"every conversation is longer than --max_length {settings['max_length']} "
                        "before its first reply ends; raise --max_length")

    tokenized = Dataset.from_dict(rows)
    splits = split_by_marks(tokenized, with_validation=settings["validation_percentage"] > 0 or bool(validation_files))
    if "validation" in splits and len(splits["validation"]) == 0:
        raise UserError("the validation split holds no conversation: raise --validation_split_percentage "
                        "or give --validation_files")
    if settings["packing"]:
        splits = {name: packed_rows(split, settings["max_length"]) for name, split in splits.items()}
    for name, split in splits.items():
        print0(_describe(name, split, settings["max_length"], settings["packing"]))
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
