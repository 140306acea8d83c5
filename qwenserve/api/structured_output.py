"""Request fields that constrain the output's form -> the engine's Guide.

OpenAI's `response_format` (chat, completions) and the Responses API's `text.format`; vLLM's
`structured_outputs` and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`.
At most one may be given. Shapes are checked here; whether a schema, regex or grammar compiles is
the engine's check (engine.guided).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qwenserve.api.errors import bad_request
from qwenserve.api.protocol import bad_text_path
from qwenserve.engine.guided import Guide
from qwenserve.tool_parser.schema import is_writable_name

# vLLM's structured_outputs keys -> the Guide kind each asks for.
_STRUCTURED_OUTPUT_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
# vLLM's structured_outputs options that change nothing here: JSON is always compact, properties the
# schema does not list are never written, and there is one backend, with nothing to fall back to.
_VLLM_NO_OP_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "disable_fallback")
_GUIDED_FIELDS = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def response_format_guide(fmt: dict[str, Any] | None, param: str = "response_format") -> Guide | None:
    """OpenAI's response_format: {"type": "text" | "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}."""
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return Guide("json_object", param=param)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request(
            "'response_format' of type 'json_schema' needs a 'json_schema' object holding the 'name' and 'schema'.",
            param=f"{param}.json_schema",
        )
    _check_schema_fields(spec, f"{param}.json_schema")
    return _schema_guide(spec.get("schema"), f"{param}.json_schema.schema")


def responses_format_guide(fmt: dict[str, Any] | None) -> Guide | None:
    """The Responses API's text.format: as response_format, but a json_schema's fields sit beside
    "type": {"type": "json_schema", "name", "schema", "strict"}."""
    if fmt is None or fmt.get("type") != "json_schema":
        return response_format_guide(fmt, "text.format")
    _check_schema_fields(fmt, "text.format")
    if fmt.get("schema") is None:
        # The chat form ({"json_schema": {...}}) sent here would otherwise lose its schema silently.
        raise bad_request("'text.format' of type 'json_schema' needs a 'schema'.", param="text.format.schema")
    return _schema_guide(fmt["schema"], "text.format.schema")


def _check_schema_fields(spec: dict[str, Any], param: str) -> None:
    """OpenAI's json_schema fields: a string `name` (required, as OpenAI and vLLM have it), `strict` a boolean."""
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise bad_request(f"'{param}.name' is required: a name for the schema.", param=f"{param}.name")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request(f"'{param}.strict' must be a boolean.", param=f"{param}.strict")


def _schema_guide(schema: Any, param: str) -> Guide:
    """A JSON-schema guide; no schema means any JSON object."""
    if schema is None:
        return Guide("json_object", param=param)
    if isinstance(schema, str):  # vLLM's guided_json takes the schema as JSON text too
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as err:
            raise bad_request(
                f"'{param}' must be a JSON schema object, or a string holding one; this string is not JSON ({err}).",
                param=param,
            ) from err
    if not isinstance(schema, dict):
        raise bad_request(f"'{param}' must be a JSON schema object, got {type(schema).__name__}.", param=param)
    if (bad := bad_text_path(schema)) is not None:  # a schema given as a string skipped the request's check
        what = {"depth": "is nested too deeply", "number": "holds NaN or an infinite number"}.get(
            bad[1], "holds a lone UTF-16 surrogate"
        )
        raise bad_request(f"'{param}' {what} (at {bad[0] or 'its top'}).", param=param)
    if (found := empty_combinator(schema)) is not None:
        path, keyword = found
        raise bad_request(
            f"'{param}' has an empty '{keyword}'{f' (at {path})' if path else ''}: nothing can match it (JSON "
            "Schema requires at least one entry).",
            param=param,
        )
    if (found := unenforced_keyword(schema)) is not None:
        path, keyword = found
        raise bad_request(
            f"'{param}' uses '{keyword}'{f' (at {path})' if path else ''}, which structured output cannot enforce "
            "here: the answer could break it. Remove it, or check that part of the answer yourself.",
            param=param,
            code="unsupported_parameter",
        )
    return Guide("json_schema", json.dumps(schema), param=param)


