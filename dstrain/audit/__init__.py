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
7. a summary per split: samples, tokens, trained share, truncated and dropped, length histogram;
8. image-text conversations: each row's image tokens are its images' (placeholders agree, no cut image),
   none trained; images and tokens per image in the summary (images.py).
Every problem comes with a count and the first offending records by file:line.

The checks over the splits read the data once per filesystem (the first process runs them, every
other one reads its findings, kept beside the cached data), then every rank checks the model itself
(under ZeRO-3 the embedding is gathered from all) and all agree on one verdict. Where each part lives: findings.py (what a problem and the report are), columns.py (reading token
columns), splits.py (the checks over each stage's rows: every stage registers one function over a
split), model_checks.py (template, tokenizer and model), this module (running them all, the
verdict every rank reaches together). The scan reads the token columns in Arrow batches with numpy,
never a Python loop per token, so it costs seconds where tokenizing cost minutes.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

from dstrain.audit.findings import Audit, Finding, SplitAudit
from dstrain.audit.images import has_images, image_findings
from dstrain.audit.model_checks import (context_findings, embedding_rows, model_findings, planned_generation_config,
                                         template_findings)
from dstrain.audit.splits import STAGES, AuditContext
from dstrain.data.cache import cache_key
from dstrain.data.chat_template import closing_token
from dstrain.distributed import any_rank, build_once, finish, is_main_process, print0
from dstrain.errors import UserError

__all__ = ["STAGES", "Audit", "audit", "audit_before_training", "log_to_wandb", "planned_generation_config"]


def audit(stage: str, data, tokenizer, config=None, generation_config=None, model=None,
          max_length: int | None = None, drop_too_long: bool = False) -> Audit:
    """Every check of `stage` over the processed splits in `data` (a ProcessedDatasets or any dict of splits)."""
    if stage not in STAGES:
        raise UserError(f"the data audit knows no stage '{stage}' (known: {', '.join(STAGES)})")
    checks = STAGES[stage]
    if config is not None and hasattr(config, "get_text_config"):  # an image-text model: its language model's
        config = config.get_text_config()
    end_of_turn = closing_token(tokenizer) if checks.chat else None
    findings = template_findings(tokenizer, end_of_turn, generation_config) if checks.chat else []
    findings += model_findings(tokenizer, config, generation_config, model)
    findings += context_findings(config, data)
    rows = embedding_rows(model, config)

    def audit_splits() -> dict[str, SplitAudit]:
        report = getattr(data, "report", {})
        results = {name: checks.audit_split(name, dataset, AuditContext(tokenizer, report.get(name, {}), end_of_turn,
                                                                        rows, max_length, drop_too_long))
                   for name, dataset in data.items()}
        for name, dataset in data.items():  # image-text conversations: their image tokens (dstrain/audit/images.py)
            if checks.chat and has_images(dataset):
                found, summary = image_findings(name, dataset, report.get(name, {}))
                results[name].findings.extend(found)
                results[name].summary.update(summary)
        return results

    folder = getattr(data, "folder", None)
    if folder is None:  # splits made by hand (tests), not read from the cache
        results = audit_splits()
    else:  # read once per filesystem: the first process audits, every other one reads its findings
        key = cache_key({"stage": stage, "end_of_turn": end_of_turn, "embedding_rows": rows, "max_length": max_length,
                         "drop_too_long": drop_too_long, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id})
        target = Path(folder) / f"audit-{key}"
        build_once(target, lambda staging: _write_split_audits(staging, audit_splits()), f"the data audit {target}")
        results = _read_split_audits(target)
    for result in results.values():
        findings += result.findings
    return Audit(stage, findings, {name: result.summary for name, result in results.items()},
                 getattr(data, "report", {}).get("contamination"))


def _write_split_audits(folder: Path, results: dict[str, SplitAudit]) -> None:
    folder.mkdir(parents=True)
    (folder / "splits.json").write_text(json.dumps({name: {"findings": [asdict(f) for f in result.findings],
                                                           "summary": result.summary}
                                                    for name, result in results.items()}))


def _read_split_audits(folder: Path) -> dict[str, SplitAudit]:
    saved = json.loads((folder / "splits.json").read_text())
    return {name: SplitAudit([Finding(**finding) for finding in result["findings"]], result["summary"])
            for name, result in saved.items()}


def audit_before_training(stage: str, data, tokenizer, model, data_args, training_args) -> Audit | None:
    """The call each training script makes once its data and model are ready, before the Trainer.

    Runs on every rank (it is a cheap pass, and under ZeRO-3 gathering the embedding needs them
    all); rank 0 prints the summary. On a problem with --audit error every rank stops: rank 0 with
    the one-line error, the others quietly, all with exit code 2.
    """
    if data_args.audit == "off":
        return None
    result = audit(stage, data, tokenizer, model.config, getattr(model, "generation_config", None), model,
                   getattr(data_args, "max_length", None), getattr(data_args, "drop_too_long", False))
    print0(result.render())
    if any_rank(data_args.audit == "error" and bool(result.findings)):
        finish()
        if not is_main_process():
            raise SystemExit(2)
        raise UserError(result.error_line() if result.findings else "the data audit failed on another rank")
    if is_main_process() and "wandb" in training_args.reporting_targets():
        log_to_wandb(result, training_args.run_name)
    return result


def log_to_wandb(result: Audit, run_name: str | None = None) -> None:
    """The summary as a WandB table and summary values, in the run the Trainer then logs to.

    HF's WandbCallback reuses a run that already exists ("run may have been created manually"),
    so the run is started here with the callback's own project and name.
    """
    import wandb  # only when reporting to WandB: importing it costs a second

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
    if result.contamination:  # the contamination check: records overlapping, per benchmark its contaminated items
        for split, count in result.contamination["contaminated"].items():
            wandb.run.summary[f"data_audit/contamination/{split}_records"] = count
            wandb.run.summary[f"data_audit/contamination/{split}_dropped"] = result.contamination["dropped"][split]
        for name, found in result.contamination["benchmarks"].items():
            wandb.run.summary[f"data_audit/contamination/{name}/contaminated_items"] = found["contaminated_items"]
            wandb.run.summary[f"data_audit/contamination/{name}/items"] = found["items"]
