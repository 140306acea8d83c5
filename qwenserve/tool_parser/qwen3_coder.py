"""Parser for Qwen3-Coder's XML tool-call format, streaming and whole-text.

The model writes::

    optional text
    <tool_call>
    <function=NAME>
    <parameter=P>
    raw value, any number of lines
    </parameter>
    </function>
    </tool_call>

Design: one incremental state machine serves both modes. ``parse(text)`` is
literally ``feed(text)`` + ``finish()`` on a fresh instance, and every
decision taken during ``feed`` is made only once enough text has arrived that
no continuation could change it (otherwise the parser waits). Hence streaming
under any chunking yields exactly the same content and argument strings as
the whole-text parse.

Delimiters are judged structurally, never first-match, because file contents
written through ``write_file`` routinely contain ``</parameter>`` or whole
``<tool_call>`` blocks:

* ``</parameter>`` closes a value only when followed by optional whitespace
  and then end of text, ``</function>``, ``</tool_call>`` or
  ``<parameter=NAME>`` for a schema-known NAME not yet given in this call
  (any NAME on the next lines after a number, boolean, object or array: only
  strings hold tags across lines, but a JSON string may hold both on one line);
* a missing ``</parameter>`` is recovered at a line-start
  ``<parameter=NAME>`` (same NAME rule), or a line-start ``</function>`` /
  ``</tool_call>`` that is itself followed by the end or another call, or a
  ``</function>`` on the value's line followed by the end, or by
  ``</tool_call>`` and then the end or another call;
* line-start ``<tool_call>`` / ``<function=`` inside a value open a literal
  nesting level, inside which nothing is structural until the matching close;
  when that reading leaves the value without its own ``</parameter>`` but the
  flat reading has one, the opener was prose and the flat reading wins.

Outside calls, a ``<function=`` opens a call without its ``<tool_call>`` only at
a line start or right after a ``</tool_call>`` (elsewhere mid-line it is prose about the format), and stray ``<tool_call>`` /
``</tool_call>`` tags (dedicated tokens, never prose) are dropped from content.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenserve.tool_parser.schema import MAX_NAME_CHARS, ParamType, ToolSchemas, convert_value, is_valid_name

Delta = dict[str, Any]
ToolCall = dict[str, Any]

TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAM = "<parameter="
PARAM_END = "</parameter>"
_ALL_TAGS = (TOOL_CALL, TOOL_CALL_END, FUNCTION, FUNCTION_END, PARAM, PARAM_END)
_CLOSERS = (PARAM_END, FUNCTION_END, TOOL_CALL_END)
_WS = re.compile(r"\s*")
_NAME_STOP = re.compile(r"[>\n<]")

# Sentinels: "need more text" and the outcomes of reading a tag name.
_WAIT: Any = object()
_BAD: Any = object()


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` + 24 hex digits."""
    return "call_" + secrets.token_hex(12)


def is_partial(buf: str, i: int, tags: Iterable[str]) -> bool:
    """Whether ``buf[i:]`` (possibly empty) is a proper prefix of one of ``tags``."""
    rest = len(buf) - i
    return any(rest < len(tag) and buf.startswith(tag[:rest], i) for tag in tags)


def skip_ws(buf: str, i: int) -> int:
    """Index of the first non-whitespace character at or after ``i``."""
    return _WS.match(buf, i).end()


def read_name(buf: str, start: int) -> tuple[Any, str, int]:
    """Read ``NAME>`` starting at ``start``.

    Returns ``(None, name, index after '>')``, ``(_WAIT, "", start)`` while the
    name may still be arriving, or ``(_BAD, "", start)`` when a newline or
    ``<`` comes first (a slip such as ``<function=NAME`` without ``>``).
    """
    m = _NAME_STOP.search(buf, start, start + MAX_NAME_CHARS + 1)
    if m is None:
        status = _BAD if len(buf) - start > MAX_NAME_CHARS else _WAIT
        return status, "", start
    if m.group() != ">":
        return _BAD, "", start
    return None, buf[start : m.start()].strip(), m.end()


