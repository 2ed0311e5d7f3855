"""The OpenAI API's request bodies as pydantic models, and its error shape ({"error": {"message", "type",
"param", "code"}}), so that the official `openai` client raises its usual exceptions. Checks pydantic
cannot express (unsupported fields, stop strings) raise the same errors."""

from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

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


def validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found, as OpenAI words it: 400 with the offending field as `param`."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    path = ".".join(str(part) for part in first.get("loc", ())[1:])
    return APIError(400, f"{path or 'body'}: {first.get('msg', 'invalid value')}", param=path or None)


# ===== requests =====

MAX_STOP_STRINGS = 4

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str  # a data:image/...;base64, URL or a local path / file:// URL (dstrain/infer/images.py)


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart]

    def text(self) -> str:
        """The text parts (image parts: dstrain/infer/images.request_images)."""
        return self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content if part.type == "text")


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

    def stops(self, max_length: int = 256) -> tuple[str, ...]:
        """At most 4 non-empty strings (OpenAI's bound) of at most `max_length` characters each: the text
        held back while streaming, and the work of looking for them, grow with their length."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
        if (longest := max(map(len, stops), default=0)) > max_length:
            raise APIError(400, f"stop: a stop string of {longest} characters is longer than this server allows "
                                f"({max_length})", param="stop")
        return tuple(stops)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def chat_messages(self) -> list[dict]:
        """The conversation as the chat template renders it: the one place an OpenAI request's messages
        become the engine's input."""
        return [{"role": message.role, "content": message.text()} for message in self.messages]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False  # not supported
    logprobs: int | None = None  # not supported
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
