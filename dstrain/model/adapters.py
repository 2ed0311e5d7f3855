"""LoRA and QLoRA through PEFT: wrapping a model, checking target modules, 4-bit loading, and loading
a saved adapter on its base."""

from importlib.util import find_spec
from pathlib import Path

import torch
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

from dstrain.distributed import print0
from dstrain.errors import UserError
from dstrain.model.image_text import is_image_text, language_model_targets


def linear_layer_names(model) -> list[str]:
    """The distinct names (last part) of the model's linear layers, the output head (an LM head, or a
    reward model's score head, which PEFT trains in full) left out."""
    heads = [model.get_output_embeddings(), getattr(model, "score", None), getattr(model, "classifier", None)]
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and not any(module is head for head in heads)}
    return sorted(names)


def target_modules(model, requested: str) -> str | list[str]:
    """`all-linear`, or a comma list checked against the model's own linear layers."""
    if requested.strip() == "all-linear":
        return language_model_targets(model, "all-linear") if is_image_text(model.config) else "all-linear"
    wanted = [name.strip() for name in requested.split(",") if name.strip()]
    known = linear_layer_names(model)
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise UserError(f"--lora_target_modules: {', '.join(unknown) or 'nothing given'} is not a linear layer of "
                        f"this model; its linear layers are: {', '.join(known)} (or use all-linear)")
    # An image-text model's vision tower has layers of the same names: adapters go on the language model only.
    return language_model_targets(model, wanted) if is_image_text(model.config) else wanted


def lora_config(model, lora_args, task_type: str = "CAUSAL_LM") -> LoraConfig:
    """The adapter settings, target modules checked against `model`. SEQ_CLS (reward models) also
    trains the new score head in full, as PEFT does for that task."""
    return LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=target_modules(model, lora_args.lora_target_modules),
        task_type=task_type,
    )


def apply_lora(model, lora_args, activation_checkpointing: bool):
    """Freeze the model and add LoRA adapters; prints trainable vs total parameters."""
    if activation_checkpointing:
        # With checkpointing, a frozen embedding's output has no grad, so the recomputed blocks
        # would get none either; PEFT needs the inputs to require grads.
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(model, lora_args))
    report_trainable(model, lora_args)
    return model


def report_trainable(model, lora_args) -> None:
    trainable, total = model.get_nb_trainable_parameters()  # PEFT's count knows ZeRO-3 shards and 4-bit weights
    print0(f"LoRA r={lora_args.lora_r} alpha={lora_args.lora_alpha}: {trainable:,} trainable of {total:,} "
           f"parameters ({trainable / total:.2%})")


def quantization_config(bits: int | None):
    """bitsandbytes 4/8-bit loading for QLoRA; a clear refusal where it cannot run."""
    if not bits:
        return None
    if bits not in (4, 8):
        raise UserError(f"--quantization_bit must be 4 or 8, got {bits}")
    if not torch.cuda.is_available():
        raise UserError(f"--quantization_bit {bits} (QLoRA) needs a CUDA GPU: bitsandbytes' {bits}-bit kernels "
                        "do not run on CPU; drop the flag for plain LoRA")
    if find_spec("bitsandbytes") is None:  # an optional dependency: GPU machines only
        raise UserError("--quantization_bit needs bitsandbytes: pip install bitsandbytes")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_config(adapter_dir: str | Path) -> PeftConfig:
    """An adapter folder's settings as PEFT reads them (base model, task type, rank)."""
    config = Path(adapter_dir) / "adapter_config.json"
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"{config}: not a readable adapter config ({error})") from None


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter folder names (as lora.py wrote it), checked to exist."""
    config, base = Path(adapter_dir) / "adapter_config.json", adapter_config(adapter_dir).base_model_name_or_path
    if not base:
        raise UserError(f"{config} names no base model: pass --base")
    if not Path(base).exists():
        raise UserError(f"{config}: its base model {base} is not found: pass --base")
    return base


def load_adapter_model(adapter, base: str | None = None) -> tuple[PeftModel, str]:
    """A saved adapter on its base model (the one its config names, unless `base` is given), and that
    base's path: a causal LM (lora.py, dpo.py) or a one-score reward model (reward.py, task SEQ_CLS)."""
    if not is_adapter_folder(adapter):
        raise UserError(f"{adapter}: no adapter_config.json (is it a PEFT adapter folder from lora.py?)")
    reward_model = adapter_config(adapter).task_type == "SEQ_CLS"
    one_score = {"num_labels": 1} if reward_model else {}
    if base is None:
        auto_class = AutoPeftModelForSequenceClassification if reward_model else AutoPeftModelForCausalLM
        base = adapter_base(adapter)
        # An absolute path: PEFT's Hub lookup of a tokenizer beside the adapter rejects it without the network.
        return auto_class.from_pretrained(str(Path(adapter).resolve()), **one_score), base
    if not Path(base).exists():
        raise UserError(f"base model {base} not found")
    base_class = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    return PeftModel.from_pretrained(base_class.from_pretrained(base, **one_score), str(adapter)), base