def json_escape(text: str) -> str:
    """``text`` escaped as the inside of a JSON string (so pieces concatenate)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


@dataclass
class _Call:
    """Book-keeping for one emitted tool call."""

    index: int
    id: str
    name: str
    params: set[str] = field(default_factory=set)
    keys: int = 0
    arguments: list[str] = field(default_factory=list)
    closed: bool = False


class ToolParserBase:
    """Shared streaming machinery: buffering, content segments, call deltas.

    Subclasses implement :meth:`_step`. Content handling: a run of text
    between calls is a segment; whitespace-only segments are never emitted
    (so the newlines around and between calls never reach the client).
    """

    def __init__(self, tools: Sequence[Any] | None = None, calls_only: bool = False) -> None:
        """Create a parser for one request's ``tools`` (OpenAI tool dicts; may be None/empty).

        ``calls_only``: the output is known to hold nothing but calls (a grammar wrote it), so any text
        outside them is dropped, such as a call's opening tag cut short by max_tokens, which a grammar
        may spell in several tokens.
        """
        self._schemas = ToolSchemas(tools)
        self._calls_only = calls_only
        self._reset()

    # ------------------------------------------------------------------ public API

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Parse a whole model output into ``(content, tool_calls)``.

        ``content`` is None when empty or whitespace-only; ``tool_calls`` are
        OpenAI dicts ``{"id", "type": "function", "function": {"name", "arguments"}}``
        with ``arguments`` a JSON object string. Does not touch the streaming state.
        """
        worker = type(self).__new__(type(self))
        worker._schemas, worker._calls_only = self._schemas, self._calls_only
        worker._reset()
        return assemble(worker.feed(text) + worker.finish())

    def feed(self, text: str) -> list[Delta]:
        """Consume the next piece of model output; return OpenAI chat ``delta`` dicts."""
        if self._finished or not text:
            return []
        self._buf += text
        while self._step(False):
            pass
        return self._drain()

    def finish(self) -> list[Delta]:
        """Flush everything held back at end of generation (closes an unterminated call)."""
        if self._finished:
            return []
        while self._step(True):
            pass
        self._finished = True
        self._ws_hold = ""
        return self._drain()

    @property
    def tool_calls_emitted(self) -> int:
        """Number of tool calls whose header delta (id + name) has been emitted.

        Non-zero means the streamed response made tool calls: the server should
        then use ``finish_reason="tool_calls"``.
        """
        return len(self._calls)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls streamed so far, assembled (arguments complete once closed)."""
        return [_call_dict(c.id, c.name, "".join(c.arguments)) for c in self._calls]

    # ------------------------------------------------------------------ subclass hooks

    def _reset(self) -> None:
        self._buf = ""
        self._pos = 0
        self._out: list[Delta] = []
        self._calls: list[_Call] = []
        self._finished = False
        self._seg_started = False
        self._ws_hold = ""

    def _step(self, final: bool) -> bool:
        """Advance the state machine; False when it must wait for text (or is done)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ content scanning

    def _content_to_next_tag(self) -> int | None:
        """Emit plain content up to the next '<' and return its index; None if there is none."""
        buf, i = self._buf, self._pos
        lt = buf.find("<", i)
        if lt < 0:
            self._emit_content(buf[i:])
            self._pos = len(buf)
            return None
        self._emit_content(buf[i:lt])
        self._pos = lt
        return lt

    def _content_other_tag(self, lt: int, final: bool, tags: tuple[str, ...]) -> bool:
        """A '<' that opens none of `tags`: wait while it may still become one, else emit it.

        A stray ``</tool_call>`` is dropped: it and ``<tool_call>`` are dedicated tokens in Qwen's
        vocabulary, never prose (the model closing a call twice, or one it never opened).
        """
        buf = self._buf
        if buf.startswith(TOOL_CALL_END, lt):
            self._pos = lt + len(TOOL_CALL_END)
            return True
        if is_partial(buf, lt, (*tags, TOOL_CALL_END)):
            if not final:
                return False
            # Cut off by the end of generation: the prefix of a multi-token tag (<function=) is dropped
            # rather than leaked as markup; the call tags are single tokens, so a prefix of theirs is text.
            rest = buf[lt:]
            multi_token = [t for t in tags if t not in (TOOL_CALL, TOOL_CALL_END)]
            self._emit_content("" if len(rest) > 1 and is_partial(buf, lt, tuple(multi_token)) else rest)
            self._pos = len(buf)
            return False
        self._emit_content("<")
        self._pos = lt + 1
        return True

    def _at_line_start(self, i: int) -> bool:
        """Whether only whitespace precedes ``i`` on its line (or ``i`` starts the text)."""
        line_start = self._buf.rfind("\n", 0, i) + 1
        return not self._buf[line_start:i].strip()

    # ------------------------------------------------------------------ emission helpers

    def _emit_content(self, text: str) -> None:
        if not text or self._calls_only:
            return
        if not self._seg_started:
            if text.isspace():
                self._ws_hold += text
                return
            text = self._ws_hold + text
            self._ws_hold = ""
            self._seg_started = True
        self._out.append({"content": text})

    def _open_call(self, name: str) -> _Call:
        self._ws_hold = ""
        self._seg_started = False
        call = _Call(index=len(self._calls), id=new_call_id(), name=name)
        self._calls.append(call)
        header = {"index": call.index, "id": call.id, "type": "function"}
        header["function"] = {"name": name, "arguments": ""}
        self._out.append({"tool_calls": [header]})
        return call

    def _emit_args(self, call: _Call, fragment: str) -> None:
        if not fragment:
            return
        call.arguments.append(fragment)
        self._out.append({"tool_calls": [{"index": call.index, "function": {"arguments": fragment}}]})

    def _close_call(self, call: _Call, fragment: str) -> None:
        self._emit_args(call, fragment)
        call.closed = True
        self._ws_hold = ""
        self._seg_started = False

    def _drain(self) -> list[Delta]:
        merged: list[Delta] = []
        for delta in self._out:
            if "content" in delta and merged and set(merged[-1]) == {"content"}:
                merged[-1] = {"content": merged[-1]["content"] + delta["content"]}
            else:
                merged.append(delta)
        self._out = []
        return merged


