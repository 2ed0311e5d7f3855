"""Generation with transformers' `generate` (KV cache on): loading a model folder, or a PEFT adapter
folder on its base, with any number of named LoRA adapters; sampling settings; chat or plain prompts;
batched generation with left padding; streaming through transformers' streamers.

Shared by generate.py, chat.py, serve.py (dstrain/infer/engine.py) and the demo.
"""

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextStreamer

from dstrain.errors import UserError
from dstrain.model.adapters import adapter_base, is_adapter_folder
from dstrain.model.loading import context_length, load_tokenizer
from dstrain.data.chat_template import end_of_turn_id, has_chat_template, render

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


# ===== sampling settings =====

@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; the same fields for the CLI flags, batch answers and the server."""
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = 0  # None: not reseeded (a server's default, so concurrent requests differ)
    stop: tuple[str, ...] = ()  # extra stop strings (OpenAI's `stop`), cut from the text
    ignore_eos: bool = False  # always generate max_new_tokens (vLLM's flag; benchmarks use it)

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) for the first out-of-range value, or None."""
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", 0 <= self.temperature <= 100, "must be between 0 (greedy) and 100"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or positive"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be positive (1 is off)"),
            ("stop", all(self.stop) and len(self.stop) <= 4, "takes at most 4 non-empty strings"),
        ]
        return next(((name, message) for name, ok, message in checks if not ok), None)

    def check(self) -> "Sampling":
        if (problem := self.problem()) is not None:
            raise UserError(f"--{problem[0]}: {problem[1]}, got {getattr(self, problem[0])}")
        return self

    def batch_key(self) -> tuple:
        """Requests whose keys match can share one `generate` call (each keeps its own max_new_tokens)."""
        return (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed, self.stop,
                self.ignore_eos)

    def generate_kwargs(self) -> dict:
        kwargs = {"repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            return kwargs | {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        return kwargs | {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def describe(self) -> dict:
        return asdict(self) | {"stop": list(self.stop)}


def add_sampling_flags(parser, max_new_tokens: int = 128, temperature: float = 0.7) -> None:
    """The sampling flags every inference command takes."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 means greedy decoding")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling (1: off)")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="above 1 discourages repeats (1: off)")
    parser.add_argument("--seed", type=int, default=0)


def sampling_from_args(args) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed).check()


# ===== loading =====

@dataclass
class InferenceModel:
    """A model ready to generate: plain, or a PeftModel holding named adapters over one base."""
    model: object
    tokenizer: object
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> folder
    context: int | None = None
    main_adapter: str | None = None  # the adapter --model named, when it was an adapter folder

    @property
    def has_adapters(self) -> bool:
        return bool(self.adapters)


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
    target = pick_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a model from {base}: {str(error).splitlines()[0]}") from None
    if is_adapter_folder(model_dir) and (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)  # lora.py's chat stop tokens
    model = _attach_adapters(model, adapters)
    model.to(target).eval()
    return InferenceModel(model, tokenizer, adapters, context_length(model.config), main_adapter)


def _attach_adapters(model, adapters: dict[str, str]):
    if not adapters:
        return model
    from peft import PeftModel

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


# ===== prompts =====

def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation through the tokenizer's chat template, ending with the assistant's cue."""
    if not has_chat_template(tokenizer):
        raise UserError("this model's tokenizer has no chat template: use plain continuation (--prompt)")
    return render(tokenizer, messages, add_generation_prompt=True)


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    # The tokenizer's own special tokens (a bos for models that want one; ours adds none).
    return tokenizer(text, verbose=False)["input_ids"]


def stop_token_ids(model, tokenizer, chat: bool) -> list[int]:
    """eos and what the model's generation_config stops at; for chat also the end-of-turn token,
    so even a model saved without chat stop tokens (a pretrained base) ends its turn."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    extra = [end_of_turn_id(tokenizer)] if chat and has_chat_template(tokenizer) else []
    return [token for token in dict.fromkeys([*extra, *configured, tokenizer.eos_token_id]) if token is not None]


# ===== generation =====

@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # generated tokens, the stop token included
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens reached)


class StopTextFilter:
    """Cuts text at the first stop string and, while streaming, holds back text that may be the start
    of one. Hand-written because transformers' `stop_strings` only ends generation: the stop text
    stays in the output, and a streamer has already passed it on."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        self.pending += text
        found = [self.pending.find(stop) for stop in self.stops if stop in self.pending]
        if found:
            self.stopped = True
            return self.pending[:min(found)]
        hold = max((n for stop in self.stops for n in range(len(stop) - 1, 0, -1)
                    if self.pending.endswith(stop[:n])), default=0)
        released, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return released

    def flush(self) -> str:
        released, self.pending = ("" if self.stopped else self.pending), ""
        return released


class CallbackStreamer(TextStreamer):
    """transformers' TextStreamer (whole words, never half a character), handing each piece to a
    callback instead of printing it."""

    def __init__(self, tokenizer, on_text):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class StopWhenSet(StoppingCriteria):
    """Ends generation once the event is set (the client went away, or a stop string was streamed)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder-only model continues from the last position of each row, so batches pad on the left."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    return input_ids, attention_mask


@torch.inference_mode()
def generate_batch(loaded: InferenceModel, prompts: list[list[int]], sampling: Sampling, stop_ids: list[int],
                   max_new_tokens: list[int] | None = None, adapter_names: list[str] | None = None,
                   streamer=None, cancel: threading.Event | None = None) -> list[Completion]:
    """One `generate` call for all prompts (left padded). Each row may have its own max_new_tokens
    and, over a PeftModel, its own adapter (PEFT's mixed-adapter batches; BASE_ADAPTER for none)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    limits = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_padded(prompts, pad_id, model.device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    extra = {"adapter_names": adapter_names} if loaded.has_adapters and adapter_names else {}
    if cancel is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([StopWhenSet(cancel)])
    if sampling.ignore_eos:
        extra["min_new_tokens"] = max(limits)
    if sampling.stop:  # end each row at its stop string rather than at max_new_tokens
        extra |= {"stop_strings": list(sampling.stop), "tokenizer": tokenizer}
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(limits),
                            eos_token_id=stop_ids, pad_token_id=pad_id, streamer=streamer,
                            **sampling.generate_kwargs(), **extra)
    completions = []
    for row, (prompt, limit) in enumerate(zip(prompts, limits)):
        new = output[row, input_ids.shape[1]:].tolist()[:limit]
        ends = [] if sampling.ignore_eos else [i for i, token in enumerate(new) if token in stop_ids]
        new = new[:ends[0] + 1] if ends else new
        text_filter = StopTextFilter(sampling.stop)
        text = text_filter.feed(tokenizer.decode(new, skip_special_tokens=True)) + text_filter.flush()
        while text_filter.stopped and new and new[-1] == pad_id:  # generate pads a row it ended early
            new.pop()
        finished = bool(ends) or text_filter.stopped or (cancel is not None and cancel.is_set())
        completions.append(Completion(text, len(prompt), len(new), "stop" if finished else "length"))
    return completions


def generate_one(loaded: InferenceModel, prompt: list[int], sampling: Sampling, chat: bool, streamer=None,
                 adapter: str | None = None) -> Completion:
    adapter_names = [adapter] if adapter else None
    return generate_batch(loaded, [prompt], sampling, stop_token_ids(loaded.model, loaded.tokenizer, chat),
                          adapter_names=adapter_names, streamer=streamer)[0]


def fit_to_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> str | None:
    """Why a request cannot fit the model's context, or None when it does."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        return (f"this model's maximum context length is {context} tokens, but {prompt_tokens + max_new_tokens} "
                f"were asked for ({prompt_tokens} in the prompt, {max_new_tokens} to generate)")
    return None

