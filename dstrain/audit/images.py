"""The data audit's checks on image-text conversations (dstrain/data/multimodal.py), read in Arrow batches:

8. each row holds exactly the image tokens of the images it keeps (placeholders agree with the images, and
   no truncation cut an image's tokens or kept tokens whose image was left out), and no image token is
   trained; the summary adds images, image tokens and tokens per image (from the build report).
"""

import numpy as np

from dstrain.audit.columns import Provenance, TokenBatch, batches, flat_column
from dstrain.audit.findings import Finding, Offenders
from dstrain.data.chat_template import IGNORE

CHECK = 8


def has_images(dataset) -> bool:
    return "image_tokens" in dataset.column_names


def image_findings(name: str, dataset, report: dict) -> tuple[list[Finding], dict]:
    """Problems with a split's image tokens, and the summary values to add."""
    image_token = report.get("image_token_id")
    disagree, trained = Offenders(), Offenders()
    for first_row, table in batches(dataset.select_columns(["input_ids", "labels", "image_tokens", "source"])):
        tokens = TokenBatch.read(table)
        counts, per_row = flat_column(table, "image_tokens")
        expected = _sums(counts, per_row)
        is_image = tokens.ids == image_token
        found = np.bincount(tokens.row_of[is_image], minlength=tokens.rows)
        where = Provenance(table, name, first_row)
        disagree.add(np.nonzero(found != expected)[0],
                     lambda i: f"{where.sample(i, 0)} ({found[i]} image tokens for images of {expected[i]})")
        bad = np.unique(tokens.row_of[is_image & (tokens.labels != IGNORE)])
        trained.add(bad, lambda i: where.sample(i, 0))
    findings = disagree.finding(CHECK, "rows whose image tokens differ from their images' (a placeholder count "
                                       "or a truncation that cut an image)",
                                "rebuild the data (delete the data cache) and report it: the build keeps them equal")
    findings += trained.finding(CHECK, "image tokens with a trained label", "image tokens must be -100 in the labels")
    summary = {key: report.get(key) for key in ("images", "image_tokens", "tokens_per_image_min",
                                                "tokens_per_image_max")}
    return findings, summary


def _sums(counts: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """Each row's sum of its (possibly empty) run of `counts`."""
    ends = np.cumsum(per_row)
    totals = np.concatenate([[0], np.cumsum(counts)])
    return totals[ends] - totals[ends - per_row]
