"""`--api-key`: every route but /health needs `Authorization: Bearer KEY` (or `x-api-key`)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from qwenserve.api.errors import ANTHROPIC_ERRORS, APIError

OPEN_PATHS = frozenset({"/health"})


def _presented_key(scope: Scope) -> bytes | None:
    """The key as the client sent it, raw bytes: a non-ASCII key arrives as its UTF-8 bytes."""
    auth = _authorization(scope)
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    key = dict(scope.get("headers") or []).get(b"x-api-key")
    return key.strip() if key else None


def _authorization(scope: Scope) -> bytes:
    """The Authorization header's value, empty when none was sent."""
    return dict(scope.get("headers") or []).get(b"authorization", b"").strip()


class APIKeyMiddleware:
    """Rejects requests without the configured key with an OpenAI-shaped 401."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        if key is None or not hmac.compare_digest(key, self.api_key):
            # Anthropic clients send the key as x-api-key (ANTHROPIC_API_KEY), OpenAI ones as a bearer token.
            how = "'x-api-key: <key>'" if ANTHROPIC_ERRORS.get() else "'Authorization: Bearer <key>'"
            if key is not None:
                message = "Incorrect API key."
            elif _authorization(scope):
                message = "The Authorization header needs the Bearer scheme: send 'Authorization: Bearer <key>'."
            else:
                message = f"Missing API key: send {how}."
            err = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
