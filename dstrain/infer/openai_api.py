"""OpenAI-compatible HTTP API over the generation engine, with FastAPI: /v1/chat/completions (and
`stream: true` as server-sent events), /v1/completions, /v1/models, and /health; an optional API key
(`Authorization: Bearer ...`). Request bodies and the OpenAI error shape: dstrain/infer/openai_requests.py;
request ids, the body-size limit and the error handlers: dstrain/infer/openai_guards.py.

The handlers are plain functions on two routers (/health open, /v1 behind the key); what they share,
the engine and the settings, lives in the app's state and reaches them as a FastAPI dependency.

Limits, each an OpenAI-shaped error: the request body's size (413, checked before it is read whole), the
number and length of stop strings, the prompt's length (a bound from its characters before anything is
rendered, then the exact count). Chat-template rendering and tokenizing run on a worker thread, never on the event
loop. An unexpected error answers with a request id only; its text and traceback go to the server's log
under that id (every response carries it in `x-request-id`).
"""

import asyncio
import json
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from jinja2 import TemplateError

from dstrain.data.chat_template import has_chat_template
from dstrain.errors import UserError
from dstrain.infer.engine import EngineBusy, GenerationEngine, GenerationRequest
from dstrain.infer.generation import Completion, chat_prompt_ids, fit_to_context, text_prompt_ids
from dstrain.infer.images import image_prompt_ids, request_images
from dstrain.infer.openai_guards import EXCEPTION_HANDLERS, ClientGone, RequestGuard, internal_error, request_id
from dstrain.infer.openai_requests import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from dstrain.infer.sampling import Sampling


@dataclass
class ServerSettings:
    models: dict[str, str | None]  # served name -> adapter name (BASE_ADAPTER for the base; None: no adapters)
    api_key: str | None = None
    default_max_tokens: int = 256
    max_tokens_limit: int = 2048
    max_request_bytes: int = 4 * 2**20
    max_stop_length: int = 256  # characters per stop string


def longest_token_chars(tokenizer) -> int:
    """The most characters any vocabulary entry is spelt with. An entry never stands for more characters of
    text than its spelling has (a byte-level entry spells each byte as one character, a SentencePiece entry
    spells a space as one), so a prompt of N characters is at least N / this many tokens."""
    return max(map(len, tokenizer.get_vocab()), default=1) or 1


