"""Checks 2 and 3 on the template, the tokenizer and the model themselves (not on the rows): the
reply's closing token is trained and stops generation; embedding rows, special ids and the
embedding weights agree with the tokenizer."""

from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
from transformers import GenerationConfig

from dstrain.audit.findings import FIRST, Finding, token_name
from dstrain.data.chat_template import IGNORE, PROBE, has_generation_markers, set_chat_stops, tokenize_conversation


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
                                   f"{token_name(tokenizer, end_of_turn)}, so it would run past the end of a reply",
                                "make the model's generation_config.eos_token_id include it"))
    return findings


def embedding_rows(model, config) -> int | None:
    if model is not None:
        weight = model.get_input_embeddings().weight
        return int(weight.ds_shape[0]) if hasattr(weight, "ds_shape") else int(weight.shape[0])
    return getattr(config, "vocab_size", None)


def model_findings(tokenizer, config, generation_config, model=None) -> list[Finding]:
    """Check 3 on the pair itself: embedding rows, special ids in config and generation config, real weights."""
    findings = []
    rows = embedding_rows(model, config)
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
                                        len(zero), [token_name(tokenizer, i) for i in zero[:FIRST]]))
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


def context_findings(config, data) -> list[Finding]:
    """Check 3, the context: pretraining blocks longer than the model's positions (its
    max_position_embeddings, after any --rope_scaling/--max_position_embeddings extension) would train
    positions it has no RoPE range for. Chat rows are checked against --max_length where they are built
    (sft.py refuses a --max_length over the context)."""
    context = getattr(config, "max_position_embeddings", None) if config is not None else None
    longest = max((getattr(split, "block_size", 0) or 0 for split in data.values()), default=0)
    if not context or longest <= context:
        return []
    scaling = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    problem = f"blocks of {longest:,} tokens but the model's context is {context:,} positions (rope {scaling})"
    return [Finding(3, problem,
                    "extend it (--rope_scaling, --max_position_embeddings) or lower --block_size")]
