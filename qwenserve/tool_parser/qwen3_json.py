"""Parser for the Hermes-style JSON tool-call format used by other Qwen3 models.

The model writes::

    optional text
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The JSON object is delimited by bracket matching that understands JSON
strings (and the single-quoted strings of a Python-literal slip), so a
``</tool_call>`` inside a string value (a file being written) does not end
the block. A ``</tool_call>`` met outside strings with brackets still open is
a model slip (a missing ``}``) and is repaired. A ``<tool_call>`` met outside
strings before the block's ``</tool_call>`` means the model left that tag out
(and maybe a ``}``): the block ends there and the tag opens the next call.
Each call is emitted whole when its block ends: a header delta, then one
arguments delta.
A block may also hold a list of such objects (parallel calls batched into one
block): each becomes a call. Blocks whose JSON cannot be parsed at all, or
whose arguments hold what JSON cannot carry (NaN), are kept as content; parsed
calls without a usable name are dropped. Like the XML parser, ``parse`` is
``feed`` + ``finish`` on a fresh instance, so both modes agree exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from qwenserve.tool_parser.qwen3_coder import (
    TOOL_CALL,
    TOOL_CALL_END,
    ToolParserBase,
    is_partial,
    skip_ws,
)
from qwenserve.tool_parser.schema import NOT_DECODED, decode_literal

# Inside a string, per quote: the next escape or closing quote. A ' outside a JSON string starts a
# Python-literal string ({'name': 'f'}); JSON has none there, so tracking it costs JSON nothing.
_IN_STRING = {'"': re.compile(r'[\\"]'), "'": re.compile(r"[\\']")}
_OUTSIDE = re.compile(r'["\'{}\[\],<]')
_CLOSING = {"{": "}", "[": "]"}
_NOT_A_CALL: Any = object()
# A complete "name" member: the key, then a whole string (escapes allowed).
_NAME_DONE = re.compile(r'"name"\s*:\s*"(?:[^"\\]|\\.)*"')


class Qwen3JsonToolParser(ToolParserBase):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` parser (same API as the XML one)."""

    def _reset(self) -> None:
        super()._reset()
        self._in_block = False
        self._block_start = 0
        self._json_start = 0
        self._scan = 0
        self._stack: list[str] = []
        self._quote = ""  # the open string's quote character; '' outside strings
        self._obj_end = -1
        # Where the last complete member ends (before a ',', after a '{' / '['), with the brackets then open.
        self._member_cut: tuple[int, tuple[str, ...]] | None = None
        self._cut_back = ""  # a cut-off block's JSON up to that point, closed

    def _step(self, final: bool) -> bool:
        return self._step_block(final) if self._in_block else self._step_content(final)

    # ------------------------------------------------------------------ outside calls

    def _step_content(self, final: bool) -> bool:
        lt = self._content_to_next_tag()
        if lt is None:
            return False
        if self._buf.startswith(TOOL_CALL, lt):
            return self._maybe_open(lt, final)
        return self._content_other_tag(lt, final, (TOOL_CALL,))

    def _maybe_open(self, lt: int, final: bool) -> bool:
        buf = self._buf
        j = skip_ws(buf, lt + len(TOOL_CALL))
        if j == len(buf):
            if final:
                self._pos = j
            return False
        if buf[j] not in _CLOSING:  # not a call: the text stays, the stray tag goes (see _content_other_tag)
            self._pos = lt + len(TOOL_CALL)
            return True
        self._in_block = True
        self._block_start = lt
        self._json_start = self._scan = j
        self._stack = []
        self._quote = ""
        self._obj_end = -1
        self._member_cut = None
        self._cut_back = ""
        return True

    # ------------------------------------------------------------------ inside a block

    def _step_block(self, final: bool) -> bool:
        if self._obj_end < 0:
            outcome = self._scan_object(final)
            if outcome is None:
                return False
            if outcome is not True:
                text, block_end = outcome
                self._end_block(text, block_end)
                return True
        return self._after_object(final)

    def _scan_object(self, final: bool) -> Any:
        """Find the end of the JSON object: True (found), (text, block end) for a
        repaired/truncated block, or None while more text is needed."""
        buf = self._buf
        k = self._scan
        while k < len(buf):
            if self._quote:
                m = _IN_STRING[self._quote].search(buf, k)
                if m is None:
                    k = len(buf)
                    break
                if m.group() == "\\":
                    if m.end() >= len(buf):
                        k = m.start()
                        break
                    k = m.end() + 1
                    continue
                self._quote = ""
                k = m.end()
                continue
            m = _OUTSIDE.search(buf, k)
            if m is None:
                k = len(buf)
                break
            c, k = m.group(), m.end()
            if c in "\"'":
                self._quote = c
            elif c in _CLOSING:
                self._stack.append(c)
                self._member_cut = (k, tuple(self._stack))
            elif c == ",":
                self._member_cut = (m.start(), tuple(self._stack))
            elif c in "}]":
                if self._stack:
                    self._stack.pop()
                if not self._stack:
                    self._obj_end = k
                    return True
            elif buf.startswith(TOOL_CALL_END, m.start()):
                # Closing tag outside any string with brackets open: a missing "}".
                return self._repaired(m.start()), m.start() + len(TOOL_CALL_END)
            elif buf.startswith(TOOL_CALL, m.start()):
                # The next call's opening tag (a dedicated token, never JSON) with this one unfinished: the
                # model left out its "}" and </tool_call>. The block ends here; the tag opens the next call.
                return self._repaired(m.start()), m.start()
            elif is_partial(buf, m.start(), (TOOL_CALL_END, TOOL_CALL)) and not final:
                k = m.start()
                break
        self._scan = k
        if not final:
            return None
        if self._member_cut is not None:
            self._cut_back = self._closed(*self._member_cut)
        if not _NAME_DONE.search(buf, self._json_start):
            return "", len(buf)  # cut off before its name was complete: no call (as the XML parser)
        return self._repaired(len(buf)), len(buf)

    def _repaired(self, end: int) -> str:
        """The JSON text up to ``end`` with an open string and brackets closed."""
        return self._closed(end, self._stack, self._quote)

    def _closed(self, end: int, stack: Sequence[str], quote: str = "") -> str:
        """The JSON text up to ``end``, then ``quote`` (closing an open string) and the closers of ``stack``."""
        text = self._buf[self._json_start : end].rstrip() + quote
        return text + "".join(_CLOSING[c] for c in reversed(stack))

    def _after_object(self, final: bool) -> bool:
        buf = self._buf
        text = buf[self._json_start : self._obj_end]
        j = skip_ws(buf, self._obj_end)
        if buf.startswith(TOOL_CALL_END, j):
            self._end_block(text, j + len(TOOL_CALL_END))
            return True
        if is_partial(buf, j, (TOOL_CALL_END,)):
            if not final:
                return False
            self._end_block(text, len(buf))
            return True
        close = buf.find(TOOL_CALL_END, j)
        opener = buf.find(TOOL_CALL, j)
        if opener >= 0 and (close < 0 or opener < close):
            # The next call opens before this one's </tool_call>: the model left that tag out. The call
            # ends with its object; text before the opener is prose, as after an unclosed last call.
            self._end_block(text, self._obj_end)
            return True
        # Junk after the object: drop it up to the closing tag if there is one.
        if close >= 0:
            self._end_block(text, close + len(TOOL_CALL_END))
            return True
        if not final:
            return False
        self._end_block(text, self._obj_end)
        return True

    def _end_block(self, text: str, block_end: int) -> None:
        calls = _interpret_block(text, self._schemas.is_function) if text else []
        if self._cut_back and text and not calls:
            # Cut off inside a key ('{"name": "f", "argu'): the call with its complete members.
            trimmed = _interpret_block(self._cut_back, self._schemas.is_function)
            calls = trimmed or calls
        if calls is None:
            # Unparseable, or arguments JSON cannot carry (NaN): keep what the model wrote rather than lose it.
            self._emit_content(self._buf[self._block_start : block_end])
        for name, arguments in calls or ():
            record = self._open_call(name)
            self._close_call(record, json.dumps(arguments, ensure_ascii=False))
        self._in_block = False
        self._pos = block_end


