"""Prompts for online RL (grpo.py): read, checked, measured through the chat template, fitted.

Records: {"prompt": "..."} (one user turn) or {"prompt": [messages ending with the user's turn]}, plus
any other fields (a reference answer, test cases, ...), which reach the reward functions as keyword
arguments, one list entry per completion. The built-in answer rewards read the --answer_field
("answer"); a number there is kept as its text, so 42 and "42" both work. Each row also carries
"source" (file:line), so a reward function can name the record it judges.

The model writes the reply during training, so only the prompt is fitted here: a prompt whose rendering
(with the assistant's opening) is longer than --max_prompt_length is dropped and counted, as the other
stages drop what does not fit; TRL does not cut prompts itself. The prompts stay messages: TRL renders
them through the same chat template when it generates.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from dstrain.data.cache import DataSpec, ProcessedDatasets, processed_datasets, skipped_records, split_by_marks
from dstrain.data.chat_format import check_turn_order
from dstrain.data.chat_template import render
from dstrain.data.pairs import checked_messages
from dstrain.data.records import ReadStats, read_records
from dstrain.distributed import print0
from dstrain.errors import BadRecord, UserError


def prompt_from_record(record: dict, where: str, answer_field: str = "answer") -> dict:
    """A checked prompt record: "prompt" as messages ending with the user's turn, the other fields kept.
    Raises BadRecord naming the record and what is wrong."""
    if "prompt" not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(f"{where}: no 'prompt' (keys: {keys}); a prompt record needs 'prompt' as a string or "
                        "a list of messages")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRecord(f"{where}: 'prompt' is empty")
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = checked_messages(prompt, "prompt", where)
    # A conversation waiting for the assistant: SFT's turn rules, checked on the prompt plus a reply.
    check_turn_order(prompt + [{"role": "assistant", "content": "reply"}], where)
    extra = {key: value for key, value in record.items() if key != "prompt"}
    if "source" in extra or "is_validation" in extra:
        raise BadRecord(f"{where}: 'source' and 'is_validation' are fields this toolkit adds; rename yours")
    if answer_field in extra:
        answer = extra[answer_field]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise BadRecord(f"{where}: '{answer_field}' must be a string or a number, got {type(answer).__name__}")
        extra[answer_field] = str(answer)
    return {"prompt": prompt, **extra, "source": where}


@dataclass(frozen=True)
class PromptSpec(DataSpec):
    """RL prompts: checked, kept as messages, those longer than max_prompt_length tokens dropped."""

    kind = "prompts"
    layout = "1"

    max_prompt_length: int = 512
    answer_field: str = "answer"

    def read(self, files: tuple[Path, ...], stats: ReadStats):
        return read_records(list(files), lambda record, where: prompt_from_record(record, where, self.answer_field),
                            self.skip_bad_records, stats, "prompts")

    def build(self, tokenizer, records: Dataset, scratch: Path) -> ProcessedDatasets:
        measured = records.map(_measure, batched=True, batch_size=256, fn_kwargs={"tokenizer": tokenizer},
                               num_proc=None if len(records) < 20_000 else self.workers or len(os.sched_getaffinity(0)),
                               desc="Measuring prompts")
        columns = measured.select_columns(["is_validation", "prompt_tokens"]).with_format("numpy")[:]
        fits = columns["prompt_tokens"] <= self.max_prompt_length
        if not fits.any():
            raise UserError(f"no prompt fits in --max_prompt_length {self.max_prompt_length} tokens "
                            f"(the shortest has {int(columns['prompt_tokens'].min())}): raise it")
        kept = measured.filter(lambda lengths: [n <= self.max_prompt_length for n in lengths],
                               input_columns="prompt_tokens", batched=True)
        splits = split_by_marks(kept.remove_columns("prompt_tokens"), with_validation=self.holds_out)
        if "validation" in splits and len(splits["validation"]) == 0:
            raise UserError("the validation split holds no prompt: raise --validation_split_percentage "
                            "or give --validation_files")
        report = {}
        for name, in_split in (("train", ~columns["is_validation"]), ("validation", columns["is_validation"])):
            if name in splits:
                lengths = columns["prompt_tokens"][in_split]
                report[name] = {"rows": len(splits[name]), "dropped": int((lengths > self.max_prompt_length).sum()),
                                "tokens": int(lengths[lengths <= self.max_prompt_length].sum())}
        return ProcessedDatasets(splits, report=report)


def _measure(batch: dict, tokenizer) -> dict:
    return {"prompt_tokens": np.array([len(render(tokenizer, messages, add_generation_prompt=True))
                                       for messages in batch["prompt"]], dtype=np.int64)}


def prompt_length_limit(max_prompt_length: int | None, max_completion_length: int, context: int | None) -> int:
    """--max_prompt_length, by default the room the model's context leaves beside the completion."""
    if context and (max_prompt_length or 1) + max_completion_length > context:
        raise UserError(f"--max_prompt_length {max_prompt_length or 1} + --max_completion_length {max_completion_length} "
                        f"exceed the model's context of {context} tokens")
    if max_prompt_length is None:
        return context - max_completion_length if context else 1024
    return max_prompt_length


def prompt_datasets(data_args, tokenizer, seed: int, max_prompt_length: int) -> ProcessedDatasets:
    """Train (and validation) prompts: "prompt" messages, the records' other fields, "source"."""
    spec = PromptSpec.from_arguments(data_args, seed, max_prompt_length=max_prompt_length,
                                     answer_field=data_args.answer_field)
    data = processed_datasets(spec, tokenizer)
    if (skipped := skipped_records(data.report)) is not None:
        print0(skipped)
    print0(describe(data, spec.max_prompt_length))
    return data


def describe(data: ProcessedDatasets, max_prompt_length: int) -> str:
    dropped = sum(data.report[name]["dropped"] for name in data)
    lines = [f"Prompts: {sum(data.report[name]['rows'] for name in data):,} kept, {dropped:,} dropped "
             f"(longer than --max_prompt_length {max_prompt_length} tokens)"]
    lines += [f"Data: {name} {data.report[name]['rows']:,} prompts, {data.report[name]['tokens']:,} tokens"
              for name in data]
    return "\n".join(lines)
