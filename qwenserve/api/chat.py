"""Chat messages to a prompt string: normalise what clients send into the plain dicts the
model's Jinja template expects, choose the tool-call format, and render.

Past bugs of the server this project replaced, which this module exists to prevent: pydantic objects reaching
Jinja, and assistant `arguments` arriving as a JSON string where the Qwen3-Coder template
iterates `arguments|items`.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from typing import Any

import jinja2

from qwenserve.api.errors import APIError, bad_request
from qwenserve.api.protocol import (
    AllowedTools,
    AllowedToolsChoice,
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    Tool,
    bad_text_path,
)
from qwenserve.api.structured_output import call_opening

logger = logging.getLogger("qwenserve.api")

_TEXT_PART_TYPES = ("text", "input_text", "output_text")


def media_note(kind: str) -> str:
    """What the model reads in place of an image or file a tool returned. Not a 400: agents carry a tool's
    output along in every later request, so one screenshot would fail the rest of the session."""
    return f"[{kind.removeprefix('input_')} omitted: this model reads text only]"


def content_to_text(content: Any, param: str) -> str:
    """A message's content as one string: text parts joined with "\\n", null as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):  # Responses input items are not typed by pydantic
            raise bad_request(
                f"Content part {param}[{j}] must be an object with a 'type' (or a string), got "
                f"{type(part).__name__}.",
                param=f"{param}[{j}]",
            )
        kind = part.get("type")
        if kind is None:
            raise bad_request(f"Content part {param}[{j}] has no 'type'.", param=f"{param}[{j}].type")
        if kind in _TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(
                    f"A {kind!r} content part needs 'text' as a string.", param=f"{param}[{j}].text"
                )
            texts.append(text)
        elif kind == "refusal":
            texts.append(str(part.get("refusal") or ""))
        else:
            raise bad_request(
                f"Content parts of type {kind!r} are not supported: this model reads text only.",
                param=f"{param}[{j}].type",
                code="unsupported_content",
            )
    return "\n".join(texts)


def arguments_to_dict(arguments: Any) -> dict[str, Any]:
    """Past tool-call arguments as a dict for the template; bad input degrades to {}.

    qwen-code sends JSON strings; null, "" and non-JSON text must never crash rendering.
    """
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str) and arguments.strip():
        try:
            value = json.loads(arguments)
        except (ValueError, RecursionError):
            logger.debug("tool call arguments are not JSON, rendering them as {}: %.200s", arguments)
            return {}
        if isinstance(value, dict):
            return value
    return {}


def normalize_message(msg: ChatMessage, i: int) -> dict[str, Any]:
    """One message as a plain dict in the shape the Qwen chat templates read."""
    role = "system" if msg.role == "developer" else msg.role
    # An assistant turn may be all tool calls and an empty tool result arrives as null; a user or
    # system message without content is a client bug worth naming.
    if msg.content is None and role in ("user", "system"):
        raise bad_request(f"A {msg.role} message needs 'content'.", param=f"messages[{i}].content")
    out: dict[str, Any] = {"role": role, "content": content_to_text(msg.content, f"messages[{i}].content")}
    if msg.name:
        out["name"] = msg.name
    if role == "assistant" and msg.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id or f"call_{i}_{k}",
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": checked_arguments(
                        call.function.arguments, f"messages[{i}].tool_calls[{k}].function.arguments"
                    ),
                },
            }
            for k, call in enumerate(msg.tool_calls)
        ]
    if role == "tool" and msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    return out


def checked_arguments(arguments: Any, param: str) -> dict[str, Any]:
    """arguments_to_dict, refusing what a JSON string decodes into that the request check could not see
    (a "\\ud800" escape inside the string, nesting too deep to render); `param` names the field."""
    value = arguments_to_dict(arguments)
    # A NaN in past arguments is kept: the model may have written it, and history is rendered as given.
    if isinstance(arguments, str) and (found := bad_text_path(value, numbers=False)) is not None:
        what = "a lone UTF-16 surrogate" if found[1] == "surrogate" else "JSON nested too deeply"
        raise bad_request(f"The arguments in {param} hold {what}.", param=param)
    return value


def normalize_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """All messages as plain dicts (content strings, argument dicts)."""
    return [normalize_message(m, i) for i, m in enumerate(messages)]


