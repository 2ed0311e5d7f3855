"""The HTTP server's guards and error answers, every one OpenAI-shaped: a request id for each request (in
`x-request-id` and the server's log), the request body's size limit (413), the handlers that turn
exceptions into OpenAI error bodies, and an unexpected error answered without its internal text."""

import logging
import uuid

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from dstrain.infer.openai_requests import APIError, validation_error

log = logging.getLogger("dstrain.serve")


async def api_error(_request, error: APIError):
    return error.response()


async def request_validation_error(_request, error: RequestValidationError):
    return validation_error(error).response()


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


async def unexpected_error(request: Request, error: Exception):  # still a body the client can parse
    log.error("request %s: %s %s failed", request_id(request), request.method, request.url.path, exc_info=error)
    return internal_error(request_id(request)).response()


def internal_error(request_id_: str, what: str = "internal error") -> APIError:
    """What the client learns of a failure: no exception text, a request id the server's log has."""
    return APIError(500, f"{what} (request id {request_id_}; the server's log has the details)",
                    type_="server_error")


class RequestGuard:
    """ASGI middleware: gives each request an id (request.state.request_id, the `x-request-id` header) and
    refuses a body over `max_bytes` with 413, by its Content-Length before reading or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        identity = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = identity
        too_large = APIError(413, f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
                             code="request_too_large")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", identity.encode())]
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send_with_id)
        # Read the body here, counting, before the app sees it: a chunked body has no Content-Length, and an
        # error raised while FastAPI reads would come back as its generic 400. It is bounded by max_bytes.
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await too_large.response()(scope, receive, send_with_id)
            if not message.get("more_body", False):
                break

        async def replayed_receive():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replayed_receive, send_with_id)


async def http_error(_request, error: StarletteHTTPException):
    code = "not_found" if error.status_code == 404 else None
    return APIError(error.status_code, str(error.detail), code=code).response()


class ClientGone(Exception):
    """Nobody is left to answer."""


async def client_gone(_request, _error: ClientGone):
    return Response(status_code=499)  # nginx's "client closed request": only the server's log sees it




EXCEPTION_HANDLERS = {APIError: api_error, RequestValidationError: request_validation_error,
                      Exception: unexpected_error, StarletteHTTPException: http_error, ClientGone: client_gone}
