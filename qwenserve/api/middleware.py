"""ASGI middlewares: answer 503 while the model loads, count responses by route and status (and log
the refused ones), read every POST body as JSON, refuse bodies too large to be a prompt, and tag every
response with a request id."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenserve.api.errors import ANTHROPIC_ERRORS, APIError, internal_error, unavailable
from qwenserve.api.metrics import Metrics
from qwenserve.api.request_log import HTTP_REQUEST_ID, LOGGED_REQUESTS
from qwenserve.config import env_number

logger = logging.getLogger("qwenserve.api")

# Routes that work before the model is loaded.
ALWAYS_OPEN = frozenset({"/health"})

KNOWN_ROUTES = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/tokenize",
        "/detokenize",
        "/docs",
        "/openapi.json",
        "/version",
    }
)


class TrailingSlashMiddleware:
    """Serve a known route asked for with trailing slashes (`/v1/chat/completions/`, as some clients
    build URLs from a base ending in '/') as the route itself. Starlette would answer a 307 redirect,
    which clients that do not follow redirects on POST (httpx's default) report as a failure."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            stripped = path.rstrip("/")
            if stripped in KNOWN_ROUTES:
                scope = dict(scope, path=stripped, raw_path=stripped.encode())
        await self.app(scope, receive, send)


class AnthropicErrorsMiddleware:
    """Errors on the Anthropic Messages API's routes take Anthropic's shape (errors.ANTHROPIC_ERRORS), whichever
    layer raises them: the key check's 401, the loading gate's 503, a validation 400. Outside all of them."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        # Any path of the Messages API, also under a mistaken prefix (/v1/v1/messages): the 404 reaches an
        # Anthropic client, which reads its own shape only.
        if not path.endswith("/messages") and "/messages/" not in path:
            await self.app(scope, receive, send)
            return
        token = ANTHROPIC_ERRORS.set(True)
        try:
            await self.app(scope, receive, send)
        finally:
            ANTHROPIC_ERRORS.reset(token)


class LoadingGateMiddleware:
    """503 + Retry-After on every route but /health until `is_ready()` turns true."""

    def __init__(self, app: ASGIApp, is_ready: Callable[[], bool], retry_after: int = 5):
        self.app = app
        self.is_ready = is_ready
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in ALWAYS_OPEN and not self.is_ready():
            err = unavailable(
                "The model is still loading; retry shortly.", self.retry_after, code="model_loading"
            )
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


# Routes polled by monitors: their refusals (503 while loading) would flood the log.
_QUIET_ROUTES = frozenset({"/health", "/metrics"})
_MAX_LOGGED_BODY = 4096


class ForeignOriginMiddleware:
    """403 for a request from a web page whose origin may not call the API. CORS alone only keeps such a
    page from reading the answer: a plain-text POST needs no preflight, and the model would still run."""

    def __init__(self, app: ASGIApp, allowed: Callable[[str], bool]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = dict(scope.get("headers") or []).get(b"origin") if scope["type"] == "http" else None
        origin = raw.decode("latin-1") if raw is not None else None
        if origin is not None and not self.allowed(origin):
            err = APIError(
                403,
                f"Requests from web pages at {origin!r} are not allowed: start the server with "
                "--allowed-origins naming that origin.",
                code="origin_not_allowed",
            )
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Every response carries `x-request-id`, as OpenAI's do (the SDK shows it as `_request_id`): the one
    the client sent when it is a short printable token, else a new one; the request's log line names it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        request_id = given if 0 < len(given) <= 128 and given.isascii() and given.decode().isprintable() else None
        header = (b"x-request-id", request_id or f"req_{uuid.uuid4().hex}".encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        token = HTTP_REQUEST_ID.set(header[1].decode())
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            HTTP_REQUEST_ID.reset(token)


def _is_preflight(scope: Scope) -> bool:
    """A browser's CORS preflight: an OPTIONS asking whether the real request may follow."""
    headers = dict(scope.get("headers") or [])
    return scope["method"] == "OPTIONS" and b"access-control-request-method" in headers


# Routes with an id in the path: one series per route, not one per id.
_ID_ROUTES = (
    (re.compile(r"/v1/models/.+"), "/v1/models/{name}"),
    (re.compile(r"/v1/responses/[^/]+"), "/v1/responses/{id}"),
    (re.compile(r"/v1/responses/[^/]+/input_items"), "/v1/responses/{id}/input_items"),
)


def route_label(path: str) -> str:
    """The `route` label of qwenserve_requests_total: the route, its template for one with an id in it (a
    stored response read back is not an unknown path), "other" for paths no route serves."""
    if path in KNOWN_ROUTES:
        return path
    return next((label for pattern, label in _ID_ROUTES if pattern.fullmatch(path)), "other")


class StatusCountMiddleware:
    """Feeds qwenserve_requests_total{route, status}; unknown paths share one label. Outermost, so it
    also logs one line for every request refused with a 4xx or 503 (whichever layer refused it): a
    request that never reached the engine has no request-log line of its own (one the engine ended
    has, and is not logged twice)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = route_label(path)
        status = {"code": 500}
        body = bytearray()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif _is_refusal(status["code"]) and len(body) < _MAX_LOGGED_BODY:
                body.extend(message.get("body", b"")[: _MAX_LOGGED_BODY - len(body)])
            await send(message)

        logged: list[str] = []
        token = LOGGED_REQUESTS.set(logged)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            LOGGED_REQUESTS.reset(token)
            # A preflight CORS granted is no API request; a refused one (a foreign page) is counted.
            if not (status["code"] < 400 and _is_preflight(scope)):
                self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
        if _is_refusal(status["code"]) and path not in _QUIET_ROUTES and not logged:
            logger.info("refused %s %s: %d %s", scope.get("method"), path, status["code"], _error_summary(bytes(body)))


def _is_refusal(status: int) -> bool:
    """Client errors and 503s (loading, queue full, shutting down). Not 499, a client that left a request
    the engine was running (its request line says finish=abort), nor 500s (logged with their traceback)."""
    return (400 <= status < 500 and status != 499) or status == 503


def _error_summary(body: bytes) -> str:
    """`type (param): message` from an OpenAI-shaped error body, or the raw start of any other body."""
    try:
        err = json.loads(body)["error"]
        param = f" ({err['param']})" if err.get("param") else ""
        return f"{err.get('type')}{param}: {err.get('message')}"
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


class JSONBodyMiddleware:
    """Read POST bodies as JSON whatever Content-Type says: `curl -d '{...}'` without
    `-H 'Content-Type: application/json'` sends form encoding, and every body here is JSON. A compressed
    body (Content-Encoding) is a 415 naming the encoding, not a JSON error about its bytes."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            encoding = dict(scope["headers"]).get(b"content-encoding", b"identity").decode("latin-1").strip()
            if encoding.lower() not in ("", "identity"):
                message = f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed."
                await APIError(415, message, code="unsupported_content_encoding").response()(scope, receive, send)
                return
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


class InternalErrorMiddleware:
    """An unexpected exception in a route becomes its OpenAI-shaped 500 here, innermost, so the
    connection stays usable: past this point Starlette answers the 500 and then re-raises, and the
    server drops the keep-alive connection under the client's next request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:  # too late for a status: let the server end the response
                raise
            logger.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            await internal_error(exc).response()(scope, receive, send)


# No prompt needs this much: 16 MiB is ~16x a full 262k-token context of source code, while
# tokenizing such a body would hold the tokenizer thread for tens of seconds (40 MB: 52 s on a CPU).
MAX_BODY_BYTES = int(env_number("QWENSERVE_MAX_BODY_BYTES", 16 * 1024 * 1024))


class BodyLimitMiddleware:
    """413 for a POST whose body exceeds `max_bytes`: at once from its Content-Length, and while it
    is read when it has none (chunked uploads), so no body past the limit is ever held whole."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            err = APIError(413, self._too_large(f"of {int(length):,} bytes "), code="request_too_large")
            await err.response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside FastAPI's body read, which passes HTTPExceptions on to the
                    # error handlers (errors.py): the client gets the OpenAI-shaped 413.
                    raise StarletteHTTPException(413, detail=self._too_large(""))
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self, size: str) -> str:
        return f"Request body {size}exceeds this server's limit of {self.max_bytes:,} bytes."
