"""Chat evaluation (eval.py chat): a questions file answered through chat.py's batch path
(dstrain/infer/chat_session.py), each answer scored against the record's references and by a reward
model (reward.py's scoring, dstrain/infer/scoring.py); with a second model, the same prompts answered
by both and compared by the reward model.

References, per record of the questions file (chat.py's format: a string, {"question", "system"?,
"id"?} or {"messages": [...]}), all optional:
    "answer": "..." or ["...", ...]   exact match against any of them, after normalising both sides
                                       (NFKC, case folded, spaces collapsed, punctuation at the ends dropped)
    "answer_regex": "..."             a Python regular expression found anywhere in the answer (re.search)

Scores come with a 95% confidence interval from the percentile bootstrap over the questions (10,000
resamples, seeded: the same file gives the same interval). The win rate of the model over --compare
counts a tie (equal rewards) as half a win.
"""

import json
import os
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dstrain.errors import BadRecord
from dstrain.infer.chat_session import Question

CONFIDENCE = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class References:
    answers: tuple[str, ...] = ()
    pattern: re.Pattern | None = None


def references(question: Question) -> References:
    """The record's reference answers, checked (a bad one names its file:line)."""
    fields = question.fields
    answers = fields.get("answer")
    if answers is not None:
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise BadRecord(f"{question.where}: 'answer' must be a non-empty string or a list of them")
    pattern = fields.get("answer_regex")
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise BadRecord(f"{question.where}: 'answer_regex' must be a non-empty string")
        try:
            pattern = re.compile(pattern)
        except re.error as error:
            raise BadRecord(f"{question.where}: 'answer_regex' is not a valid regular expression ({error})") from None
    return References(tuple(answers or ()), pattern)


def normalise_answer(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip(string.punctuation + " ")


def exact_match(answer: str, refs: References) -> bool | None:
    """None when the record has no "answer"."""
    if not refs.answers:
        return None
    return normalise_answer(answer) in {normalise_answer(reference) for reference in refs.answers}


def regex_match(answer: str, refs: References) -> bool | None:
    return None if refs.pattern is None else refs.pattern.search(answer) is not None


def bootstrap_interval(values, seed: int = 0) -> list[float]:
    """[low, high]: the percentile bootstrap interval of the mean of `values` (CONFIDENCE, RESAMPLES
    resamples of the same size, drawn with a seeded generator, in chunks so memory stays flat)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, RESAMPLES, 1000):
        draws = rng.integers(0, len(values), size=(min(1000, RESAMPLES - start), len(values)))
        means.append(values[draws].mean(axis=1))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return [float(low), float(high)]


def summarise(values: list) -> dict | None:
    """Mean and interval over the questions that have a value (None where a record has no reference)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return {"mean": float(np.mean(present)), "interval": bootstrap_interval(present), "questions": len(present)}


def win_scores(rewards: list[float], other: list[float]) -> list[float]:
    """1 where the model's answer scores higher than the other's, 0.5 on a tie, 0 below."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, other)]


def score_answers(questions: list[Question], answers: dict[str, list], rewards: dict[str, list] | None) -> dict:
    """The per-question rows and the summary. `answers` and `rewards`: model label -> one per question."""
    refs = [references(question) for question in questions]
    rows, summary = [], {}
    for i, question in enumerate(questions):
        row = dict(question.record)
        for key in ("answer", "answer_regex"):
            if key in question.fields:
                row[f"reference_{key}"] = question.fields[key]
        for label, model_answers in answers.items():
            completion = model_answers[i]
            row[label] = {"answer": completion.text, "finish_reason": completion.finish_reason,
                          "completion_tokens": completion.completion_tokens,
                          "exact_match": exact_match(completion.text, refs[i]),
                          "regex_match": regex_match(completion.text, refs[i])}
            if rewards is not None:
                row[label]["reward"] = rewards[label][i]
        rows.append(row)
    for label in answers:
        found = {metric: summarise([row[label][metric] for row in rows]) for metric in ("exact_match", "regex_match")}
        if rewards is not None:
            found["reward"] = summarise(rewards[label])
        summary[label] = {metric: value for metric, value in found.items() if value is not None}
    labels = list(answers)
    if rewards is not None and len(labels) == 2:
        wins = win_scores(rewards[labels[0]], rewards[labels[1]])
        for row, win in zip(rows, wins):
            row["winner"] = labels[0] if win == 1 else labels[1] if win == 0 else "tie"
        summary["comparison"] = {"win_rate": summarise(wins), "wins": wins.count(1.0), "ties": wins.count(0.5),
                                 "losses": wins.count(0.0), "of": f"{labels[0]} over {labels[1]} by the reward model"}
    return {"summary": summary, "questions": rows}


def summary_lines(report: dict) -> list[str]:
    lines = []
    for label, metrics in report["summary"].items():
        if label == "comparison":
            continue
        for metric, value in metrics.items():
            low, high = value["interval"]
            lines.append(f"{label:<10} {metric:<12} {value['mean']:.4f}  (95% CI {low:.4f} to {high:.4f}, "
                         f"{value['questions']} questions)")
    comparison = report["summary"].get("comparison")
    if comparison:
        rate = comparison["win_rate"]
        lines.append(f"win rate of {comparison['of']}: {rate['mean']:.4f} (95% CI {rate['interval'][0]:.4f} to "
                     f"{rate['interval'][1]:.4f}; {comparison['wins']} wins, {comparison['ties']} ties, "
                     f"{comparison['losses']} losses)")
    return lines


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
