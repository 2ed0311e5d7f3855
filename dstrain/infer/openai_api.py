"""OpenAI-compatible HTTP API over the generation engine, with FastAPI: /v1/chat/completions (and
`stream: true` as server-sent events), /v1/completions, /v1/models; OpenAI-shaped errors
({"error": {"message", "type", "param", "code"}}) so the official `openai` client raises its usual
exceptions; an optional API key (`Authorization: Bearer ...`)."""

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, FastAPI, Request
from jinja2 import TemplateError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from dstrain.data.chat_template import has_chat_template
from dstrain.infer.engine import EngineBusy, GenerationEngine, GenerationRequest
from dstrain.infer.generation import Completion, StopTextFilter, chat_prompt_ids, fit_to_context, text_prompt_ids
from dstrain.infer.sampling import Sampling


# ===== errors =====

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found, as OpenAI words it: 400 with the offending field as `param`."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    path = ".".join(str(part) for part in first.get("loc", ())[1:])
    return APIError(400, f"{path or 'body'}: {first.get('msg', 'invalid value')}", param=path or None)


# ===== requests =====

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share. top_k, repetition_penalty and ignore_eos are extensions (vLLM takes
    the same names; the openai client sends them through `extra_body`). Unknown fields are ignored."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check_supported(self) -> None:
        """Fields OpenAI has that this server does not do: refused rather than silently ignored."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported: use repetition_penalty (above 1 discourages repeats)",
                               param=name)
        if self.n != 1:
            raise APIError(400, f"n: only 1 choice per request is supported, got {self.n}", param="n")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        return tuple(stops)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False  # not supported
    logprobs: int | None = None  # not supported
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


# ===== the app =====

@dataclass
class ServerSettings:
    models: dict[str, str | None]  # served name -> adapter name (BASE_ADAPTER for the base; None: no adapters)
    api_key: str | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048


def build_app(engine: GenerationEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="dstrain OpenAI-compatible server")
    tokenizer, context = engine.loaded.tokenizer, engine.loaded.context
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError):
        return _validation_error(error).response()

    @app.exception_handler(Exception)
    async def unexpected_error(_request, error: Exception):  # still a body the client can parse
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type_="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, error: StarletteHTTPException):
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, str(error.detail), code=code).response()

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def adapter_for(name: str) -> str | None:
        if name not in settings.models:
            raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(settings.models)}",
                           param="model", code="model_not_found")
        return settings.models[name]

    def sampling_for(body: SamplingFields, prompt_tokens: int) -> Sampling:
        body.check_supported()
        requested = body.requested_max_tokens()
        if requested is not None and requested > settings.max_tokens_limit:
            raise APIError(400, f"max_tokens: {requested} is more than this server allows "
                                f"({settings.max_tokens_limit})", param="max_tokens")
        room = (context - prompt_tokens) if context else settings.max_tokens_limit
        max_new = requested if requested is not None else max(1, min(settings.default_max_tokens, room))
        if (problem := fit_to_context(prompt_tokens, max_new, context)) is not None:
            raise APIError(400, problem, param="max_tokens" if requested else "messages",
                           code="context_length_exceeded")
        return Sampling(max_new_tokens=max_new, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                        repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stops(),
                        ignore_eos=body.ignore_eos)

    def new_request(prompt, sampling, chat, adapter, on_text=None) -> GenerationRequest:
        loop = asyncio.get_running_loop()
        return GenerationRequest(prompt, sampling, chat, adapter, loop, loop.create_future(), on_text)

    def submit(*requests: GenerationRequest) -> None:
        try:
            engine.submit(*requests)
        except EngineBusy as busy:
            raise APIError(429, str(busy), type_="rate_limit_error", code="server_busy") from None

    async def outcome(request: GenerationRequest) -> Completion:
        try:
            return await request.done
        except Exception as error:  # noqa: BLE001 - generation failed: a 500 the client can read
            raise APIError(500, f"generation failed: {error}", type_="server_error") from None

    def usage(completions: list[Completion]) -> dict:
        prompt = sum(c.prompt_tokens for c in completions)
        generated = sum(c.completion_tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def streamed(request: GenerationRequest, pieces: asyncio.Queue, chunk, finish_chunk, body: SamplingFields,
                 opening: dict | None = None):
        """SSE events: the opening chunk, one chunk per piece of text, a last chunk with the finish reason,
        optionally one with the usage, then [DONE]. A client that goes away stops the generation."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                if opening is not None:
                    yield format_sse_event(data_str=json.dumps(opening))
                while (piece := await pieces.get()) is not None:
                    yield format_sse_event(data_str=json.dumps(chunk(piece)))
                try:
                    completion = await outcome(request)
                except APIError as error:
                    yield format_sse_event(data_str=json.dumps(error.body()))
                    return
                yield format_sse_event(data_str=json.dumps(finish_chunk(completion.finish_reason)))
                if include_usage:
                    yield format_sse_event(data_str=json.dumps(finish_chunk(None, usage([completion]))))
                yield format_sse_event(data_str="[DONE]")
            finally:
                request.cancel.set()  # no effect once finished; stops the model when the client left early

        return EventSourceResponse(events())

    def streaming_request(prompt, sampling, chat, adapter):
        """A request whose text pieces (stop strings held back and cut) arrive on an asyncio queue."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        text_filter = StopTextFilter(sampling.stop)
        request: GenerationRequest | None = None

        def on_text(text: str) -> None:  # in the worker thread
            released = text_filter.feed(text)
            if text_filter.stopped:
                request.cancel.set()
            if released:
                loop.call_soon_threadsafe(pieces.put_nowait, released)

        request = new_request(prompt, sampling, chat, adapter, on_text)

        def end_of_stream(_future) -> None:
            if (rest := text_filter.flush()):
                pieces.put_nowait(rest)
            pieces.put_nowait(None)

        request.done.add_done_callback(end_of_stream)
        return request, pieces

    v1 = [Depends(check_key)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": engine.pending}

    @app.get("/v1/models", dependencies=v1)
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "dstrain"}
                                           for name in settings.models]}

    @app.get("/v1/models/{name}", dependencies=v1)
    async def get_model(name: str):
        adapter_for(name)
        return {"id": name, "object": "model", "created": created, "owned_by": "dstrain"}

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest):
        adapter = adapter_for(body.model)
        if not has_chat_template(tokenizer):
            raise APIError(400, f"the model {body.model!r} has no chat template: use /v1/completions", param="model")
        try:
            prompt = chat_prompt_ids(tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except TemplateError as error:  # e.g. templates that demand alternating user/assistant turns
            raise APIError(400, f"messages: the model's chat template refused them: {error}",
                           param="messages") from None
        sampling = sampling_for(body, len(prompt))
        identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}

        if body.stream:
            request, pieces = streaming_request(prompt, sampling, True, adapter)
            submit(request)

            def chunk(piece: str, role: dict | None = None) -> dict:
                delta = (role or {}) | {"content": piece}
                return identity | {"object": "chat.completion.chunk",
                                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

            def finish_chunk(reason, usage_=None) -> dict:
                choices = [] if usage_ else [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]
                return identity | {"object": "chat.completion.chunk", "choices": choices, "usage": usage_}

            return streamed(request, pieces, chunk, finish_chunk, body, opening=chunk("", {"role": "assistant"}))

        request = new_request(prompt, sampling, True, adapter)
        submit(request)
        completion = await outcome(request)
        return identity | {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": usage([completion]),
        }

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest):
        adapter = adapter_for(body.model)
        if body.echo or body.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError(400, "prompt: give a string or a list of strings", param="prompt")
        prompts = [text_prompt_ids(tokenizer, text) for text in texts]
        samplings = [sampling_for(body, len(prompt)) for prompt in prompts]
        identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}

        if body.stream:
            if len(prompts) != 1:
                raise APIError(400, "stream takes a single prompt", param="prompt")
            request, pieces = streaming_request(prompts[0], samplings[0], False, adapter)
            submit(request)

            def chunk(piece: str) -> dict:
                return identity | {"object": "text_completion",
                                   "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]}

            def finish_chunk(reason, usage_=None) -> dict:
                choices = [] if usage_ else [{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]
                return identity | {"object": "text_completion", "choices": choices, "usage": usage_}

            return streamed(request, pieces, chunk, finish_chunk, body)

        requests = [new_request(prompt, sampling, False, adapter) for prompt, sampling in zip(prompts, samplings)]
        submit(*requests)
        results = [await outcome(request) for request in requests]
        return identity | {
            "object": "text_completion",
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(results)],
            "usage": usage(results),
        }

    return app
