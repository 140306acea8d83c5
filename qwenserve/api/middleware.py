"""ASGI middlewares: answer 503 while the model loads, and count responses by route and status."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenserve.api.errors import unavailable
from qwenserve.api.metrics import Metrics

# Routes that work before the model is loaded.
ALWAYS_OPEN = frozenset({"/health"})

KNOWN_ROUTES = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/tokenize",
        "/detokenize",
        "/docs",
        "/openapi.json",
        "/version",
    }
)


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


class StatusCountMiddleware:
    """Feeds qwenserve_requests_total{route, status}; unknown paths share one label."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = (
            path
            if path in KNOWN_ROUTES
            else "/v1/models/{name}"
            if path.startswith("/v1/models/")
            else "other"
        )
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()


class JSONBodyMiddleware:
    """Read POST bodies as JSON whatever Content-Type says: `curl -d '{...}'` without
    `-H 'Content-Type: application/json'` sends form encoding, and every body here is JSON."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)
