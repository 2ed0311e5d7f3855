"""Preference pairs for reward modelling and DPO: read, check, render through the chat template, fit.

Record forms (detected per record):
  strings     {"prompt": "...", "chosen": "...", "rejected": "..."}
              A prompt written as an Anthropic HH transcript ("Human: ...\n\nAssistant: ...\n\nHuman: ...
              \n\nAssistant:") becomes its turns; any other string is one user turn.
  chat        {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
              (TRL's conversational form; a side may also be a plain string).
  implicit    {"chosen": [messages], "rejected": [messages]}: two whole conversations that share
              every turn but the last assistant reply, which is the prompt.
An optional numeric "margin" (how much better chosen is) feeds the reward loss.

Both sides of a pair are rendered the same way: prompt + reply through the tokenizer's chat
template, so they share the exact prompt tokens and differ only in the reply. A pair longer than
max_length loses its oldest exchanges (whole user/assistant turns, the system turn kept) until it
fits; one whose last user turn and longer reply do not fit even alone is dropped. Both are counted.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Sequence, Value

from dstrain.data.cache import (
    DataSpec,
    ProcessedDatasets,
    cap_validation,
    list_lengths,
    processed_datasets,
    skipped_records,
    split_by_marks,
)
from dstrain.data.chat_format import check_turn_order
from dstrain.data.chat_template import render
from dstrain.data.records import ReadStats, read_records
from dstrain.data.token_store import token_dtype
from dstrain.distributed import print0
from dstrain.errors import BadRecord, UserError

SIDES = ("chosen", "rejected")
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]*")


# ---------------------------------------------------------------- reading and checking records


def transcript_turns(prompt: str) -> list[dict]:
    """An HH transcript ("Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") as turns; any other
    string as one user turn."""
    if not (prompt.startswith("Human:") and prompt.rstrip().endswith("Assistant:")):
        return [{"role": "user", "content": prompt}]
    parts = HH_TURN.split(prompt)  # ["", "Human", "a", "Assistant", "b", ..., "Assistant", ""]
    speakers, texts = parts[1::2], parts[2::2]
    role = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": role[speaker], "content": text.strip()} for speaker, text in zip(speakers[:-1], texts[:-1])]
    return turns


def _reply(value, side: str, where: str) -> str:
    """One side's reply text: a string, or a list holding one assistant message."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise BadRecord(f"{where}: '{side}' must be one assistant message (or a string); "
                            f"got a list of {len(value)} messages")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise BadRecord(f"{where}: '{side}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord(f"{where}: '{side}' is empty")
    return value


def checked_messages(value, what: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{where}: '{what}' must be a string or a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord(f"{where}: {what} message {i} must be an object with 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_implicit_prompt(record: dict, where: str) -> tuple[list[dict], str, str]:
    """{"chosen": [...], "rejected": [...]}: the shared turns are the prompt, the last replies the sides.
    Not TRL's extract_prompt: it takes the longest common prefix, so sides that differ before their last
    reply would pass silently as multi-turn replies; here they are a bad record."""
    chosen, rejected = (checked_messages(record[side], side, where) for side in SIDES)
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord(f"{where}: no 'prompt', and 'chosen' and 'rejected' differ before their last turn, "
                        "so the shared prompt cannot be found")
    return chosen[:-1], _reply(chosen[-1:], "chosen", where), _reply(rejected[-1:], "rejected", where)


def pair_from_record(record: dict, where: str) -> dict:
    """A checked pair: {"prompt": messages ending with the user's turn, "chosen": str, "rejected": str,
    "margin": float}. Raises BadRecord naming the record and what is wrong."""
    missing = [side for side in SIDES if side not in record]
    if missing:
        keys = ", ".join(sorted(record)) or "none"
        raise BadRecord(f"{where}: no '{missing[0]}' (keys: {keys}); a pair needs 'prompt', 'chosen' and 'rejected'")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRecord(f"{where}: 'prompt' is empty")
            prompt = transcript_turns(prompt)
        else:
            prompt = checked_messages(prompt, "prompt", where)
        chosen, rejected = (_reply(record[side], side, where) for side in SIDES)
    elif all(isinstance(record[side], list) for side in SIDES):
        prompt, chosen, rejected = _split_implicit_prompt(record, where)
    else:
        raise BadRecord(f"{where}: no 'prompt' (keys: {', '.join(sorted(record))}); a pair needs 'prompt', "
                        "'chosen' and 'rejected', or two whole conversations as 'chosen' and 'rejected'")
    if chosen.strip() == rejected.strip():
        raise BadRecord(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference to learn")
    # The prompt must be a conversation waiting for the assistant: the same rules as SFT data,
    # checked on the prompt followed by a reply.
    check_turn_order(prompt + [{"role": "assistant", "content": chosen}], where)
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise BadRecord(f"{where}: 'margin' must be a number, got {type(margin).__name__}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": float(margin)}


def iter_pairs(files: list[Path], skip_bad_records: bool = False, stats: ReadStats | None = None):
    """Yield each record's checked pair, with "source" (file:line); bad records stop the run or are
    skipped and counted."""
    return read_records(files, lambda record, where: {**pair_from_record(record, where), "source": where},
                        skip_bad_records, stats, "preference pairs")


# ---------------------------------------------------------------- rendering and fitting


def render_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str) -> dict:
    """{"prompt_ids", "chosen_ids", "rejected_ids"}: the prompt with the assistant's opening, then each
    reply through its end of turn, cut from one rendering of the whole conversation per side."""
    prompt_ids = render(tokenizer, prompt, add_generation_prompt=True)
    pair = {"prompt_ids": prompt_ids}
    for side, reply in zip(SIDES, (chosen, rejected)):
        whole = render(tokenizer, prompt + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
        if whole[:len(prompt_ids)] != prompt_ids:
            raise UserError("the chat template renders the prompt differently once a reply follows, so both "
                            "sides of a pair cannot share the same prompt tokens; use a template that renders "
                            "a conversation's beginning the same way (such as ChatML)")
        pair[f"{side}_ids"] = whole[len(prompt_ids):]
    return pair


def fit_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_length: int) -> tuple[dict, int] | None:
    """The rendered pair with the oldest exchanges dropped until prompt + the longer reply fit in
    max_length, and how many turns were dropped; None if even the last user turn does not fit."""
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    body = prompt[len(system):]  # user, assistant, ..., user
    for dropped in range(0, len(body), 2):
        pair = render_pair(tokenizer, system + body[dropped:], chosen, rejected)
        longest = max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
        if len(pair["prompt_ids"]) + longest <= max_length:
            return pair, dropped
    return None


@dataclass(frozen=True)
class PairSpec(DataSpec):
    """Preference data: pairs rendered through the chat template, fitted to max_length."""

    kind = "preference"
    layout = "3"  # 3: compact types; rows and tokens in the build report

    max_length: int = 1024

    def read(self, files: tuple[Path, ...], stats: ReadStats):
        return iter_pairs(list(files), self.skip_bad_records, stats)

    def build(self, tokenizer, records, scratch: Path) -> ProcessedDatasets:
        return _render_and_fit(self, tokenizer, records)


def preference_datasets(data_args, tokenizer, seed: int) -> ProcessedDatasets:
    """Train (and validation) pairs as prompt_ids / chosen_ids / rejected_ids (+ margin, source)."""
    spec = PairSpec.from_arguments(data_args, seed, max_length=data_args.max_length)
    data = processed_datasets(spec, tokenizer)
    if (skipped := skipped_records(data.report)) is not None:
        print0(skipped)
    print0(describe(data, spec.max_length))
    return data


KEPT, SHORTENED, DROPPED, IDENTICAL = 0, 1, 2, 3  # what fitting to max_length did to a pair


def _render_and_fit(spec: PairSpec, tokenizer, pairs: Dataset) -> ProcessedDatasets:
    ids = Sequence(Value(np.dtype(token_dtype(len(tokenizer))).name))
    fitted = pairs.map(
        _render_batch, batched=True, batch_size=256, num_proc=None if len(pairs) < 20_000 else
        spec.workers or len(os.sched_getaffinity(0)),
        fn_kwargs={"tokenizer": tokenizer, "max_length": spec.max_length, "skip_identical": spec.skip_bad_records},
        remove_columns=["prompt", "chosen", "rejected"],
        features=Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids, "margin": Value("float32"),
                           "source": Value("string"), "is_validation": Value("bool"), "fit": Value("int8")}),
        desc="Rendering pairs")
    columns = fitted.select_columns(["is_validation", "fit"]).with_format("numpy")[:]
    reports = {}
    for name, in_split in (("train", ~columns["is_validation"]), ("validation", columns["is_validation"])):
        fits = columns["fit"][in_split]
        reports[name] = {"kept": int(np.isin(fits, (KEPT, SHORTENED)).sum()), "truncated": int((fits == SHORTENED).sum()),
                         "dropped": int((fits == DROPPED).sum()), "identical": int((fits == IDENTICAL).sum())}
    kept, truncated, dropped, identical = (sum(report[key] for report in reports.values())
                                           for key in ("kept", "truncated", "dropped", "identical"))
    if kept == 0:
        raise UserError(f"no pair fits in --max_length {spec.max_length}: raise it")
    fitted = fitted.filter(lambda fits: [fit in (KEPT, SHORTENED) for fit in fits], input_columns="fit", batched=True)
    fitted = cap_validation(fitted.remove_columns("fit"), spec.max_validation_tokens, "chosen_ids")
    splits = split_by_marks(fitted, with_validation=spec.holds_out)
    if "validation" in splits and len(splits["validation"]) == 0:
        raise UserError("the validation split holds no pair: raise --validation_split_percentage "
                        "or give --validation_files")
    for name, split in splits.items():
        reports[name] |= {"rows": len(split), "tokens": 2 * int(list_lengths(split, "prompt_ids").sum())
                          + int(list_lengths(split, "chosen_ids").sum()) + int(list_lengths(split, "rejected_ids").sum())}
    return ProcessedDatasets(splits, report={name: reports[name] for name in splits})


def describe(data: ProcessedDatasets, max_length: int) -> str:
    """What fitting did and what each split holds, from the build report (printed whether the run built
    the data or found it in the cache)."""
    kept, truncated, dropped, identical = (sum(data.report[name][key] for name in data)
                                           for key in ("kept", "truncated", "dropped", "identical"))
    lines = [f"Pairs: {kept:,} kept, {truncated:,} shortened by dropping their oldest turns and {dropped:,} dropped "
             f"(last user turn + reply longer than --max_length {max_length})"
             + (f", {identical:,} skipped as identical after tokenizing" if identical else "")]
    lines += [f"Data: {name} {split['rows']:,} pairs, {split['tokens']:,} tokens (both sides)"
              for name, split in ((name, data.report[name]) for name in data)]
    return "\n".join(lines)


def _render_batch(batch: dict, tokenizer, max_length: int, skip_identical: bool) -> dict:
    """A batch of pairs rendered and fitted (fit: KEPT, SHORTENED by dropping old turns, DROPPED: the
    last question and reply do not fit, IDENTICAL: both sides became the same tokens)."""
    out = {key: [] for key in ("prompt_ids", "chosen_ids", "rejected_ids", "fit")}
    for prompt, chosen, rejected, source in zip(batch["prompt"], batch["chosen"], batch["rejected"], batch["source"]):
        fitted = fit_pair(tokenizer, prompt, chosen, rejected, max_length)
        pair, fit = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}, DROPPED
        if fitted is not None:
            pair, dropped_turns = fitted
            fit = SHORTENED if dropped_turns else KEPT
            if pair["chosen_ids"] == pair["rejected_ids"]:  # texts differing only where the template normalises
                if not skip_identical:
                    raise BadRecord(f"{source}: 'chosen' and 'rejected' become the same tokens")
                fit = IDENTICAL
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            out[key].append(pair[key])
        out["fit"].append(fit)
    return out | {"margin": batch["margin"], "source": batch["source"], "is_validation": batch["is_validation"]}


def as_reward_pairs(dataset: Dataset) -> Dataset:
    """TRL's reward layout: each side is the whole sequence, prompt + reply."""
    def join(batch):
        return {side: [p + s for p, s in zip(batch["prompt_ids"], batch[side])] for side in ("chosen_ids", "rejected_ids")}

    return dataset.map(join, batched=True, remove_columns=["prompt_ids"])