def _interpret_block(text: str, is_function: Callable[[str], bool]) -> list[tuple[str, dict[str, Any]]] | None:
    """A block's calls: one object, or a list of them (some models batch parallel calls into one block).
    None if the text cannot be read or a call's arguments cannot be sent as JSON; calls of a wrong shape or
    an unknown function are left out."""
    obj = decode_literal(text)
    if obj is NOT_DECODED:
        return None
    calls = []
    for item in obj if isinstance(obj, list) else [obj]:
        call = _interpret(item, is_function)
        if call is None:
            return None
        if call is not _NOT_A_CALL:
            calls.append(call)
    return calls


def _interpret(obj: Any, is_function: Callable[[str], bool]) -> Any:
    """One decoded call as (name, arguments dict); None if its arguments hold what JSON cannot carry, or
    _NOT_A_CALL for a wrong shape or a name that `is_function` does not take."""
    if not isinstance(obj, dict):
        return _NOT_A_CALL
    name = obj.get("name")
    arguments = obj.get("arguments", obj.get("parameters"))
    if isinstance(arguments, str):
        arguments = decode_literal(arguments) if arguments.strip() else {}
    if arguments is None or arguments is NOT_DECODED:
        arguments = {}
    if not isinstance(name, str) or not is_function(name) or not isinstance(arguments, dict):
        return _NOT_A_CALL
    try:
        json.dumps(arguments, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return name, arguments
