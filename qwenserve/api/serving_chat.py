"""POST /v1/chat/completions: render, submit, and answer as one JSON body or an SSE stream
with incremental content and tool-call deltas."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from qwenserve.api.chat import ToolPlan, normalize_messages, plan_tools, render_chat
from qwenserve.api.errors import APIError, aborted, bad_request
from qwenserve.api.logprobs import chat_logprobs, shown_logprobs
from qwenserve.api.protocol import ChatCompletionRequest
from qwenserve.api.request_log import RequestTracker, log_request_body
from qwenserve.api.sampling import build_sampling_params
from qwenserve.api.state import ServerState, new_id
from qwenserve.api.streaming import (
    SSE_DONE,
    heartbeat_without_choices,
    respond,
    sse,
)
from qwenserve.api.structured_output import (
    allowed_calls_guide,
    calls_or_reply_guide,
    forced_call_guide,
    forced_call_markup,
    is_reply_format,
    request_guide,
)
from qwenserve.engine.guided import Guide
from qwenserve.engine.outputs import RequestOutput
from qwenserve.engine.sampling_params import InvalidRequestError, SamplingParams

logger = logging.getLogger("qwenserve.api")


def final_finish_reason(engine_reason: str, made_tool_call: bool) -> str:
    """`tool_calls` when a call was emitted and generation ended normally."""
    if engine_reason == "abort":
        raise aborted()
    if made_tool_call and engine_reason == "stop":
        return "tool_calls"
    return engine_reason


@dataclass
class PreparedChat:
    """A validated chat request ready for the engine: its sampling, tool plan and prompt."""

    params: SamplingParams
    plan: ToolPlan
    prompt_ids: list[int]


class ChatCompletions:
    """Handler for one app; stateless between requests apart from `state`."""

    def __init__(self, state: ServerState):
        self.state = state

    def _prompt(self, req: ChatCompletionRequest, plan: ToolPlan) -> list[int]:
        """Render and tokenize (runs on the tokenization thread)."""
        messages = normalize_messages(req.messages)
        text = render_chat(
            self.state.tokenizer,
            messages,
            plan.tools,
            req.chat_template_kwargs,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
        return self.state.encode_prompt(text + plan.forced_prefix, "messages")

    async def _constrain_calls(self, plan: ToolPlan, params: SamplingParams, reply: Guide | None = None) -> ToolPlan:
        """tool_choice required / named: a grammar makes the answer calls of the allowed functions with
        parameters valid against their schemas (the grammar writes the call's opening, so the prompt no
        longer ends with it); where it cannot be built, the prompt's forced opening alone stays.
        allowed_tools `auto`: text is free, but a call can only be of an allowed function (where the
        grammar cannot be built, CallFilter drops the others' calls). `auto` with a `reply` format: calls,
        or a reply in that format (params.guide stays None where the grammar cannot be built)."""
        forced = bool(plan.must_call)
        names = plan.callable_names or tuple(t["function"]["name"] for t in plan.tools or [])
        for loose in (False, True):  # loose: the parameter names alone, for schemas xgrammar cannot compile
            if forced:
                guide = forced_call_guide(plan.tools or [], names, plan.one_call, loose=loose)
            elif reply is not None:
                guide = calls_or_reply_guide(plan.tools or [], names, plan.one_call, reply, loose=loose)
            else:
                guide = allowed_calls_guide(plan.tools or [], names, plan.one_call, loose=loose)
            if guide is None:
                return plan
            try:
                params.guide = await self.state.compile_guide(guide)
            except InvalidRequestError as err:
                logger.info("tool_choice: the tools' schemas give no grammar%s (%s)", " at all" if loose else "", err)
                continue
            return replace(plan, forced_prefix="", calls_only=True) if forced else plan
        return plan

    async def _with_reply_format(self, plan: ToolPlan, params: SamplingParams, reply: Guide) -> ToolPlan:
        """Tools beside response_format / text.format, which OpenAI applies to a text reply only: a call
        keeps its tool's schema. A forced call leaves no text to shape; `auto` answers with calls or a
        reply in the format (where the calls give no grammar, the format alone, which leaves no room
        for a call)."""
        if plan.must_call:
            refuse_with_forced_call(params, plan, self.state.tokenizer)
            return await self._constrain_calls(plan, params)
        constrained = await self._constrain_calls(plan, params, reply)
        if params.guide is not None:
            return constrained
        params.guide = await self.state.compile_guide(reply)
        return guided_tool_plan(plan, reply)

    def parser(self, plan: ToolPlan) -> Any | None:
        """A fresh tool-call parser for one output, or None when the output is plain text."""
        if not plan.parse:
            return None
        return self.state.tool_parser_cls(plan.tools, calls_only=plan.calls_only)

    async def prepare(self, req: ChatCompletionRequest, text_format: Guide | None = None) -> PreparedChat:
        """Validate, map the sampling fields, plan the tools and render the prompt.

        Cheap validation first, then the render; nothing may fail after add_request without an
        abort, so callers build their parsers and context before submitting. `text_format`: the
        structured output a Responses request's text.format asks for (chat's is response_format).
        """
        check_chat_fields(req)
        params = build_sampling_params(
            req,
            self.state.generation_defaults,
            max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            guide=request_guide(req, text_format),
        )
        plan = plan_tools(req, self.state.xml_tools)
        guide, params.guide = params.guide, None
        if guide is not None and plan.tools and self.state.xml_tools and is_reply_format(guide):
            plan = await self._with_reply_format(plan, params, guide)
        elif guide is not None:
            plan = guided_tool_plan(plan, guide)
            params.guide = await self.state.compile_guide(guide)
        elif plan.must_call and self.state.xml_tools:
            refuse_with_forced_call(params, plan, self.state.tokenizer)
            plan = await self._constrain_calls(plan, params)
        elif plan.allowed and self.state.xml_tools:
            plan = await self._constrain_calls(plan, params)
        prompt_ids = await self.state.run_cpu(self._prompt, req, plan)
        return PreparedChat(params, plan, prompt_ids)

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        """Validate, submit to the engine, and answer (stream or not)."""
        state = self.state
        request_id = new_id("chatcmpl")
        if state.settings.log_requests:
            log_request_body(request_id, req)
        prepared = await self.prepare(req)
        plan = prepared.plan
        tracker = RequestTracker(request_id, state.metrics, len(prepared.prompt_ids), n=req.n)
        ctx = _ChatContext(state, req, plan, request_id, tracker, [self.parser(plan) for _ in range(req.n)])
        stream = state.add_request(request_id, prepared.prompt_ids, prepared.params)
        return await respond(
            raw, request_id, ctx, req.stream, lambda: ctx.stream(stream), lambda: ctx.collect(stream)
        )


def refuse_with_forced_call(params: SamplingParams, plan: ToolPlan, tokenizer: Any) -> None:
    """400 for the sampling fields a forced call (tool_choice required / named, as a grammar of calls)
    cannot honour."""
    if params.min_tokens:
        # The call's grammar may allow nothing but the end once the call is written, which min_tokens
        # forbids; without the grammar the model wrote calls of tools it was not offered.
        raise bad_request(
            "'min_tokens' cannot be combined with tool_choice 'required' or a named function.", param="min_tokens"
        )
    # The forced answer is nothing but calls: a stop the call's own markup meets ends it before any call
    # is complete, and the answer holds no call at all. (A stop inside a parameter's value still can.)
    markup = forced_call_markup(plan.tools or [], plan.must_call)
    if stop := next((s for s in params.stop if any(s in m for m in markup)), None):
        raise bad_request(
            f"'stop' holds {stop!r}, which the tool call that tool_choice 'required' or a named function "
            "makes the answer write would meet in its own markup: the answer would end before the call.",
            param="stop",
        )
    markup_ids = {t for m in markup for t in tokenizer.encode(m, add_special_tokens=False)}
    if stop_id := next((t for t in params.stop_token_ids if t in markup_ids), None):
        raise bad_request(
            f"'stop_token_ids' holds {stop_id}, a token of the tool-call markup that tool_choice 'required' or "
            "a named function makes the answer write: the answer would end before the call.",
            param="stop_token_ids",
        )


def check_chat_fields(req: ChatCompletionRequest) -> None:
    """Refuse, with a 400 naming the field, what this server would otherwise silently not do."""
    if req.max_completion_tokens is not None and req.max_completion_tokens < 1:
        raise bad_request(
            f"'max_completion_tokens' must be >= 1, got {req.max_completion_tokens}.", param="max_completion_tokens"
        )
    if req.top_logprobs and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    unsupported = {"modalities": (req.modalities not in (None, ["text"]), "this server answers in text only"),
                   "audio": (req.audio is not None, "this server answers in text only"),
                   "web_search_options": (req.web_search_options is not None, "this server has no web search")}  # fmt: skip
    for param, (given, why) in unsupported.items():
        if given:
            raise bad_request(f"'{param}' is not supported: {why}.", param=param, code="unsupported_parameter")
    if req.functions is not None or req.function_call is not None:
        param = "functions" if req.functions is not None else "function_call"
        raise bad_request(
            f"The legacy '{param}' field is not supported; send 'tools' and 'tool_choice' instead.",
            param=param,
            code="unsupported_parameter",
        )


def guided_tool_plan(plan: ToolPlan, guide: Guide) -> ToolPlan:
    """The tool plan of a request whose output a grammar shapes: the model still sees the tools, but
    the grammar leaves no room for a call, so none is parsed; forcing one contradicts the grammar."""
    if plan.forced_prefix:
        raise bad_request(
            f"tool_choice 'required' or a named function cannot be combined with structured output "
            f"('{guide.param}'): the call would have to match both.",
            param="tool_choice",
        )
    return ToolPlan(tools=plan.tools, parse=False)


class CallFilter:
    """Which of one output's tool calls reach the client: with `names` (tool_choice required / named)
    only calls of those functions (a call forced by its opening alone, where the tools' schemas gave
    no grammar, left the model free to go on calling tools it was never offered), with `one_call`
    (parallel_tool_calls: false, a named tool_choice) only the first. Streamed calls are renumbered 0, 1, ... as kept."""

    def __init__(self, names: tuple[str, ...] = (), one_call: bool = False):
        self.names = frozenset(names)
        self.one_call = one_call
        self.kept: dict[int, int | None] = {}  # the parser's call index -> the client's, None: dropped
        self.num_kept = 0

    def _admits(self, name: Any) -> bool:
        return (not self.names or name in self.names) and not (self.one_call and self.num_kept)

    def calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The kept calls of a whole output."""
        kept = []
        for call in calls:
            if self._admits(call["function"]["name"]):
                kept.append(call)
                self.num_kept += 1
        return kept

    def deltas(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stream deltas without the pieces of dropped calls (a call's first piece holds its name)."""
        out = []
        for d in deltas:
            if d.get("tool_calls"):
                d = {**d, "tool_calls": [kept for c in d["tool_calls"] if (kept := self._delta(c)) is not None]}
            out.append(d)
        return out

    def _delta(self, call: dict[str, Any]) -> dict[str, Any] | None:
        index = call["index"]
        if index not in self.kept:
            admitted = self._admits((call.get("function") or {}).get("name"))
            self.kept[index] = self.num_kept if admitted else None
            self.num_kept += admitted
        new_index = self.kept[index]
        return None if new_index is None else {**call, "index": new_index}


def parse_deltas(parser: Any | None, text: str, final: bool, calls: CallFilter) -> list[dict[str, Any]]:
    """Chat `delta` dicts for the next piece of model output: plain content without a parser,
    else the parser's content and the tool-call deltas `calls` keeps (flushed when `final`), empty
    ones dropped."""
    if parser is None:
        return [{"content": text}] if text else []
    deltas = list(parser.feed(text)) if text else []
    if final:
        deltas += list(parser.finish())
    return [d for d in calls.deltas(deltas) if d.get("content") or d.get("tool_calls")]


class TrackedRequest:
    """An engine request from submission to its last output, with its log line: what every endpoint on
    the chat path shares (this one, Responses, Anthropic Messages)."""

    def __init__(self, state: ServerState, request_id: str, tracker: RequestTracker):
        self.state = state
        self.request_id = request_id
        self.tracker = tracker
        self.finished = False

    def close_if_unfinished(self) -> None:
        """Abort in the engine (frees KV blocks) unless the request already completed. Either way the
        request is logged and counted here if it was not yet: a client that leaves once the answer is
        complete (after its finish chunk, before the usage chunk or the end event) closes the stream at
        a `yield` the stream's own `done` comes after."""
        if not self.finished:
            self.finished = True
            self.state.abort(self.request_id)
            self.tracker.done(finish="abort")
        self.tracker.done()

    def log_error(self, exc: APIError) -> None:
        """The request's log line, for a request that failed."""
        self.tracker.fail(exc)

    def count_calls(self, delta: dict[str, Any]) -> bool:
        """Count the delta's new calls (a call's first delta has its id); True if it holds tool calls."""
        calls = delta.get("tool_calls") or []
        self.tracker.tool_calls += sum(1 for c in calls if c.get("id"))
        return bool(calls)


class _ChatContext(TrackedRequest):
    """One request's response assembly (ids, parsers, logprobs, usage)."""

    def __init__(
        self,
        state: ServerState,
        req: ChatCompletionRequest,
        plan: ToolPlan,
        request_id: str,
        tracker: RequestTracker,
        parsers: list[Any | None],
    ):
        super().__init__(state, request_id, tracker)
        self.req = req
        self.plan = plan
        self.parsers = parsers
        self.model = state.model_name(req.model)
        self.created = int(time.time())
        self.want_logprobs = req.logprobs
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # Per choice: only calls of the functions tool_choice allows, and only the first one where the
        # plan allows one (parallel_tool_calls: false, a named tool_choice).
        self.call_filters = [CallFilter(plan.callable_names, plan.one_call) for _ in range(req.n)]
        self.finished_choices: set[int] = set()  # indexes whose finish_reason chunk went out

    # ---- streaming ----

    def chunk(
        self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> str:
        payload: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }
        if self.include_usage:
            payload["usage"] = None
        if finish is not None:
            self.finished_choices.add(index)
        return sse(payload)

    def heartbeat(self) -> str:
        """An empty delta for a choice still running (a finish chunk is a choice's last): resets
        qwen-code's idle watchdog, ignored by every client."""
        index = next((i for i in range(self.req.n) if i not in self.finished_choices), None)
        if index is None:
            return sse(heartbeat_without_choices(self.request_id, "chat.completion.chunk", self.created, self.model,
                                                 self.include_usage))
        return self.chunk(index, {})

    def _deltas(self, index: int, text: str, final: bool) -> list[dict[str, Any]]:
        return parse_deltas(self.parsers[index], text, final, self.call_filters[index])

    async def stream(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        """The SSE body: role, deltas as parsed, finish chunk per choice, usage, [DONE]."""
        n = self.req.n
        made_call = [False] * n
        pending_lp: list[list[Any]] = [[] for _ in range(n)]
        for i in range(n):
            yield self.chunk(i, {"role": "assistant", "content": ""})
            if self.plan.forced_prefix and self.parsers[i] is not None:
                for d in self._deltas(i, self.plan.forced_prefix, final=False):
                    made_call[i] |= self.count_calls(d)
                    yield self.chunk(i, d)
        async for out in stream:
            self.tracker.observe(out)
            i = out.index
            if self.want_logprobs and out.logprobs:
                pending_lp[i].extend(shown_logprobs(out) or [])
            for d in self._deltas(i, out.text, final=out.finish_reason is not None):
                made_call[i] |= self.count_calls(d)
                yield self.chunk(i, d, logprobs=self._take(pending_lp, i))
            if out.finish_reason is not None:
                reason = final_finish_reason(out.finish_reason, made_call[i])
                self.tracker.set_finish(i, reason)
                yield self.chunk(i, {}, reason, logprobs=self._take(pending_lp, i))
        self.finished = True
        if self.include_usage:
            yield sse(self._usage_chunk())
        self.tracker.done()
        yield SSE_DONE

    def stream_error(self, exc: APIError) -> str:
        """A failure after the stream started: the error event (OpenAI SDKs raise on a chunk with a
        top-level `error`), then [DONE]."""
        self.log_error(exc)
        return sse(exc.body()) + SSE_DONE

    def _take(self, pending: list[list[Any]], i: int) -> Any:
        if not pending[i]:
            return None
        out = chat_logprobs(pending[i], self.state.token_bytes)
        pending[i] = []
        return out

    def _usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.tracker.usage(),
        }

    # ---- non-streaming ----

    async def collect(self, stream: AsyncIterator[RequestOutput]) -> dict[str, Any]:
        """Run to completion and build the chat.completion body."""
        n = self.req.n
        texts = [""] * n
        logprobs: list[list[Any]] = [[] for _ in range(n)]
        reasons = ["stop"] * n
        async for out in stream:
            self.tracker.observe(out)
            texts[out.index] += out.text
            if out.logprobs:
                logprobs[out.index].extend(shown_logprobs(out) or [])
            if out.finish_reason is not None:
                reasons[out.index] = out.finish_reason
        self.finished = True
        choices = [self._choice(i, texts[i], reasons[i], logprobs[i]) for i in range(n)]
        self.tracker.done()
        return {
            "id": self.request_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.tracker.usage(),
        }

    def _choice(self, i: int, text: str, reason: str, logprobs: list[Any]) -> dict[str, Any]:
        parser = self.parsers[i]
        # refusal: null as OpenAI sends it (the TypeScript SDK's type requires the key).
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        calls: list[dict[str, Any]] = []
        if parser is not None:
            content, calls = parser.parse(self.plan.forced_prefix + text)
            calls = self.call_filters[i].calls(calls)
            message["content"] = content
            if calls:
                message["tool_calls"] = calls
                self.tracker.tool_calls += len(calls)
        finish = final_finish_reason(reason, bool(calls))
        self.tracker.set_finish(i, finish)
        return {
            "index": i,
            "message": message,
            "logprobs": chat_logprobs(logprobs, self.state.token_bytes) if self.want_logprobs else None,
            "finish_reason": finish,
        }

