"""Image-text models (transformers' AutoModelForImageTextToText: LLaVA-style, Qwen2-VL, ...) in sft.py and
lora.py: telling one from its config, its processor, the chat data it trains on, freezing the vision tower
or the projector, and LoRA on the language model only.

Tested here with a tiny LLaVA (tests/tiny_multimodal.py). Qwen2-VL / Qwen2.5-VL load through the same
Auto classes and processor API (`_get_num_multimodal_tokens`, `image_processor`), but their processors need
torchvision, whose pip wheels do not load with the CPU torch on the test machines: untested.
"""

from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from dstrain.distributed import print0
from dstrain.errors import UserError

# Where the parts sit, by model family: LLaVA-style models (model.vision_tower, model.multi_modal_projector,
# model.language_model), Qwen2-VL (model.visual holds the tower and its merger, the projector).
VISION_TOWERS = ("vision_tower", "visual", "vision_model")
PROJECTORS = ("multi_modal_projector", "merger", "mm_projector")
LANGUAGE_MODELS = ("language_model",)


def is_image_text(config) -> bool:
    """Whether the model takes images: an image-text-to-text model type with a vision part."""
    return (config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and getattr(config, "vision_config", None) is not None)


def model_class(config):
    return AutoModelForImageTextToText if is_image_text(config) else AutoModelForCausalLM


def load_processor(path: str, trust_remote_code: bool = False):
    """The model folder's processor (tokenizer + image processor + chat template)."""
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as error:
        raise UserError(f"{path}: cannot load the image-text model's processor: {str(error).splitlines()[0]}") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(f"{path}: its processor ({type(processor).__name__}) has no image processor; an "
                        "image-text model folder holds processor_config.json (or preprocessor_config.json) beside the tokenizer")
    return processor


def check_freeze_flags(model_args, config) -> None:
    if (model_args.freeze_vision_tower or model_args.freeze_projector) and not is_image_text(config):
        raise UserError("--freeze_vision_tower and --freeze_projector apply to image-text models; "
                        f"{model_args.model_name_or_path or model_args.config_name} is a {config.model_type} text model")


def _parts(model, names: tuple[str, ...]) -> list:
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in names]


def freeze_parts(model, freeze_vision_tower: bool, freeze_projector: bool) -> None:
    """Stop training the vision tower and/or the projector (requires_grad off: the optimizer skips them)."""
    for wanted, names, flag in ((freeze_vision_tower, VISION_TOWERS, "--freeze_vision_tower"),
                                (freeze_projector, PROJECTORS, "--freeze_projector")):
        if not wanted:
            continue
        parts = _parts(model, names)
        if not parts:
            raise UserError(f"{flag}: found no {' or '.join(names)} in this {model.config.model_type} model")
        for part in parts:
            part.requires_grad_(False)
        frozen = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for part in parts for p in part.parameters())
        print0(f"{flag}: {frozen:,} parameters frozen")  # ds_numel: the whole size of a ZeRO-3 shard


def language_model_targets(model, wanted: list[str] | str) -> list[str]:
    """The full names of the language model's linear layers called `wanted` (all of them for all-linear):
    LoRA on the language model only, never on the vision tower or the projector, whose layers share names
    (q_proj, fc1) with it."""
    import torch  # noqa: PLC0415

    heads = [model.get_output_embeddings()]
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and not any(module is head for head in heads)
             and any(part in name.split(".") for part in LANGUAGE_MODELS)
             and (wanted == "all-linear" or name.rsplit(".", 1)[-1] in wanted)]
    if not names:
        raise UserError(f"--lora_target_modules: no linear layer {wanted} in this model's language model")
    return names


def chat_data(model_args, data_args, tokenizer, config, seed: int, training_args=None):
    """(the processed chat splits, the processor or None): image-text conversations for an image-text model
    (dstrain/data/multimodal.py), text SFT's otherwise (dstrain/data/sft.py). sft.py, lora.py and audit.py."""
    from dstrain.data.multimodal import image_sft_datasets  # noqa: PLC0415 - image models only
    from dstrain.data.sft import sft_datasets  # noqa: PLC0415

    if not is_image_text(config):
        return sft_datasets(data_args, tokenizer, seed), None
    if training_args is not None and training_args.sequence_parallel_size > 1:
        raise UserError("--sequence_parallel_size is not supported with image-text models")
    processor = load_processor(model_args.model_name_or_path or model_args.tokenizer_name,
                               model_args.trust_remote_code)
    data = image_sft_datasets(data_args, processor.tokenizer, processor, seed)
    if training_args is not None:
        # The Trainer would drop the `images` column (no argument of the model's forward) before the collator,
        # which turns it into pixel_values.
        training_args.remove_unused_columns = False
    return data, processor
