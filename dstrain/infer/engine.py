"""The server's generation engine: one worker thread owns the model and runs `generate` on batches of
queued requests; a bound on waiting + running requests turns overload into a clean "busy" answer.

Why a hand-written queue. transformers' `generate` runs one static batch to completion and the
model is not thread-safe, so requests that arrive while it runs wait here and the next call takes
as many compatible ones as `max_batch_size` allows (dynamic batching; `max_batch_size=1` is
one-at-a-time). Compatible means the same sampling settings and kind of prompt: each row keeps its
own prompt, max_new_tokens and LoRA adapter (PEFT mixes adapters within one batch). Streamed
requests run alone: transformers' streamers take one row. transformers' continuous batching
(paged attention) does not run PEFT adapters, and vLLM (serve.py --backend vllm) is the tool for
that scale.
"""

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dstrain.infer.generation import CallbackStreamer, Completion, generate_batch, stop_token_ids
from dstrain.infer.model_loading import InferenceModel
from dstrain.infer.sampling import Sampling


class EngineBusy(Exception):
    """More requests are waiting or running than the engine accepts."""


@dataclass
class GenerationRequest:
    prompt: list[int]
    sampling: Sampling
    chat: bool  # chat prompts also stop at the end-of-turn token
    adapter: str | None  # a PEFT adapter name, BASE_ADAPTER, or None for a model without adapters
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # resolves with a Completion (or the exception generation raised)
    on_text: Callable[[str], None] | None = None  # streaming: each piece of text, called in the worker
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the client is gone
    images: list = field(default_factory=list)  # an image-text model's images (PIL), in image-token order

    def batch_key(self) -> tuple:
        return (self.sampling.batch_key(), self.chat, self.on_text is not None)


class GenerationEngine:
    def __init__(self, loaded: InferenceModel, max_batch_size: int = 8, max_queue: int = 64,
                 batch_wait_s: float = 0.01):
        self.loaded, self.max_batch_size, self.max_queue, self.batch_wait_s = (loaded, max_batch_size, max_queue,
                                                                               batch_wait_s)
        self._incoming: queue.Queue = queue.Queue()
        self._held: deque[GenerationRequest] = deque()  # taken from the queue but not batchable yet
        self._lock = threading.Lock()
        self._pending = 0  # accepted and not finished: waiting or running
        self._stop_ids = {chat: stop_token_ids(loaded.model, loaded.tokenizer, chat) for chat in (True, False)}
        self._worker = threading.Thread(target=self._work, name="generation", daemon=True)
        self.batches_run = 0

    def start(self) -> "GenerationEngine":
        self._worker.start()
        return self

    def stop(self) -> None:
        self._incoming.put(None)
        self._worker.join(timeout=30)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, *requests: GenerationRequest) -> None:
        """Queue the requests, all or none; EngineBusy when they do not fit under max_queue."""
        with self._lock:
            if self._pending + len(requests) > self.max_queue:
                raise EngineBusy(f"the server is busy: {self._pending} requests are waiting or running "
                                 f"(at most {self.max_queue}); retry shortly")
            self._pending += len(requests)
        for request in requests:
            self._incoming.put(request)

    # ----- the worker thread -----

    def _work(self) -> None:
        while (first := self._held.popleft() if self._held else self._incoming.get()) is not None:
            batch = self._gather(first)
            live = [request for request in batch if not request.cancel.is_set()]
            self._finish_cancelled([request for request in batch if request.cancel.is_set()])
            if live:
                self._run(live)

    def _gather(self, first: GenerationRequest) -> list[GenerationRequest]:
        """`first` plus the compatible requests already held or arriving within batch_wait_s."""
        batch, key = [first], first.batch_key()
        if first.on_text is not None or self.max_batch_size == 1:
            return batch
        for request in list(self._held):
            if len(batch) < self.max_batch_size and request.batch_key() == key:
                self._held.remove(request)
                batch.append(request)
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                request = self._incoming.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request is None:  # stop: finish this batch first
                self._incoming.put(None)
                break
            (batch if request.batch_key() == key else self._held).append(request)
        return batch

    def _run(self, batch: list[GenerationRequest]) -> None:
        head = batch[0]
        streamer = CallbackStreamer(self.loaded.tokenizer, head.on_text) if head.on_text else None
        adapters = [request.adapter for request in batch] if self.loaded.has_adapters else None
        try:
            completions = generate_batch(self.loaded, [request.prompt for request in batch], head.sampling,
                                         self._stop_ids[head.chat],
                                         max_new_tokens=[request.sampling.max_new_tokens for request in batch],
                                         adapter_names=adapters, streamer=streamer,
                                         cancel=head.cancel if len(batch) == 1 else None,
                                         images=[request.images for request in batch])
        except Exception as error:  # noqa: BLE001 - handed to each waiting request, which answers 500
            for request in batch:
                self._resolve(request, error)
        else:
            self.batches_run += 1
            for request, completion in zip(batch, completions):
                self._resolve(request, completion)

    def _finish_cancelled(self, requests: list[GenerationRequest]) -> None:
        for request in requests:
            self._resolve(request, Completion("", len(request.prompt), 0, "stop"))

    def _resolve(self, request: GenerationRequest, outcome) -> None:
        with self._lock:
            self._pending -= 1

        def settle():
            if request.done.done():  # the waiting coroutine was cancelled
                return
            if isinstance(outcome, BaseException):
                request.done.set_exception(outcome)
            else:
                request.done.set_result(outcome)

        request.loop.call_soon_threadsafe(settle)