def normalize_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tools as plain dicts; a missing or null `parameters` becomes an empty object schema."""
    if not tools:
        return None
    out = []
    for tool in tools:
        fn: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            fn["description"] = tool.function.description
        params = tool.function.parameters
        fn["parameters"] = params if params is not None else {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


@dataclass
class ToolPlan:
    """How a chat request uses tools: what the template sees, whether to parse the output,
    and the text appended to the prompt to force a call (also fed to the parser first)."""

    tools: list[dict[str, Any]] | None
    parse: bool
    forced_prefix: str = ""
    must_call: tuple[str, ...] = ()  # tool_choice required / named: the functions one of which must be called
    calls_only: bool = False  # a grammar makes the answer nothing but calls: text outside them is markup
    # At most one call: parallel_tool_calls false, or a named tool_choice (that function, once, as OpenAI
    # and vLLM answer it; an agent would run every repeat).
    one_call: bool = False
    allowed: tuple[str, ...] = ()  # tool_choice allowed_tools (auto): calls of other tools are dropped

    @property
    def callable_names(self) -> tuple[str, ...]:
        """The functions whose calls may reach the client (empty: any offered)."""
        return self.must_call or self.allowed


def _call_prefix(xml: bool, name: str | None) -> str:
    """The opening of a tool call, up to and including the function name when known."""
    if xml:
        return call_opening(name) if name else "<tool_call>\n<function="
    return f'<tool_call>\n{{"name": "{name}", "arguments": ' if name else '<tool_call>\n{"name": "'


def plan_tools(request: ChatCompletionRequest, xml: bool) -> ToolPlan:
    """Apply tool_choice: none hides the tools, required/named prefill the start of a call.

    `xml` selects the call syntax the prefill uses (ServerState.xml_tools).
    """
    tools = normalize_tools(request.tools)
    choice = request.tool_choice
    one_call = request.parallel_tool_calls is False
    if not tools:
        if choice == "required" or isinstance(choice, NamedToolChoice | AllowedToolsChoice):
            raise bad_request("tool_choice requires a non-empty 'tools' list.", param="tool_choice")
        return ToolPlan(tools=None, parse=False)
    if choice == "none":
        return ToolPlan(tools=None, parse=False)
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, AllowedToolsChoice):
        return _allowed_tools_plan(tools, choice.allowed_tools, xml, one_call)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(
                f"tool_choice names {choice.function.name!r}, which is not in 'tools'.", param="tool_choice"
            )
        return ToolPlan(tools=tools, parse=True, forced_prefix=_call_prefix(xml, choice.function.name),
                        must_call=(choice.function.name,), one_call=True)
    if choice == "required":
        # With one tool, "required" can only mean that tool: force its name as well.
        name = names[0] if len(names) == 1 else None
        return ToolPlan(tools=tools, parse=True, forced_prefix=_call_prefix(xml, name), must_call=tuple(names),
                        one_call=one_call)
    return ToolPlan(tools=tools, parse=True, one_call=one_call)


def _allowed_tools_plan(tools: list[dict[str, Any]], allowed: AllowedTools, xml: bool, one_call: bool) -> ToolPlan:
    """tool_choice allowed_tools: every tool is rendered (the prompt stays the one an `auto` turn sends,
    prefix cache included); `required` forces a call of one of the allowed ones, `auto` lets the model
    answer in text and keeps only its calls of allowed ones."""
    offered = {t["function"]["name"] for t in tools}
    names = tuple(dict.fromkeys(choice.function.name for choice in allowed.tools))
    for j, name in enumerate(names):
        if name not in offered:
            raise bad_request(
                f"tool_choice.allowed_tools names {name!r}, which is not in 'tools'.",
                param=f"tool_choice.allowed_tools.tools[{j}]",
            )
    if allowed.mode == "auto":
        return ToolPlan(tools=tools, parse=True, one_call=one_call, allowed=names)
    name = names[0] if len(names) == 1 else None
    return ToolPlan(tools=tools, parse=True, forced_prefix=_call_prefix(xml, name), must_call=names,
                    one_call=one_call)  # fmt: skip


def _template_kwargs(tokenizer: Any, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """chat_template_kwargs minus anything that would clash with apply_chat_template's own
    parameters (tokenize, tools, chat_template, ...): unknown keys are just template vars."""
    if not kwargs:
        return {}
    reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters) | {"messages"}
    return {k: v for k, v in kwargs.items() if k not in reserved}


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """Render with the model's own chat template; template errors become a 400."""
    if continue_final_message:
        if messages[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs a final assistant message.", param="messages")
        add_generation_prompt = False
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **_template_kwargs(tokenizer, template_kwargs),
        )
    except (jinja2.TemplateError, TypeError, ValueError, KeyError) as exc:
        raise APIError(
            400, f"The chat template could not render these messages: {exc}", param="messages"
        ) from exc