# JSON-schema keywords xgrammar (0.2) compiles as if absent, and what holds subschemas. A schema using one
# is refused rather than answered with JSON that may break it.
_UNENFORCED = ("not", "if", "then", "else", "contains", "minContains", "maxContains", "patternProperties",
               "propertyNames", "dependentSchemas", "dependentRequired", "dependencies")  # fmt: skip
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# What may not stand beside a "$ref": xgrammar compiles such a node as the reference alone, so a constraint
# there would be dropped. Annotations (description, title, default, x-... extensions) may.
_CONSTRAINTS = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
    "maxLength", "pattern", "format", "anyOf", "oneOf", "allOf", "minProperties", "maxProperties", "nullable",
    "unevaluatedItems", "unevaluatedProperties", *_UNENFORCED, "uniqueItems",
})  # fmt: skip
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_VALUES = ("items", "additionalProperties", "unevaluatedItems", "unevaluatedProperties")


def unenforced_keyword(schema: dict[str, Any]) -> tuple[str, str] | None:
    """(where, keyword) of the first constraint in `schema` that the grammar would not enforce (an empty
    anyOf / oneOf / allOf among them), or None."""
    return _find(schema, lambda node: _empty_combinator(node) or _unenforced_in(node))


def empty_combinator(schema: dict[str, Any]) -> tuple[str, str] | None:
    """(where, keyword) of the first anyOf / oneOf / allOf in `schema` given as an empty list, or None:
    JSON Schema forbids one, and xgrammar reads it as the empty text (an answer such as `[,`)."""
    return _find(schema, _empty_combinator)


def _find(schema: dict[str, Any], test: Callable[[dict[str, Any]], str | None]) -> tuple[str, str] | None:
    """(where, what) for the first subschema on which `test` names something. Iterative: any depth is safe."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        if (found := test(node)) is not None:
            return path, found
        stack.extend(_subschemas(node, path))
    return None


def _empty_combinator(node: dict[str, Any]) -> str | None:
    return next((key for key in ("anyOf", "oneOf", "allOf") if node.get(key) == []), None)


def _unenforced_in(node: dict[str, Any]) -> str | None:
    for keyword in _UNENFORCED:
        if keyword in node:
            return keyword
    if node.get("uniqueItems") is True:
        return "uniqueItems"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return "allOf"  # one entry is compiled as itself; an intersection is not
    if "multipleOf" in node and (node.get("type") != "integer" or any(k in node for k in _BOUNDS)):
        return "multipleOf"  # enforced only on an integer without bounds
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        return "minLength" if "minLength" in node else "maxLength"  # lengths are dropped beside these
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        return "$ref"  # only references inside the schema resolve; nothing is fetched
    if ref is not None and (sibling := next((key for key in node if key in _CONSTRAINTS), None)):
        return f"{sibling}' beside '$ref"
    return None


def _subschemas(node: dict[str, Any], path: str) -> list[tuple[Any, str]]:
    children = []
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            children += [(sub, f"{path}.{key}.{name}".lstrip(".")) for name, sub in node[key].items()]
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            children += [(sub, f"{path}.{key}[{i}]".lstrip(".")) for i, sub in enumerate(node[key])]
    for key in _SCHEMA_VALUES:
        if isinstance(node.get(key), dict):
            children.append((node[key], f"{path}.{key}".lstrip(".")))
    return children


def _vllm_guide(req: Any) -> Guide | None:
    """vLLM's guided_* fields and structured_outputs (already known to hold at most one spec)."""
    for name, kind in _GUIDED_FIELDS.items():
        if getattr(req, name) is not None:
            return _spec_guide(kind, getattr(req, name), name)
    so = req.structured_outputs
    if so is None:
        return None
    if not isinstance(so, dict):
        raise bad_request("'structured_outputs' must be an object such as {\"json\": {...}}.", param="structured_outputs")
    given = [k for k, v in so.items() if k in (*_STRUCTURED_OUTPUT_KINDS, "json_object") and v not in (None, False)]
    unknown = [k for k, v in so.items()
               if k not in (*_STRUCTURED_OUTPUT_KINDS, "json_object", *_VLLM_NO_OP_OPTIONS) and v not in (None, False)]
    if unknown:
        raise bad_request(
            f"'structured_outputs.{unknown[0]}' is not supported by this server (json, json_object, regex, choice "
            "and grammar are).",
            param=f"structured_outputs.{unknown[0]}",
            code="unsupported_parameter",
        )
    if len(given) != 1:
        raise bad_request(
            "'structured_outputs' must hold exactly one of json, json_object, regex, choice, grammar.",
            param="structured_outputs",
        )
    key = given[0]
    if key == "json_object":
        return Guide("json_object", param="structured_outputs.json_object")
    return _spec_guide(_STRUCTURED_OUTPUT_KINDS[key], so[key], f"structured_outputs.{key}")


