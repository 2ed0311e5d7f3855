"""The model is derived from the tokenizer: vocab size and special ids are never typed by hand.

Sizes come from a preset in configs/models/ (or any JSON with a `model_type`, or a
HuggingFace model folder); the architecture is whatever `AutoConfig` knows, LLaMA by default.
"""

import json
import math
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from dstrain.errors import UserError

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def resolve_model_spec(name_or_path: str) -> Path:
    """A preset name (`tiny`), a JSON file, or a folder with a config.json."""
    candidates = [Path(name_or_path), PRESET_DIR / name_or_path, PRESET_DIR / f"{name_or_path}.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate / "config.json"
    presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
    raise UserError(f"--config_name: '{name_or_path}' is neither a file, a model folder, nor a preset ({presets})")


def load_model_spec(name_or_path: str) -> dict:
    path = resolve_model_spec(name_or_path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a JSON object of model settings")
    spec = {key: value for key, value in spec.items() if not key.startswith("_")}  # "_comment" etc.
    spec.setdefault("model_type", "llama")
    return spec


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase, multiple_of: int = 1) -> int:
    """len(tokenizer), rounded up to a multiple (64 keeps GPU matmuls on fast tile sizes)."""
    return int(math.ceil(len(tokenizer) / multiple_of) * multiple_of)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def derive_model_config(tokenizer: PreTrainedTokenizerBase, config_name: str, overrides: str | None = None,
                        pad_vocab_to_multiple_of: int = 1) -> PretrainedConfig:
    """The preset's architecture and sizes, `--config_overrides "num_hidden_layers=4,hidden_act=gelu"` over
    them (PretrainedConfig.update_from_string, as run_clm.py does), and the vocabulary size and special
    ids from the tokenizer, whatever the preset or the overrides say."""
    spec = load_model_spec(config_name)
    model_type = spec.pop("model_type")
    from_tokenizer = {"vocab_size": padded_vocab_size(tokenizer, pad_vocab_to_multiple_of), **special_token_ids(tokenizer)}
    try:
        config = AutoConfig.for_model(model_type, **(spec | from_tokenizer))
    except ValueError as error:
        raise UserError(f"--config_name {config_name}: {str(error).splitlines()[0]}") from None
    if overrides:
        for item in overrides.split(","):
            if "=" not in item or not item.split("=", 1)[0].strip():
                raise UserError(f"--config_overrides: '{item}' is not key=value")
        try:
            config.update_from_string(overrides)
        except ValueError as error:
            raise UserError(f"--config_overrides {overrides}: {str(error).splitlines()[0]}") from None
        config.update(from_tokenizer)
    return config


# RoPE variants that stretch a trained context (transformers' ROPE_INIT_FUNCTIONS); "default" stretches nothing.
SCALED_ROPE = ("linear", "dynamic", "yarn", "longrope", "llama3")


def parse_rope_scaling(value: str) -> dict:
    """`--rope_scaling yarn:4` or a JSON object in transformers' rope_parameters form
    (`{"rope_type": "yarn", "factor": 4, "beta_fast": 32}`): the parameters to lay over the model's own."""
    text = value.strip()
    if text.startswith("{"):
        try:
            params = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"--rope_scaling: not valid JSON ({error})") from None
        if not isinstance(params, dict):
            raise UserError("--rope_scaling: expected a JSON object such as {\"rope_type\": \"yarn\", \"factor\": 4}")
        params = dict(params)
        if "type" in params and "rope_type" not in params:  # the older key, as in many published configs
            params["rope_type"] = params.pop("type")
    else:
        kind, _, factor = text.partition(":")
        try:
            params = {"rope_type": kind.strip(), "factor": float(factor)}
        except ValueError:
            raise UserError(f"--rope_scaling '{value}': expected TYPE:FACTOR (e.g. yarn:4, linear:2) or a JSON "
                            "object") from None
    if params.get("rope_type") not in SCALED_ROPE:
        raise UserError(f"--rope_scaling: rope type '{params.get('rope_type')}' is not one of {', '.join(SCALED_ROPE)}")
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise UserError(f"--rope_scaling: factor must be a number of at least 1, got {factor}")
    return params


def extend_context(config: PretrainedConfig, rope_scaling: str | None, max_position_embeddings: int | None) -> None:
    """Context extension for continued pretraining: RoPE scaling over the model's rope parameters, and the
    longer context it serves (--max_position_embeddings, else the trained context times the factor).
    Both are written into the config, so the saved model carries them and loads extended anywhere."""
    if not rope_scaling and not max_position_embeddings:
        return
    trained = getattr(config, "max_position_embeddings", None)
    if trained is None or getattr(config, "rope_parameters", None) is None:
        raise UserError(f"--rope_scaling/--max_position_embeddings: the {config.model_type} config has no RoPE "
                        "parameters and max_position_embeddings to extend")
    new_context = max_position_embeddings
    if rope_scaling:
        params = parse_rope_scaling(rope_scaling)
        rope = {**config.rope_parameters, **params}
        if params["rope_type"] != "linear":  # these scale relative to the context the model was trained on
            rope.setdefault("original_max_position_embeddings", trained)
        config.rope_parameters = rope
        new_context = new_context or int(trained * params["factor"])
    config.max_position_embeddings = new_context
    try:
        config.validate_rope()
    except (ValueError, KeyError) as error:
        raise UserError(f"--rope_scaling {rope_scaling}: {str(error).splitlines()[0]}") from None


def check_model_tokenizer_pair(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a model whose embeddings or special ids disagree with the tokenizer."""
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab < len(tokenizer):
        raise UserError(
            f"{where}: the model's vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            "they were not made for each other"
        )
    for key, token_id in special_token_ids(tokenizer).items():
        model_id = getattr(config, key, None)
        if model_id is None or token_id is None:
            continue
        model_ids = model_id if isinstance(model_id, list) else [model_id]
        if token_id not in model_ids:
            raise UserError(f"{where}: the model's {key} is {model_id} but the tokenizer's is {token_id}")


def count_parameters(model) -> int:
    """Parameter count that also works under ZeRO-3, where local tensors are empty shards."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def describe_size(model) -> str:
    total = count_parameters(model)
    return f"{total / 1e6:.2f}M parameters" if total >= 1e5 else f"{total:,} parameters"
