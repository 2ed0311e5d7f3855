"""The running batch of the server's continuous batching: requests join it and leave it between any two
decoding steps, each row with its own prompt, sampling settings, stop tokens, stop strings, length and
LoRA adapter. Driven by one worker thread (dstrain/infer/engine.py).

Which parts are written here, and why. The model's forward, its KV cache (transformers' DynamicCache),
PEFT's per-row adapters (`adapter_names`) and the sampling processors are the libraries' own; the step
loop around them is ours. transformers 5.23's own continuous batching (`generate_batch`, paged
attention) gives the same greedy tokens, but on CPU with the demo model it did 87 tokens/s for 8 prompts
of 48 tokens where one-at-a-time `generate` did 359 (its per-step scheduling dominates a small model),
and it runs no PEFT adapters; `generate` itself runs a static batch to its end. So the cache is one
left-padded batch: a joining request is prefilled on its own (left-padded against the others joining with
it), and its cache rows are padded on the left to the running batch's length and concatenated to it; a
request that leaves is dropped from the cache by index, and columns that have become padding for every
remaining row are cut. Positions come from the attention mask as `generate` computes them, so each row's
greedy tokens are those of `generate` on its prompt alone (tests/test_serve_batching.py checks it).
Models whose cache has sliding-window layers cannot be left-padded this way and are refused.
"""

import random
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dstrain.infer.generation import Completion, StopTextFilter
from dstrain.infer.model_loading import InferenceModel
from dstrain.infer.sampling import Sampling


