"""The server's generation engine: continuous batching on one worker thread that owns the model. Requests,
streamed or not, join the running batch (dstrain/infer/running_batch.py) between any two decoding steps
while it has fewer than `max_batch_size` rows, and leave it as soon as they finish or their client goes
away (the cancel event, seen at the next step). `max_batch_size=1` is one request at a time. A bound on
waiting + running requests turns overload into a clean "busy" answer.

The worker hands results to the event loop once per step (one `call_soon_threadsafe` for every row's text
piece), never blocking on it; the event loop never touches the model.
"""

import asyncio
import logging
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field

from dstrain.infer.generation import Completion, stop_token_ids
from dstrain.infer.model_loading import InferenceModel
from dstrain.infer.running_batch import Row, RunningBatch, check_cache_supported, new_row
from dstrain.infer.sampling import Sampling

log = logging.getLogger("dstrain.serve")


class EngineBusy(Exception):
    """More requests are waiting or running than the engine accepts."""


@dataclass(eq=False)  # compared by identity: each is one client's request
class GenerationRequest:
    prompt: list[int]
    sampling: Sampling
    chat: bool  # chat prompts also stop at the end-of-turn token
    adapter: str | None  # a PEFT adapter name, BASE_ADAPTER, or None for a model without adapters
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # resolves with a Completion (or the exception generation raised)
    pieces: asyncio.Queue | None = None  # streaming: text pieces (stop strings cut), then None at the end
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the client is gone
    request_id: str = ""  # for the server's log
    images: list = field(default_factory=list)  # an image-text model's images (PIL), in image-token order
    joined_running: int | None = None  # how many rows were decoding when this one joined (set by the engine)


class GenerationEngine:
    def __init__(self, loaded: InferenceModel, max_batch_size: int = 16, max_queue: int = 64):
        check_cache_supported(loaded.model)
        self.loaded, self.max_batch_size, self.max_queue = loaded, max_batch_size, max_queue
        self._waiting: deque[GenerationRequest] = deque()  # accepted, not yet in the batch
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)  # a request arrived, or stop() was called
        self._stopping = False
        self._pending = 0  # accepted and not finished: waiting or running
        self._stop_ids = {chat: stop_token_ids(loaded.model, loaded.tokenizer, chat) for chat in (True, False)}
        self._worker = threading.Thread(target=self._work, name="generation", daemon=True)
        self.steps_run = 0  # decoding steps (prefills not counted)
        self.rows_decoded = 0  # the sum of the rows of every step: / steps_run is the mean batch
        self.largest_batch = 0  # the most rows that decoded together (tests read it)
        self.cancelled = 0  # requests ended because their client went away (/health reports it)

    def start(self) -> "GenerationEngine":
        self._worker.start()
        return self

    def stop(self) -> None:
        """Admit nothing more, finish the running rows; requests still waiting are refused."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
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
            self._waiting.extend(requests)
            self._wakeup.notify()

    # ----- the worker thread -----

    def _work(self) -> None:
        batch, stopping = RunningBatch(self.loaded), False
        while not stopping or len(batch):
            joining, cancelled, stopping = self._take_new(batch)
            self._settle([], [(request, Completion("", len(request.prompt), 0, "stop")) for request in cancelled])
            joining = [new_row(self.loaded, request, self._stop_ids[request.chat]) for request in joining]
            pieces: list[tuple[Row, str]] = []
            if joining:
                for row in joining:
                    row.request.joined_running = len(batch)
                try:
                    pieces += batch.admit(joining)
                except Exception as error:  # noqa: BLE001 - each joining request answers 500; the others go on
                    self._fail(joining, error)
            gone = [row for row in batch.rows if row.request.cancel.is_set() and row.finish is None]
            for row in gone:
                row.finish = "stop"
            self.cancelled += len(gone) + len(cancelled)
            self._leave(batch, pieces)
            if not len(batch):
                continue
            try:
                pieces = batch.step()
            except Exception as error:  # noqa: BLE001 - the batch's cache is unusable: every row answers 500
                rows = batch.rows
                batch.clear()
                self._fail(rows, error)
                continue
            self.steps_run += 1
            self.rows_decoded += len(pieces)
            self.largest_batch = max(self.largest_batch, len(batch))
            self._leave(batch, pieces)

    def _take_new(self, batch: RunningBatch) -> tuple[list[GenerationRequest], list[GenerationRequest], bool]:
        """(requests for the free rows, waiting requests whose client has gone, stopping). Blocks only while
        nothing runs. Gone clients are dropped from the whole queue every step, so they never hold a place."""
        with self._lock:
            while not self._waiting and not len(batch) and not self._stopping:
                self._wakeup.wait()
            cancelled = [request for request in self._waiting if request.cancel.is_set()]
            if cancelled:
                self._waiting = deque(request for request in self._waiting if not request.cancel.is_set())
            if self._stopping:
                refused, self._waiting = list(self._waiting), deque()
                self._settle([], [(request, EngineBusy("the server is shutting down")) for request in refused],
                             locked=True)
            joining = []
            while self._waiting and len(batch) + len(joining) < self.max_batch_size:
                joining.append(self._waiting.popleft())
            return joining, cancelled, self._stopping

    def _leave(self, batch: RunningBatch, pieces: list[tuple[Row, str]]) -> None:
        """Pass on this step's text and let the finished rows go."""
        finished = batch.finished()
        batch.remove(finished)
        self._settle([(row.request, piece) for row, piece in pieces if piece],
                     [(row.request, row.completion(self.loaded.tokenizer)) for row in finished])

    def _fail(self, rows: list[Row], error: Exception) -> None:
        for row in rows:
            log.error("request %s: generation failed", row.request.request_id, exc_info=error)
        self._settle([], [(row.request, error) for row in rows])

    def _settle(self, pieces: list[tuple[GenerationRequest, str]],
                outcomes: list[tuple[GenerationRequest, Completion | Exception]], locked: bool = False) -> None:
        """Hand text pieces and final outcomes to their event loops: one call per loop, in order."""
        if outcomes and locked:
            self._pending -= len(outcomes)
        elif outcomes:
            with self._lock:
                self._pending -= len(outcomes)
        by_loop = defaultdict(lambda: ([], []))
        for request, piece in pieces:
            by_loop[request.loop][0].append((request, piece))
        for request, outcome in outcomes:
            by_loop[request.loop][1].append((request, outcome))
        for loop, (loop_pieces, loop_outcomes) in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, loop_pieces, loop_outcomes)
            except RuntimeError:  # that loop is closed: nobody waits for these any more
                pass


def deliver(pieces: list[tuple[GenerationRequest, str]],
            outcomes: list[tuple[GenerationRequest, Completion | Exception]]) -> None:
    """In the event loop: queue the streamed pieces, end the streams, resolve the futures."""
    for request, piece in pieces:
        if request.pieces is not None:
            request.pieces.put_nowait(piece)
    for request, outcome in outcomes:
        if request.pieces is not None:
            request.pieces.put_nowait(None)
        if request.done.done():  # the waiting coroutine was cancelled
            continue
        if isinstance(outcome, BaseException):
            request.done.set_exception(outcome)
        else:
            request.done.set_result(outcome)
