"""The Anthropic Messages API request (`POST /v1/messages`, `/v1/messages/count_tokens`) and its mapping
onto a chat request.

A Messages request is turned into the ChatCompletionRequest its conversation would be in OpenAI's shape
(`system` as the first system message, `tool_use` blocks as an assistant message's `tool_calls` with
their ids, `tool_result` blocks as tool messages) and then served by the chat machinery, so the prompt,
the sampling defaults, the tool-call parser and the prefix cache are those of /v1/chat/completions.
Messages and blocks are checked here one by one rather than by a pydantic union, so a bad block is
named exactly (`messages[2].content[1].tool_use_id`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwenserve.api.chat import media_note
from qwenserve.api.errors import APIError, bad_request
from qwenserve.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    SharedSamplingFields,
    StrictScalars,
    Tool,
    ToolCall,
    flat_tool,
)

# `system` messages stand where they are in the conversation (Claude Code sends its environment so, after
# the first user message); the top-level `system` is the prompt's first system message.
_ROLES = ("user", "assistant", "system")
# Blocks a text model cannot read: a clear 400 rather than a prompt that silently lacks them.
_MEDIA_BLOCKS = ("image", "document", "container_upload")
# The model never thinks; a history carried over from a model that did is rendered without its thoughts.
_THINKING_BLOCKS = ("thinking", "redacted_thinking")
# Anthropic's hosted tools' calls and results in an assistant turn (a conversation begun on Anthropic): this
# server runs no such tool, and the answer they led to is in the turn's text. Also any "*_tool_result".
_SERVER_TOOL_BLOCKS = ("server_tool_use", "mcp_tool_use")


def _dropped_from_history(kind: str) -> bool:
    """An assistant block the prompt leaves out: thoughts, and hosted tools' calls and results."""
    return kind in _THINKING_BLOCKS or kind in _SERVER_TOOL_BLOCKS or kind.endswith("_tool_result")
_TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")


class MessagesInput(StrictScalars):
    """What both /v1/messages and /v1/messages/count_tokens read: the conversation, tools and format.
    Unknown fields are ignored, as Anthropic clients send many (betas, `container`, `context_management`)."""

    model: str | None = None  # any name: it is echoed back
    messages: list[Any]  # checked by chat_messages
    system: str | list[Any] | None = None
    tools: list[Any] | None = None  # checked by chat_tools
    tool_choice: dict[str, Any] | None = None  # checked by chat_tool_choice
    output_config: dict[str, Any] | None = None  # `format` (a JSON schema) is applied; `effort` is not
    # Accepted and ignored: the model does not think, and prefix caching is automatic here.
    thinking: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None  # refused when not empty (refuse_unsupported)
    thread: Any = None  # message threads (server-held history): refused when set (refuse_unsupported)


class MessagesRequest(MessagesInput, SharedSamplingFields):
    """What `client.messages.create(...)` sends. Besides Anthropic's `temperature`, `top_p`, `top_k` and
    `stop_sequences`, the chat path's sampling extras (`min_p`, `repetition_penalty`, `seed`, ...) pass
    through as they are."""

    max_tokens: int
    stop_sequences: list[str] | None = None
    stream: bool = False
    # Accepted and ignored.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    container: Any = None
    context_management: Any = None
    inference_geo: str | None = None
    speed: str | None = None


def refuse_unsupported(req: MessagesInput) -> None:
    """400, naming the field, for what this server cannot do rather than silently not do."""
    if req.mcp_servers:
        raise bad_request(
            "'mcp_servers' is not supported: this server does not connect to MCP servers; run them in your client.",
            param="mcp_servers",
            code="unsupported_parameter",
        )
    if req.thread is not None:
        # A `continue` turn carries only the new messages, without the history, `system` or `tools` the thread
        # holds: ignored, the model would answer a tool result out of context. This error code makes the
        # anthropic SDKs' tool runner (unsupportedRequestBehavior 'continue_unthreaded') resend the turn with
        # the full history and no thread, as it does for any request Anthropic cannot thread.
        raise APIError(
            400,
            "'thread' is not supported: this server holds no message threads. Send the whole "
            "conversation in 'messages' without 'thread'.",
            param="thread",
            code="unsupported_parameter",
            details={"error_code": "thread_unsupported_request", "unsupported": ["thread"]},
        )
    if isinstance(req, MessagesRequest) and req.max_tokens < 1:
        raise bad_request(f"'max_tokens' must be >= 1, got {req.max_tokens}.", param="max_tokens")


