"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API, served by the chat path.

The request becomes a chat request (protocol_messages.to_chat_request) that ChatCompletions validates,
renders and samples exactly as /v1/chat/completions would; the engine's output goes through the same
tool-call parser, and its chat deltas are turned into Anthropic content blocks (`text`, `tool_use`) and,
when streaming, into the SSE events the Anthropic SDKs read (`message_start`, `content_block_start`,
`content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`; `ping` to keep alive).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from qwenserve.api.chat_backed import ChatBackedContext, Event
from qwenserve.api.errors import APIError
from qwenserve.api.protocol_messages import (
    MessagesInput,
    MessagesRequest,
    refuse_unsupported,
    to_chat_request,
)
from qwenserve.api.request_log import RequestTracker, log_request_body
from qwenserve.api.serving_chat import (
    ChatCompletions,
    PreparedChat,
    final_finish_reason,
)
from qwenserve.api.state import ServerState, item_id
from qwenserve.api.streaming import respond
from qwenserve.engine.outputs import RequestOutput

# Anthropic's own keep-alive event: every SDK skips it, and its bytes reset a client's idle timer.
PING = 'event: ping\ndata: {"type":"ping"}\n\n'

# The engine's (and OpenAI's) words for a prompt over the context; Anthropic clients recognise a full
# context by Anthropic's ("prompt is too long: M tokens > N maximum": Claude Code then compacts).
_OVERFLOW = re.compile(r"maximum context length is (\d+) tokens\. However, your request resulted in (more than )?(\d+)")


