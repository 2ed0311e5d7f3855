"""OpenAI-compatible HTTP API over the generation engine, with FastAPI: /v1/chat/completions (and
`stream: true` as server-sent events), /v1/completions, /v1/models, and /health; an optional API key
(`Authorization: Bearer ...`). Request bodies and the OpenAI error shape: dstrain/infer/openai_requests.py.

The handlers are plain functions on two routers (/health open, /v1 behind the key); what they share,
the engine and the settings, lives in the app's state and reaches them as a FastAPI dependency.
"""

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dstrain.data.chat_template import has_chat_template
from dstrain.errors import UserError
from dstrain.infer.engine import EngineBusy, GenerationEngine, GenerationRequest
from dstrain.infer.generation import Completion, StopTextFilter, chat_prompt_ids, fit_to_context, text_prompt_ids
from dstrain.infer.images import image_prompt_ids, request_images
from dstrain.infer.openai_requests import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    validation_error,
)
from dstrain.infer.sampling import Sampling


@dataclass
class ServerSettings:
    models: dict[str, str | None]  # served name -> adapter name (BASE_ADAPTER for the base; None: no adapters)
    api_key: str | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048


@dataclass
class Server:
    """What the handlers share, kept in the app's state."""
    engine: GenerationEngine
    settings: ServerSettings
    created: int  # when the app was built: the models' `created` time

    def adapter_for(self, name: str) -> str | None:
        models = self.settings.models
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    def sampling_for(self, body: SamplingFields, prompt_tokens: int) -> Sampling:
        body.check_supported()
        settings, context = self.settings, self.engine.loaded.context
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

    def submit(self, *requests: GenerationRequest) -> None:
        try:
            self.engine.submit(*requests)
        except EngineBusy as busy:
            raise APIError(429, str(busy), type_="rate_limit_error", code="server_busy") from None


async def current_server(request: Request) -> Server:  # async, like check_key: no worker thread for either
    return request.app.state.server


CurrentServer = Annotated[Server, Depends(current_server)]
# auto_error=False: a missing or wrong key is refused below, with OpenAI's 401 body rather than FastAPI's.
bearer = HTTPBearer(auto_error=False)


async def check_key(server: CurrentServer,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    key = server.settings.api_key
    if key is not None and (credentials is None
                            or not secrets.compare_digest(credentials.credentials.encode(), key.encode())):
        raise APIError(401, "missing or incorrect API key (send Authorization: Bearer <key>)", code="invalid_api_key")


# ===== errors: every one OpenAI-shaped =====

async def api_error(_request, error: APIError):
    return error.response()


async def request_validation_error(_request, error: RequestValidationError):
    return validation_error(error).response()


async def unexpected_error(_request, error: Exception):  # still a body the client can parse
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type_="server_error").response()


async def http_error(_request, error: StarletteHTTPException):
    code = "not_found" if error.status_code == 404 else None
    return APIError(error.status_code, str(error.detail), code=code).response()


# ===== generation requests and their answers =====

def new_request(prompt, sampling, chat, adapter, on_text=None, images=None) -> GenerationRequest:
    loop = asyncio.get_running_loop()
    return GenerationRequest(prompt, sampling, chat, adapter, loop, loop.create_future(), on_text,
                             images=images or [])


async def outcome(request: GenerationRequest) -> Completion:
    try:
        return await request.done
    except Exception as error:  # noqa: BLE001 - generation failed: a 500 the client can read
        raise APIError(500, f"generation failed: {error}", type_="server_error") from None


def usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def streaming_request(prompt, sampling, chat, adapter, images=None):
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

    request = new_request(prompt, sampling, chat, adapter, on_text, images)

    def end_of_stream(_future) -> None:
        if (rest := text_filter.flush()):
            pieces.put_nowait(rest)
        pieces.put_nowait(None)

    request.done.add_done_callback(end_of_stream)
    return request, pieces


def streamed(request: GenerationRequest, pieces: asyncio.Queue, chunk, finish_chunk, body: SamplingFields,
             opening: dict | None = None) -> EventSourceResponse:
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


