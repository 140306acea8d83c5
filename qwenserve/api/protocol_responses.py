"""The OpenAI Responses API request (`POST /v1/responses`) and its mapping onto a chat request.

A Responses request, its `previous_response_id` and `item_reference` items expanded from the
response store (serving_responses), is turned into the ChatCompletionRequest that chat history
would be (instructions as the first system message, `function_call` items as an assistant
message's `tool_calls`, `function_call_output` items as tool messages) and then served by the chat
machinery. Input items and tools are checked here one by one rather than by a pydantic union, so a
bad item is named exactly (`input[2].call_id`, `tools[0].type`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict

from qwenserve.api.chat import checked_arguments, content_to_text, media_note
from qwenserve.api.errors import APIError, bad_request
from qwenserve.api.protocol import (
    AllowedTools,
    AllowedToolsChoice,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    Lenient,
    NamedFunction,
    NamedToolChoice,
    SharedSamplingFields,
    Tool,
    ToolCall,
    flat_tool,
)

_MESSAGE_ROLES = ("user", "system", "developer", "assistant")
# Parts of a function_call_output a text model cannot read (Codex's view_image returns an input_image).
_MEDIA_PARTS = ("input_image", "input_file", "input_audio")
_TOOL_CHOICE_MODES = ("auto", "none", "required")


class ResponsesTextFormat(Lenient):
    """{"type": "text" | "json_object"} or {"type": "json_schema", "name", "schema", "strict"}: the
    extra fields are kept, to compile and to echo in the response."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class ResponsesText(Lenient):
    model_config = ConfigDict(extra="allow")  # e.g. verbosity: echoed, no effect
    format: ResponsesTextFormat | None = None


class ResponsesRequest(SharedSamplingFields):
    """What `client.responses.create(...)` sends; unknown fields are ignored, as for chat. The sampling
    fields (temperature, top_p and the chat path's extras: top_k, stop, seed, ...) pass to chat as they are."""

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None  # checked by chat_tools
    tool_choice: str | dict[str, Any] | None = None  # checked by chat_tool_choice
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = None
    stream: bool = False
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None  # false: the response is not kept for later requests (response_store)
    text: ResponsesText | None = None
    reasoning: dict[str, Any] | None = None  # accepted and ignored: the model does not reason
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Accepted and ignored (declared so --log-requests shows them): prefix caching is automatic here.
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    max_tool_calls: int | None = None
    stream_options: dict[str, Any] | None = None
    previous_response_id: str | None = None  # expanded from the response store
    # Refused when set (see refuse_unsupported): they need server-side state or features this server lacks.
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    top_logprobs: int | None = None
    # Chat's names for what Responses calls otherwise: refused, naming the field to use, rather than ignored.
    max_tokens: Any = None
    max_completion_tokens: Any = None
    response_format: Any = None
    n: Any = None


# Chat fields a Responses request may mistake for its own -> what /v1/responses takes instead.
_CHAT_FIELDS = {
    "max_tokens": "/v1/responses takes 'max_output_tokens'",
    "max_completion_tokens": "/v1/responses takes 'max_output_tokens'",
    "response_format": "/v1/responses takes 'text.format'",
    "n": "/v1/responses gives one output per response (send several, or use /v1/chat/completions)",
}


def _unsupported(message: str, param: str) -> APIError:
    return bad_request(message, param=param, code="unsupported_parameter")


