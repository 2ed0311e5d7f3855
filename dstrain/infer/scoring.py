"""Scoring replies with a trained reward model (`reward.py score`): loading reward.py's output, a full
model or a LoRA adapter on its base, and reading one score per reply, rendered exactly as in training."""

import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from dstrain.data.chat_format import check_turn_order
from dstrain.data.chat_template import render
from dstrain.data.pairs import SIDES, checked_messages, pair_from_record, transcript_turns
from dstrain.data.records import expand_inputs, read_records, write_jsonl_atomically
from dstrain.errors import BadRecord, UserError
from dstrain.model.adapters import is_adapter_folder, load_adapter_model
from dstrain.model.loading import load_tokenizer


def load_reward_model(path: str):
    """A reward.py output folder: a full model, or a LoRA adapter over the base it names."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--model: no model folder at {path}")
    tokenizer = load_tokenizer(path)
    try:
        model = load_adapter_model(folder)[0] if is_adapter_folder(folder) else \
            AutoModelForSequenceClassification.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a reward model from {path}: {str(error).splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise UserError(f"{path} is not a reward model (it has {model.config.num_labels} labels, not one score)")
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last token before padding
    if tokenizer.pad_token is None:  # tokenizer.pad needs one even for a batch of one; larger ones the model refuses
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@torch.inference_mode()
def rewards(model, tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int = 8) -> list[float]:
    """The score of each reply to its prompt, rendered exactly as in training (prompt + reply through
    the chat template). Batches are right-padded; the model reads the last real token."""
    sequences = [render(tokenizer, prompt + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
                 for prompt, reply in zip(prompts, replies)]
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        padded = tokenizer.pad({"input_ids": batch}, padding_side="right", return_tensors="pt")
        logits = model(**padded).logits
        scores.extend(logits[:, 0].float().tolist())
    return scores


def _scoring_item(record: dict, where: str) -> dict:
    """A pair (scores both sides) or a single {"prompt", "response"}."""
    if "response" not in record:
        return pair_from_record(record, where)
    prompt, response = record.get("prompt"), record["response"]
    if isinstance(prompt, str) and prompt.strip():
        prompt = transcript_turns(prompt)
    else:
        prompt = checked_messages(prompt, "prompt", where)
    if not isinstance(response, str) or not response.strip():
        raise BadRecord(f"{where}: 'response' must be a non-empty string")
    check_turn_order(prompt + [{"role": "assistant", "content": response}], where)
    return {"prompt": prompt, "response": response}


def score_file(model_dir: str, input_path: str, output_path: str, batch_size: int = 8) -> dict:
    """Write every input record with its reward(s) added: "reward" for {"prompt", "response"}, or
    "reward_chosen", "reward_rejected" for pairs. Returns a summary (pairwise accuracy where pairs)."""
    files = expand_inputs([input_path], "--input")
    records, items = [], []
    read = read_records(files, lambda record, where: (record, _scoring_item(record, where)), require_some=False)
    for record, item in read:  # every record is checked before any scoring
        records.append(record)
        items.append(item)
    if not items:
        raise UserError(f"{input_path}: no records to score")
    model, tokenizer = load_reward_model(model_dir)
    started = time.perf_counter()
    singles = [i for i, item in enumerate(items) if "response" in item]
    pairs = [i for i, item in enumerate(items) if "response" not in item]
    for index, score in zip(singles, rewards(model, tokenizer, [items[i]["prompt"] for i in singles],
                                             [items[i]["response"] for i in singles], batch_size)):
        records[index]["reward"] = score
    for side in SIDES:
        scores = rewards(model, tokenizer, [items[i]["prompt"] for i in pairs], [items[i][side] for i in pairs],
                         batch_size)
        for index, score in zip(pairs, scores):
            records[index][f"reward_{side}"] = score
    summary = {"records": len(records), "seconds": round(time.perf_counter() - started, 3)}
    if pairs:
        wins = sum(records[i]["reward_chosen"] > records[i]["reward_rejected"] for i in pairs)
        summary |= {"pairs": len(pairs), "accuracy": wins / len(pairs),
                    "mean_margin": sum(records[i]["reward_chosen"] - records[i]["reward_rejected"] for i in pairs)
                    / len(pairs)}
    write_jsonl_atomically(Path(output_path), records, input_path)
    return summary
