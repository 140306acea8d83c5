"""Request fields that constrain the output's form -> the engine's Guide.

OpenAI's `response_format` (chat, completions) and the Responses API's `text.format`; vLLM's
`structured_outputs` and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`.
At most one may be given. Shapes are checked here; whether a schema, regex or grammar compiles is
the engine's check (engine.guided).
"""

from __future__ import annotations

import json
from typing import Any

from qwenserve.api.errors import bad_request
from qwenserve.engine.guided import Guide

# vLLM's structured_outputs keys -> the Guide kind each asks for.
_STRUCTURED_OUTPUT_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
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
            "'response_format' of type 'json_schema' needs a 'json_schema' object holding the 'schema'.",
            param=f"{param}.json_schema",
        )
    return _schema_guide(spec.get("schema"), f"{param}.json_schema.schema")


def responses_format_guide(fmt: dict[str, Any] | None) -> Guide | None:
    """The Responses API's text.format: as response_format, but a json_schema's fields sit beside
    "type": {"type": "json_schema", "name", "schema", "strict"}."""
    if fmt is None or fmt.get("type") != "json_schema":
        return response_format_guide(fmt, "text.format")
    return _schema_guide(fmt.get("schema"), "text.format.schema")


def _schema_guide(schema: Any, param: str) -> Guide:
    """A JSON-schema guide; no schema means any JSON object."""
    if schema is None:
        return Guide("json_object", param=param)
    if isinstance(schema, str):  # vLLM's guided_json takes the schema as JSON text too
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise bad_request(f"'{param}' is not valid JSON: {err}", param=param) from err
    if not isinstance(schema, dict):
        raise bad_request(f"'{param}' must be a JSON schema object, got {type(schema).__name__}.", param=param)
    return Guide("json_schema", json.dumps(schema), param=param)


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
    unknown = [k for k, v in so.items() if k not in (*_STRUCTURED_OUTPUT_KINDS, "json_object") and v is not None]
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


def request_guide(req: Any, response_format: Guide | None) -> Guide | None:
    """The one guide a request (its sampling fields, api.protocol.SharedSamplingFields) asks for: the
    one its response_format (or text.format) gave, or vLLM's; a 400 when it asks for two."""
    vllm = [name for name in (*_GUIDED_FIELDS, "structured_outputs") if getattr(req, name) is not None]
    if len(vllm) + (response_format is not None) > 1:
        names = ([response_format.param.split(".")[0]] if response_format is not None else []) + vllm
        raise bad_request(f"Only one structured-output field may be set; got {', '.join(names)}.", param=names[1])
    return response_format if response_format is not None else _vllm_guide(req)
