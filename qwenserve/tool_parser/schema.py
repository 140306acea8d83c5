"""Schema-driven typing of tool-call parameter values.

Qwen3-Coder writes every parameter value as raw text; the only source of truth
for its JSON type is the tool's JSON schema from the request. Strings must
never be JSON-decoded (a ``package.json`` written through ``write_file`` has
to stay a string), while integers, numbers, booleans, objects and arrays are
decoded leniently. Nothing in this module raises on odd schemas or values.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_NUMBER_PREFIXES = ("num", "float", "double", "decimal", "real")
_BOOL_TYPES = frozenset({"boolean", "bool", "binary"})
_CONTAINER_PREFIXES = ("object", "array", "arr", "dict", "list", "tuple", "map")
_NULL_WORDS = frozenset({"null", "none"})
_TRUE_WORDS = frozenset({"true", "1", "yes"})
_PHANTOM_CHARS = frozenset("{}<>\"'")
NOT_DECODED = object()  # decode_literal's answer when text is neither JSON nor a Python literal


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can be a real function/parameter name.

    Unrendered Jinja such as ``{{ tc.name }}`` (a "phantom" call the model
    copied from a template) contains braces or whitespace and is rejected.
    """
    return bool(name) and not any(c in _PHANTOM_CHARS or c.isspace() for c in name)


# The longest name the XML parser waits for before it takes ``<function=`` for a slip.
MAX_NAME_CHARS = 255


def is_writable_name(name: str) -> bool:
    """Whether a declared function/parameter ``name`` reads back as written from ``<function=NAME>``:
    the name ends at the first ``>`` (``<`` or a line break end it as a slip) and is stripped."""
    return 0 < len(name) <= MAX_NAME_CHARS and name == name.strip() and not any(c in "<>\n" for c in name)


@dataclass(frozen=True)
class ParamType:
    """The resolved type of one parameter.

    ``name`` is the lower-cased primary (first non-null) JSON-schema type, or
    None for a parameter the schema does not describe (kept as raw text).
    """

    name: str | None
    nullable: bool = False
    choices: tuple[str, ...] = ()  # a string enum's (or const's) values

    @property
    def is_raw_string(self) -> bool:
        """True when any value text is returned unchanged (so it may be streamed as it arrives)."""
        return self.name is None or (self.name in _STRING_TYPES and not self.nullable and not self.choices)

    @property
    def holds_markup(self) -> bool:
        """Whether a value may hold tool-call tags as text: a string may (a file written through
        ``write_file``), a number, boolean, object or array may not (no JSON or literal of theirs spans
        ``</parameter>`` + newline + ``<parameter=``)."""
        return self.name is None or self.name in _STRING_TYPES


RAW = ParamType(None)


# Schema fragments one parameter's type may visit: refs and unions can nest (or loop) without bound,
# and this runs for every tool of every request.
_MAX_VISITS = 256


def _resolve(schema: Any, root: Any = None, budget: list[int] | None = None, refs: frozenset[str] = frozenset()
             ) -> tuple[str | None, bool]:  # fmt: skip
    """(primary type or None, nullable) of a schema fragment; `root` is the tool's parameters schema,
    which local `$ref`s ("#/$defs/point") point into (a ref already being resolved counts as untyped).
    A union of several non-string types (anyOf boolean / integer, type [number, boolean]) is "any":
    the value's own JSON type decides."""
    budget = [_MAX_VISITS] if budget is None else budget
    budget[0] -= 1
    if not isinstance(schema, Mapping) or budget[0] < 0:
        return None, False
    nullable = schema.get("nullable") is True or schema.get("type") == "null"
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        if ref in refs:
            return None, nullable
        primary, ref_nullable = _resolve(_pointer(root, ref), root, budget, refs | {ref})
        return primary, nullable or ref_nullable
    declared = schema.get("type")
    names = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
    types: list[str] = []
    for raw_name in names:
        if not isinstance(raw_name, str):
            continue
        lowered = raw_name.strip().lower()
        if lowered == "null":
            nullable = True
        else:
            types.append(lowered)
    for key in ("anyOf", "oneOf", "allOf"):
        subs = schema.get(key)
        if not isinstance(subs, list):
            continue
        for sub in subs:
            sub_type, sub_nullable = _resolve(sub, root, budget, refs)
            nullable = nullable or sub_nullable
            if sub_type is not None and (key != "allOf" or not types):
                types.append(sub_type)
    distinct = list(dict.fromkeys(types))
    if not distinct:
        primary = _infer_untyped(schema)
        if isinstance(schema.get("enum"), list) and None in schema["enum"]:
            nullable = True
    elif len(distinct) == 1 or any(t in _STRING_TYPES for t in distinct):
        primary = distinct[0]  # with a string among them, text that looks like a number may be one
    else:
        primary = "any"
    return primary, nullable


def _pointer(root: Any, ref: str) -> Any:
    """The fragment of `root` a local JSON pointer ("#/$defs/point") names, or None."""
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) else None


def _infer_untyped(schema: Mapping[str, Any]) -> str | None:
    """Guess a type for a schema without ``type`` (enum values, properties, items)."""
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        values = [v for v in enum if v is not None]
        # Non-string enums ([1, 2, 3]) need decoding; "any" tries JSON first.
        return "string" if all(isinstance(v, str) for v in values) else "any"
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return None


def resolve_type(schema: Any, root: Any = None) -> ParamType:
    """Resolve a property's JSON schema to a :class:`ParamType`.

    Handles ``type`` strings and lists, ``anyOf``/``oneOf``/``allOf`` (first
    non-null type wins), ``nullable: true`` and type-less enums. A described
    parameter whose type cannot be determined is treated as a string, which
    is the safe choice for raw text.
    """
    primary, nullable = _resolve(schema, root)
    primary = primary or "string"
    return ParamType(primary, nullable, _string_choices(schema, root) if primary in _STRING_TYPES else ())


