"""POST /v1/responses: the OpenAI Responses API, served by the chat path.

The request becomes a chat request (protocol_responses.to_chat_request) that ChatCompletions
validates, renders and samples exactly as /v1/chat/completions would; the engine's output goes
through the same tool-call parser, and its chat deltas are turned into Responses output items
(`message`, `function_call`) and, when streaming, into the typed SSE events the OpenAI SDKs read
(`event: response.output_text.delta` ...), each with an increasing `sequence_number`. Finished
responses are kept in memory (response_store, unless `store: false`) for `previous_response_id`,
`item_reference` items and GET / DELETE /v1/responses/{id}.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from qwenserve.api.chat_backed import ChatBackedContext, Event
from qwenserve.api.errors import APIError, bad_request
from qwenserve.api.protocol_responses import (
    ResponsesRequest,
    refuse_unsupported,
    to_chat_request,
    tool_namespaces,
)
from qwenserve.api.request_log import RequestTracker, log_request_body
from qwenserve.api.response_store import ResponseStore
from qwenserve.api.serving_chat import (
    ChatCompletions,
    PreparedChat,
    final_finish_reason,
)
from qwenserve.api.state import ServerState, item_id
from qwenserve.api.streaming import respond
from qwenserve.api.structured_output import responses_format_guide
from qwenserve.engine.outputs import RequestOutput


def response_error_code(exc: APIError) -> str:
    """The Response object's `error.code`, one of OpenAI's values: qwen-code retries a `server_error`
    (a failed step, a shutdown) as it retries a 500."""
    if exc.status == 429:
        return "rate_limit_exceeded"
    return "server_error" if exc.status >= 500 else "invalid_prompt"


def sse_event(kind: str, payload: dict[str, Any]) -> str:
    """One typed SSE event: an `event:` line, then the payload (which repeats the type) as `data:`."""
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class OutputItems:
    """Responses output items built from chat deltas, returning each step's stream events.

    One item is open at a time: text opens a `message` (closing an open call), a new call id opens a
    `function_call` (closing whatever is open), so items keep the order the model wrote them in.
    """

    def __init__(self, namespaces: dict[str, str] | None = None) -> None:
        self.namespaces = namespaces or {}  # function name -> its namespace tool (protocol.tool_namespaces)
        self.items: list[dict[str, Any]] = []  # closed items, in output order
        self._open: dict[str, Any] | None = None
        self._call_index: int | None = None  # the parser's index of the open call
        self._pieces: list[str] = []  # the open item's text or argument fragments

    def add(self, delta: dict[str, Any]) -> list[Event]:
        """Apply one chat delta (content, or tool-call header / argument fragments)."""
        events: list[Event] = []
        if delta.get("content"):
            if self._open is None or self._open["type"] != "message":
                events += self.close("completed")
                events += self._open_message()
            events.append(self._fragment("response.output_text.delta", delta["content"]))
        for call in delta.get("tool_calls") or []:
            if call.get("id"):
                events += self.close("completed")
                events += self._open_call(call)
            fragment = (call.get("function") or {}).get("arguments")
            if fragment and self._call_index == call.get("index"):
                events.append(self._fragment("response.function_call_arguments.delta", fragment))
        return events

    def close(self, status: str) -> list[Event]:
        """Finish the open item (if any) with `status` ("completed" or "incomplete")."""
        if self._open is None:
            return []
        item, text = self._open, "".join(self._pieces)
        close = self._close_message if item["type"] == "message" else self._close_call
        events = close(item, text, status)
        self._open, self._call_index, self._pieces = None, None, []
        self.items.append(events[-1][1]["item"])
        return events

    @property
    def _index(self) -> int:
        return len(self.items)  # the open item's output_index: closed items come before it

    def _fragment(self, kind: str, text: str) -> Event:
        assert self._open is not None
        self._pieces.append(text)
        payload: dict[str, Any] = {"item_id": self._open["id"], "output_index": self._index, "delta": text}
        if kind == "response.output_text.delta":
            payload.update(content_index=0, logprobs=[])
        return kind, payload

    def _open_message(self) -> list[Event]:
        item = {"id": item_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        self._open = item
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            ("response.output_item.added", {"output_index": self._index, "item": item}),
            (
                "response.content_part.added",
                {"item_id": item["id"], "output_index": self._index, "content_index": 0, "part": part},
            ),
        ]

    def _open_call(self, call: dict[str, Any]) -> list[Event]:
        name = (call.get("function") or {}).get("name", "")
        item = {
            "id": item_id("fc"),
            "type": "function_call",
            "status": "in_progress",
            "call_id": call["id"],
            "name": name,
            "arguments": "",
        }
        if name in self.namespaces:  # the client routes the call by its namespace
            item["namespace"] = self.namespaces[name]
        self._open, self._call_index = item, call.get("index")
        return [("response.output_item.added", {"output_index": self._index, "item": item})]

    def _close_message(self, item: dict[str, Any], text: str, status: str) -> list[Event]:
        where = {"item_id": item["id"], "output_index": self._index, "content_index": 0}
        part = {"type": "output_text", "text": text, "annotations": []}
        done = {**item, "status": status, "content": [part]}
        return [
            ("response.output_text.done", {**where, "text": text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": part}),
            ("response.output_item.done", {"output_index": self._index, "item": done}),
        ]

    def _close_call(self, item: dict[str, Any], arguments: str, status: str) -> list[Event]:
        events: list[Event] = []
        if not arguments:  # a call without parameters: "{}", as the chat path's parser assembles it
            events.append(self._fragment("response.function_call_arguments.delta", "{}"))
            arguments = "{}"
        where = {"item_id": item["id"], "output_index": self._index}
        done = {**item, "status": status, "arguments": arguments}
        return events + [
            ("response.function_call_arguments.done", {**where, "name": item["name"], "arguments": arguments}),
            ("response.output_item.done", {"output_index": self._index, "item": done}),
        ]


def _own_position(param: str | None, num_history: int) -> str | None:
    """An error's `input[i]...` as the client numbered its items: the previous response's items come first."""
    match = re.match(r"input\[(\d+)\]", param or "")
    if not match or not num_history:
        return param
    index = int(match.group(1)) - num_history
    return "previous_response_id" if index < 0 else f"input[{index}]{param[match.end():]}"  # type: ignore[index]


def _with_id(item: Any, response_id: str, index: int) -> Any:
    """An input item as the input_items list shows it: with an id (the client's, else one derived from the
    response and the item's place) and a message's text as a content part."""
    if not isinstance(item, dict):
        return item
    shown = {**item, "id": item.get("id") or f"msg_{response_id.removeprefix('resp_')}_{index}"}
    if item.get("type", "message") == "message":
        shown["type"] = "message"
        if isinstance(item.get("content"), str):
            kind = "output_text" if item.get("role") == "assistant" else "input_text"
            shown["content"] = [{"type": kind, "text": item["content"]}]
    return shown


def _not_kept(response_id: str) -> APIError:
    return APIError(
        404,
        f"Response with id {response_id!r} not found: this server keeps recent responses in memory until it "
        "restarts (not those sent with store: false).",
        param="response_id",
        code="not_found",
    )


class Responses:
    """Handler for one app: a Responses request is served by `chat`'s machinery."""

    def __init__(self, state: ServerState, chat: ChatCompletions):
        self.state = state
        self.chat = chat
        self.store = ResponseStore()

    async def _prepare(self, req: ResponsesRequest) -> tuple[PreparedChat, list[dict[str, Any]]]:
        """The chat request's sampling, tool plan and prompt, and the request's own input items (item
        references resolved) as the store keeps them; errors the chat path names by `messages` (the
        template, the context length) point at `input` here."""
        refuse_unsupported(req)
        own_items = self._own_items(req)
        history = self._history(req.previous_response_id)
        expanded = req if isinstance(req.input, str) and not history else req.model_copy(
            update={"input": history + own_items}
        )  # fmt: skip
        try:
            fmt = req.text.format if req.text is not None else None
            text_format = responses_format_guide(fmt.model_dump()) if fmt is not None else None
            prepared = await self.chat.prepare(to_chat_request(expanded), text_format)
        except APIError as exc:
            if exc.param and exc.param.startswith("messages"):
                exc.param = "input"
            exc.param = _own_position(exc.param, len(history))
            raise
        return prepared, own_items

    def _own_items(self, req: ResponsesRequest) -> list[Any]:
        """`input` as items (a string: one user message), each `item_reference` replaced by the kept item."""
        if isinstance(req.input, str):
            return [{"type": "message", "role": "user", "content": req.input}]
        return [self._resolve(item, i) for i, item in enumerate(req.input)]

    def _resolve(self, item: Any, i: int) -> Any:
        if not isinstance(item, dict) or item.get("type") != "item_reference":
            return item
        ref = item.get("id")
        kept = self.store.item(ref) if isinstance(ref, str) else None
        if kept is None:
            raise bad_request(
                f"Item with id {ref!r} not found: this server keeps recent responses in memory until it "
                "restarts (not those sent with store: false). Send the item itself instead of a reference "
                "(the Vercel AI SDK does with providerOptions.openai.store = false).",
                param=f"input[{i}].id",
                code="item_not_found",
            )
        return copy.deepcopy(kept)  # this request's own copy: nothing that reads it can change the kept one

    def _history(self, previous_id: str | None) -> list[dict[str, Any]]:
        """The items of the conversation `previous_response_id` continues ([] without one)."""
        if previous_id is None:
            return []
        history = self.store.conversation(previous_id)
        if history is None:
            raise bad_request(
                f"Previous response with id {previous_id!r} not found: this server keeps recent responses "
                "in memory until it restarts (not those sent with store: false). Resend the whole "
                "conversation in 'input' instead.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return history

    async def count_input_tokens(self, req: ResponsesRequest) -> dict[str, Any]:
        """The prompt's size, rendered exactly as create() renders it."""
        prepared, _ = await self._prepare(req)
        return {"object": "response.input_tokens", "input_tokens": len(prepared.prompt_ids)}

    def retrieve(self, response_id: str) -> dict[str, Any]:
        """A kept response's body (GET /v1/responses/{id})."""
        kept = self.store.get(response_id)
        if kept is None:
            raise _not_kept(response_id)
        return kept.body

    def input_items(self, response_id: str, limit: int = 20, order: str = "desc", after: str | None = None) -> dict[str, Any]:
        """A kept response's own input items, a page at a time (GET /v1/responses/{id}/input_items)."""
        kept = self.store.get(response_id)
        if kept is None:
            raise _not_kept(response_id)
        if not 1 <= limit <= 100:
            raise bad_request(f"'limit' must be from 1 to 100, got {limit}.", param="limit")
        if order not in ("asc", "desc"):
            raise bad_request(f"'order' must be asc or desc, got {order!r}.", param="order")
        items = [_with_id(item, response_id, i) for i, item in enumerate(kept.input_items)]
        if order == "desc":
            items.reverse()
        ids = [item["id"] for item in items]
        if after is not None:
            if after not in ids:
                raise bad_request(f"'after' names no input item of {response_id!r}: {after!r}.", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }

    def delete(self, response_id: str) -> dict[str, Any]:
        """Forget a kept response (DELETE /v1/responses/{id})."""
        if not self.store.delete(response_id):
            raise _not_kept(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        """Validate, submit to the engine, and answer with a Response object or its event stream."""
        state = self.state
        request_id = item_id("resp")
        if state.settings.log_requests:
            log_request_body(request_id, req)
        prepared, own_items = await self._prepare(req)
        tracker = RequestTracker(request_id, state.metrics, len(prepared.prompt_ids))
        ctx = _ResponseContext(state, req, prepared, request_id, tracker, self.chat.parser(prepared.plan))
        if req.store is not False:
            ctx.on_finish = lambda body: self.store.put(request_id, req.previous_response_id, own_items, body)
        outputs = state.add_request(request_id, prepared.prompt_ids, prepared.params, prompt_param="input")
        return await respond(
            raw, request_id, ctx, req.stream, lambda: ctx.stream(outputs), lambda: ctx.collect(outputs)
        )


class _ResponseContext(ChatBackedContext):
    """One request's Response object and events (ids, parser, output items, usage)."""

    def __init__(
        self, state: ServerState, req: ResponsesRequest, prepared: PreparedChat, request_id: str,
        tracker: RequestTracker, parser: Any | None,
    ):  # fmt: skip
        super().__init__(state, req.model, prepared, request_id, tracker, parser)
        self.req = req
        self.created_at = int(time.time())
        self.output = OutputItems(tool_namespaces(req.tools))
        self.status = "in_progress"
        self.error: dict[str, str] | None = None  # the Response object's `error`, once it failed
        self.sequence = 0
        self.on_finish: Callable[[dict[str, Any]], None] | None = None  # keeps the finished body

    def _text(self) -> dict[str, Any]:
        """The request's `text` as given (OpenAI echoes it), its format {"type": "text"} by default."""
        text = self.req.text.model_dump(exclude_none=True) if self.req.text is not None else {}
        return {**text, "format": text.get("format") or {"type": "text"}}

    def heartbeat(self) -> str:
        """`response.in_progress` again, the Response as it stands: an event, not a comment line, because
        Codex restarts its idle timeout (300 s by default) only on events, and a long prompt on a CPU or
        behind a queue can take that long to read."""
        return self._event("response.in_progress", {"response": self.body()})

    # ---- shared by both modes ----

    def add_delta(self, delta: dict[str, Any]) -> list[Event]:
        return self.output.add(delta)

    def _finish(self, engine_reason: str) -> list[Event]:
        """Close the open item and end the response: `incomplete` when cut by the length limit."""
        reason = final_finish_reason(engine_reason, self.tracker.tool_calls > 0)
        self.tracker.set_finish(0, reason)
        self.status = "incomplete" if reason == "length" else "completed"
        events = self.output.close(self.status)
        body = self.body()
        if self.on_finish is not None:
            self.on_finish(body)
        return events + [(f"response.{self.status}", {"response": body})]

    def body(self) -> dict[str, Any]:
        """The Response object in its current state, with the request's settings echoed."""
        done = self.status != "in_progress"
        params = self.prepared.params
        return {
            "id": self.request_id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": False,
            "completed_at": int(time.time()) if self.status == "completed" else None,
            "error": self.error,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": self.req.instructions,
            "max_output_tokens": self.req.max_output_tokens,
            "metadata": self.req.metadata or {},
            "model": self.model,
            "output": list(self.output.items) if done else [],
            "parallel_tool_calls": self.req.parallel_tool_calls,
            "previous_response_id": self.req.previous_response_id,
            "reasoning": {key: (self.req.reasoning or {}).get(key) for key in ("effort", "summary")},  # echoed
            "store": self.req.store is not False,  # kept for later requests (Responses.store)
            "temperature": params.temperature,
            "text": self._text(),
            "tool_choice": self.req.tool_choice or "auto",
            "tools": self.req.tools or [],
            "top_p": params.top_p,
            "truncation": self.req.truncation or "disabled",
            "usage": self._usage() if done else None,
            "user": self.req.user,
        }

    def _usage(self) -> dict[str, Any]:
        usage = self.tracker.usage()
        return {
            "input_tokens": usage["prompt_tokens"],
            # cache_write_tokens: what OpenAI bills as writes to its prompt cache; the prefix cache here
            # fills itself as prompts are computed, at no charge (newer SDKs require the field).
            "input_tokens_details": {
                "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                "cache_write_tokens": 0,
            },
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        }

    # ---- streaming ----

    def _event(self, kind: str, payload: dict[str, Any]) -> str:
        body = {"type": kind, "sequence_number": self.sequence, **payload}
        self.sequence += 1
        return sse_event(kind, body)

    async def stream(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """The SSE body: created, in_progress, each item's events as parsed, completed / incomplete;
        a failure after the start ends it with `response.failed` (stream_error)."""
        yield self._event("response.created", {"response": self.body()})
        yield self._event("response.in_progress", {"response": self.body()})
        for event in self._feed(self._prefix(), final=False):
            yield self._event(*event)
        reason = "stop"
        async for out in outputs:
            self.tracker.observe(out)
            for event in self._feed(out.text, final=out.finish_reason is not None):
                yield self._event(*event)
            reason = out.finish_reason or reason
        self.finished = True
        for event in self._finish(reason):
            yield self._event(*event)
        self.tracker.done()


    def stream_error(self, exc: APIError) -> str:
        """A failure after the stream started, as OpenAI ends such a stream: the open item closes
        `incomplete`, then `response.failed` carries the error (qwen-code and the SDKs raise it)."""
        self.log_error(exc)
        self.status = "failed"
        self.error = {"code": response_error_code(exc), "message": exc.message}
        events = self.output.close("incomplete") + [("response.failed", {"response": self.body()})]
        return "".join(self._event(*event) for event in events)

    # ---- non-streaming ----

    async def collect(self, outputs: AsyncIterator[RequestOutput]) -> dict[str, Any]:
        """Run to completion and build the Response object (the same items a stream would give)."""
        text, reason = "", "stop"
        async for out in outputs:
            self.tracker.observe(out)
            text += out.text
            reason = out.finish_reason or reason
        self.finished = True
        self._feed(self._prefix() + text, final=True)
        self._finish(reason)
        self.tracker.done()
        return self.body()