@dataclass
class Server:
    """What the handlers share, kept in the app's state."""
    engine: GenerationEngine
    settings: ServerSettings
    created: int  # when the app was built: the models' `created` time
    token_chars: int = 1  # longest_token_chars of the tokenizer
    # Rendering and tokenizing: off the event loop, one at a time (the tokenizer is shared with the engine).
    prompt_worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="prompts"))

    async def off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.prompt_worker, function, *args)

    def check_prompt_chars(self, size: int, param: str) -> None:
        """Before any rendering: a prompt whose characters alone need more tokens than the context holds."""
        context = self.engine.loaded.context
        if context is not None and size > context * self.token_chars:
            raise APIError(400, f"this model's maximum context length is {context} tokens, and a prompt of {size} "
                                f"characters is at least {-(-size // self.token_chars)} tokens", param=param,
                           code="context_length_exceeded")

    def adapter_for(self, name: str) -> str | None:
        models = self.settings.models
        if name not in models:
            raise APIError(404, f"the model {name!r} does not exist; this server has: {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    def check_before_rendering(self, body: SamplingFields, prompt_chars: list[int], param: str) -> None:
        """Every check that needs no tokens, so that a request refused anyway costs no rendering."""
        body.check_supported()
        body.stops(self.settings.max_stop_length)
        requested = body.requested_max_tokens()
        if requested is not None and requested > self.settings.max_tokens_limit:
            raise APIError(400, f"max_tokens: {requested} is more than this server allows "
                                f"({self.settings.max_tokens_limit})", param="max_tokens")
        for size in prompt_chars:
            self.check_prompt_chars(size, param)

    def sampling_for(self, body: SamplingFields, prompt_tokens: int) -> Sampling:
        settings, context = self.settings, self.engine.loaded.context
        requested = body.requested_max_tokens()
        room = (context - prompt_tokens) if context else settings.max_tokens_limit
        max_new = requested if requested is not None else max(1, min(settings.default_max_tokens, room))
        if (problem := fit_to_context(prompt_tokens, max_new, context)) is not None:
            raise APIError(400, problem, param="max_tokens" if requested else "messages",
                           code="context_length_exceeded")
        return Sampling(max_new_tokens=max_new, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                        repetition_penalty=body.repetition_penalty, seed=body.seed,
                        stop=body.stops(settings.max_stop_length),
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


# ===== generation requests and their answers =====

def new_request(prompt, sampling, chat, adapter, http: Request, stream: bool = False,
                images: list | None = None) -> GenerationRequest:
    """A request for the engine; streamed ones get the queue their text pieces arrive on."""
    loop = asyncio.get_running_loop()
    return GenerationRequest(prompt, sampling, chat, adapter, loop, loop.create_future(),
                             asyncio.Queue() if stream else None, request_id=request_id(http), images=images or [])


async def outcome(request: GenerationRequest) -> Completion:
    try:
        return await request.done
    except EngineBusy as busy:  # shutting down with the request still waiting
        raise APIError(503, str(busy), type_="server_error", code="shutting_down") from None
    except Exception:  # noqa: BLE001 - generation failed (the engine logged it): a 500 the client can read
        raise internal_error(request.request_id, "generation failed") from None


async def outcomes_unless_gone(requests: list[GenerationRequest], http: Request) -> list[Completion]:
    """The completions; if the client disconnects first, the requests are cancelled (their rows leave the
    batch at the next step) and nothing is answered."""
    async def disconnected():
        while (await http.receive())["type"] != "http.disconnect":  # the body is read: only the disconnect is left
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        finished = asyncio.ensure_future(asyncio.wait([request.done for request in requests]))
        await asyncio.wait([finished, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not finished.done():
            finished.cancel()
            raise ClientGone()
        return [await outcome(request) for request in requests]
    finally:
        watcher.cancel()
        for request in requests:
            request.cancel.set()  # no effect once finished


def usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def streamed(request: GenerationRequest, chunk, finish_chunk, body: SamplingFields,
             opening: dict | None = None) -> EventSourceResponse:
    """SSE events: the opening chunk, one chunk per piece of text, a last chunk with the finish reason,
    optionally one with the usage, then [DONE]. A client that goes away stops the generation."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        try:
            if opening is not None:
                yield format_sse_event(data_str=json.dumps(opening))
            while (piece := await request.pieces.get()) is not None:
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
    engine = server.engine
    return {"status": "ok", "pending": engine.pending, "cancelled": engine.cancelled, "steps": engine.steps_run,
            "rows_decoded": engine.rows_decoded}


def model_card(server: Server, name: str) -> dict:
    return {"id": name, "object": "model", "created": server.created, "owned_by": "dstrain"}


@v1.get("/models")
async def list_models(server: CurrentServer):
    return {"object": "list", "data": [model_card(server, name) for name in server.settings.models]}


@v1.get("/models/{name}")
async def get_model(name: str, server: CurrentServer):
    server.adapter_for(name)
    return model_card(server, name)


def render_chat(loaded, messages: list) -> tuple[list[int], list]:
    """On the prompt worker: the conversation through the chat template, and its images (PIL). An
    image-text model's image_url parts are opened here and each image's tokens expanded in place
    (dstrain/infer/images.py); a text request has none."""
    try:
        rendered, images = request_images(loaded, messages)
        if images:
            return image_prompt_ids(loaded, rendered, images), images
        return chat_prompt_ids(loaded.tokenizer, rendered), []
    except UserError as error:  # an image that cannot be opened, placeholders that do not match
        raise APIError(400, f"messages: {error}", param="messages") from None
    except TemplateError as error:  # e.g. templates that demand alternating user/assistant turns
        raise APIError(400, f"messages: the model's chat template refused them: {error}", param="messages") from None


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [text_prompt_ids(tokenizer, text) for text in texts]


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, server: CurrentServer, http: Request):
    adapter, tokenizer = server.adapter_for(body.model), server.engine.loaded.tokenizer
    if not has_chat_template(tokenizer):
        raise APIError(400, f"the model {body.model!r} has no chat template: use /v1/completions", param="model")
    messages = body.chat_messages()
    server.check_before_rendering(body, [sum(len(str(message["content"])) for message in messages)], "messages")
    prompt, images = await server.off_loop(render_chat, server.engine.loaded, body.messages)
    sampling = server.sampling_for(body, len(prompt))
    identity = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}

    request = new_request(prompt, sampling, True, adapter, http, stream=body.stream, images=images)
    server.submit(request)
    if body.stream:
        return streamed(request, partial(chat_chunk, identity), partial(chat_finish_chunk, identity), body,
                        opening=chat_chunk(identity, "", {"role": "assistant"}))
    completion, = await outcomes_unless_gone([request], http)
    return identity | {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "logprobs": None, "finish_reason": completion.finish_reason}],
        "usage": usage([completion]),
    }


@v1.post("/completions")
async def completions(body: CompletionRequest, server: CurrentServer, http: Request):
    adapter, tokenizer = server.adapter_for(body.model), server.engine.loaded.tokenizer
    if body.echo or body.logprobs:
        raise APIError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
        raise APIError(400, "prompt: give a string or a list of strings", param="prompt")
    if body.stream and len(texts) != 1:
        raise APIError(400, "stream takes a single prompt", param="prompt")
    server.check_before_rendering(body, [len(text) for text in texts], "prompt")
    prompts = await server.off_loop(tokenize_texts, tokenizer, texts)
    samplings = [server.sampling_for(body, len(prompt)) for prompt in prompts]
    identity = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}

    requests = [new_request(prompt, sampling, False, adapter, http, stream=body.stream)
                for prompt, sampling in zip(prompts, samplings)]
    server.submit(*requests)
    if body.stream:
        return streamed(requests[0], partial(text_chunk, identity), partial(text_finish_chunk, identity), body)
    results = await outcomes_unless_gone(requests, http)
    return identity | {
        "object": "text_completion",
        "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                    for i, c in enumerate(results)],
        "usage": usage(results),
    }


def build_app(engine: GenerationEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="dstrain OpenAI-compatible server", exception_handlers=EXCEPTION_HANDLERS)
    app.state.server = Server(engine, settings, int(time.time()), longest_token_chars(engine.loaded.tokenizer))
    app.add_middleware(RequestGuard, max_bytes=settings.max_request_bytes)
    app.include_router(router)
    app.include_router(v1)
    return app
