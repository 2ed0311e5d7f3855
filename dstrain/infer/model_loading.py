"""A model ready to generate: a model folder, or a PEFT adapter folder on its base, with any number
of named LoRA adapters over one copy of that base (chosen per row at generation time); the model
flags chat.py, generate.py and serve.py share; the device it runs on."""

import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, GenerationConfig

from dstrain.errors import UserError
from dstrain.model.adapters import adapter_base, is_adapter_folder
from dstrain.model.image_text import is_image_text, load_processor, model_class
from dstrain.model.loading import context_length, load_tokenizer


@dataclass
class InferenceModel:
    """A model ready to generate: plain, or a PeftModel holding named adapters over one base."""
    model: object
    tokenizer: object
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> folder
    context: int | None = None
    main_adapter: str | None = None  # the adapter --model named, when it was an adapter folder
    processor: object = None  # an image-text model's processor (images at inference: dstrain/infer/images.py)

    @property
    def has_adapters(self) -> bool:
        return bool(self.adapters)


def add_model_flags(parser) -> None:
    """The flags that say which model an inference command loads, and where."""
    parser.add_argument("--model", required=True,
                        help="a model folder with its tokenizer, or a PEFT adapter folder (lora.py's output)")
    parser.add_argument("--base", help="the base model of an adapter --model (default: the one its config names)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1")
    parser.add_argument("--trust_remote_code", action="store_true", help="run code shipped in the model folder")


def load_model_from_args(args, adapters: dict[str, str] | None = None) -> InferenceModel:
    """The model add_model_flags' flags name, with `adapters` (name -> folder) over its base."""
    return load_inference_model(args.model, args.base, adapters, args.device, args.trust_remote_code)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: no CUDA GPU is visible")
    return torch.device(requested)


def load_inference_model(model_dir: str, base: str | None = None, adapters: dict[str, str] | None = None,
                         device: str = "auto", trust_remote_code: bool = False) -> InferenceModel:
    """`model_dir` is a model folder or a PEFT adapter folder (loaded on `base`, or the base its config
    names); `adapters` adds named LoRA adapters over the same base, chosen per row at generation time."""
    adapters, main_adapter = dict(adapters or {}), None
    if not Path(model_dir).exists():
        raise UserError(f"--model: not found: {model_dir}")
    if is_adapter_folder(model_dir):
        main_adapter = Path(model_dir).resolve().name
        if main_adapter in adapters:
            raise UserError(f"--lora {main_adapter}: the name is taken by --model {model_dir}; choose another")
        adapters = {main_adapter: model_dir} | adapters
        base = base or adapter_base(model_dir)
        # lora.py saves the tokenizer (and its chat template) beside the adapter
        tokenizer_dir = model_dir if (Path(model_dir) / "tokenizer_config.json").is_file() else base
    else:
        base, tokenizer_dir = base or model_dir, model_dir
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code)
    if tokenizer.pad_token is None:  # batches are padded with eos then; the attention mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    target = pick_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    # The base is loaded here, not by AutoPeftModelForCausalLM, so that the --lora adapters share it and a
    # broken base and a broken adapter each keep their own error message.
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
        # an image-text model (AutoModelForImageTextToText) with its processor, or a causal LM
        model = model_class(config).from_pretrained(base, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a model from {base}: {str(error).splitlines()[0]}") from None
    processor = load_processor(tokenizer_dir, trust_remote_code) if is_image_text(config) else None
    if is_adapter_folder(model_dir) and (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)  # lora.py's chat stop tokens
    model = _attach_adapters(model, adapters)
    model.to(target).eval()
    return InferenceModel(model, tokenizer, adapters, context_length(model.config), main_adapter, processor)


def release(loaded: InferenceModel) -> None:
    """Let a model's memory go before the next one loads (eval.py chat answers with two models in turn)."""
    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _attach_adapters(model, adapters: dict[str, str]):
    if not adapters:
        return model
    for name, folder in adapters.items():
        if not is_adapter_folder(folder):
            raise UserError(f"--lora {name}={folder}: no adapter_config.json there "
                            "(a PEFT adapter folder from lora.py)")
    try:
        (first_name, first_dir), *others = adapters.items()
        model = PeftModel.from_pretrained(model, first_dir, adapter_name=first_name)
        for name, folder in others:
            model.load_adapter(folder, adapter_name=name)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise UserError(f"cannot load the LoRA adapters {', '.join(adapters)}: {str(error).splitlines()[0]}") from None
    return model