# The markup of a Qwen3-Coder call: a value holding any of it would be read back differently by the
# tool parser than the grammar wrote it (the value would end early, or a call appear inside it).
CALL_MARKUP = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>"]
CALL_CLOSING = "\n</function>\n</tool_call>"


def call_opening(name: str) -> str:
    """How a Qwen3-Coder call of `name` opens: the grammar's tag and the prompt's forced prefix write it so."""
    return f"<tool_call>\n<function={name}>\n"


def forced_call_markup(tools: list[dict[str, Any]], names: tuple[str, ...]) -> list[str]:
    """The fixed text a forced call of one of `names` writes: its opening, its declared parameters' tags, the
    closings (with the newlines around them) and the newline between calls; a value is free text."""
    markup = [*CALL_MARKUP, "\n", "\n</parameter>\n" + CALL_CLOSING]
    for tool in tools:
        fn = tool["function"]
        if fn["name"] not in names:
            continue
        markup.append(call_opening(fn["name"]))
        schema = fn.get("parameters")
        props = schema.get("properties") if isinstance(schema, dict) else None
        markup += [f"<parameter={name}>\n" for name in (props if isinstance(props, dict) else ())]
    return markup


def forced_call_guide(
    tools: list[dict[str, Any]], names: tuple[str, ...], one_call: bool, loose: bool = False
) -> Guide | None:
    """A grammar for an answer that is nothing but calls of `names` in Qwen3-Coder's XML (tool_choice
    required / named), each call's parameters valid against its tool's schema (string lengths and
    patterns aside, see _call_schema); a tool whose schema the grammar would not enforce (keywords it
    drops, no object at the top) may be called with its declared parameters holding any values. None
    when a name the parser could not read back is among them (the call is then forced by its prompt
    prefix alone). `loose`: every tool so, for schemas xgrammar cannot compile at all."""
    tags = _call_tags(tools, names, loose)
    if tags is None:
        return None
    spec = {"type": "structural_tag", "format": {
        "type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
        "stop_after_first": one_call,
    }}  # fmt: skip
    return Guide("structural_tag", json.dumps(spec), param="tools")


def allowed_calls_guide(
    tools: list[dict[str, Any]], names: tuple[str, ...], one_call: bool, loose: bool = False
) -> Guide | None:
    """tool_choice allowed_tools in `auto` mode: text as the model likes, but a call it opens can only be
    one of `names`, with parameters held as forced_call_guide holds them (None where that cannot be built:
    the calls of other tools are then dropped after the fact)."""
    tags = _call_tags(tools, names, loose)
    if tags is None:
        return None
    spec = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags, "at_least_one": False,
        "stop_after_first": one_call,
    }}  # fmt: skip
    return Guide("structural_tag", json.dumps(spec), param="tool_choice")


def calls_or_reply_guide(
    tools: list[dict[str, Any]], names: tuple[str, ...], one_call: bool, reply: Guide, loose: bool = False
) -> Guide | None:
    """tool_choice `auto` beside response_format / text.format, which OpenAI applies to a text reply only:
    the answer is either calls of `names` (held as forced_call_guide holds them) or a reply in the format.
    None where the calls' grammar cannot be built."""
    tags = _call_tags(tools, names, loose)
    if tags is None:
        return None
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
             "stop_after_first": one_call}  # fmt: skip
    spec = {"calls": calls, "reply": {"kind": reply.kind, "value": reply.value}}
    return Guide("calls_or_reply", json.dumps(spec), param=reply.param)


def is_reply_format(guide: Guide) -> bool:
    """Whether a guide is OpenAI's response_format / text.format JSON, which shapes a text reply only (a
    tool call keeps its tool's schema); vLLM's guided fields shape the whole answer."""
    return guide.kind in ("json_object", "json_schema") and guide.param.startswith(("response_format", "text.format"))