def _call_dict(call_id: str, name: str, arguments: str) -> ToolCall:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assemble(deltas: Iterable[Delta]) -> tuple[str | None, list[ToolCall]]:
    """Fold a delta sequence into ``(content, tool_calls)`` the way a client would."""
    content: list[str] = []
    calls: dict[int, list[Any]] = {}
    for delta in deltas:
        content.append(delta.get("content") or "")
        for tc in delta.get("tool_calls") or ():
            entry = calls.setdefault(tc["index"], [tc.get("id"), None, []])
            fn = tc.get("function") or {}
            if fn.get("name"):
                entry[1] = fn["name"]
            entry[2].append(fn.get("arguments") or "")
    text = "".join(content)
    result = [_call_dict(cid, name, "".join(args) or "{}") for _, (cid, name, args) in sorted(calls.items())]
    return (text if text.strip() else None), result


# ---------------------------------------------------------------------- Qwen3-Coder XML

_CONTENT, _HEADER, _FUNC, _VALUE, _AFTER_FUNC, _SKIP = range(6)


@dataclass
class _Value:
    """A parameter value being read; positions index the parser buffer."""

    name: str
    start: int
    ptype: ParamType
    emit: bool
    streaming: bool
    stream_pos: int
    lead_known: bool = False
    scan: int = 0
    nest: list[str] = field(default_factory=list)
    # First literal nested opener: text after it is not streamed, so that the
    # end-of-text fallback may still reinterpret the nesting.
    nest_floor: int = -1


