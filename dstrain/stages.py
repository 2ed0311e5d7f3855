"""What each training stage reads, made from its arguments as the training script makes it: one
place for audit.py and `data.py prepare`, so both build exactly the cache the training run will
look for (the training scripts make theirs with the same calls, in their recipes)."""

from dstrain.arguments import AdapterDataArguments, ChatDataArguments, DataArguments, PreferenceDataArguments
from dstrain.data.blocks import pretraining_datasets
from dstrain.data.cache import ProcessedDatasets
from dstrain.data.chat_template import require_chat_template
from dstrain.data.pairs import preference_datasets
from dstrain.errors import UserError
from dstrain.model.image_text import chat_data
from dstrain.model.loading import choose_block_size, load_tokenizer, model_config_for

CHAT_STAGES = ("sft", "preference")


def stage_of(data_args) -> str:
    """pretrain, sft or preference: which data a script's data arguments describe."""
    if isinstance(data_args, PreferenceDataArguments):
        return "preference"
    if isinstance(data_args, AdapterDataArguments) or hasattr(data_args, "stage"):
        return data_args.stage
    if isinstance(data_args, ChatDataArguments):
        return "sft"
    if isinstance(data_args, DataArguments):
        return "pretrain"
    raise UserError(f"{type(data_args).__name__} describes no training data")


def stage_data(stage: str, model_args, data_args, seed: int) -> tuple[object, object, ProcessedDatasets]:
    """(tokenizer, model config, the processed splits) of `stage`, building the cache where missing."""
    tokenizer = load_tokenizer(model_args.tokenizer_name, model_args.trust_remote_code)
    config = model_config_for(model_args, tokenizer)
    if stage in CHAT_STAGES:
        require_chat_template(tokenizer, model_args.tokenizer_name)
    if stage == "preference":
        return tokenizer, config, preference_datasets(data_args, tokenizer, seed)
    if stage == "sft":  # an image-text model's conversations carry images (dstrain/model/image_text.py)
        return tokenizer, config, chat_data(model_args, data_args, tokenizer, config, seed)[0]
    block_size = choose_block_size(data_args.block_size, config, model_args.config_name or model_args.model_name_or_path)
    return tokenizer, config, pretraining_datasets(data_args, tokenizer, block_size, seed)