def _call_tags(tools: list[dict[str, Any]], names: tuple[str, ...], loose: bool) -> list[dict[str, Any]] | None:
    """One structural tag per callable tool: its call's opening, its parameters, its closing."""
    tags = []
    for tool in tools:
        fn = tool["function"]
        if fn["name"] not in names:
            continue
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        if not _readable_names(fn["name"], schema):
            return None
        tags.append({
            "type": "tag", "begin": call_opening(fn["name"]),
            # One whitespace character around a value at most: the newline the format puts there; a model
            # free to add more may pad a value with it, which then reaches the parsed arguments.
            "content": {"type": "json_schema", "json_schema": _names_only(schema) if loose else _call_schema(schema),
                        "style": "qwen_xml",
                        "max_whitespace_cnt": 1,
                        "excludes": CALL_MARKUP},
            "end": CALL_CLOSING,
        })  # fmt: skip
    return tags


def _call_schema(schema: Any) -> dict[str, Any]:
    """The schema a forced call's parameters are held to. Only declared names may appear when there are
    any (the parser reads an undeclared `<parameter=` inside a value as text); a `pattern` is dropped,
    since a string held to one is exempt from keeping the call markup out (xgrammar ignores lengths beside
    that rule as well). A schema the grammar would not enforce keeps only its parameter names."""
    if not isinstance(schema, dict) or schema.get("type", "object") != "object" or unenforced_keyword(schema):
        return _names_only(schema)
    out = _without_patterns(schema)
    if isinstance(schema.get("properties"), dict) and schema["properties"]:
        out["additionalProperties"] = False
    return out


def _names_only(schema: Any) -> dict[str, Any]:
    """The declared (and required) parameter names of a schema, holding any values; any parameters when
    it declares none (the parser takes any name then)."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    names = [name for name in props if isinstance(name, str)] if isinstance(props, dict) else []
    if not names:
        return {"type": "object", "additionalProperties": True}
    required = schema.get("required")
    required = [r for r in required if r in names] if isinstance(required, list) else []
    return {"type": "object", "properties": {name: {} for name in names}, "required": required,
            "additionalProperties": False}  # fmt: skip


def _without_patterns(node: Any) -> Any:
    """A copy of a schema with no `pattern` in any of its (sub)schemas."""
    if not isinstance(node, dict):
        return node
    out = {key: value for key, value in node.items() if key != "pattern"}
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {name: _without_patterns(sub) for name, sub in node[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_without_patterns(sub) for sub in node[key]]
    for key in _SCHEMA_VALUES:
        if isinstance(node.get(key), dict):
            out[key] = _without_patterns(node[key])
    return out


def _readable_names(function: str, schema: Any) -> bool:
    """Whether the tool parser reads back the function's name and its parameters' names as written."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    params = list(props) if isinstance(props, dict) else []
    return all(is_writable_name(name) for name in [function, *params])


def _spec_guide(kind: str, value: Any, param: str) -> Guide:
    if kind == "json_schema":
        return _schema_guide(value, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request(f"'{param}' must be a non-empty list of non-empty strings.", param=param)
        return Guide("choice", json.dumps(value), param=param)
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{param}' must be a non-empty string.", param=param)
    return Guide(kind, value, param=param)  # type: ignore[arg-type]


def request_guide(req: Any, text_format: Guide | None = None) -> Guide | None:
    """The one guide a request (its sampling fields, api.protocol.SharedSamplingFields) asks for: its
    response_format's (or the Responses API's text.format, given as `text_format`), or vLLM's; a 400
    when it asks for two."""
    fmt = getattr(req, "response_format", None)
    response_format = text_format if text_format is not None else response_format_guide(fmt.model_dump()) if fmt else None
    vllm = [name for name in (*_GUIDED_FIELDS, "structured_outputs") if getattr(req, name) is not None]
    if len(vllm) + (response_format is not None) > 1:
        names = vllm
        if response_format is not None:
            names = ["text.format" if response_format.param.startswith("text") else "response_format", *vllm]
        raise bad_request(f"Only one structured-output field may be set; got {', '.join(names)}.", param=names[1])
    return response_format if response_format is not None else _vllm_guide(req)
