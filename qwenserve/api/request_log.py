"""Per-request timing and accounting: feeds the latency histograms and token counters, and
writes the one log line per request (id, tokens, TTFT, tok/s, finish reason)."""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from typing import Any

from qwenserve.api.errors import APIError
from qwenserve.api.metrics import Metrics
from qwenserve.engine.outputs import RequestOutput

logger = logging.getLogger("qwenserve.api")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _escape_controls(value: Any) -> Any:
    if value is None or isinstance(value, int | float):  # numbers keep their type for %d / %.1f
        return value
    return _CONTROL_CHARACTERS.sub(lambda m: m.group().encode("unicode_escape").decode(), str(value))


class _EscapeControlCharacters(logging.Filter):
    """Escapes line breaks and other control characters in the values a log line names: a request's path or
    a refusal's message holds what the client sent, and a raw line break there would forge log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_escape_controls(arg) for arg in record.args)
        return True


logger.addFilter(_EscapeControlCharacters())

# The x-request-id of the HTTP request being handled (RequestIdMiddleware sets it): the log line names it,
# so a client's id can be found in the server's log.
HTTP_REQUEST_ID: ContextVar[str | None] = ContextVar("http_request_id", default=None)
# The engine requests whose line the HTTP request being handled has written (StatusCountMiddleware gives
# each HTTP request its own list): one the engine itself ended with a 4xx (a structured-output dead end)
# or a 503 (shut down) is then not logged a second time as "refused".
LOGGED_REQUESTS: ContextVar[list[str] | None] = ContextVar("logged_requests", default=None)


def log_request_body(request_id: str, body: Any) -> None:
    """`--log-requests`: the request body as received (after JSON parsing): the fields the client
    sent, not the defaults it left out."""
    if hasattr(body, "model_dump"):
        body = body.model_dump(exclude_unset=True)
    logger.info("request %s body: %s", request_id, json.dumps(body, ensure_ascii=False, default=str))


class RequestTracker:
    """Watches one request's outputs; call `observe` on each and `done` once at the end."""

    def __init__(self, request_id: str, metrics: Metrics | None, prompt_tokens: int = 0, n: int = 1):
        self.request_id = request_id
        self.metrics = metrics
        self.n = n  # choices: each is one generation in qwenserve_request_finished_total
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        # Per choice: the inter-token gaps are a sequence's own (with n > 1 the choices' tokens interleave).
        self._last_token_of: dict[int, float] = {}
        self.prompt_tokens = prompt_tokens  # known at once: a request aborted before its first output counts them
        self.cached_tokens = 0
        self.generated: dict[int, int] = {}
        self.finish_reasons: dict[int, str] = {}
        self.tool_calls = 0
        self.http_request_id = HTTP_REQUEST_ID.get()
        self._logged_into = LOGGED_REQUESTS.get()
        self._logged = False

    def observe(self, out: RequestOutput) -> None:
        """Record one RequestOutput increment (timing and token counts)."""
        now = time.monotonic()
        self.prompt_tokens = out.num_prompt_tokens
        self.cached_tokens = max(self.cached_tokens, out.num_cached_tokens)
        if out.token_ids:
            if self.first_token is None:
                self.first_token = now
                if self.metrics:
                    self.metrics.ttft.observe(now - self.arrival)
            previous = self._last_token_of.get(out.index)
            if self.metrics and previous is not None:
                # Several tokens in one increment: spread the gap evenly between them.
                gap = (now - previous) / len(out.token_ids)
                for _ in out.token_ids:
                    self.metrics.itl.observe(gap)
            self._last_token_of[out.index] = now
            self.last_token = now
        self.generated[out.index] = out.num_generated_tokens
        if out.finish_reason:
            self.finish_reasons[out.index] = out.finish_reason

    def set_finish(self, index: int, reason: str) -> None:
        """Record the finish reason the client saw (e.g. tool_calls rather than the engine's stop)."""
        self.finish_reasons[index] = reason

    def choice_finishes(self, finish: str | None = None, error: str | None = None) -> list[str]:
        """Each choice's finish reason: the one it ended with, else `finish` ("abort": the client left, or the
        server stopped, before it did) or, for a request that failed, "error". One label per choice, never one
        joined label per request: `n` choices are `n` generations, and a dashboard summing the reasons must not
        meet "length,stop"."""
        fallback = finish or ("error" if error else "none")
        indexes = sorted(set(range(self.n)) | set(self.finish_reasons))
        return [self.finish_reasons.get(i, fallback) for i in indexes]

    @property
    def completion_tokens(self) -> int:
        return sum(self.generated.values())

    def usage(self) -> dict[str, Any]:
        """OpenAI usage, with the prefix-cache hits in prompt_tokens_details."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def fail(self, exc: APIError) -> None:
        """The log line of a request that ended in `exc`: its unfinished choices count as "abort" when the
        server aborted it (shutting down), else as "error"."""
        self.done(finish="abort" if exc.code == "aborted" else None, error=exc.message)

    def done(self, finish: str | None = None, error: str | None = None) -> None:
        """Count tokens, observe latency and write the request's log line (once)."""
        if self._logged:
            return
        self._logged = True
        if self._logged_into is not None:
            self._logged_into.append(self.request_id)
        now = time.monotonic()
        reasons = self.choice_finishes(finish, error)
        if self.metrics:
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
            self.metrics.cached_tokens.inc(self.cached_tokens)
            self.metrics.generation_tokens.inc(self.completion_tokens)
            for reason in reasons:
                self.metrics.finished.labels(finish_reason=reason).inc()
            self.metrics.e2e.observe(now - self.arrival)
        finish = ",".join(sorted(set(reasons)))
        ttft = f"{self.first_token - self.arrival:.3f}s" if self.first_token is not None else "-"
        decode_time = (self.last_token or now) - (self.first_token or now)
        rate = (self.completion_tokens - len(self.generated)) / decode_time if decode_time > 0 else 0.0
        tools = f" tool_calls={self.tool_calls}" if self.tool_calls else ""
        err = f" error={error!r}" if error else ""
        http_id = f" x-request-id={self.http_request_id}" if self.http_request_id else ""
        logger.info(
            "request %s: prompt=%d cached=%d generated=%d ttft=%s %.1f tok/s total=%.3fs finish=%s%s%s%s",
            self.request_id,
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
            ttft,
            rate,
            now - self.arrival,
            finish,
            tools,
            err,
            http_id,
        )