def refuse_unsupported(req: ResponsesRequest) -> None:
    """400, naming the field, for what this text-only server cannot do."""
    if req.conversation is not None:
        raise _unsupported(
            "'conversation' is not supported: this server keeps no conversation objects. Continue from a "
            "response with 'previous_response_id', or resend the whole conversation in 'input'.",
            "conversation",
        )
    if req.prompt is not None:
        raise _unsupported("Stored prompt templates ('prompt') are not supported; send 'input'.", "prompt")
    if req.background:
        raise _unsupported(
            "'background' responses are not supported: a response runs while its request is open.", "background"
        )
    if req.top_logprobs or "message.output_text.logprobs" in (req.include or []):
        param = "top_logprobs" if req.top_logprobs else "include"
        raise _unsupported("Logprobs are not supported on /v1/responses; use /v1/chat/completions.", param)
    for param, instead in _CHAT_FIELDS.items():
        if getattr(req, param) is not None and not (param == "n" and getattr(req, param) == 1):
            raise _unsupported(f"'{param}' is a chat completions field: {instead}.", param)
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise bad_request(f"'max_output_tokens' must be >= 1, got {req.max_output_tokens}.", param="max_output_tokens")


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request equivalent to `req` (after refuse_unsupported): same sampling, same tools."""
    return ChatCompletionRequest(
        model=req.model,
        messages=chat_messages(req),
        tools=chat_tools(req.tools),
        tool_choice=chat_tool_choice(req.tool_choice),
        parallel_tool_calls=req.parallel_tool_calls,
        max_tokens=req.max_output_tokens,
        stream=req.stream,
        user=req.user,
        **{name: getattr(req, name) for name in SharedSamplingFields.model_fields},
    )


# ---- input items -> chat messages ----


def chat_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """`instructions` and `input` as chat history."""
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage(role="system", content=req.instructions))
    if isinstance(req.input, str):
        messages.append(ChatMessage(role="user", content=req.input))
        return messages
    if not req.input:
        raise bad_request("'input' must not be empty.", param="input")
    call_ids: set[str] = set()
    for i, item in enumerate(req.input):
        _add_item(messages, item, i, call_ids)
    if not messages:
        raise bad_request("'input' holds no message.", param="input")
    return messages


def _add_item(messages: list[ChatMessage], item: Any, i: int, call_ids: set[str]) -> None:
    """Append input item `i` to `messages`; `call_ids` collects the calls seen so far."""
    if not isinstance(item, dict):
        raise bad_request(f"input[{i}] must be an object.", param=f"input[{i}]")
    kind = item.get("type", "message")
    if kind == "message":
        messages.append(_message(item, i))
    elif kind == "function_call":
        _add_call(messages, item, i, call_ids)
    elif kind == "function_call_output":
        messages.append(_call_output(item, i, call_ids))
    elif kind == "reasoning":
        pass  # a reasoning model's carried-over thoughts: this model never writes any, nothing to render
    else:
        raise _unsupported(
            f"Input items of type {kind!r} are not supported; send messages, function_call and "
            "function_call_output items.",
            f"input[{i}].type",
        )


def _required_str(item: dict[str, Any], key: str, i: int) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"input[{i}].{key} must be a non-empty string.", param=f"input[{i}].{key}")
    return value


def _message(item: dict[str, Any], i: int) -> ChatMessage:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise bad_request(
            f"input[{i}].role must be one of {', '.join(_MESSAGE_ROLES)}, got {role!r}.", param=f"input[{i}].role"
        )
    return ChatMessage(role=role, content=_item_text(item, "content", i))


def _item_text(item: dict[str, Any], key: str, i: int) -> str:
    """item[key] (a string or a list of content parts) as the text chat history holds."""
    value = item.get(key)
    if not isinstance(value, str | list):
        raise bad_request(f"input[{i}].{key} must be a string or a list of content parts.", param=f"input[{i}].{key}")
    return content_to_text(value, f"input[{i}].{key}")


def _add_call(messages: list[ChatMessage], item: dict[str, Any], i: int, call_ids: set[str]) -> None:
    """A past function call joins the assistant turn it belongs to (the previous assistant message,
    whose text or other calls it follows), as chat history keeps them."""
    call_id = _required_str(item, "call_id", i)
    name = _required_str(item, "name", i)
    arguments = item.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise bad_request(f"input[{i}].arguments must be a JSON string.", param=f"input[{i}].arguments")
    call = ToolCall(
        id=call_id, function=FunctionCall(name=name, arguments=checked_arguments(arguments, f"input[{i}].arguments"))
    )
    call_ids.add(call_id)
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        last.tool_calls = [*(last.tool_calls or []), call]
    else:
        messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


def _call_output(item: dict[str, Any], i: int, call_ids: set[str]) -> ChatMessage:
    call_id = _required_str(item, "call_id", i)
    if call_id not in call_ids:
        raise bad_request(
            f"No function_call item before input[{i}] has call_id {call_id!r}.", param=f"input[{i}].call_id"
        )
    output = item.get("output")
    if isinstance(output, list):
        output = [_text_for_media(part) for part in output]
    return ChatMessage(role="tool", tool_call_id=call_id, content=_item_text({"output": output}, "output", i))


def _text_for_media(part: Any) -> Any:
    """A tool's image or file output part as a text part saying it was left out (chat.media_note)."""
    if isinstance(part, dict) and part.get("type") in _MEDIA_PARTS:
        return {"type": "input_text", "text": media_note(part["type"])}
    return part


# ---- tools ----


# Hosted tools that only add reach (the model may search the web): left out of the prompt rather than
# refused, since Codex sends web_search on every turn; a tool_choice naming one is still a 400.
_IGNORED_HOSTED_TOOLS = ("web_search", "web_search_preview")


