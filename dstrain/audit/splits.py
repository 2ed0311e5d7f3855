"""The checks on each stage's processed splits: chat rows (checks 1, 2, 4), pretraining blocks (5),
preference pairs (6), and the token rules every stage obeys (3, 4). Each stage registers one
function over a split; it returns the split's findings and summary (check 7)."""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from dstrain.audit.columns import Provenance, TokenBatch, batches, flat_column
from dstrain.audit.findings import FIRST, Finding, Offenders, SplitAudit, token_name
from dstrain.data.cache import length_histogram
from dstrain.data.chat_template import IGNORE

MAX_PACKING_LOSS = 0.05  # share of a split's tokens that block packing may leave out before it is a problem


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
    return (offenders["pad"].finding(3, f"samples that train the pad token {token_name(tokenizer, pad)}", pad_fix)
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
    for first_row, table in batches(dataset):
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
                                       f"{token_name(context.tokenizer, context.end_of_turn)} is not trained",
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
    positions, _ = flat_column(table, "position_ids")
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


def audit_block_split(name: str, blocks, context: AuditContext) -> SplitAudit:
    """Check 5 (and the token rules) over the blocks of a split (dstrain/data/blocks.PackedBlocks): every
    document of the plan ends with eos, no id past the embedding, no pad token (blocks train every
    token), little of the split left out. Read per document from the token stores: the ends of the
    documents and the largest id and pad count each store recorded, never a pass over every token,
    unless a store breaks a rule and its offending documents are to be named."""
    eos, pad = context.tokenizer.eos_token_id, context.tokenizer.pad_token_id
    offenders = {rule: Offenders() for rule in ("joined", *TOKEN_RULES)}
    block_size, rows = blocks.block_size, len(blocks)
    used = np.unique(np.asarray(blocks.store))
    for store_index in used:
        store = blocks.stores[store_index]
        in_plan = np.nonzero(np.asarray(blocks.store) == store_index)[0]
        documents = np.asarray(blocks.document)[in_plan]
        ends = np.asarray(store.tokens[np.asarray(store.offsets)[documents + 1] - 1])
        _name_blocks(blocks, in_plan[ends != eos], offenders["joined"], name)
        if context.embedding_rows is not None and store.meta["max_id"] >= context.embedding_rows:
            _name_documents(blocks, store, in_plan, documents, store.tokens >= context.embedding_rows,
                            offenders["range"], name)
        if pad is not None and pad != eos and store.meta["pad_tokens"]:
            _name_documents(blocks, store, in_plan, documents, store.tokens == pad, offenders["pad"], name)
    findings = offenders["joined"].finding(5, f"blocks that join documents without an eos "
                                              f"{token_name(context.tokenizer, eos)} between them",
                                           "the model would learn to run one document into the next: end every "
                                           "document with eos (dstrain/data/blocks.py does)")
    planned = int(blocks.starts[-1])
    tokens = rows * block_size
    left_out = planned - tokens
    if left_out > MAX_PACKING_LOSS * planned:
        more = "raise --validation_split_percentage, " if name == "validation" else ""
        findings.append(Finding(5, f"block packing leaves out {left_out / planned:.1%} of the {name} split "
                                   f"({left_out:,} of {planned:,} tokens: the split's last tokens do not fill a "
                                   f"block of {block_size})", f"{more}lower --block_size or add data"))
    findings += _token_rule_findings(offenders, context)
    summary = {"samples": len(blocks.document), "rows": rows, "tokens": tokens, "trained_tokens": tokens,
               "truncated": None, "dropped": None, "dropped_tokens": left_out,
               "lengths": context.report.get("length_histogram", {})}
    if "sources" in context.report:  # a mixture: each source's planned and achieved share, and its epochs
        sources = context.report["sources"]
        summary["sources"] = [{"name": name, "planned": weight, "achieved": achieved,
                               "epochs": achieved * planned / available if available else 0.0}
                              for name, weight, achieved, available in zip(sources["names"], sources["weights"],
                                                                           sources["achieved"],
                                                                           sources["available_tokens"])]
    return SplitAudit(findings, summary)


def _name_blocks(blocks, positions: np.ndarray, offenders: Offenders, split: str) -> None:
    """Count the plan's documents at `positions` as offenders, each named by the block it ends in."""
    ends = (np.asarray(blocks.starts)[positions + 1] - 1) // blocks.block_size
    inside = ends < len(blocks)  # a document in the left-out tail is in no block
    offenders.add(np.unique(ends[inside]), lambda block: f"{', '.join(blocks.block_places(block)[:3])} ({split} block {block})")


def _name_documents(blocks, store, in_plan: np.ndarray, documents: np.ndarray, bad_tokens: np.ndarray,
                    offenders: Offenders, split: str) -> None:
    """Count the plan's documents of `store` holding a bad token, named by their block."""
    offsets = np.asarray(store.offsets)
    bad_documents = np.unique(np.searchsorted(offsets, np.nonzero(bad_tokens)[0], side="right") - 1)
    _name_blocks(blocks, in_plan[np.isin(documents, bad_documents)], offenders, split)


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
    for first_row, table in batches(dataset):
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
    eot = token_name(context.tokenizer, context.end_of_turn)
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
