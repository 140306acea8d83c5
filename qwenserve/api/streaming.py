"""How an endpoint answers: `respond` sends either an SSE stream (`data:` framing, keep-alive chunks,
a guard that turns a failure mid-stream into the endpoint's error event, a response class that always
closes its generator so aborts run) or one JSON body, abandoned as soon as the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qwenserve.api.errors import APIError
from qwenserve.config import env_number

logger = logging.getLogger("qwenserve.api")

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"

# qwen-code aborts a stream after 240 s without a chunk (SSE comments do not count), so an
# empty-delta chunk goes out whenever nothing else has for this long.
HEARTBEAT_SECONDS = env_number("QWENSERVE_HEARTBEAT_SECONDS", 10.0, whole=False)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> str:
    """One SSE event: a `data:` line with compact JSON and the blank line that ends it."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def heartbeat_without_choices(request_id: str, obj: str, created: int, model: str, include_usage: bool) -> dict:
    """A keep-alive chunk once every choice has finished (only the usage chunk is left to send):
    `choices: []`, as the usage chunk has, since a choice's finish chunk must be its last."""
    payload: dict[str, Any] = {"id": request_id, "object": obj, "created": created, "model": model, "choices": []}
    if include_usage:
        payload["usage"] = None
    return payload


async def with_heartbeat(
    source: AsyncIterator[str], heartbeat: Callable[[], str], interval: float = HEARTBEAT_SECONDS
) -> AsyncIterator[str]:
    """Re-yield `source`, inserting `heartbeat()` whenever it has been quiet for `interval` s.

    The source is advanced in a task so a timeout never cancels it mid-step; closing this
    generator cancels that task, which runs the source's `finally` (and so its abort).
    """
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield heartbeat()
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
        else:
            await source.aclose()  # type: ignore[attr-defined]


_END = object()


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as (position, item) in arrival order."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(pos: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((pos, item, None))
            await queue.put((pos, _END, None))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer, which re-raises it
            await queue.put((pos, _END, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            pos, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                remaining -= 1
                continue
            yield pos, item
    finally:
        for task in tasks:
            task.cancel()


async def guarded(
    events: AsyncIterator[str], request_id: str, on_error: Callable[[APIError], str], close: Callable[[], None]
) -> AsyncIterator[str]:
    """An endpoint's SSE body that cannot break off silently: a failure after the start becomes its error
    event (`on_error`, which also writes the request's log line; an unexpected exception is logged with
    its traceback first), and `close` (abort the request if unfinished) runs however the stream ends."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield on_error(exc)
    except Exception as exc:  # noqa: BLE001 - reported to the client as a mid-stream error
        logger.exception("request %s failed mid-stream", request_id)
        yield on_error(APIError(500, f"Generation failed: {type(exc).__name__}: {exc}"))
    finally:
        close()
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


class SSEResponse(StreamingResponse):
    """text/event-stream response that closes its body generator however the stream ends.

    Starlette cancels the sending task when the client disconnects; closing the generator
    here as well makes its `finally` (engine.abort) run at once, not at garbage collection.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None):
        super().__init__(content, headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except OSError:
            pass  # the client went away mid-write: nothing left to send it
        finally:
            if self._on_close is not None:
                self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class AnswerContext(Protocol):
    """What an endpoint's per-request context gives `respond`."""

    def heartbeat(self) -> str:
        """A keep-alive event for a stream whose answer is slow to come (a long prefill, a queue)."""
        ...

    def log_error(self, exc: APIError) -> None:
        """Write the request's log line with the error it ended in."""
        ...

    def stream_error(self, exc: APIError) -> str:
        """log_error, then the event that tells a stream's client."""
        ...

    def close_if_unfinished(self) -> None:
        """Abort the request if it has not ended (the client went away mid-answer)."""
        ...


async def respond(
    raw: Request,
    request_id: str,
    ctx: AnswerContext,
    stream: bool,
    events: Callable[[], AsyncIterator[str]],
    collect: Callable[[], Awaitable[dict[str, Any]]],
) -> Response:
    """The answer to one request: the SSE stream `events()` (guarded, with heartbeats), or the JSON
    body `collect()` builds. Either way `ctx.close_if_unfinished` (abort in the engine, freeing its KV
    blocks) runs when the answer ends or the client leaves."""
    if stream:
        body = guarded(events(), request_id, ctx.stream_error, ctx.close_if_unfinished)
        return SSEResponse(with_heartbeat(body, ctx.heartbeat), on_close=ctx.close_if_unfinished)
    work = asyncio.ensure_future(collect())
    try:
        return JSONResponse(await wait_or_disconnect(raw, work))
    except APIError as exc:
        if exc.status != 499:  # a client gone away is an abort; anything else is logged as its error
            ctx.log_error(exc)
        raise
    finally:
        ctx.close_if_unfinished()


async def wait_or_disconnect(request: Request, work: asyncio.Future[Any]) -> Any:
    """Await `work`; if the client hangs up first, cancel it and raise the 499 (the caller aborts)."""
    while True:
        # Polled 4 times a second: a client gone at 0.2 s should not cost a second of prefill.
        done, _ = await asyncio.wait({work}, timeout=0.25)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            raise APIError(499, "Client disconnected.", code="client_disconnected")
