"""Pydantic request models for the OpenAI-compatible endpoints.

Lenient by design where clients differ: unknown fields are ignored (qwen-code and other
clients send many provider-specific extras), content may be a string, an array of parts or
null, and tool schemas are kept as plain dicts. Strict where OpenAI is: the request's own
scalars are not coerced ("5" is not a max_tokens, "yes" is not a stream flag). Range checks
on sampling values live in SamplingParams so the engine and the API agree on them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError, PydanticUndefined

from qwenserve.api.errors import bad_request
from qwenserve.tool_parser.schema import is_writable_name

# Why a function name is refused: the model could never call it so that the parser reads it back.
UNWRITABLE_NAME = (
    "a function name may not hold '<', '>' or a line break, begin or end with a space, or pass 255 "
    "characters: the model writes it inside a call's markup (<function=NAME>)"
)


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit null for a field with a default is the default, as in OpenAI's API ("boolean or
        null", "integer or null"): clients that send every unset field as null must not get a 400."""
        # Most objects (each of a long history's messages) hold no null: pass them on untouched.
        if not isinstance(data, dict) or not any(value is None for value in data.values()):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None
            or key not in fields
            or fields[key].default in (None, PydanticUndefined)
            and fields[key].default_factory is None
        }


class FunctionCall(Lenient):
    name: str = ""
    # Clients send a JSON string (OpenAI), some send a dict, some null: all accepted.
    arguments: str | dict[str, Any] | list[Any] | None = None


class ToolCall(Lenient):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any] | str] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _not_legacy(cls, role: Any) -> Any:
        if role == "function":  # as the legacy `functions` field is refused (serving_chat.check_chat_fields)
            raise PydanticCustomError(
                "legacy_role",
                "role 'function' belongs to the legacy function-calling format, which is not supported: send the "
                "result as a 'tool' message with the 'tool_call_id' of the assistant's call",
            )
        return role


