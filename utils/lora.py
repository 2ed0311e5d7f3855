"""LoRA and QLoRA through PEFT: wrapping a model, checking target modules, 4-bit loading."""

import torch
from peft import LoraConfig, get_peft_model

from utils.distributed import print0
from utils.errors import UserError
from utils.model_config import count_parameters


def linear_layer_names(model) -> list[str]:
    """The distinct names (last part) of the model's linear layers, the output head left out."""
    output = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output}
    return sorted(names)


def target_modules(model, requested: str) -> str | list[str]:
    """`all-linear`, or a comma list checked against the model's own linear layers."""
    if requested.strip() == "all-linear":
        return "all-linear"
    wanted = [name.strip() for name in requested.split(",") if name.strip()]
    known = linear_layer_names(model)
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise UserError(f"--lora_target_modules: {', '.join(unknown) or 'nothing given'} is not a linear layer of "
                        f"this model; its linear layers are: {', '.join(known)} (or use all-linear)")
    return wanted


def apply_lora(model, lora_args, activation_checkpointing: bool):
    """Freeze the model and add LoRA adapters; prints trainable vs total parameters."""
    if activation_checkpointing:
        # With checkpointing, a frozen embedding's output has no grad, so the recomputed blocks
        # would get none either; PEFT needs the inputs to require grads.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=target_modules(model, lora_args.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = count_parameters(model)
    print0(f"LoRA r={lora_args.lora_r} alpha={lora_args.lora_alpha}: {trainable:,} trainable of {total:,} "
           f"parameters ({trainable / total:.2%})")
    return model


def quantization_config(bits: int | None):
    """bitsandbytes 4/8-bit loading for QLoRA; a clear refusal where it cannot run."""
    if not bits:
        return None
    if bits not in (4, 8):
        raise UserError(f"--quantization_bit must be 4 or 8, got {bits}")
    if not torch.cuda.is_available():
        raise UserError(f"--quantization_bit {bits} (QLoRA) needs a CUDA GPU: bitsandbytes' {bits}-bit kernels "
                        "do not run on CPU; drop the flag for plain LoRA")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--quantization_bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
