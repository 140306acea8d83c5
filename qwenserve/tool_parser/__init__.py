"""Tool-call parsers turning Qwen3 model output into OpenAI ``tool_calls``.

Both parsers share one API (see :class:`ToolParserBase`)::

    parser = Qwen3CoderToolParser(request_tools)
    content, tool_calls = parser.parse(text)        # whole output

    for piece in decoded_pieces:                   # streaming
        send(parser.feed(piece))                   # list of OpenAI ``delta`` dicts
    send(parser.finish())                          # flush held-back text / close calls

The server filters the parsed calls by tool_choice (api.serving_chat.CallFilter) and sets
``finish_reason`` to "tool_calls" only when a call it kept was sent.

Streaming and whole-text parsing give identical content and arguments for any
chunking of the same text.
"""

from __future__ import annotations

from qwenserve.tool_parser.qwen3_coder import Qwen3CoderToolParser, ToolParserBase, assemble
from qwenserve.tool_parser.qwen3_json import Qwen3JsonToolParser
from qwenserve.tool_parser.schema import ParamType, ToolSchemas, convert_value, resolve_type

__all__ = [
    "ParamType",
    "Qwen3CoderToolParser",
    "Qwen3JsonToolParser",
    "ToolParserBase",
    "ToolSchemas",
    "assemble",
    "convert_value",
    "get_tool_parser_class",
    "resolve_type",
]


def get_tool_parser_class(chat_template: str | None) -> type[ToolParserBase]:
    """Pick the parser matching a chat template.

    Qwen3-Coder templates teach the XML format (they contain ``<function=``);
    any other template, or None, gets the Hermes-style JSON parser.
    """
    if chat_template and "<function=" in chat_template:
        return Qwen3CoderToolParser
    return Qwen3JsonToolParser