class FunctionDefinition(Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    # Missing, null, {"type": "object"} without properties: all valid (parameterless tools).
    parameters: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _writable(cls, name: str) -> str:
        if name and not is_writable_name(name):
            raise PydanticCustomError("unwritable_name", UNWRITABLE_NAME)
        return name


class Tool(Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


def flat_tool(name: str, description: Any, schema: Any, param: str, schema_field: str) -> Tool:
    """A tool given flat (Responses' `parameters`, Anthropic's `input_schema`) as chat's Tool, checked as
    chat's are; a 400 names the field (`param` is the tool's path, `schema_field` its schema's name)."""
    if not is_writable_name(name):
        raise bad_request(f"{param}.name: {UNWRITABLE_NAME}.", param=f"{param}.name")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{param}.description must be a string.", param=f"{param}.description")
    if schema is not None and not isinstance(schema, dict):
        raise bad_request(f"{param}.{schema_field} must be a JSON schema object.", param=f"{param}.{schema_field}")
    return Tool(function=FunctionDefinition(name=name, description=description, parameters=schema))


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class AllowedTools(Lenient):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolsChoice(Lenient):
    """OpenAI's `{"type": "allowed_tools", ...}`: only these may be called, while every tool stays in the
    prompt (so the prompt, and its cached prefix, do not change with the subset)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


def _tool_choice_kind(value: Any) -> str | None:
    """Which form of tool_choice a value is meant as, so that a malformed one is told what that form lacks
    rather than why it matches none of the three. (The tags are capitalised: error paths leave them out.)"""
    if isinstance(value, str):
        return "Mode"
    if isinstance(value, dict | NamedToolChoice | AllowedToolsChoice):
        kind = (value.get("type") or "function") if isinstance(value, dict) else value.type
        return {"function": "Function", "allowed_tools": "AllowedTools"}.get(kind)
    return None


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("Mode")]
    | Annotated[NamedToolChoice, Tag("Function")]
    | Annotated[AllowedToolsChoice, Tag("AllowedTools")],
    Discriminator(
        _tool_choice_kind,
        custom_error_type="invalid_tool_choice",
        custom_error_message="tool_choice must be 'none', 'auto', 'required', {'type': 'function', 'function': "
        "{'name': NAME}} or {'type': 'allowed_tools', 'allowed_tools': {'mode': 'auto' or 'required', 'tools': "
        "[...]}}",
    ),
]


class StrictScalars(Lenient):
    # Strict in pydantic's sense: no str -> int/bool or bool -> int coercion (an int still fills a float).
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(StrictScalars):
    include_usage: bool = False
    continuous_usage_stats: Any = None  # vLLM's; refused when set (api.sampling)


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}


class SharedSamplingFields(StrictScalars):
    """The sampling fields every generating endpoint takes as they are (chat, completions, responses)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: keep the matched stop string
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM's structured output (api.structured_output).
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    # vLLM's, not implemented: declared only so that a request setting it is refused (api.sampling)
    # instead of answered as if it had been applied.
    prompt_logprobs: Any = None
    guided_whitespace_pattern: Any = None


class SamplingFields(SharedSamplingFields):
    """The sampling fields shared by chat and text completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    response_format: ResponseFormat | None = None
    functions: list[Any] | None = None  # the legacy function-calling fields: refused, see serving_chat
    function_call: Any = None
    chat_template: Any = None  # vLLM's per-request template: refused (api.sampling)
    echo: Any = None  # vLLM's chat echo: refused (api.sampling)
    modalities: Any = None  # OpenAI's audio output and web search: refused unless text only (serving_chat)
    audio: Any = None
    web_search_options: Any = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(union_mode="left_to_right")
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = None
    response_format: ResponseFormat | None = None


class TokenizeRequest(StrictScalars):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(StrictScalars):
    model: str | None = None
    tokens: list[int]


# JSON nested deeper than this is refused: no tool schema needs it, and rendering it (the chat template's
# tojson) would recurse past Python's limit.
MAX_JSON_DEPTH = 64


# A value's place: (its parent's link, its name there: a field or key, or an int for a list index); None at the top.
_Link = tuple[Any, str | int] | None


def bad_text_path(value: Any, numbers: bool = True) -> tuple[str, str] | None:
    """(param path such as "messages[0].content", what is wrong) for the first string holding a lone
    UTF-16 surrogate (JSON allows "\\ud800"; no tokenizer or UTF-8 response can carry it), the first
    value nested deeper than MAX_JSON_DEPTH, or the first NaN or infinite number (Python's JSON reader
    takes NaN, Infinity and 1e999; no answer echoing them could be written as JSON) unless `numbers` is
    False; None when the request is clean. Iterative: any depth is safe.

    It runs on the event loop for every request, so each value carries only a link to its parent and
    its name there, clean scalars get no entry at all, and the path is spelled out only for the value found
    (a 100k-message request on a 2-core CPU: 0.86 s -> 0.35 s)."""
    stack: list[tuple[Any, _Link, int]] = [(value, None, 0)]
    while stack:
        item, link, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _has_lone_surrogate(item):
                return _spell_path(link), "surrogate"
            continue
        if isinstance(item, float):
            if numbers and not math.isfinite(item):
                return _spell_path(link), "number"
            continue
        if depth > MAX_JSON_DEPTH:
            return _spell_path(link), "depth"
        if isinstance(item, BaseModel):
            # A model's __dict__ holds its fields, in their order (getattr per field costs twice as much).
            children: list[tuple[Any, str | int]] = [(v, name) for name, v in vars(item).items()]
            children += [(v, str(k)) for k, v in (item.model_extra or {}).items()]  # echoed too (Responses' text)
        elif isinstance(item, dict):
            children = [(child, str(key)) for key, v in item.items() for child in (key, v)]
        elif isinstance(item, list | tuple):
            children = list(zip(item, range(len(item)), strict=True))
        else:
            continue
        for child, name in reversed(children):  # first child on top: the first problem is found first
            if child is None or isinstance(child, int) or (isinstance(child, str) and child.isascii()):
                continue  # clean whatever it is (most fields): not worth a stack entry
            stack.append((child, (link, name), depth + 1))
    return None


def _spell_path(link: _Link) -> str:
    """"messages[0].content" for the chain of names that `link` ends."""
    names: list[str | int] = []
    while link is not None:
        link, name = link
        names.append(name)
    path = ""
    for name in reversed(names):
        if isinstance(name, int):
            path += f"[{name}]"
        else:
            # The path is echoed in the error: a key holding the surrogate itself is written escaped.
            name = name.encode("utf-8", "backslashreplace").decode("utf-8")
            path = f"{path}.{name}" if path else name
    return path


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