def to_chat_request(req: MessagesInput) -> ChatCompletionRequest:
    """The chat request equivalent to `req` (after refuse_unsupported): same prompt, sampling and tools."""
    conversation = chat_conversation(req)
    tool_choice, one_call = chat_tool_choice(req.tool_choice)
    fields: dict[str, Any] = {}
    if isinstance(req, MessagesRequest):
        fields = {name: getattr(req, name) for name in SharedSamplingFields.model_fields}
        fields.update(max_tokens=req.max_tokens, stream=req.stream, stop=_stop_strings(req))
        if _thinking_on(req.thinking) and req.temperature == 1:
            fields["temperature"] = None  # the model's own default (generation_config.json), as if unset
    return ChatCompletionRequest(
        model=req.model,
        messages=conversation.messages,
        tools=chat_tools(req.tools),
        tool_choice=tool_choice,
        parallel_tool_calls=False if one_call else None,
        continue_final_message=conversation.prefill,
        add_generation_prompt=not conversation.prefill,
        response_format=_response_format(req.output_config),
        **fields,
    )


def _thinking_on(thinking: dict[str, Any] | None) -> bool:
    """Whether the request asks for extended thinking. Anthropic then accepts no `temperature` but 1, so
    clients that turn thinking on send 1 (qwen-code's Anthropic provider does on every request): a value
    the API forces says nothing of the sampling wanted, and this model, which does not think, would
    otherwise sample at 1 instead of its own default (greedy for the demo model, 0.7 for Qwen3-Coder)."""
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def _stop_strings(req: MessagesRequest) -> list[str] | None:
    """`stop_sequences`, and chat's `stop` for clients that send vLLM's name."""
    extra = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stops = list(req.stop_sequences or []) + extra
    return stops or None


def _response_format(output_config: dict[str, Any] | None) -> ResponseFormat | None:
    """output_config.format {"type": "json_schema", "schema"} as chat's response_format."""
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad_request(
            "output_config.format must be {'type': 'json_schema', 'schema': {...}}.", param="output_config.format"
        )
    return ResponseFormat(type="json_schema", json_schema={"name": "output", "schema": fmt["schema"]})


# ---- system and messages -> chat messages ----


@dataclass
class Conversation:
    """The chat history of a Messages request; `prefill`: it ends with assistant text the answer continues."""

    messages: list[ChatMessage] = field(default_factory=list)
    prefill: bool = False


def chat_conversation(req: MessagesInput) -> Conversation:
    """`system` and `messages` as chat history. Consecutive messages of one role form one turn, as
    Anthropic's API combines them; within a turn, text blocks are joined by a line break."""
    conversation = Conversation()
    system = _system_text(req.system)
    if system:
        conversation.messages.append(ChatMessage(role="system", content=system))
    if not req.messages:
        raise bad_request("'messages' must hold at least one message.", param="messages")
    turns = _turns(req.messages)
    for role, blocks in turns:
        _ADD_TURN[role](conversation.messages, blocks)
    if not conversation.messages:
        raise bad_request("'messages' holds no text, tool_use or tool_result block.", param="messages")
    last = conversation.messages[-1]
    # A final assistant turn of text alone is a prefill: the answer continues it, as with Anthropic.
    conversation.prefill = turns[-1][0] == "assistant" and last.role == "assistant" and not last.tool_calls
    return conversation


# Claude Code opens its system prompt with a block for Anthropic's billing whose value changes with the
# conversation's first message: rendered, it would make every new session's prompt differ from its first
# token on, and no prefix could be reused. It says nothing to the model, so it is left out.
_BILLING_HEADER = "x-anthropic-billing-header:"