def sse_event(kind: str, payload: dict[str, Any]) -> str:
    """One SSE event: an `event:` line, then the payload (with its `type`) as `data:`."""
    body = json.dumps({"type": kind, **payload}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {body}\n\n"


def with_anthropic_overflow_words(exc: APIError) -> APIError:
    """A context overflow's message led by Anthropic's words (the OpenAI ones follow, for qwen-code)."""
    if exc.code == "context_length_exceeded" and (found := _OVERFLOW.search(exc.message)):
        limit, more, size = found.groups()
        exc.message = f"prompt is too long: {'more than ' if more else ''}{size} tokens > {limit} maximum. {exc.message}"
    return exc


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's streamed arguments as the `input` object (the parser writes a JSON object; "{}" for none)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}  # a call cut short (max_tokens) whose JSON the parser could not close
    return value if isinstance(value, dict) else {}


class ContentBlocks:
    """Anthropic content blocks built from chat deltas, returning each step's stream events.

    One block is open at a time: text opens a `text` block (closing an open call), a new call id opens
    a `tool_use` block (closing whatever is open), so blocks keep the order the model wrote them in.
    """

    def __init__(self) -> None:
        self.blocks: list[dict[str, Any]] = []  # closed blocks, in output order
        self._open: dict[str, Any] | None = None
        self._call_index: int | None = None  # the parser's index of the open call
        self._pieces: list[str] = []  # the open block's text or argument fragments

    @property
    def made_call(self) -> bool:
        return any(block["type"] == "tool_use" for block in self.blocks) or (
            self._open is not None and self._open["type"] == "tool_use"
        )

    def add(self, delta: dict[str, Any]) -> list[Event]:
        """Apply one chat delta (content, or tool-call header / argument fragments)."""
        events: list[Event] = []
        if delta.get("content"):
            if self._open is None or self._open["type"] != "text":
                events += self.close()
                events += self._start({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": delta["content"]}, delta["content"]))
        for call in delta.get("tool_calls") or []:
            if call.get("id"):
                events += self.close()
                name = (call.get("function") or {}).get("name", "")
                events += self._start({"type": "tool_use", "id": item_id("toolu"), "name": name, "input": {}})
                self._call_index = call.get("index")
            fragment = (call.get("function") or {}).get("arguments")
            if fragment and self._call_index == call.get("index"):
                events.append(self._delta({"type": "input_json_delta", "partial_json": fragment}, fragment))
        return events

    def close(self) -> list[Event]:
        """Finish the open block (if any)."""
        if self._open is None:
            return []
        block, text = self._open, "".join(self._pieces)
        if block["type"] == "text":
            self.blocks.append({"type": "text", "text": text})
        else:
            self.blocks.append({**block, "input": tool_input(text)})
        self._open, self._call_index, self._pieces = None, None, []
        return [("content_block_stop", {"index": len(self.blocks) - 1})]

    def _start(self, block: dict[str, Any]) -> list[Event]:
        self._open = block
        return [("content_block_start", {"index": len(self.blocks), "content_block": block})]

    def _delta(self, delta: dict[str, Any], piece: str) -> Event:
        self._pieces.append(piece)
        return "content_block_delta", {"index": len(self.blocks), "delta": delta}


def stop_reason(engine_reason: str, matched: int | str | None, made_call: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for how the engine ended the answer: a stop sequence is named even
    when it cut a call short (the client asked to stop there); a call made otherwise is `tool_use`."""
    reason = final_finish_reason(engine_reason, made_call)  # raises the 503 for an abort
    if reason == "length":
        return "max_tokens", None
    if isinstance(matched, str):
        return "stop_sequence", matched
    return ("tool_use" if made_call else "end_turn"), None


class Messages:
    """Handler for one app: a Messages request is served by `chat`'s machinery."""

    def __init__(self, state: ServerState, chat: ChatCompletions):
        self.state = state
        self.chat = chat

    async def _prepare(self, req: MessagesInput) -> PreparedChat:
        """The chat request's sampling, tool plan and prompt."""
        refuse_unsupported(req)
        try:
            return await self.chat.prepare(to_chat_request(req))
        except APIError as exc:
            if exc.param == "stop" and isinstance(req, MessagesRequest) and req.stop_sequences:
                exc.param = "stop_sequences"  # Anthropic's name for the field the chat path calls `stop`
            raise with_anthropic_overflow_words(exc) from None

    async def count_tokens(self, req: MessagesInput) -> dict[str, int]:
        """The prompt's size, rendered exactly as /v1/messages renders it."""
        prepared = await self._prepare(req)
        return {"input_tokens": len(prepared.prompt_ids)}

    async def create(self, req: MessagesRequest, raw: Request) -> Response:
        """Validate, submit to the engine, and answer with a Message or its event stream."""
        state = self.state
        request_id = item_id("msg")
        if state.settings.log_requests:
            log_request_body(request_id, req)
        prepared = await self._prepare(req)
        tracker = RequestTracker(request_id, state.metrics, len(prepared.prompt_ids))
        ctx = _MessageContext(state, req, prepared, request_id, tracker, self.chat.parser(prepared.plan))
        try:
            outputs = state.add_request(request_id, prepared.prompt_ids, prepared.params)
        except APIError as exc:
            raise with_anthropic_overflow_words(exc) from None
        return await respond(
            raw, request_id, ctx, req.stream, lambda: ctx.stream(outputs), lambda: ctx.collect(outputs)
        )


class _MessageContext(ChatBackedContext):
    """One request's Message and events (id, parser, content blocks, usage)."""

    def __init__(
        self, state: ServerState, req: MessagesRequest, prepared: PreparedChat, request_id: str,
        tracker: RequestTracker, parser: Any | None,
    ):  # fmt: skip
        super().__init__(state, req.model, prepared, request_id, tracker, parser)
        self.content = ContentBlocks()
        self.stop: tuple[str | None, str | None] = (None, None)  # (stop_reason, stop_sequence)
        self.started = False

    def heartbeat(self) -> str:
        return PING

    # ---- shared by both modes ----

    def add_delta(self, delta: dict[str, Any]) -> list[Event]:
        return self.content.add(delta)

    def _finish(self, engine_reason: str, matched: int | str | None) -> list[Event]:
        """Close the open block and settle the stop reason."""
        events = self.content.close()
        self.stop = stop_reason(engine_reason, matched, self.content.made_call)
        self.tracker.set_finish(0, final_finish_reason(engine_reason, self.content.made_call))
        return events

    def usage(self) -> dict[str, int]:
        """Anthropic's usage: `input_tokens` is the part of the prompt the prefix cache did not hold,
        `cache_read_input_tokens` the part it did (their sum is the prompt). Nothing is billed as a cache
        write: the cache fills itself as prompts are computed."""
        cached = self.tracker.cached_tokens
        return {
            "input_tokens": self.tracker.prompt_tokens - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": self.tracker.completion_tokens,
        }

    def body(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        """The Message object with `content` and the stop reason and usage so far."""
        reason, sequence = self.stop
        return {
            "id": self.request_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": self.usage(),
        }

    # ---- streaming ----

    def _start_events(self) -> list[str]:
        """message_start (once): sent with the first output, when the prompt's cache hits are known."""
        if self.started:
            return []
        self.started = True
        return [sse_event("message_start", {"message": self.body([])}), PING]

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """The SSE body: message_start, each block's events as parsed, message_delta, message_stop; pings
        keep it alive while the prompt is read, and a failure after the start is an `error` event."""
        pending = self._feed(self._prefix(), final=False)
        reason, matched = "stop", None
        async for out in outputs:
            self.tracker.observe(out)
            pending += self._feed(out.text, final=out.finish_reason is not None)
            for event in self._start_events():
                yield event
            for event in pending:
                yield sse_event(*event)
            pending = []
            reason, matched = out.finish_reason or reason, out.stop_reason
        self.finished = True
        for event in self._start_events():
            yield event
        for event in pending + self._finish(reason, matched):
            yield sse_event(*event)
        stop_reason_, stop_sequence = self.stop
        delta = {"stop_reason": stop_reason_, "stop_sequence": stop_sequence}
        yield sse_event("message_delta", {"delta": delta, "usage": self.usage()})
        yield sse_event("message_stop", {})
        self.tracker.done()

    def stream_error(self, exc: APIError) -> str:
        """A failure after the stream started: an `error` event (the SDKs raise it), which ends the stream."""
        self.log_error(exc)
        return sse_event("error", {"error": {"type": exc.anthropic_type, "message": exc.message,
                                             "param": exc.param, "code": exc.code}})  # fmt: skip

    # ---- non-streaming ----

    async def collect(self, outputs: AsyncIterator[RequestOutput]) -> dict[str, Any]:
        """Run to completion and build the Message (the same blocks a stream would give)."""
        text, reason, matched = "", "stop", None
        async for out in outputs:
            self.tracker.observe(out)
            text += out.text
            reason, matched = out.finish_reason or reason, out.stop_reason
        self.finished = True
        self._feed(self._prefix() + text, final=True)
        self._finish(reason, matched)
        self.tracker.done()
        return self.body(self.content.blocks)
