"""Pre-flight data audit: the training bugs no error reports, caught before a GPU hour is spent.

The checks read the processed datasets exactly as training will see them (built by
dstrain/data/sft.py and dstrain/data/blocks.py), the tokenizer, and the model's config, generation
config and embedding:

1. every SFT sample keeps a trained token after truncation; conversations whose first reply
   ends after --max_length are dropped only with --drop_too_long;
2. the end-of-turn token closing each assistant reply is trained, and generation stops at it;
3. model and tokenizer agree: embedding rows, bos/eos/pad ids, the pad id never trained, no
   token id past the embedding, no all-zero embedding row (gathered under ZeRO-3);
4. packed rows: position ids restart at every conversation, no trained label crosses into it;
5. pretraining blocks: an eos between documents; the share of tokens block packing leaves out;
6. reward/DPO pairs: chosen and rejected differ, share the prompt tokens, end their turn, fit;
7. a summary per split: samples, tokens, trained share, truncated and dropped, length histogram.
Every problem comes with a count and the first offending records by file:line.

Each stage registers one function over a split (`register_stage`); it returns the split's
findings and summary. The scan reads the token columns in Arrow batches with numpy, never a
Python loop per token, so it costs seconds where tokenizing cost minutes.
"""

import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import GenerationConfig

from dstrain.arguments import LoraArguments, TrainingArguments, json_to_argv
from dstrain.data.cache import length_histogram
from dstrain.distributed import finish, is_main_process, print0
from dstrain.errors import UserError
from dstrain.data.chat_template import IGNORE, PROBE, closing_token, has_generation_markers, set_chat_stops, tokenize_conversation

FIRST = 5  # offending records named per problem
BATCH_ROWS = 2_000
MAX_PACKING_LOSS = 0.05  # share of a split's tokens that block packing may leave out before it is a problem


@dataclass
class Finding:
    """One problem: which check found it, what is wrong, the fix, how many records, the first ones."""

    check: int
    problem: str
    fix: str
    count: int = 0
    records: list[str] = field(default_factory=list)  # "path:line" or "path:line (detail)"

    def __str__(self) -> str:
        found = f": {self.count:,}, first {', '.join(self.records)}" if self.records else ""
        return f"{self.problem}{found}; {self.fix}"


@dataclass
class SplitAudit:
    findings: list[Finding]
    summary: dict  # samples, rows, tokens, trained_tokens, truncated, dropped, dropped_tokens, lengths


@dataclass
class AuditContext:
    """What a split's checks need besides the rows."""

    tokenizer: object
    report: dict = field(default_factory=dict)  # the build report of this split (dstrain/data/cache.py)
    end_of_turn: int | None = None  # chat stages: the token that closes an assistant reply
    embedding_rows: int | None = None
    max_length: int | None = None
    drop_too_long: bool = False


@dataclass(frozen=True)
class Stage:
    audit_split: Callable[[str, Dataset, AuditContext], SplitAudit]
    chat: bool  # rendered with the chat template: check that replies end with a trained end-of-turn token


STAGES: dict[str, Stage] = {}


def register_stage(name: str, audit_split: Callable[[str, Dataset, AuditContext], SplitAudit], chat: bool) -> None:
    """Make `audit(name, ...)` run `audit_split(split_name, dataset, context)` on every split."""
    STAGES[name] = Stage(audit_split, chat)


# ---------------------------------------------------------------- reading token columns


def _flat(table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """All values of a list column, concatenated, and each row's length."""
    lists = table.column(column).combine_chunks()
    return (lists.flatten().to_numpy(zero_copy_only=False),
            pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64))


def _batches(dataset: Dataset):
    """(first row number, Arrow table) per batch of rows."""
    for number, table in enumerate(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)):
        yield number * BATCH_ROWS, table


