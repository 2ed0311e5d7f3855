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
from tokenizers.decoders import DecodeStream
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dstrain.infer.generation import Completion, StopTextFilter
from dstrain.infer.images import pixel_inputs
from dstrain.infer.model_loading import InferenceModel
from dstrain.infer.sampling import Sampling


class IncrementalText:
    """Token ids to text pieces as they arrive, never half a character. With a fast tokenizer this is the
    `tokenizers` library's own DecodeStream (in Rust: a step costs microseconds, not two Python decodes);
    otherwise a short window is decoded (from the start of the last emitted piece, the offsets vLLM's
    detokenizer uses, so a word's leading space survives)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self.stream is not None:
            return self.stream.step(self.backend, token) or ""
        self.ids.append(token)
        before, after = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held (an unfinished character, which decodes as U+FFFD, as `decode` would give it)."""
        if self.stream is not None:
            return ""  # DecodeStream holds bytes only until they complete a character
        before, after = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One request in the running batch."""
    request: object  # engine.GenerationRequest
    stop_ids: frozenset[int]
    random: random.Random | None  # per request, so a seed gives the same tokens whatever shares the batch
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
    draws = None
    if sampling.temperature != 0:
        draws = random.Random(sampling.seed if sampling.seed is not None else random.getrandbits(63))
    needs_text = request.pieces is not None or bool(sampling.stop)
    return Row(request, frozenset(stop_ids), draws,
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

    def _forward(self, input_ids, mask, position_ids, cache, rows: list[Row], **extra) -> tuple[torch.Tensor, DynamicCache]:
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
        # An image-text model sees its images at prefill only: their features fill the image tokens' places
        # in the cache, and decoding steps read them from there.
        images = pixel_inputs(self.loaded, [row.request.images for row in rows])
        logits, cache = self._forward(ids, mask, positions, DynamicCache(), rows, **images)
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
        leaving_ids = {id(row) for row in leaving}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in leaving_ids]
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
        width = max(self.mask.shape[1], mask.shape[1])
        # Everything new is built before anything is replaced: a failure here (out of memory) leaves the
        # running batch as it was, and only the joining requests fail.
        merged = [(torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)], dim=0),
                   torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)], dim=0))
                  for mine, theirs in zip(self.cache.layers, cache.layers)]
        merged_mask = torch.cat([left_pad(self.mask, width), left_pad(mask, width)], dim=0)
        merged_next = torch.cat([self.next_tokens, first.unsqueeze(1)], dim=0)
        for layer, (keys, values) in zip(self.cache.layers, merged):
            layer.keys, layer.values = keys, values
        self.mask, self.next_tokens, self.rows = merged_mask, merged_next, self.rows + list(rows)

    def _pick(self, logits: torch.Tensor, rows: list[Row], histories: list[torch.Tensor] | None) -> torch.Tensor:
        """Each row's next token under its own settings, in `generate`'s order: repetition penalty, no stop
        token before max_new_tokens for ignore_eos, then greedy, or temperature, top-k, top-p and a draw.
        Vectorised over the rows that share a setting: per-row tensor operations would cost more than the
        forward of a small model at batch 16."""
        for i, row in enumerate(rows):  # rare: a Python step per row that asks for it
            if row.sampling.repetition_penalty != 1:
                penalty = RepetitionPenaltyLogitsProcessor(row.sampling.repetition_penalty)
                logits[i:i + 1] = penalty(histories[i][None], logits[i:i + 1])
        for stop_ids, indices in groups(rows, lambda row: row.stop_ids if row.sampling.ignore_eos else None):
            if stop_ids is not None:
                logits[torch.tensor(indices)[:, None], torch.tensor(sorted(stop_ids))[None, :]] = -float("inf")
        chosen = logits.argmax(-1)
        sampled = [i for i, row in enumerate(rows) if row.sampling.temperature != 0]
        if not sampled:
            return chosen
        scores = logits[sampled] / torch.tensor([rows[i].sampling.temperature for i in sampled],
                                                device=logits.device)[:, None]
        members = [rows[i] for i in sampled]
        for (top_k, top_p), indices in groups(members, lambda row: (row.sampling.top_k, row.sampling.top_p)):
            index = torch.tensor(indices, device=logits.device)
            if top_k:
                scores[index] = TopKLogitsWarper(top_k)(None, scores[index])
            if top_p < 1:
                scores[index] = TopPLogitsWarper(top_p)(None, scores[index])
        # One uniform draw per row from the row's own generator, turned into a token by the inverse of its
        # cumulative distribution: a seeded request draws the same tokens whatever else shares the batch.
        cumulative = scores.softmax(-1).cumsum(-1)
        draws = torch.tensor([row.random.random() for row in members], device=logits.device, dtype=cumulative.dtype)
        picks = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None], right=True)
        chosen[sampled] = picks[:, 0].clamp(max=logits.shape[-1] - 1)
        return chosen


def groups(rows: list[Row], key) -> list[tuple[object, list[int]]]:
    """(key, row indices) for each distinct key, in order of first appearance."""
    found: dict = {}
    for i, row in enumerate(rows):
        found.setdefault(key(row), []).append(i)
    return list(found.items())


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence dimension (-2 for keys and values [rows, heads, seq, dim], -1 for masks)."""
    dim = tensor.dim() - 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