class IncrementalText:
    """Token ids to text pieces as they arrive, never half a character: decodes a short window (from the
    start of the last emitted piece) rather than the whole reply each step, the offsets vLLM's detokenizer
    uses, so a tokenizer that drops a word's leading space at the start of a decode still gets it right."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before, after = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before, after = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


@dataclass
class Row:
    """One request in the running batch."""
    request: object  # engine.GenerationRequest
    stop_ids: frozenset[int]
    generator: torch.Generator | None  # per request, so a seed gives the same tokens whatever shares the batch
    tokens: list[int] = field(default_factory=list)  # generated so far
    text: IncrementalText | None = None  # streamed requests and stop strings: text as it grows
    stop_filter: StopTextFilter | None = None
    released: list[str] = field(default_factory=list)  # text passed on (or kept, unstreamed), stop strings cut
    finish: str | None = None

    @property
    def sampling(self) -> Sampling:
        return self.request.sampling

    def add(self, token: int) -> str:
        """Take the next token; the text it releases (streaming). Sets `finish` when the row is done."""
        sampling = self.sampling
        self.tokens.append(token)
        piece = ""
        if self.text is not None:
            piece = self.stop_filter.feed(self.text.add(token))
            if self.stop_filter.stopped:
                self.finish = "stop"
        if token in self.stop_ids and not sampling.ignore_eos:
            self.finish = "stop"
        elif self.finish is None and len(self.tokens) >= sampling.max_new_tokens:
            self.finish = "length"
        if self.finish is not None and self.text is not None and not self.stop_filter.stopped:
            piece += self.stop_filter.feed(self.text.flush()) + self.stop_filter.flush()
        if piece:
            self.released.append(piece)
        return piece

    def completion(self, tokenizer) -> Completion:
        if self.text is not None:
            text = "".join(self.released)
        else:
            text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        return Completion(text, len(self.request.prompt), len(self.tokens), self.finish or "stop", list(self.tokens))


def new_row(loaded: InferenceModel, request, stop_ids: list[int]) -> Row:
    sampling = request.sampling
    generator = None
    if sampling.temperature != 0:
        generator = torch.Generator(device=loaded.model.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else random.getrandbits(63))
    needs_text = request.pieces is not None or bool(sampling.stop)
    return Row(request, frozenset(stop_ids), generator,
               text=IncrementalText(loaded.tokenizer) if needs_text else None,
               stop_filter=StopTextFilter(sampling.stop) if needs_text else None)


def check_cache_supported(model) -> None:
    """Left-padded rows need full-attention caches (see the module's docstring): refused at start-up."""
    layers = DynamicCache(config=model.config).layers
    if any(type(layer) is not DynamicLayer for layer in layers):
        raise ValueError(f"{model.config.model_type} has sliding-window attention layers, which the transformers "
                         "backend's continuous batching does not support: serve it with --backend vllm or sglang")


class RunningBatch:
    """The rows decoding together, their KV cache and attention mask (1 for real tokens, 0 for padding)."""

    def __init__(self, loaded: InferenceModel):
        self.loaded, self.model = loaded, loaded.model
        self.device = self.model.device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached columns]
        self.next_tokens: torch.Tensor | None = None  # [rows, 1]: the token each row feeds next

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.next_tokens = [], None, None, None

    def _forward(self, input_ids, mask, position_ids, cache, rows: list[Row]) -> tuple[torch.Tensor, DynamicCache]:
        extra = {}
        if self.loaded.has_adapters:
            extra["adapter_names"] = [row.request.adapter for row in rows]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                         use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :].float(), out.past_key_values

    @torch.inference_mode()
    def admit(self, rows: list[Row]) -> list[tuple[Row, str]]:
        """Prefill the joining rows (one left-padded forward), pick their first tokens, and merge them in."""
        pad_id = self.loaded.tokenizer.pad_token_id or 0
        longest = max(len(row.request.prompt) for row in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.request.prompt
            ids[i, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, longest - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate computes them
        logits, cache = self._forward(ids, mask, positions, DynamicCache(), rows)
        first = self._pick(logits, rows, [torch.tensor(row.request.prompt, device=self.device) for row in rows])
        self._merge(rows, cache, mask, first)
        return self._take(rows, first)

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, str]]:
        """One decoding step for every row: its next token (and any text it releases)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        logits, self.cache = self._forward(self.next_tokens, self.mask, positions, self.cache, self.rows)
        histories = None
        if any(row.sampling.repetition_penalty != 1 for row in self.rows):
            histories = [torch.tensor(row.request.prompt + row.tokens, device=self.device) for row in self.rows]
        chosen = self._pick(logits, self.rows, histories)
        self.next_tokens = chosen.unsqueeze(1)
        return self._take(self.rows, chosen)

    def finished(self) -> list[Row]:
        return [row for row in self.rows if row.finish is not None]

    def remove(self, leaving: list[Row]) -> None:
        """Drop rows (finished or cancelled) from the batch and the cache; cut all-padding columns."""
        if not leaving:
            return
        keep = [i for i, row in enumerate(self.rows) if row not in leaving]
        if not keep:
            return self.clear()
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_tokens = self.mask[index], self.next_tokens[index]
        start = int(self.mask.any(0).nonzero()[0])  # padding every remaining row has on the left
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]

    # ----- inside -----

    def _take(self, rows: list[Row], tokens: torch.Tensor) -> list[tuple[Row, str]]:
        return [(row, row.add(token)) for row, token in zip(rows, tokens.tolist())]  # one device sync a step

    def _merge(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, first: torch.Tensor) -> None:
        if self.cache is None:
            self.rows, self.cache, self.mask, self.next_tokens = list(rows), cache, mask, first.unsqueeze(1)
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)], dim=0)
        self.mask = torch.cat([left_pad(self.mask, width), left_pad(mask, width)], dim=0)
        self.next_tokens = torch.cat([self.next_tokens, first.unsqueeze(1)], dim=0)
        self.rows += rows

    def _pick(self, logits: torch.Tensor, rows: list[Row], histories: list[torch.Tensor] | None) -> torch.Tensor:
        """Each row's next token under its own settings, in `generate`'s order: repetition penalty, no stop
        token before max_new_tokens for ignore_eos, then greedy, or temperature, top-k, top-p and a draw."""
        chosen = logits.argmax(-1)
        for i, row in enumerate(rows):
            sampling = row.sampling
            if sampling.temperature == 0 and sampling.repetition_penalty == 1 and not sampling.ignore_eos:
                continue  # the argmax above
            scores = logits[i:i + 1]
            if sampling.repetition_penalty != 1:
                scores = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(histories[i][None], scores)
            if sampling.ignore_eos:
                scores = scores.clone()
                scores[:, list(row.stop_ids)] = -float("inf")
            if sampling.temperature == 0:
                chosen[i] = scores.argmax(-1)[0]
                continue
            scores = TemperatureLogitsWarper(sampling.temperature)(None, scores)
            if sampling.top_k:
                scores = TopKLogitsWarper(sampling.top_k)(None, scores)
            if sampling.top_p < 1:
                scores = TopPLogitsWarper(sampling.top_p)(None, scores)
            chosen[i] = torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0, 0]
        return chosen


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence dimension (-2 for keys and values [rows, heads, seq, dim], -1 for masks)."""
    dim = tensor.dim() - 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
