"""Generation with transformers' `generate` (KV cache on): chat or plain prompts, one left-padded batch
per call (each row with its own max_new_tokens and LoRA adapter), stop tokens and stop strings, and
streaming through transformers' streamers.

Shared by generate.py, chat.py (dstrain/infer/chat_session.py) and serve.py (dstrain/infer/engine.py).
"""

import threading
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from dstrain.data.chat_template import end_of_turn_id, has_chat_template, render
from dstrain.errors import UserError
from dstrain.infer.model_loading import InferenceModel
from dstrain.infer.sampling import Sampling

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


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
    token_ids: list[int] | None = None  # the generated ids, where the caller kept them (the server's engine)


class StopTextFilter:
    """Cuts text at the first stop string to be completed and, while streaming, holds back text that may be the
    start of one. Hand-written because transformers' `stop_strings` only ends generation: the stop text
    stays in the output, and a streamer has already passed it on. Each stop string is matched with a
    Knuth-Morris-Pratt automaton, so a piece costs time in its own length whatever the stop strings' length
    (looking for every held-back prefix again cost the square of it: 0.4 ms a piece at 256 characters)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.stopped = stops, "", False
        self._fallback = [prefix_function(stop) for stop in stops]
        self._matched = [0] * len(stops)  # per stop: how many of its first characters end the text so far

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        start = len(self.pending)
        self.pending += text
        matched = self._matched
        for offset, char in enumerate(text):
            completed = 0  # the longest stop string ending at this character: it starts first
            for k, stop in enumerate(self.stops):
                state, fallback = matched[k], self._fallback[k]
                while state and stop[state] != char:
                    state = fallback[state - 1]
                if stop[state] == char:
                    state += 1
                if state == len(stop):
                    completed = max(completed, state)
                    state = fallback[state - 1]
                matched[k] = state
            if completed:
                self.stopped = True
                return self.pending[:start + offset + 1 - completed]
        hold = max(matched)
        released, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return released

    def flush(self) -> str:
        released, self.pending = ("" if self.stopped else self.pending), ""
        return released


def prefix_function(text: str) -> list[int]:
    """For each prefix of `text`, the length of its longest proper prefix that is also its suffix."""
    table = [0] * len(text)
    for i in range(1, len(text)):
        state = table[i - 1]
        while state and text[i] != text[state]:
            state = table[state - 1]
        table[i] = state + (text[i] == text[state])
    return table


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


@torch.inference_mode()
def generate_batch(loaded: InferenceModel, prompts: list[list[int]], sampling: Sampling, stop_ids: list[int],
                   max_new_tokens: list[int] | None = None, adapter_names: list[str] | None = None,
                   streamer=None, cancel: threading.Event | None = None, images: list[list] | None = None
                   ) -> list[Completion]:
    """One `generate` call for all prompts (left padded). Each row may have its own max_new_tokens
    and, over a PeftModel, its own adapter (PEFT's mixed-adapter batches; BASE_ADAPTER for none); for an
    image-text model, its own images (PIL, in the order of its image tokens: dstrain/infer/images.py)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    limits = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
    pad_id = tokenizer.pad_token_id  # eos where the tokenizer has none (load_inference_model)
    # A decoder-only model continues from the last position of each row, so batches pad on the left.
    padded = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(model.device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    extra = {"adapter_names": adapter_names} if loaded.has_adapters and adapter_names else {}
    if cancel is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([StopWhenSet(cancel)])
    if sampling.ignore_eos:
        extra["min_new_tokens"] = max(limits)
    if images and any(images):
        from dstrain.infer.images import pixel_inputs  # noqa: PLC0415 - image-text models only

        extra |= pixel_inputs(loaded, images)
    if sampling.stop:  # end each row at its stop string rather than at max_new_tokens
        extra |= {"stop_strings": list(sampling.stop), "tokenizer": tokenizer}
    output = model.generate(**padded, max_new_tokens=max(limits), eos_token_id=stop_ids, pad_token_id=pad_id,
                            streamer=streamer, **sampling.generate_kwargs(), **extra)
    completions = []
    for row, (prompt, limit) in enumerate(zip(prompts, limits)):
        new = output[row, padded["input_ids"].shape[1]:].tolist()[:limit]
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
                 adapter: str | None = None, images: list | None = None) -> Completion:
    adapter_names = [adapter] if adapter else None
    return generate_batch(loaded, [prompt], sampling, stop_token_ids(loaded.model, loaded.tokenizer, chat),
                          adapter_names=adapter_names, streamer=streamer, images=[images] if images else None)[0]


def fit_to_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> str | None:
    """Why a request cannot fit the model's context, or None when it does."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        return (f"this model's maximum context length is {context} tokens, but {prompt_tokens + max_new_tokens} "
                f"were asked for ({prompt_tokens} in the prompt, {max_new_tokens} to generate)")
    return None

