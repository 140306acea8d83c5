"""OpenAI-shaped errors: one exception type and the handlers that turn every failure into
`{"error": {"message", "type", "param", "code"}}` with the right status code. On the Anthropic Messages
API's routes the same error is `{"type": "error", "error": {"type", "message", "param", "code"}}`, a body
both kinds of client read (ANTHROPIC_ERRORS)."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qwenserve.engine.sampling_params import InvalidRequestError

logger = logging.getLogger("qwenserve.api")

# OpenAI's `type` strings by status code: the API answers a wrong key (code invalid_api_key) and an
# unknown model (code model_not_found) as invalid_request_error too.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}

# Anthropic's `type` strings by status code (https://docs.claude.com/en/api/errors): any other 4xx is an
# invalid_request_error, any other 5xx an api_error. 503 (loading, queue full) is their 529's overloaded_error.
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}

# 4xx statuses a client may send again (timeout, conflict, rate limit); other 4xx answers on the Anthropic routes
# say `x-should-retry: false`.
_RETRYABLE_4XX = frozenset({408, 409, 429})

# True while a request to the Anthropic Messages API is handled (set by middleware.AnthropicErrorsMiddleware,
# outside every layer that may refuse it): its errors take Anthropic's shape too.
ANTHROPIC_ERRORS: ContextVar[bool] = ContextVar("anthropic_errors", default=False)


class APIError(Exception):
    """An error the HTTP layer answers with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.details = details  # Anthropic's `error.details` (an `error_code` its SDKs act on); Anthropic routes only

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    @property
    def anthropic_type(self) -> str:
        return _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body, shared by plain responses and mid-stream `data: {"error": ...}` chunks. On the
        Anthropic routes, Anthropic's shape with OpenAI's fields kept (its SDKs read error.type and .message)."""
        if ANTHROPIC_ERRORS.get():
            error = {"type": self.anthropic_type, "message": self.message, "param": self.param, "code": self.code}
            if self.details is not None:
                error["details"] = self.details
            return {"type": "error", "error": error}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a JSON response, in OpenAI's or (on Anthropic routes) Anthropic's shape."""
        headers = self.headers
        if ANTHROPIC_ERRORS.get() and 400 <= self.status < 500 and self.status not in _RETRYABLE_4XX:
            # As Anthropic's API does: sending the same request again cannot help. Claude Code retries a
            # 401 (ten times, ~3 minutes of backoff, for a wrong key) unless told not to.
            headers = {"x-should-retry": "false", **headers}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def internal_error(exc: Exception) -> APIError:
    """A server bug, as the client sees it."""
    return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}")


def aborted() -> APIError:
    """The server ended the request (shutdown, or an engine-side abort): retryable elsewhere or later."""
    return APIError(503, "The request was aborted by the server.", code="aborted", headers={"Retry-After": "1"})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the offending field."""
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: int = 5, code: str = "service_unavailable") -> APIError:
    """A 503 with Retry-After, which the OpenAI SDKs and qwen-code retry."""
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def from_invalid_request(exc: InvalidRequestError) -> APIError:
    """Map the engine's validation error (bad sampling value, prompt too long) to a 400."""
    return APIError(400, exc.message, param=exc.param, code=exc.code)


_LOCATIONS = frozenset({"body", "query", "path", "header"})
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"})


def _is_union_tag(part: str) -> bool:
    """pydantic puts the union member it tried into `loc` (str, literal[...], NamedToolChoice)."""
    return part in _TYPE_TAGS or not part.isidentifier() or part[:1].isupper()


def format_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; ('query', 'limit') -> 'limit'; None for
    the body itself. OpenAI names a parameter without where it was sent."""
    out = ""
    if loc and loc[0] in _LOCATIONS:
        loc = loc[1:]
    for part in loc:
        if isinstance(part, str) and _is_union_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def _most_specific(errors: list[Any]) -> Any:
    """The first error, or a deeper one about the same field: where a value matches no member of a union
    (content as a string or a list of parts), the member that got furthest names the bad part
    (`messages[0].content[1]`) where the first would only name the field."""
    first = errors[0]
    field = tuple(first.get("loc", ()))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    return max(same, key=lambda e: len(format_loc(e.get("loc", ())) or ""))


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn FastAPI/pydantic's 422 into OpenAI's 400 with `param` set to the first bad field."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request body.")
    first = _most_specific(errors)
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "") or first.get("msg", "")
        return bad_request(f"Request body is not valid JSON: {detail}", code="invalid_json")
    loc = first.get("loc", ())
    param = format_loc(loc)
    if kind == "missing" and param is None:
        return bad_request("Request body is missing: send a JSON object.", code="invalid_json")
    msg = first.get("msg", "invalid value")
    if kind == "model_attributes_type" and param is None:
        return bad_request("Request body must be a JSON object.", code="invalid_json")
    where = f"'{param}'" if param else "request body"
    extra = f" ({len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for {where}: {msg}{extra}", param=param, code="invalid_value")


def unreadable_body(cause: BaseException) -> APIError:
    """The 400 for a body the JSON reader could not take: not UTF-8, or nested past the parser's limit."""
    if isinstance(cause, UnicodeDecodeError):
        detail = f"it is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    elif isinstance(cause, RecursionError):
        detail = "it is nested too deeply"
    else:
        detail = f"{type(cause).__name__}: {cause}"
    return bad_request(f"Request body could not be read as JSON: {detail}.", code="invalid_json")


def unknown_route_message(method: str, path: str, routes: set[str]) -> str:
    """The 404 text, with the fix when the path is one of ours without its /v1 prefix: the usual
    cause is a client base URL that does not end in /v1."""
    message = f"Unknown route: {method} {path}"
    if path.startswith("/v1/v1/") and path[3:] in routes:
        return (
            f"{message}. Did you mean {path[3:]}? The client added /v1 to a base URL that already ends in /v1. "
            "OpenAI clients take http://HOST:PORT/v1; Anthropic clients (Claude Code, the anthropic SDK) take "
            "http://HOST:PORT, without /v1."
        )
    if not path.startswith("/v1/") and f"/v1{path}" in routes:
        for_whom = "An Anthropic client's base URL for this server is http://HOST:PORT" if path.startswith(
            "/messages") else "An OpenAI client's base URL for this server ends in /v1"
        message += f". Did you mean /v1{path}? {for_whom}."
    return message


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure path, FastAPI's own included, answer in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return from_invalid_request(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = unknown_route_message(request.method, request.url.path, {r.path for r in app.routes})
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and isinstance(exc.__cause__, ClientDisconnect):
            # Nobody reads this answer; its status (nginx's 499) keeps the log and metrics from calling it a 400.
            return APIError(499, "The client closed the connection before its request body arrived.",
                            code="client_disconnected").response()  # fmt: skip
        elif exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's body reader turns any failure but a JSON syntax error into a bare "error parsing the body".
            return unreadable_body(exc.__cause__).response()
        else:
            message = str(exc.detail)
        code = "request_too_large" if exc.status_code == 413 else None
        err = APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {}))
        return err.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return internal_error(exc).response()