def chat_chunk(identity: dict, piece: str, role: dict | None = None) -> dict:
    delta = (role or {}) | {"content": piece}
    return identity | {"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}


def chat_finish_chunk(identity: dict, reason, usage_=None) -> dict:
    choices = [] if usage_ else [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]
    return identity | {"object": "chat.completion.chunk", "choices": choices, "usage": usage_}


def text_chunk(identity: dict, piece: str) -> dict:
    return identity | {"object": "text_completion",
                       "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]}


def text_finish_chunk(identity: dict, reason, usage_=None) -> dict:
    choices = [] if usage_ else [{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}]
    return identity | {"object": "text_completion", "choices": choices, "usage": usage_}


# ===== the endpoints =====

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])


@router.get("/health")
async def health(server: CurrentServer):
    return {"status": "ok", "pending": server.engine.pending}


def model_card(server: Server, name: str) -> dict:
    return {"id": name, "object": "model", "created": server.created, "owned_by": "dstrain"}


@v1.get("/models")
async def list_models(server: CurrentServer):
    return {"object": "list", "data": [model_card(server, name) for name in server.settings.models]}


@v1.get("/models/{name}")
async def get_model(name: str, server: CurrentServer):
    server.adapter_for(name)
    return model_card(server, name)


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, server: CurrentServer):
    adapter, tokenizer = server.adapter_for(body.model), server.engine.loaded.tokenizer
    if not has_chat_template(tokenizer):
        raise APIError(400, f"the model {body.model!r} has no chat template: use /v1/completions", param="model")
    try:  # image_url parts (an image-text model): the image token per image, expanded (dstrain/infer/images.py)
        messages, images = request_images(server.engine.loaded, body.messages)
        prompt = image_prompt_ids(server.engine.loaded, messages, images) if images else chat_prompt_ids(
            tokenizer, messages)
    except UserError as error:
        raise APIError(400, f"messages: {error}", param="messages") from None
    except TemplateError as error:  # e.g. templates that demand alternating user/assistant turns
        raise APIError(400, f"messages: the model's chat template refused them: {error}", param="messages") from None
    sampling = server.sampling_for(body, len(prompt))
    identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}

    if body.stream:
        request, pieces = streaming_request(prompt, sampling, True, adapter, images)
        server.submit(request)
        return streamed(request, pieces, partial(chat_chunk, identity), partial(chat_finish_chunk, identity), body,
                        opening=chat_chunk(identity, "", {"role": "assistant"}))

    request = new_request(prompt, sampling, True, adapter, images=images)
    server.submit(request)
    completion = await outcome(request)
    return identity | {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "logprobs": None, "finish_reason": completion.finish_reason}],
        "usage": usage([completion]),
    }


@v1.post("/completions")
async def completions(body: CompletionRequest, server: CurrentServer):
    adapter, tokenizer = server.adapter_for(body.model), server.engine.loaded.tokenizer
    if body.echo or body.logprobs:
        raise APIError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise APIError(400, "prompt: give a string or a list of strings", param="prompt")
    prompts = [text_prompt_ids(tokenizer, text) for text in texts]
    samplings = [server.sampling_for(body, len(prompt)) for prompt in prompts]
    identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}

    if body.stream:
        if len(prompts) != 1:
            raise APIError(400, "stream takes a single prompt", param="prompt")
        request, pieces = streaming_request(prompts[0], samplings[0], False, adapter)
        server.submit(request)
        return streamed(request, pieces, partial(text_chunk, identity), partial(text_finish_chunk, identity), body)

    requests = [new_request(prompt, sampling, False, adapter) for prompt, sampling in zip(prompts, samplings)]
    server.submit(*requests)
    results = [await outcome(request) for request in requests]
    return identity | {
        "object": "text_completion",
        "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                    for i, c in enumerate(results)],
        "usage": usage(results),
    }


def build_app(engine: GenerationEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="dstrain OpenAI-compatible server", exception_handlers={
        APIError: api_error, RequestValidationError: request_validation_error, Exception: unexpected_error,
        StarletteHTTPException: http_error})
    app.state.server = Server(engine, settings, int(time.time()))
    app.include_router(router)
    app.include_router(v1)
    return app