def _system_text(system: str | list[Any] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    texts = []
    for j, block in enumerate(system):
        param = f"system[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad_request(f"{param} must be a text block ({{'type': 'text', 'text': ...}}).", param=param)
        text = _required_str(block, "text", param, allow_empty=True)
        if not text.startswith(_BILLING_HEADER):
            texts.append(text)
    return "\n".join(texts)


Block = tuple[dict[str, Any], str]  # (a content block, its param path)


def _turns(messages: list[Any]) -> list[tuple[str, list[Block]]]:
    """Messages as turns: (role, the blocks of that role's consecutive messages)."""
    turns: list[tuple[str, list[Block]]] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{param} must be an object with 'role' and 'content'.", param=param)
        role = message.get("role")
        if role not in _ROLES:
            raise bad_request(f"{param}.role must be one of {', '.join(_ROLES)}, got {role!r}.", param=f"{param}.role")
        blocks = _blocks(message.get("content"), f"{param}.content")
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    return turns


def _blocks(content: Any, param: str) -> list[Block]:
    if isinstance(content, str):
        return [({"type": "text", "text": content}, param)]
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content blocks.", param=param)
    blocks = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad_request(f"{param}[{j}] must be a content block: an object with a 'type'.", param=f"{param}[{j}]")
        blocks.append((block, f"{param}[{j}]"))
    return blocks


def _required_str(block: dict[str, Any], key: str, param: str, allow_empty: bool = False) -> str:
    value = block.get(key)
    if not isinstance(value, str) or not (value or allow_empty):
        raise bad_request(f"{param}.{key} must be a {'' if allow_empty else 'non-empty '}string.", param=f"{param}.{key}")
    return value


def _optional_bool(block: dict[str, Any], key: str, param: str) -> bool:
    """A flag that may be left out (or null): False then; anything but a boolean is a 400."""
    value = block.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{param}.{key} must be true or false, got {value!r}.", param=f"{param}.{key}")
    return bool(value)


def _unreadable(kind: str, param: str) -> APIError:
    """The 400 for a block this server cannot take."""
    if kind in _MEDIA_BLOCKS:
        return bad_request(
            f"Content blocks of type {kind!r} are not supported: this model reads text only.",
            param=f"{param}.type",
            code="unsupported_content",
        )
    return bad_request(f"Content blocks of type {kind!r} are not supported here.", param=f"{param}.type")


def _add_user_turn(messages: list[ChatMessage], blocks: list[Block]) -> None:
    """Text runs become user messages and each tool_result a tool message, in the order given (Anthropic
    puts a turn's tool results first, then any text: the tool messages, then one user message)."""
    texts: list[str] = []

    def flush_text() -> None:
        if texts:
            messages.append(ChatMessage(role="user", content="\n".join(texts)))
            texts.clear()

    for block, param in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(_required_str(block, "text", param, allow_empty=True))
        elif kind == "search_result":
            texts.append(_search_result_text(block, param))
        elif kind == "tool_result":
            flush_text()
            messages.append(_tool_message(block, param))
        else:
            raise _unreadable(kind, param)
    flush_text()


def _tool_message(block: dict[str, Any], param: str) -> ChatMessage:
    """A tool_result as the tool message answering the call with its `tool_use_id` (the template pairs
    results with calls by order; the id is kept for the history's sake). A failed tool's output says so."""
    call_id = _required_str(block, "tool_use_id", param)
    text = _tool_result_text(block.get("content"), f"{param}.content")
    if _optional_bool(block, "is_error", param):
        text = f"Error: {text}"
    return ChatMessage(role="tool", tool_call_id=call_id, content=text)


def _tool_result_text(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of text blocks.", param=param)
    texts = []
    for block, block_param in _blocks(content, param):
        kind = block["type"]
        if kind in _MEDIA_BLOCKS:  # Claude Code's Read of an image file: a note, not a 400
            texts.append(media_note(kind))
        elif kind == "text":
            texts.append(_required_str(block, "text", block_param, allow_empty=True))
        elif kind == "search_result":
            texts.append(_search_result_text(block, block_param))
        elif kind == "tool_reference":
            # Claude Code's ToolSearch result: the tool it loads. Every tool is in the prompt here already.
            texts.append(f"Tool {_required_str(block, 'tool_name', block_param)!r} is now available.")
        else:
            raise _unreadable(kind, block_param)
    return "\n".join(texts)


def _search_result_text(block: dict[str, Any], param: str) -> str:
    """A search result as the model reads it: its title and source, then its text blocks."""
    head = " ".join(str(block[key]) for key in ("title", "source") if isinstance(block.get(key), str) and block[key])
    body = _tool_result_text(block.get("content"), f"{param}.content")
    return "\n".join(part for part in (head, body) if part)


def _add_assistant_turn(messages: list[ChatMessage], blocks: list[Block]) -> None:
    """One assistant message: its text blocks joined, its tool_use blocks as tool_calls (ids kept)."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block, param in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(_required_str(block, "text", param, allow_empty=True))
        elif kind == "tool_use":
            calls.append(_tool_call(block, param))
        elif not _dropped_from_history(kind):
            raise _unreadable(kind, param)
    if texts or calls:
        messages.append(ChatMessage(role="assistant", content="\n".join(texts) or None, tool_calls=calls or None))


def _add_system_turn(messages: list[ChatMessage], blocks: list[Block]) -> None:
    """A system message within the conversation: its text blocks, in place."""
    texts = []
    for block, param in blocks:
        if block["type"] != "text":
            raise bad_request(f"A system message holds text blocks only, got {block['type']!r}.", param=f"{param}.type")
        texts.append(_required_str(block, "text", param, allow_empty=True))
    messages.append(ChatMessage(role="system", content="\n".join(texts)))


_ADD_TURN = {"user": _add_user_turn, "assistant": _add_assistant_turn, "system": _add_system_turn}


def _tool_call(block: dict[str, Any], param: str) -> ToolCall:
    call_id = _required_str(block, "id", param)
    name = _required_str(block, "name", param)
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise bad_request(f"{param}.input must be an object.", param=f"{param}.input")
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))


# ---- tools ----


def chat_tools(tools: list[Any] | None) -> list[Tool] | None:
    """Custom tools ({name, description, input_schema}) as chat tools. Anthropic's server tools and
    schema-less built-in client tools (`web_search_...`, `bash_...`, `text_editor_...`) are a 400: this
    server runs no tools, and the model knows no built-in ones."""
    if not tools:
        return None
    return [_chat_tool(tool, j) for j, tool in enumerate(tools)]


def _chat_tool(tool: Any, j: int) -> Tool:
    param = f"tools[{j}]"
    if not isinstance(tool, dict):
        raise bad_request(f"{param} must be an object.", param=param)
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise bad_request(
            f"Tools of type {kind!r} are not supported: this server runs no server tools and its model knows "
            "no built-in ones; send custom tools ({'name', 'description', 'input_schema'}).",
            param=f"{param}.type",
            code="unsupported_parameter",
        )
    name = _required_str(tool, "name", param)
    return flat_tool(name, tool.get("description"), tool.get("input_schema"), param, "input_schema")


def chat_tool_choice(choice: dict[str, Any] | None) -> tuple[str | NamedToolChoice | None, bool]:
    """Anthropic's tool_choice as (chat's tool_choice, whether at most one call may be made):
    auto -> "auto", any -> "required", tool -> that function, none -> "none"."""
    if choice is None:
        return None, False
    kind = choice.get("type")
    if kind not in _TOOL_CHOICE_TYPES:
        raise bad_request(
            f"tool_choice.type must be one of {', '.join(_TOOL_CHOICE_TYPES)}, got {kind!r}.", param="tool_choice.type"
        )
    one_call = _optional_bool(choice, "disable_parallel_tool_use", "tool_choice")
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("tool_choice.name must be a non-empty string.", param="tool_choice.name")
        return NamedToolChoice(function=NamedFunction(name=name)), True
    return {"auto": "auto", "any": "required", "none": "none"}[kind], one_call