def _string_choices(schema: Any, root: Any) -> tuple[str, ...]:
    """The values of a string enum or const (through one local $ref), else ()."""
    if isinstance(schema, Mapping) and isinstance(ref := schema.get("$ref"), str) and ref.startswith("#/"):
        schema = _pointer(root, ref)
    if not isinstance(schema, Mapping):
        return ()
    values = schema.get("enum") if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
    values = [v for v in values if v is not None]
    return tuple(values) if values and all(isinstance(v, str) for v in values) else ()


def _function_spec(tool: Any) -> Mapping[str, Any] | None:
    """The ``function`` object of a Chat Completions tool (or a flat Responses-API tool)."""
    if hasattr(tool, "model_dump"):
        tool = tool.model_dump()
    if not isinstance(tool, Mapping):
        return None
    inner = tool.get("function")
    return inner if isinstance(inner, Mapping) else tool


def _properties(parameters: Any) -> dict[str, ParamType] | None:
    """Typed properties of a ``parameters`` schema; None when there are none to check against."""
    if not isinstance(parameters, Mapping):
        return None
    props = parameters.get("properties")
    if not isinstance(props, Mapping) or not props:
        return None
    return {name: resolve_type(spec, parameters) for name, spec in props.items() if isinstance(name, str)}


class ToolSchemas:
    """Per-request index of tool names to typed parameters."""

    def __init__(self, tools: Iterable[Any] | None) -> None:
        """Index ``tools`` (OpenAI tool dicts); malformed entries are ignored."""
        self._tools: dict[str, dict[str, ParamType] | None] = {}
        for tool in tools or ():
            spec = _function_spec(tool)
            name = spec.get("name") if spec is not None else None
            if isinstance(name, str) and spec is not None:
                self._tools[name] = _properties(spec.get("parameters"))

    def param_type(self, tool: str, param: str) -> ParamType:
        """Type of ``param`` of ``tool``; :data:`RAW` for anything the schemas do not describe."""
        props = self._tools.get(tool)
        if props is None:
            return RAW
        return props.get(param, RAW)

    def is_function(self, name: str) -> bool:
        """Whether ``name`` read from ``<function=NAME>`` opens a call: a declared name, whatever it
        holds (``my tool``), or any name that can be one (a call of an undeclared function is still one)."""
        return name in self._tools or is_valid_name(name)

    def is_param(self, tool: str, param: str) -> bool:
        """Whether ``param`` may structurally be a parameter of ``tool``.

        With declared properties only those names count, so literal
        ``<parameter=other>`` text inside a value stays text; without them
        (unknown tool, no ``properties``) any valid name counts.
        """
        props = self._tools.get(tool)
        return param in props if props else is_valid_name(param)


def decode_literal(text: str) -> Any:
    """JSON, then Python-literal decoding of ``text``; :data:`NOT_DECODED` if neither works.

    JSON strings may hold raw line breaks and tabs (``strict=False``): a model writing a file into an
    argument often puts a real line break where ``\\n`` belongs, and what it meant is plain.
    """
    try:
        return json.loads(text, strict=False)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return NOT_DECODED


def _jsonable(value: Any) -> bool:
    """Whether ``value`` serialises to strict JSON (no NaN, sets, bytes...)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _to_number(word: str, raw: str) -> Any:
    """An int or finite float (an integral float as int), else the raw text."""
    try:
        return int(word)
    except ValueError:
        pass
    try:
        number = float(word)
    except ValueError:
        return raw
    if not math.isfinite(number):
        return raw
    return int(number) if number.is_integer() else number


def _to_int(word: str, raw: str) -> Any:
    """An int (from an integral float too), else the raw text."""
    number = _to_number(word, raw)
    return number if isinstance(number, int) else raw


def _to_container(word: str, raw: str) -> Any:
    value = decode_literal(word)
    if value is NOT_DECODED:
        return raw
    if isinstance(value, str):
        # A model trained on json.dumps(str(obj)) writes "{'k': 'v'}" in quotes.
        inner = decode_literal(value.strip())
        if isinstance(inner, dict | list):
            value = inner
    return value if _jsonable(value) else raw


def _to_any(word: str, raw: str) -> Any:
    value = decode_literal(word)
    return value if value is not NOT_DECODED and _jsonable(value) else raw


def convert_value(raw: str, ptype: ParamType) -> Any:
    """Convert one parameter's raw text to its JSON value according to ``ptype``.

    Never raises: anything that does not parse as the declared type is
    returned as the raw string, except a boolean, which is true only for the
    words in ``_TRUE_WORDS`` and false for any other (as vLLM reads it).
    """
    kind = ptype.name
    if kind is None:
        return raw
    word = raw.strip()
    if ptype.nullable and word.lower() in _NULL_WORDS:
        return None
    if kind in _STRING_TYPES:
        # A space or tab the writer put around one of an enum's values is not part of it.
        return word if ptype.choices and raw not in ptype.choices and word in ptype.choices else raw
    if word.lower() in _NULL_WORDS:
        return None
    if kind in _BOOL_TYPES:
        return word.lower() in _TRUE_WORDS
    if kind.startswith(_INT_PREFIXES):
        return _to_int(word, raw)
    if kind.startswith(_NUMBER_PREFIXES):
        return _to_number(word, raw)
    if kind.startswith(_CONTAINER_PREFIXES):
        return _to_container(word, raw)
    return _to_any(word, raw)
