"""What the audit reports: a Finding per problem (its check, what is wrong, the fix, the first
offending records by file:line), the summary per split, and the verdict."""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dstrain.eval.contamination import render_report

FIRST = 5  # offending records named per problem


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


class Offenders:
    """How many records broke one rule, and the names of the first few."""

    def __init__(self):
        self.count, self.names = 0, []

    def add(self, indices: np.ndarray, name: Callable[[int], str]) -> None:
        self.count += len(indices)
        self.names += [name(int(i)) for i in indices[:FIRST - len(self.names)]]

    def finding(self, check: int, problem: str, fix: str) -> list[Finding]:
        return [Finding(check, problem, fix, self.count, self.names)] if self.count else []


def token_name(tokenizer, token_id: int | None) -> str:
    return "none" if token_id is None else f"{tokenizer.convert_ids_to_tokens(int(token_id))} ({token_id})"


@dataclass
class Audit:
    stage: str
    findings: list[Finding]
    splits: dict[str, dict]  # summary per split
    contamination: dict | None = None  # the build report's contamination check (--decontaminate_against)

    def render(self) -> str:
        lines = [f"Data audit ({self.stage}): {len(self.findings)} problem{'s' * (len(self.findings) != 1)}",
                 f"  {'split':<11}{'samples':>9}{'rows':>9}{'tokens':>12}{'trained':>20}{'truncated':>11}"
                 f"{'dropped':>24}"]
        for name, summary in self.splits.items():
            trained = f"{summary['trained_tokens']:,} ({summary['trained_tokens'] / max(summary['tokens'], 1):.1%})"
            dropped = count_text(summary["dropped"])
            if summary["dropped_tokens"] is not None:
                share = summary["dropped_tokens"] / max(summary["dropped_tokens"] + summary["tokens"], 1)
                dropped = f"{summary['dropped_tokens']:,} tokens ({share:.1%})"
            lines.append(f"  {name:<11}{count_text(summary['samples']):>9}{summary['rows']:>9,}{summary['tokens']:>12,}"
                         f"{trained:>20}{count_text(summary['truncated']):>11}{dropped:>24}")
        for name, summary in self.splits.items():
            histogram = " | ".join(f"<={bound} {count:,}" for bound, count in summary["lengths"].items())
            lines.append(f"  lengths ({name}, tokens per sample): {histogram or '-'}")
            if summary.get("images") is not None:
                per_image = (f", {summary['tokens_per_image_min']}-{summary['tokens_per_image_max']} tokens per image"
                             if summary["images"] else "")
                lines.append(f"  images ({name}): {summary['images']:,}, {summary['image_tokens']:,} image tokens"
                             f"{per_image}")
            if summary.get("sources"):
                lines.append(f"  sources ({name}): " + " | ".join(
                    f"{source['name']} planned {source['planned']:.1%}, achieved {source['achieved']:.1%}, "
                    f"{source['epochs']:.2f} epochs" for source in summary["sources"]))
        if self.contamination:
            lines += render_report(self.contamination)
        lines += [f"  [{finding.check}] {finding}" for finding in self.findings]
        return "\n".join(lines)

    def error_line(self) -> str:
        """`<file>:<line>: data audit: <the first problem>`, the others being listed above it."""
        first = self.findings[0]
        where = f"{first.records[0].split(' (')[0]}: " if first.records else ""
        others = len(self.findings) - 1
        more = f" ({others} more problem{'s' * (others != 1)} above)" if others else ""
        return f"{where}data audit: {first}{more}; --audit warn trains anyway"


def count_text(value) -> str:
    return "-" if value is None else f"{value:,}"