@dataclass
class TokenBatch:
    """A batch of rows flattened: every token's id, label and row, and each row's first token."""

    ids: np.ndarray
    labels: np.ndarray
    row_of: np.ndarray
    row_first: np.ndarray
    rows: int

    @classmethod
    def read(cls, table) -> "TokenBatch":
        ids, lengths = _flat(table, "input_ids")
        labels, _ = _flat(table, "labels")
        row_first = np.zeros(len(ids), dtype=bool)
        row_first[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
        return cls(ids, labels, np.repeat(np.arange(len(lengths)), lengths), row_first, len(lengths))


class Provenance:
    """Where a batch's rows came from: `source` ("path:line") per row, or `sources` (a list) per
    packed row or block. Rows without either are named by split and row number."""

    def __init__(self, table, split: str, first_row: int, unit: str = "row"):
        present = [column for column in ("sources", "source") if column in table.column_names]
        self.column = table.column(present[0]).combine_chunks() if present else None
        self.split, self.first_row, self.unit = split, first_row, unit

    def counts(self) -> np.ndarray | None:
        """How many records each row holds, if known."""
        if self.column is None:
            return None
        if pa.types.is_list(self.column.type) or pa.types.is_large_list(self.column.type):
            return pc.list_value_length(self.column).to_numpy(zero_copy_only=False)
        return np.ones(len(self.column), dtype=np.int64)

    def records(self, row: int) -> list[str]:
        value = self.column[row].as_py() if self.column is not None else None
        return value if isinstance(value, list) else [value] if value else []

    def row(self, row: int) -> str:
        where, names = f"{self.split} {self.unit} {self.first_row + row}", self.records(row)
        return f"{', '.join(names[:3])} ({where})" if names else where

    def sample(self, row: int, within: int) -> str:
        names = self.records(row)
        return names[within] if within < len(names) else self.row(row)


class Offenders:
    """How many records broke one rule, and the names of the first few."""

    def __init__(self):
        self.count, self.names = 0, []

    def add(self, indices: np.ndarray, name: Callable[[int], str]) -> None:
        self.count += len(indices)
        self.names += [name(int(i)) for i in indices[:FIRST - len(self.names)]]

    def finding(self, check: int, problem: str, fix: str) -> list[Finding]:
        return [Finding(check, problem, fix, self.count, self.names)] if self.count else []


def _token(tokenizer, token_id: int | None) -> str:
    return "none" if token_id is None else f"{tokenizer.convert_ids_to_tokens(int(token_id))} ({token_id})"


def _token_rules(batch: TokenBatch, owner: np.ndarray, context: AuditContext, offenders: dict, name) -> None:
    """The rules every token obeys, whatever the stage; `owner[i]` is the sample of token i."""
    trained = batch.labels != IGNORE

    def mark(rule: str, bad: np.ndarray) -> None:
        offenders[rule].add(np.unique(owner[bad]), name)

    if context.tokenizer.pad_token_id is not None:
        mark("pad", trained & (batch.labels == context.tokenizer.pad_token_id))
    if context.embedding_rows is not None:
        mark("range", batch.ids >= context.embedding_rows)
    mark("shifted", trained & (batch.labels != batch.ids))


def _token_rule_findings(offenders: dict, context: AuditContext) -> list[Finding]:
    tokenizer, pad = context.tokenizer, context.tokenizer.pad_token_id
    shared = [name for name, same in (("eos", tokenizer.eos_token_id), ("end-of-turn", context.end_of_turn))
              if same == pad]
    pad_fix = (f"it is also the {shared[0]} token: a collator that masks padding would mask it too and the model "
               "would never learn to stop; give the tokenizer its own pad token (tokenizer.py uses <unk>)"
               if shared else "padding must never be a target")
    return (offenders["pad"].finding(3, f"samples that train the pad token {_token(tokenizer, pad)}", pad_fix)
            + offenders["range"].finding(3, f"samples with token ids past the model's {context.embedding_rows} "
                                            "embedding rows", "an index error on the GPU: the tokenizer is not the "
                                                              "model's")
            + offenders["shifted"].finding(4, "samples whose trained labels differ from their input ids",
                                           "labels must equal the inputs (the model shifts them itself)"))


TOKEN_RULES = ("pad", "range", "shifted")


# ---------------------------------------------------------------- chat stages (SFT, LoRA on chats)


def audit_chat_split(name: str, dataset: Dataset, context: AuditContext) -> SplitAudit:
    """Checks 1-4 over tokenized conversations: one per row (`source`) or packed (`position_ids`, `sources`)."""
    packed = "position_ids" in dataset.column_names
    offenders = {rule: Offenders() for rule in ("untrained", "stop", "positions", "crossing", *TOKEN_RULES)}
    totals = {"samples": 0, "rows": len(dataset), "tokens": 0, "trained_tokens": 0}
    sample_lengths = []
    for first_row, table in _batches(dataset):
        batch, where = TokenBatch.read(table), Provenance(table, name, first_row)
        starts = _packed_starts(table, batch, where, offenders["positions"]) if packed else batch.row_first
        sample_of, sample_row = np.cumsum(starts) - 1, batch.row_of[starts]
        samples = len(sample_row)
        in_row = np.bincount(sample_row, minlength=batch.rows)
        first_of_row = np.cumsum(in_row) - in_row

        def name_sample(sample: int) -> str:
            row = int(sample_row[sample])
            return where.sample(row, sample - int(first_of_row[row]))

        trained = batch.labels != IGNORE
        untrained = np.bincount(sample_of, weights=trained, minlength=samples) == 0
        offenders["untrained"].add(np.nonzero(untrained)[0], name_sample)
        # Labels are shifted inside the model: a trained first token is predicted from the sample before it.
        offenders["crossing"].add(np.unique(sample_of[trained & starts & ~batch.row_first]), name_sample)
        if context.end_of_turn is not None:
            # A reply is a run of trained tokens inside one sample; each must hold the end-of-turn token.
            span_starts = trained & (starts | ~np.concatenate([[False], trained[:-1]]))
            closed = np.bincount((np.cumsum(span_starts) - 1)[trained],
                                 weights=batch.labels[trained] == context.end_of_turn, minlength=int(span_starts.sum()))
            offenders["stop"].add(np.unique(sample_of[span_starts][closed == 0]), name_sample)
        _token_rules(batch, sample_of, context, offenders, name_sample)

        sample_lengths.append(np.bincount(sample_of, minlength=samples))
        totals["samples"] += samples
        totals["tokens"] += len(batch.ids)
        totals["trained_tokens"] += int(trained.sum())

    findings = (
        _dropped_findings(context)
        + offenders["untrained"].finding(1, "samples with no trained token (every label is -100)",
                                         "the chat template's assistant mask is empty: check its {% generation %} "
                                         "markers")
        + offenders["stop"].finding(2, "samples with an assistant reply whose end-of-turn token "
                                       f"{_token(context.tokenizer, context.end_of_turn)} is not trained",
                                    "the model would never learn to stop: train each reply through its end-of-turn "
                                    "token")
        + offenders["positions"].finding(4, "packed rows whose position ids do not restart at 0 at each conversation "
                                            "and count up within it", "attention would cross conversations: pack "
                                                                      "with dstrain.data.sft.packed_rows")
        + offenders["crossing"].finding(4, "packed conversations whose first token is trained",
                                        "the previous conversation's last token would learn to predict it: label "
                                        "a conversation's first token -100")
        + _token_rule_findings(offenders, context))
    summary = {**totals, "truncated": context.report.get("truncated"), "dropped": context.report.get("dropped"),
               "dropped_tokens": None,
               "lengths": length_histogram(np.concatenate(sample_lengths) if sample_lengths else np.zeros(0))}
    return SplitAudit(findings, summary)


def _packed_starts(table, batch: TokenBatch, where: Provenance, offenders: Offenders) -> np.ndarray:
    """Each conversation's first token in packed rows, checking (4) that positions count 0, 1, 2...
    within a conversation and that a row of k conversations restarts them exactly k times."""
    positions, _ = _flat(table, "position_ids")
    restarts = positions == 0
    follows = positions == np.concatenate([[-1], positions[:-1]]) + 1
    bad = np.unique(batch.row_of[~(restarts | follows) | (batch.row_first & ~restarts)])
    expected = where.counts()
    if expected is not None:
        bad = np.union1d(bad, np.nonzero(np.bincount(batch.row_of[restarts], minlength=batch.rows) != expected)[0])
    offenders.add(bad, where.row)
    return restarts | batch.row_first


def _dropped_findings(context: AuditContext) -> list[Finding]:
    dropped = context.report.get("dropped")
    if not dropped or context.drop_too_long:
        return []
    records = [f"{item['source']} (reply ends at token {item['first_reply_end']})"
               for item in context.report.get("dropped_first", [])[:FIRST]]
    return [Finding(1, f"conversations whose first reply ends after --max_length {context.max_length}, so none of "
                       "their tokens would be trained", "raise --max_length, or pass --drop_too_long true to train "
                                                        "without them", dropped, records)]


# ---------------------------------------------------------------- pretraining blocks


def audit_block_split(name: str, dataset: Dataset, context: AuditContext) -> SplitAudit:
    """Check 5 (and the token rules) over fixed blocks of documents joined by eos, each with its `sources`."""
    eos = context.tokenizer.eos_token_id
    offenders = {rule: Offenders() for rule in ("joined", *TOKEN_RULES)}
    totals = {"samples": context.report.get("documents"), "rows": len(dataset), "tokens": 0, "trained_tokens": 0}
    for first_row, table in _batches(dataset):
        batch, where = TokenBatch.read(table), Provenance(table, name, first_row, unit="block")
        documents = where.counts()
        if documents is not None:  # every document but a block's last ends inside it, with an eos
            eos_per_block = np.bincount(batch.row_of[batch.ids == eos], minlength=batch.rows)
            offenders["joined"].add(np.nonzero(eos_per_block < documents - 1)[0], where.row)
        _token_rules(batch, batch.row_of, context, offenders, where.row)
        totals["tokens"] += len(batch.ids)
        totals["trained_tokens"] += int((batch.labels != IGNORE).sum())

    findings = offenders["joined"].finding(5, f"blocks that join documents without an eos "
                                              f"{_token(context.tokenizer, eos)} between them",
                                           "the model would learn to run one document into the next: end every "
                                           "document with eos (dstrain/data/blocks.py does)")
    corpus_tokens = context.report.get("tokens")
    left_out = corpus_tokens - totals["tokens"] if corpus_tokens is not None else None
    if left_out and left_out > MAX_PACKING_LOSS * corpus_tokens:
        block = len(dataset[0]["input_ids"]) if len(dataset) else 0
        more = "raise --validation_split_percentage, " if name == "validation" else ""
        findings.append(Finding(5, f"block packing leaves out {left_out / corpus_tokens:.1%} of the {name} split "
                                   f"({left_out:,} of {corpus_tokens:,} tokens: each 1,000 documents lose their "
                                   f"tail shorter than a block of {block})",
                                f"{more}lower --block_size or add data"))
    findings += _token_rule_findings(offenders, context)
    summary = {**totals, "truncated": None, "dropped": None, "dropped_tokens": left_out,
               "lengths": context.report.get("length_histogram", {})}
    return SplitAudit(findings, summary)


# ---------------------------------------------------------------- preference pairs (reward.py, dpo.py)


def audit_pair_split(name: str, dataset: Dataset, context: AuditContext) -> SplitAudit:
    """Check 6 over pairs as dstrain/data/pairs.py builds them (prompt_ids, chosen_ids,
    rejected_ids, source). Both sides share the prompt tokens by construction: a pair holds one
    prompt_ids, and each side is cut from a rendering that starts with exactly those tokens. Checked:
    the sides differ, each reply is closed by the end-of-turn token (a reward model reads its score
    after it; DPO learns to stop from it), prompt + each side fit --max_length, and every token id is
    inside the embedding. A Python loop per pair: preference sets hold thousands of pairs, not millions."""
    offenders = {rule: Offenders() for rule in ("identical", "unclosed", "too_long", "range")}
    totals = {"samples": len(dataset), "rows": len(dataset), "tokens": 0, "trained_tokens": 0}
    longest = []
    for first_row, table in _batches(dataset):
        where = Provenance(table, name, first_row, unit="pair")
        columns = [table.column(key).to_pylist() for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
        for row, (prompt, chosen, rejected) in enumerate(zip(*columns)):
            broken = {
                "identical": chosen == rejected,
                "unclosed": context.end_of_turn is not None and not (context.end_of_turn in chosen
                                                                     and context.end_of_turn in rejected),
                "too_long": bool(context.max_length) and len(prompt) + max(len(chosen), len(rejected)) > context.max_length,
                "range": context.embedding_rows is not None and max(prompt + chosen + rejected) >= context.embedding_rows,
            }
            for rule in (rule for rule, bad in broken.items() if bad):
                offenders[rule].add(np.array([row]), where.row)
            totals["tokens"] += 2 * len(prompt) + len(chosen) + len(rejected)
            totals["trained_tokens"] += len(chosen) + len(rejected)
            longest.append(len(prompt) + max(len(chosen), len(rejected)))
    eot = _token(context.tokenizer, context.end_of_turn)
    findings = (
        offenders["identical"].finding(6, "pairs whose chosen and rejected replies are the same tokens",
                                       "there is no preference to learn from them: remove them")
        + offenders["unclosed"].finding(6, f"pairs with a reply not closed by the end-of-turn token {eot}",
                                        "render each reply through the chat template (dstrain/data/pairs.py)")
        + offenders["too_long"].finding(6, f"pairs longer than --max_length {context.max_length}",
                                        "the trainer would cut them where the two sides differ: fit them with "
                                        "dstrain.data.pairs.fit_pair")
        + offenders["range"].finding(3, f"pairs with token ids past the model's {context.embedding_rows} embedding "
                                        "rows", "an index error on the GPU: the tokenizer is not the model's"))
    summary = {**totals, "truncated": context.report.get("truncated"), "dropped": context.report.get("dropped"),
               "dropped_tokens": None, "lengths": length_histogram(np.array(longest, dtype=np.int64))}
    return SplitAudit(findings, summary)


register_stage("sft", audit_chat_split, chat=True)
register_stage("pretrain", audit_block_split, chat=False)
register_stage("preference", audit_pair_split, chat=True)


# ---------------------------------------------------------------- template, tokenizer and model


def template_findings(tokenizer, end_of_turn: int | None, generation_config) -> list[Finding]:
    """Check 2 on the template itself: a reply ends with a special token, the mask trains it, generation stops at it."""
    if end_of_turn is None:
        return [Finding(2, "the chat template ends an assistant reply with no special token, so the model cannot "
                           "learn where a turn ends", "use a template that closes each reply with an end-of-turn "
                                                      "token (ChatML's <|im_end|>, Llama 3's <|eot_id|>)")]
    findings = []
    name = tokenizer.convert_ids_to_tokens(end_of_turn)
    if has_generation_markers(tokenizer):
        trained = [label for label in tokenize_conversation(tokenizer, PROBE)[1] if label != IGNORE]
        if not trained:
            findings.append(Finding(2, "the chat template's {% generation %} block marks no token",
                                    f"wrap each assistant reply and its {name} in {{% generation %}}..."
                                    "{% endgeneration %}"))
        elif end_of_turn not in trained:
            findings.append(Finding(2, f"the chat template's {{% generation %}} block ends before {name}, so the "
                                       "model never learns to stop",
                                    f"move {{% endgeneration %}} after {name} in the template"))
    stops = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    stops = stops if isinstance(stops, list) else [stops]
    if generation_config is not None and end_of_turn not in stops:
        findings.append(Finding(2, f"generation stops at {stops} but not at the end-of-turn token "
                                   f"{_token(tokenizer, end_of_turn)}, so it would run past the end of a reply",
                                "make the model's generation_config.eos_token_id include it"))
    return findings


def _embedding_rows(model, config) -> int | None:
    if model is not None:
        weight = model.get_input_embeddings().weight
        return int(weight.ds_shape[0]) if hasattr(weight, "ds_shape") else int(weight.shape[0])
    return getattr(config, "vocab_size", None)


def model_findings(tokenizer, config, generation_config, model=None) -> list[Finding]:
    """Check 3 on the pair itself: embedding rows, special ids in config and generation config, real weights."""
    findings = []
    rows = _embedding_rows(model, config)
    if rows is not None and rows < len(tokenizer):
        findings.append(Finding(3, f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding only "
                                   f"{rows:,} rows", "resize the embedding or use the model's own tokenizer"))
    for where, settings in (("config", config), ("generation_config", generation_config)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ours, theirs = getattr(tokenizer, key), getattr(settings, key, None) if settings is not None else None
            theirs_list = theirs if isinstance(theirs, list) else [theirs]
            if ours is not None and theirs is not None and ours not in theirs_list:
                findings.append(Finding(3, f"the model's {where}.{key} is {theirs} but the tokenizer's is {ours}",
                                        f"set {where}.{key} to {ours} or use the model's own tokenizer"))
    if model is not None:
        findings += embedding_findings(model, tokenizer)
    return findings


def _gathered(weight):
    """Under ZeRO-3 each rank holds a shard: gather the whole tensor (every rank must take part)."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
    return nullcontext()


@torch.no_grad()
def embedding_findings(model, tokenizer) -> list[Finding]:
    """An embedding resized under ZeRO-3 outside GatheredParameters keeps empty or zero rows: find them."""
    findings = []
    embeddings = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    if embeddings["output"] is not None and embeddings["output"].weight is embeddings["input"].weight:
        del embeddings["output"]  # tied
    for kind, module in embeddings.items():
        if module is None:
            continue
        with _gathered(module.weight):
            weight = module.weight
            if weight.numel() == 0:
                findings.append(Finding(3, f"the model's {kind} embedding is empty",
                                        "resize it under ZeRO-3 only inside deepspeed.zero.GatheredParameters"))
                continue
            zero = [start + int(i) for start in range(0, min(len(tokenizer), weight.shape[0]), 8192)
                    for i in torch.nonzero(weight[start:start + 8192].abs().amax(dim=1) == 0).flatten()
                    if start + int(i) != tokenizer.pad_token_id]  # padding_idx rows start at zero
            if zero:
                findings.append(Finding(3, f"the model's {kind} embedding has all-zero rows for tokens of the "
                                           "tokenizer", "those tokens carry no signal (a resize under ZeRO-3 outside "
                                                        "deepspeed.zero.GatheredParameters leaves new rows unset)",
                                        len(zero), [_token(tokenizer, i) for i in zero[:FIRST]]))
    return findings


def planned_generation_config(model_dir: str | None, config, tokenizer, chat: bool) -> GenerationConfig:
    """The generation config a training run will save: the model folder's (or one from the config),
    with the stop tokens sft.py and lora.py add for chats."""
    if model_dir and (Path(model_dir) / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(model_dir)
    else:
        generation_config = GenerationConfig.from_model_config(config)
    if chat:
        set_chat_stops(generation_config, tokenizer)
    return generation_config


# ---------------------------------------------------------------- the audit, its report, its verdict


@dataclass
class Audit:
    stage: str
    findings: list[Finding]
    splits: dict[str, dict]  # summary per split

    def render(self) -> str:
        lines = [f"Data audit ({self.stage}): {len(self.findings)} problem{'s' * (len(self.findings) != 1)}",
                 f"  {'split':<11}{'samples':>9}{'rows':>9}{'tokens':>12}{'trained':>20}{'truncated':>11}"
                 f"{'dropped':>24}"]
        for name, summary in self.splits.items():
            trained = f"{summary['trained_tokens']:,} ({summary['trained_tokens'] / max(summary['tokens'], 1):.1%})"
            dropped = _count(summary["dropped"])
            if summary["dropped_tokens"] is not None:
                share = summary["dropped_tokens"] / max(summary["dropped_tokens"] + summary["tokens"], 1)
                dropped = f"{summary['dropped_tokens']:,} tokens ({share:.1%})"
            lines.append(f"  {name:<11}{_count(summary['samples']):>9}{summary['rows']:>9,}{summary['tokens']:>12,}"
                         f"{trained:>20}{_count(summary['truncated']):>11}{dropped:>24}")
        for name, summary in self.splits.items():
            histogram = " | ".join(f"<={bound} {count:,}" for bound, count in summary["lengths"].items())
            lines.append(f"  lengths ({name}, tokens per sample): {histogram or '-'}")
        lines += [f"  [{finding.check}] {finding}" for finding in self.findings]
        return "\n".join(lines)

    def error_line(self) -> str:
        """`<file>:<line>: data audit: <the first problem>`, the others being listed above it."""
        first = self.findings[0]
        where = f"{first.records[0].split(' (')[0]}: " if first.records else ""
        others = len(self.findings) - 1
        more = f" ({others} more problem{'s' * (others != 1)} above)" if others else ""
        return f"{where}data audit: {first}{more}; --audit warn trains anyway"


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def audit(stage: str, data, tokenizer, config=None, generation_config=None, model=None,
          max_length: int | None = None, drop_too_long: bool = False) -> Audit:
    """Every check of `stage` over the processed splits in `data` (a ProcessedDatasets or any dict of splits)."""
    if stage not in STAGES:
        raise UserError(f"the data audit knows no stage '{stage}' (known: {', '.join(STAGES)})")
    checks = STAGES[stage]
    end_of_turn = closing_token(tokenizer) if checks.chat else None
    findings = template_findings(tokenizer, end_of_turn, generation_config) if checks.chat else []
    findings += model_findings(tokenizer, config, generation_config, model)
    report, splits = getattr(data, "report", {}), {}
    for name, dataset in data.items():
        context = AuditContext(tokenizer, report.get(name, {}), end_of_turn, _embedding_rows(model, config),
                               max_length, drop_too_long)
        result = checks.audit_split(name, dataset, context)
        findings += result.findings
        splits[name] = result.summary
    return Audit(stage, findings, splits)


def _on_any_rank(failed: bool) -> bool:
    """Whether any rank failed: every rank runs the audit and they must stop together, never one waiting on another."""
    if not (dist.is_available() and dist.is_initialized()):
        return failed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    verdict = torch.tensor([int(failed)], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    return bool(verdict.item())


def audit_before_training(stage: str, data, tokenizer, model, data_args, training_args) -> Audit | None:
    """The call each training script makes once its data and model are ready, before the Trainer.

    Runs on every rank (it is a cheap pass, and under ZeRO-3 gathering the embedding needs them
    all); rank 0 prints the summary. On a problem with --audit error every rank stops: rank 0 with
    the one-line error, the others quietly, all with exit code 2.
    """
    if data_args.audit == "off":
        return None
    # SFT's length limit is a data argument; reward.py's and dpo.py's is TRL's training argument.
    max_length = getattr(data_args, "max_length", None) or getattr(training_args, "max_length", None)
    result = audit(stage, data, tokenizer, model.config, getattr(model, "generation_config", None), model,
                   max_length, getattr(data_args, "drop_too_long", False))
    print0(result.render())
    if _on_any_rank(data_args.audit == "error" and bool(result.findings)):
        finish()
        if not is_main_process():
            raise SystemExit(2)
        raise UserError(result.error_line() if result.findings else "the data audit failed on another rank")
    if is_main_process() and "wandb" in (training_args.report_to or []):
        log_to_wandb(result, training_args.run_name)
    return result


def log_to_wandb(result: Audit, run_name: str | None = None) -> None:
    """The summary as a WandB table and summary values, in the run the Trainer then logs to.

    HF's WandbCallback reuses a run that already exists ("run may have been created manually"),
    so the run is started here with the callback's own project and name.
    """
    import wandb

    if wandb.run is None:
        wandb.init(project=os.getenv("WANDB_PROJECT", "huggingface"), name=run_name)
    keys = ["samples", "rows", "tokens", "trained_tokens", "truncated", "dropped", "dropped_tokens"]
    table = wandb.Table(columns=["split", *keys, "problems"],
                        data=[[name, *(summary[key] for key in keys), len(result.findings)]
                              for name, summary in result.splits.items()])
    histograms = {f"data_audit/{name}/lengths": wandb.Table(columns=["up to tokens", "samples"],
                                                            data=[[int(b), n] for b, n in summary["lengths"].items()])
                  for name, summary in result.splits.items()}
    wandb.log({"data_audit/summary": table, **histograms})
    for name, summary in result.splits.items():
        values = {f"data_audit/{name}/{key}": summary[key] for key in keys if summary[key] is not None}
        values[f"data_audit/{name}/trained_fraction"] = summary["trained_tokens"] / max(summary["tokens"], 1)
        wandb.run.summary.update(values)
    wandb.run.summary["data_audit/problems"] = len(result.findings)


def without_training_flags(argv: list[str], kept_types) -> list[str]:
    """A training run's arguments (a JSON config and/or flags) without those only training reads
    (TrainingArguments', LoraArguments'), so audit.py takes a run's own command line or config."""
    if argv and argv[0].endswith(".json"):
        argv = json_to_argv(argv[0]) + argv[1:]
    kept = {f.name for kind in kept_types for f in fields(kind)}
    training_only = {f.name for kind in (TrainingArguments, LoraArguments) for f in fields(kind)} - kept
    remaining, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg[2:].split("=", 1)[0] in training_only
        if not skipping:
            remaining.append(arg)
    return remaining
