"""Loading the tokenizer and building or loading the model, the same way for every stage."""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dstrain.distributed import print0
from dstrain.errors import UserError
from dstrain.model.config import check_model_tokenizer_pair, derive_model_config, describe_size, extend_context
from dstrain.model.kernels import choose_attention


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    if not Path(name_or_path).exists():
        raise UserError(f"tokenizer not found: {name_or_path} (train one with tokenizer.py)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer from {name_or_path}: {str(error).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{name_or_path}: the tokenizer has no eos token, which packing and generation need")
    return tokenizer


def model_config_for(model_args, tokenizer):
    """A new config derived from the tokenizer, or the trained model's own, checked against it."""
    if model_args.config_name:
        config = derive_model_config(tokenizer, model_args.config_name, model_args.config_overrides,
                                     model_args.pad_vocab_size_to_multiple_of)
        where = f"--config_name {model_args.config_name}"
    else:
        if not Path(model_args.model_name_or_path).exists():
            raise UserError(f"--model_name_or_path: not found: {model_args.model_name_or_path}")
        config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=model_args.trust_remote_code)
        where = f"--model_name_or_path {model_args.model_name_or_path}"
    # An image-text model's vocabulary and special ids are its language model's (LlavaConfig.text_config).
    check_model_tokenizer_pair(config.get_text_config(), tokenizer,
                               f"{where} with tokenizer {model_args.tokenizer_name}")
    extend_context(config, model_args.rope_scaling, model_args.max_position_embeddings)
    return config


def context_length(config) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def choose_block_size(requested: int | None, config, where: str, follow_context: bool = False) -> int:
    """--block_size, or by default the model's context up to 2048; all of it when the context was just
    extended (`follow_context`: training at the new length is the point of extending it)."""
    context = context_length(config)
    if requested is None:
        return context if follow_context and context else min(context or 2048, 2048)
    if context is not None and requested > context:
        raise UserError(f"--block_size {requested} is larger than the model's context "
                        f"(max_position_embeddings={context} in {where})")
    return requested


def build_model(model_args, config, quantization_config=None, auto_class=AutoModelForCausalLM):
    """Random init from the config, or the weights in model_name_or_path (quantized for QLoRA).

    Under ZeRO-3 transformers creates the weights already partitioned across ranks. `auto_class`
    picks the head: a reward model is AutoModelForSequenceClassification over the same body.
    """
    attention, why = choose_attention(model_args.attn_implementation)  # --attn_implementation auto: dstrain/model/kernels.py
    print0(why)
    extra = {"attn_implementation": attention} if attention else {}
    if quantization_config is not None:
        extra["quantization_config"] = quantization_config
    if model_args.model_name_or_path:
        model = auto_class.from_pretrained(model_args.model_name_or_path, config=config,
                                           trust_remote_code=model_args.trust_remote_code, **extra)
        print0(f"Loaded {config.model_type} from {model_args.model_name_or_path}: {describe_size(model)}")
    else:
        model = auto_class.from_config(config, trust_remote_code=model_args.trust_remote_code, **extra)
        print0(f"Initialised a new {config.model_type} model: {describe_size(model)}, "
               f"vocab {config.vocab_size}, context {context_length(config)}")
    return model