def chat_tools(tools: list[Any] | None) -> list[Tool] | None:
    """Responses function tools (flat: type, name, description, parameters, strict) as chat tools.

    A namespace's functions join the list under their own names (the model sees no namespaces; a call's
    output item names its namespace, see tool_namespaces), so those names must be unique.
    Hosted web search is left out. `strict` is accepted and not enforced (no constrained decoding):
    Responses clients send it by default.
    """
    if not tools:
        return None
    flat: list[Tool] = []
    for j, tool in enumerate(tools):
        flat.extend(_chat_tools(tool, f"tools[{j}]"))
    names = [tool.function.name for tool in flat]
    for name in tool_namespaces(tools):
        if names.count(name) > 1:
            raise bad_request(
                f"Two tools are named {name!r}, one in a namespace: the model calls a namespace's functions "
                "by their own names, so those must differ from every other tool's.",
                param="tools",
            )
    return flat or None


def tool_namespaces(tools: list[Any] | None) -> dict[str, str]:
    """Function name -> the namespace tool holding it (after chat_tools checked the tools)."""
    return {
        inner["name"]: tool["name"]
        for tool in tools or []
        if tool.get("type") == "namespace"
        for inner in tool["tools"]
    }


def _chat_tools(tool: Any, param: str) -> list[Tool]:
    """One entry of `tools` as chat tools: a function, a namespace's functions, or none."""
    if not isinstance(tool, dict):
        raise bad_request(f"{param} must be an object.", param=param)
    kind = tool.get("type")
    if kind in _IGNORED_HOSTED_TOOLS:
        return []
    if kind != "namespace":
        return [_chat_tool(tool, param)]
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{param}.name must be a non-empty string.", param=f"{param}.name")
    inner = tool.get("tools")
    if not isinstance(inner, list) or not inner:
        raise bad_request(f"{param}.tools must be a non-empty list of function tools.", param=f"{param}.tools")
    about = tool.get("description")
    tools = [_chat_tool(function, f"{param}.tools[{k}]") for k, function in enumerate(inner)]
    if isinstance(about, str) and about:
        for function in tools:  # the namespace's own words, which the model would otherwise never see
            own = function.function.description
            function.function.description = f"{about} {own}" if own else about
    return tools


def _chat_tool(tool: Any, param: str) -> Tool:
    if not isinstance(tool, dict):
        raise bad_request(f"{param} must be an object.", param=param)
    kind = tool.get("type")
    if kind is None:
        raise bad_request(f"{param}.type is required: 'function' for a function tool.", param=f"{param}.type")
    if kind != "function":
        raise _unsupported(
            f"Tools of type {kind!r} are not supported: this server has no built-in tools; "
            "send function tools ({'type': 'function', 'name', 'parameters'}).",
            f"{param}.type",
        )
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        hint = " (Responses tools are flat: name and parameters sit beside 'type', not under 'function')"
        raise bad_request(
            f"{param}.name must be a non-empty string{hint if 'function' in tool else ''}.",
            param=f"{param}.name",
        )
    return flat_tool(name, tool.get("description"), tool.get("parameters"), param, "parameters")


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | NamedToolChoice | AllowedToolsChoice | None:
    """"auto" | "none" | "required" | {"type": "function", "name"} | {"type": "allowed_tools", "mode",
    "tools"} as chat's tool_choice."""
    if choice is None or choice in _TOOL_CHOICE_MODES:
        return choice
    if isinstance(choice, str):
        raise bad_request(
            f"tool_choice must be one of {', '.join(_TOOL_CHOICE_MODES)} or a function, got {choice!r}.",
            param="tool_choice",
        )
    if choice.get("type") == "allowed_tools":
        return _allowed_tools_choice(choice)
    if choice.get("type") != "function":
        raise _unsupported(
            f"tool_choice of type {choice.get('type')!r} is not supported; send 'auto', 'none', 'required', "
            "{'type': 'function', 'name': ...} or {'type': 'allowed_tools', 'mode': ..., 'tools': [...]}.",
            "tool_choice",
        )
    return _named_choice(choice, "tool_choice")


def _named_choice(choice: Any, param: str) -> NamedToolChoice:
    name = choice.get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or not name:
        raise bad_request(f"{param}.name must be a non-empty string.", param=f"{param}.name")
    return NamedToolChoice(function=NamedFunction(name=name))


def _allowed_tools_choice(choice: dict[str, Any]) -> AllowedToolsChoice:
    mode, tools = choice.get("mode"), choice.get("tools")
    if mode not in ("auto", "required"):
        raise bad_request(f"tool_choice.mode must be 'auto' or 'required', got {mode!r}.", param="tool_choice.mode")
    if not isinstance(tools, list) or not tools:
        raise bad_request("tool_choice.tools must be a non-empty list of functions.", param="tool_choice.tools")
    named = []
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _unsupported(
                f"tool_choice.tools[{j}] must be {{'type': 'function', 'name': ...}}.", f"tool_choice.tools[{j}]"
            )
        named.append(_named_choice(tool, f"tool_choice.tools[{j}]"))
    return AllowedToolsChoice(type="allowed_tools", allowed_tools=AllowedTools(mode=mode, tools=named))