class Qwen3CoderToolParser(ToolParserBase):
    """Qwen3-Coder ``<tool_call><function=..><parameter=..>`` parser.

    Usage: ``parse(text)`` for a whole output, or ``feed(delta)`` per decoded
    piece followed by one ``finish()``. Raw-string parameters stream as their
    text arrives; typed ones are emitted once structurally complete.
    """

    def _reset(self) -> None:
        super()._reset()
        self._state = _CONTENT
        self._call: _Call | None = None
        self._value: _Value | None = None

    def _step(self, final: bool) -> bool:
        handler = (
            self._step_content,
            self._step_header,
            self._step_func,
            self._step_value,
            self._step_after_func,
            self._step_skip,
        )[self._state]
        return handler(final)

    # ------------------------------------------------------------------ outside calls

    def _step_content(self, final: bool) -> bool:
        lt = self._content_to_next_tag()
        if lt is None:
            return False
        if self._buf.startswith(TOOL_CALL, lt):
            return self._content_tool_call(lt, final)
        # A call whose <tool_call> the model left out starts a line or follows a call's </tool_call>;
        # elsewhere mid-line it is prose ("each call is written as `<function=NAME>`").
        buf = self._buf
        # (Looked up only near a <function=: a long line of HTML has many '<'.)
        maybe_function = buf.startswith(FUNCTION, lt) or is_partial(buf, lt, (FUNCTION,))
        line_start = maybe_function and (self._at_line_start(lt) or _after_call_end(buf, lt))
        if buf.startswith(FUNCTION, lt) and line_start:
            self._state = _HEADER
            return True
        return self._content_other_tag(lt, final, (TOOL_CALL, FUNCTION) if line_start else (TOOL_CALL,))

    def _content_tool_call(self, lt: int, final: bool) -> bool:
        buf = self._buf
        j = skip_ws(buf, lt + len(TOOL_CALL))
        if buf.startswith(FUNCTION, j):
            self._pos = j
            self._state = _HEADER
            return True
        if buf.startswith(TOOL_CALL, j):
            self._pos = j  # the model opened the call twice: the second opener is the real one
            return True
        if is_partial(buf, j, (FUNCTION, TOOL_CALL)):
            if not final:
                return False
            self._pos = len(buf)
            return False
        # "<tool_call>example</tool_call>" is not a call: keep the text, drop the stray tags.
        self._pos = lt + len(TOOL_CALL)
        return True

    def _step_header(self, final: bool) -> bool:
        start = self._pos + len(FUNCTION)
        status, name, end = read_name(self._buf, start)
        if status is _WAIT and not final:
            return False
        if status is None and self._schemas.is_function(name):
            self._call = self._open_call(name)
            self._pos = end
            self._state = _FUNC
        else:
            self._pos = start
            self._state = _SKIP
        return True

    def _step_skip(self, final: bool) -> bool:
        """Drop a malformed or phantom call up to its end."""
        buf, i = self._buf, self._pos
        tags = (TOOL_CALL_END, TOOL_CALL, FUNCTION_END)
        hits = [(p, tag) for tag in tags if (p := buf.find(tag, i)) >= 0]
        if not hits:
            if final:
                self._pos = len(buf)
                self._to_content()
                return True
            self._pos = _safe_end(buf, i, tags)
            return False
        p, tag = min(hits)
        self._pos = p if tag == TOOL_CALL else p + len(tag)
        if tag == FUNCTION_END:
            self._state = _AFTER_FUNC
        else:
            self._to_content()
        return True

    def _to_content(self) -> None:
        self._state = _CONTENT
        self._ws_hold = ""
        self._seg_started = False

    # ------------------------------------------------------------------ inside a function

    def _step_func(self, final: bool) -> bool:
        buf = self._buf
        lt = buf.find("<", self._pos)
        if lt < 0:
            self._pos = len(buf)
            return self._end_func_if(final)
        if buf.startswith(PARAM, lt):
            return self._func_param(lt, final)
        for tag, consume, state in (
            (FUNCTION_END, True, _AFTER_FUNC),
            (TOOL_CALL_END, True, _CONTENT),
            (TOOL_CALL, False, _CONTENT),
            (FUNCTION, False, _CONTENT),
        ):
            if buf.startswith(tag, lt):
                self._pos = lt + len(tag) if consume else lt
                self._end_func(state)
                return True
        if buf.startswith(PARAM_END, lt):
            self._pos = lt + len(PARAM_END)
            return True
        if is_partial(buf, lt, _ALL_TAGS):
            self._pos = lt
            return self._end_func_if(final)
        self._pos = lt + 1
        return True

    def _end_func_if(self, final: bool) -> bool:
        if final:
            self._pos = len(self._buf)
            self._end_func(_CONTENT)
        return final

    def _end_func(self, state: int) -> None:
        call = self._call
        assert call is not None
        self._close_call(call, "}" if call.keys else "{}")
        self._call = None
        self._state = state
        if state == _CONTENT:
            self._to_content()

    def _func_param(self, lt: int, final: bool) -> bool:
        start = lt + len(PARAM)
        status, name, end = read_name(self._buf, start)
        if status is _WAIT and not final:
            self._pos = lt
            return False
        call = self._call
        assert call is not None
        # Any name that can be one opens a parameter (an undeclared one too); a declared one whatever it holds.
        if status is not None or not (is_valid_name(name) or self._schemas.is_param(call.name, name)):
            self._pos = start
            return True
        self._enter_value(name, end)
        return True

    def _step_after_func(self, final: bool) -> bool:
        buf = self._buf
        j = skip_ws(buf, self._pos)
        if buf.startswith(TOOL_CALL_END, j):
            self._pos = j + len(TOOL_CALL_END)
        elif is_partial(buf, j, (TOOL_CALL_END,)):
            if not final:
                return False
            self._pos = len(buf)
        else:
            # Text between </function> and its </tool_call> (a parameter written after the function
            # closed) belongs to the malformed call, not to content: dropped, as the JSON parser drops
            # junk after its object. Without a </tool_call> before the next call or the end, it is content.
            hits = [(p, tag) for tag in (TOOL_CALL_END, TOOL_CALL, FUNCTION) if (p := buf.find(tag, j)) >= 0]
            if not hits and not final:
                return False
            first, tag = min(hits, default=(0, ""))
            if tag == TOOL_CALL_END:
                self._pos = first + len(TOOL_CALL_END)
        self._to_content()
        return True

    # ------------------------------------------------------------------ parameter values

    def _enter_value(self, name: str, start: int) -> None:
        call = self._call
        assert call is not None
        ptype = self._schemas.param_type(call.name, name)
        emit = name not in call.params
        value = _Value(name, start, ptype, emit, emit and ptype.is_raw_string, start, scan=start)
        self._value = value
        self._pos = start
        self._state = _VALUE
        if emit:
            call.params.add(name)
            if value.streaming:
                self._emit_args(call, self._key(call, name) + '"')

    def _key(self, call: _Call, name: str) -> str:
        prefix = ", " if call.keys else "{"
        call.keys += 1
        return prefix + json.dumps(name, ensure_ascii=False) + ": "

    def _step_value(self, final: bool) -> bool:
        value = self._value
        assert value is not None
        close = self._find_value_end(value, final)
        if close is None:
            self._stream_value(value)
            return False
        end, resume = close
        self._finish_value(value, end)
        self._value = None
        self._pos = resume
        self._state = _FUNC
        return True

    def _find_value_end(self, value: _Value, final: bool) -> tuple[int, int] | None:
        """(value end, resume position) once decidable; always decided when ``final``."""
        found = self._scan(value, final, nested=True)
        if found is not None and value.nest_floor >= 0 and not self._buf.startswith(PARAM_END, found[0]):
            # The nesting made the value's own </parameter> literal and only a line-start closer ended
            # it: an opener line the value never closes (prose about the format) rather than a model
            # that forgot </parameter>. Prefer the reading where the model made no mistake.
            flat = self._scan(value, final, nested=False)
            if flat is not None and flat[0] < found[0] and self._buf.startswith(PARAM_END, flat[0]):
                return flat
        if found is not None or not final:
            return found
        # Unbalanced literal nesting: retry ignoring it, then fall back to the end.
        found = self._scan(value, final, nested=False)
        return found if found is not None else self._trailing_close(value)

    def _scan(self, value: _Value, final: bool, nested: bool) -> tuple[int, int] | None:
        buf = self._buf
        # Without nesting every verdict is local, so rescanning from what was
        # already streamed is chunking-independent.
        i = value.scan if nested else value.stream_pos
        nest = value.nest if nested else None
        while True:
            lt = buf.find("<", i)
            if lt < 0:
                i = len(buf)
                break
            verdict = self._judge(value, lt, nest, final)
            if verdict is _WAIT:
                i = lt
                break
            if isinstance(verdict, tuple):
                return verdict
            i = verdict
        if nested:
            value.scan = i
        return None

    def _judge(self, value: _Value, lt: int, nest: list[str] | None, final: bool) -> Any:
        """Verdict on the ``<`` at ``lt`` inside a value: a (end, resume) close,
        the next scan index (literal text), or ``_WAIT``."""
        buf = self._buf
        if buf.startswith(PARAM_END, lt):
            if nest:
                return lt + 1
            after = lt + len(PARAM_END)
            ok = self._followed_by(value, after, final, (FUNCTION_END, TOOL_CALL_END), params=True)
            return ok if ok is _WAIT else (lt, after) if ok else lt + 1
        at_line = lt > value.start and buf[lt - 1] == "\n"
        if buf.startswith(PARAM, lt):
            if not at_line or nest:
                return lt + 1
            status, name, _ = read_name(buf, lt + len(PARAM))
            if status is _WAIT and not final:
                return _WAIT
            return (lt, lt) if status is None and self._is_next_param(value, name) else lt + 1
        for tag, opener in ((TOOL_CALL, "tc"), (FUNCTION, "fn")):
            if buf.startswith(tag, lt):
                if nest is not None and _indented_line_start(buf, lt, value.start):
                    nest.append(opener)
                    if value.nest_floor < 0:
                        value.nest_floor = lt
                return lt + 1
        for tag, opener, follow in (
            (FUNCTION_END, "fn", (TOOL_CALL_END, TOOL_CALL, FUNCTION)),
            (TOOL_CALL_END, "tc", (TOOL_CALL, FUNCTION)),
        ):
            if buf.startswith(tag, lt):
                return self._judge_close(value, lt, tag, opener, follow, nest, final)
        if not final and is_partial(buf, lt, _ALL_TAGS):
            return _WAIT
        return lt + 1

    def _judge_close(
        self,
        value: _Value,
        lt: int,
        tag: str,
        opener: str,
        follow: tuple[str, ...],
        nest: list[str] | None,
        final: bool,
    ) -> Any:
        """Verdict on a ``</function>`` / ``</tool_call>`` met inside a value."""
        buf = self._buf
        if nest and _indented_line_start(buf, lt, value.start):
            if opener in nest:
                while nest.pop() != opener:
                    pass
            return lt + 1
        if nest:
            return lt + 1
        if not (lt > value.start and buf[lt - 1] == "\n"):
            if tag != FUNCTION_END:
                return lt + 1
            # `VALUE</function>` on the value's line: the model forgot </parameter> and closed the call,
            # when the call's end and then the end of the text or the next call follow.
            ok = self._ends_call(lt + len(tag), final)
        else:
            ok = self._followed_by(value, lt + len(tag), final, follow, params=False)
        return ok if ok is _WAIT else (lt, lt) if ok else lt + 1

    def _ends_call(self, i: int, final: bool) -> Any:
        """Whether optional whitespace then end, or ``</tool_call>`` and then end or a next call, follow ``i``."""
        buf = self._buf
        k = skip_ws(buf, i)
        if k == len(buf) or is_partial(buf, k, (TOOL_CALL_END,)):
            return True if final else _WAIT
        if not buf.startswith(TOOL_CALL_END, k):
            return False
        k = skip_ws(buf, k + len(TOOL_CALL_END))
        if k == len(buf) or is_partial(buf, k, (TOOL_CALL, FUNCTION)):
            return True if final else _WAIT
        return buf.startswith((TOOL_CALL, FUNCTION), k)

    def _followed_by(self, value: _Value, i: int, final: bool, tags: tuple[str, ...], params: bool) -> Any:
        """Whether optional whitespace then end / one of ``tags`` / a next parameter follows ``i``."""
        buf = self._buf
        k = skip_ws(buf, i)
        if k == len(buf):
            return True if final else _WAIT
        if any(buf.startswith(tag, k) for tag in tags):
            return True
        if params and buf.startswith(PARAM, k):
            status, name, _ = read_name(buf, k + len(PARAM))
            if status is _WAIT:
                return True if final else _WAIT
            # Only a line break between </parameter> and the tag makes it structural whatever it names:
            # a JSON array's string may hold `</parameter> <parameter=x>` on one line (a todo about a parser).
            own_line = "\n" in buf[i:k]
            return status is None and self._is_next_param(value, name, allow_repeat=True, own_line=own_line)
        if is_partial(buf, k, tags + ((PARAM,) if params else ())):
            # A tag cut off by the end of generation still closes the value.
            return True if final else _WAIT
        return False

    def _is_next_param(self, value: _Value, name: str, allow_repeat: bool = False, own_line: bool = True) -> bool:
        """Whether ``<parameter=name>`` can structurally start the next parameter.

        After an explicit ``</parameter>`` a repeated name is a duplicate key
        (the model slips so; first value wins). Without the close, a repeated
        name is far more likely literal text such as a fixture in a file.
        ``own_line``: the tag starts a line. No JSON or literal of a typed value spans a line break
        between tags, but one line of it (a string in an array) may hold both tags as text.
        """
        call = self._call
        assert call is not None
        if own_line and not value.ptype.holds_markup:
            # The tag cannot be text of a typed value: whatever it names (a parameter the schema lacks,
            # a repeat, whose first value wins) the model started another parameter.
            return is_valid_name(name)
        if name == value.name or (name in call.params and not allow_repeat):
            return False
        return self._schemas.is_param(call.name, name)

    def _trailing_close(self, value: _Value) -> tuple[int, int]:
        """No structural close anywhere: the value runs to the end, minus dangling closers."""
        buf = self._buf
        floor = value.stream_pos
        end = len(buf)
        while True:
            text_end = floor + len(buf[floor:end].rstrip())
            lt = buf.rfind("<", floor, text_end)
            if lt < 0 or not any(tag.startswith(buf[lt:text_end]) for tag in _CLOSERS):
                return end, len(buf)
            end = lt

    def _value_start(self, value: _Value, end: int) -> int:
        """Where the value text starts: one leading newline is not part of it."""
        start = value.start
        if start < end and self._buf[start] == "\n":
            start += 1
        return max(start, value.stream_pos)

    def _stream_value(self, value: _Value) -> None:
        """Emit the part of a raw-string value that can no longer change."""
        if not value.streaming:
            return
        buf = self._buf
        if not value.lead_known:
            if len(buf) <= value.start:
                return
            value.lead_known = True
            if buf[value.start] == "\n":
                value.stream_pos = value.start + 1
        bound = value.scan if value.nest_floor < 0 else min(value.scan, value.nest_floor)
        # A newline right before an undecided tag may be the stripped trailing one.
        if bound > value.stream_pos and buf[bound - 1] == "\n":
            bound -= 1
        if bound > value.stream_pos:
            assert self._call is not None
            self._emit_args(self._call, json_escape(buf[value.stream_pos : bound]))
            value.stream_pos = bound

    def _finish_value(self, value: _Value, end: int) -> None:
        start = self._value_start(value, end)
        tail = self._buf[start:end] if end > start else ""
        if tail.endswith("\n"):
            tail = tail[:-1]
        call = self._call
        if not value.emit or call is None:
            return
        if value.streaming:
            self._emit_args(call, json_escape(tail) + '"')
            return
        converted = convert_value(tail, value.ptype)
        self._emit_args(call, self._key(call, value.name) + json.dumps(converted, ensure_ascii=False))


def _after_call_end(buf: str, lt: int) -> bool:
    """Whether only spaces/tabs separate ``lt`` from a preceding ``</tool_call>`` (a dedicated token,
    never prose: what follows it on its line is no mention of the format)."""
    k = lt
    while k > 0 and buf[k - 1] in " \t":
        k -= 1
    return buf.endswith(TOOL_CALL_END, 0, k)


def _indented_line_start(buf: str, lt: int, floor: int) -> bool:
    """Whether only spaces/tabs separate ``lt`` from the previous newline (after ``floor``)."""
    k = lt
    while k > floor and buf[k - 1] in " \t":
        k -= 1
    return k > floor and buf[k - 1] == "\n"


def _safe_end(buf: str, start: int, tags: Sequence[str]) -> int:
    """First index from which ``buf`` could still be the start of one of ``tags``."""
    longest = max(len(tag) for tag in tags)
    for k in range(max(start, len(buf) - longest + 1), len(buf)):
        if is_partial(buf, k, tags):
            return k
    return len(buf)
