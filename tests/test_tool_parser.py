"""Tests for the Qwen3-Coder XML tool-call parser (schema typing, robustness, streaming)."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from qwenserve.tool_parser import (
    Qwen3CoderToolParser,
    Qwen3JsonToolParser,
    ToolSchemas,
    convert_value,
    get_tool_parser_class,
    resolve_type,
)


def _tool(name: str, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"type": "object"}
    if properties is not None:
        params["properties"] = properties
    return {"type": "function", "function": {"name": name, "description": name, "parameters": params}}


WEATHER = _tool(
    "get_current_weather",
    {
        "city": {"type": "string"},
        "state": {"type": "string"},
        "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]},
    },
)
AREA = _tool(
    "calculate_area",
    {"shape": {"type": "string"}, "dimensions": {"type": "object"}, "precision": {"type": "integer"}},
)
TOOLS = [WEATHER, AREA]
WRITE_FILE = [_tool("write_file", {"path": {"type": "string"}, "content": {"type": "string"}})]
GET_WEATHER = [_tool("get_weather", {"city": {"type": "string"}})]
TYPES = [
    _tool(
        "test_types",
        {
            "int_param": {"type": "integer"},
            "float_param": {"type": "float"},
            "num_param": {"type": "number"},
            "bool_param": {"type": "boolean"},
            "str_param": {"type": "string"},
            "obj_param": {"type": "object"},
            "arr_param": {"type": "array"},
        },
    )
]
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def xml_call(name: str, **params: str) -> str:
    """Render one call the way the chat template does."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def args_of(calls: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def reconstruct(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Fold deltas like a strict client, asserting the OpenAI streaming invariants."""
    content = ""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        assert "role" not in delta
        assert delta.get("content") or delta.get("tool_calls"), delta
        if delta.get("content"):
            assert isinstance(delta["content"], str)
            content += delta["content"]
        entries = delta.get("tool_calls") or []
        assert len(entries) <= 1
        for tc in entries:
            idx = tc["index"]
            fn = tc["function"]
            if idx == len(calls):
                assert CALL_ID.match(tc["id"])
                assert tc["type"] == "function"
                assert fn["name"] and fn["arguments"] == ""
                calls.append(
                    {"id": tc["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
                )
            else:
                assert idx == len(calls) - 1, "arguments must target the newest call"
                assert "id" not in tc and "type" not in tc and "name" not in fn
                calls[idx]["function"]["arguments"] += fn["arguments"]
    ids = [c["id"] for c in calls]
    assert len(set(ids)) == len(ids)
    return content, calls


def run_stream(parser: Any, chunks: list[str]) -> tuple[str, list[dict[str, Any]]]:
    deltas: list[dict[str, Any]] = []
    for chunk in chunks:
        deltas += parser.feed(chunk)
    deltas += parser.finish()
    return reconstruct(deltas)


def random_chunks(text: str, rng: random.Random, max_len: int = 12) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(1, max_len)
        chunks.append(text[i : i + n])
        i += n
    return chunks


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    lines = text.splitlines(keepends=True)
    result = [[text], list(text), lines]
    result += [random_chunks(text, rng, size) for size in (2, 3, 5, 8, 20, 64) for _ in range(3)]
    return result


def assert_stream_matches(parser_cls: type, tools: Any, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Every chunking must give exactly the non-streaming content and arguments."""
    content, calls = parser_cls(tools).parse(text)
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    for chunks in chunkings(text):
        s_content, s_calls = run_stream(parser_cls(tools), chunks)
        assert (s_content or None) == content, chunks
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in s_calls] == expected, chunks
    return content, calls


def parse_both(tools: Any, text: str) -> tuple[str | None, list[tuple[str, Any]]]:
    content, calls = assert_stream_matches(Qwen3CoderToolParser, tools, text)
    for call in calls:
        assert CALL_ID.match(call["id"]) and call["type"] == "function"
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    return content, args_of(calls)


# ---------------------------------------------------------------------------- API surface


def test_public_api_and_class_selection() -> None:
    assert get_tool_parser_class("... <function=example_function_name> ...") is Qwen3CoderToolParser
    assert get_tool_parser_class('{"name": <function-name>, "arguments": <args-json-object>}') is (
        Qwen3JsonToolParser
    )
    assert get_tool_parser_class(None) is Qwen3JsonToolParser
    parser = Qwen3CoderToolParser(None)
    assert parser.tool_calls_emitted == 0
    parser.feed(xml_call("anything", x="1"))
    parser.finish()
    assert parser.tool_calls_emitted == 1
    assert args_of(parser.tool_calls) == [("anything", {"x": "1"})]
    assert parser.feed("more") == [] and parser.finish() == []


@pytest.mark.parametrize("params", [None, {}, {"type": "object"}, {"type": "object", "properties": {}}])
def test_tools_without_parameters(params: Any) -> None:
    tool: dict[str, Any] = {"type": "function", "function": {"name": "list_files"}}
    if params is not None:
        tool["function"]["parameters"] = params
    text = "<tool_call>\n<function=list_files>\n</function>\n</tool_call>"
    assert parse_both([tool], text) == (None, [("list_files", {})])
    text2 = xml_call("list_files", dir="src", depth="2")
    assert parse_both([tool], text2) == (None, [("list_files", {"dir": "src", "depth": "2"})])


def test_no_tool_call_keeps_content_verbatim() -> None:
    text = "This is a test response without any tool calls"
    assert Qwen3CoderToolParser(TOOLS).parse(text) == (text, [])
    assert parse_both(TOOLS, text) == (text, [])
    assert Qwen3CoderToolParser(TOOLS).parse("") == (None, [])
    assert Qwen3CoderToolParser(TOOLS).parse("  \n ") == (None, [])
    lt_text = "if a < b and b <= c: print('<tool')"
    assert parse_both(TOOLS, lt_text) == (lt_text, [])


# ---------------------------------------------------------------------------- extraction

DALLAS = {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}
SINGLE = xml_call("get_current_weather", city="Dallas", state="TX", unit="fahrenheit")
EXTRACT_CASES = {
    "single_tool": (SINGLE, None, [("get_current_weather", DALLAS)]),
    "single_tool_with_content": (
        "Sure! Let me check the weather for you." + SINGLE,
        "Sure! Let me check the weather for you.",
        [("get_current_weather", DALLAS)],
    ),
    "single_tool_multiline_param": (
        xml_call(
            "calculate_area", shape="rectangle", dimensions='{"width": 10,\n "height": 20}', precision="2"
        ),
        None,
        [
            (
                "calculate_area",
                {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2},
            )
        ],
    ),
    "parallel_tools": (
        SINGLE + "\n" + xml_call("get_current_weather", city="Orlando", state="FL", unit="fahrenheit"),
        None,
        [
            ("get_current_weather", DALLAS),
            ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "fahrenheit"}),
        ],
    ),
    "tool_with_typed_params": (
        "Let me calculate that area for you."
        + xml_call("calculate_area", shape="circle", dimensions='{"radius": 15.5}', precision="3"),
        "Let me calculate that area for you.",
        [("calculate_area", {"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3})],
    ),
}


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extract_tool_calls(case: str) -> None:
    text, content, calls = EXTRACT_CASES[case]
    assert parse_both(TOOLS, text) == (content, calls)


def test_text_after_calls_is_content() -> None:
    text = "Checking.\n" + SINGLE + "\nAll done!"
    assert parse_both(TOOLS, text) == ("Checking.\n\nAll done!", [("get_current_weather", DALLAS)])
    # whitespace-only runs around and between calls are never content
    assert parse_both(TOOLS, "\n\n" + SINGLE + "\n\n" + SINGLE + "\n \n")[0] is None


def test_ids_are_unique_openai_style() -> None:
    _, calls = Qwen3CoderToolParser(TOOLS).parse(SINGLE + "\n" + SINGLE)
    assert len(calls) == 2 and all(CALL_ID.match(c["id"]) for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_missing_opening_tool_call_tag() -> None:
    text = "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n</function>"
    assert parse_both(TOOLS, text) == (None, [("get_current_weather", {"city": "Dallas", "state": "TX"})])
    assert parse_both(TOOLS, "I'll check.\n" + text + "\n</tool_call>") == (
        "I'll check.\n",
        [("get_current_weather", {"city": "Dallas", "state": "TX"})],
    )


def test_unknown_tool_and_unknown_param_are_raw_strings() -> None:
    text = xml_call("mystery", count="42", flag="true", obj='{"a": 1}')
    assert parse_both(TOOLS, text) == (
        None,
        [("mystery", {"count": "42", "flag": "true", "obj": '{"a": 1}'})],
    )
    text2 = xml_call("calculate_area", extra="7", precision="3")
    assert parse_both(TOOLS, text2) == (None, [("calculate_area", {"extra": "7", "precision": 3})])


def test_value_newline_stripping_keeps_inner_whitespace() -> None:
    code = "\n    def f():\n        return 1\n\n"
    text = f"<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n</parameter>\n<parameter=content>\n{code}\n</parameter>\n</function>\n</tool_call>"
    assert parse_both(WRITE_FILE, text) == (None, [("write_file", {"path": "a.py", "content": code})])
    inline = "<tool_call>\n<function=write_file>\n<parameter=path>a b </parameter>\n</function>\n</tool_call>"
    assert parse_both(WRITE_FILE, inline)[1] == [("write_file", {"path": "a b "})]


# ---------------------------------------------------------------------------- typing


def test_type_conversion() -> None:
    text = xml_call(
        "test_types",
        int_param="42",
        float_param="3.14",
        num_param="2.0",
        bool_param="true",
        str_param="hello world",
        obj_param='{"key": "value"}',
        arr_param='["a", "b", 1, true]',
    )
    _, calls = parse_both(TYPES, text)
    args = calls[0][1]
    assert args == {
        "int_param": 42,
        "float_param": 3.14,
        "num_param": 2,
        "bool_param": True,
        "str_param": "hello world",
        "obj_param": {"key": "value"},
        "arr_param": ["a", "b", 1, True],
    }
    assert isinstance(args["num_param"], int)


@pytest.mark.parametrize(
    ("param", "raw", "expected"),
    [
        ("bool_param", "False", False),
        ("bool_param", "TRUE", True),
        ("int_param", "not a number", "not a number"),
        ("int_param", "7.0", 7),
        ("float_param", "1e3", 1000),
        ("float_param", "nan", "nan"),
        ("obj_param", "{'key': 'value'}", {"key": "value"}),
        ("obj_param", "\"{'key': 'value', 'n': 1}\"", {"key": "value", "n": 1}),
        ("obj_param", "not json", "not json"),
        ("arr_param", "[1, 2, None]", [1, 2, None]),
        # A raw line break inside a JSON string (where \n belongs): what the model meant is plain.
        ("arr_param", '["first line\nsecond line", "b"]', ["first line\nsecond line", "b"]),
        ("obj_param", '{"body": "a\tb"}', {"body": "a\tb"}),
        ("int_param", "null", None),
        ("obj_param", "None", None),
        ("str_param", "null", "null"),
        ("str_param", "42", "42"),
        ("str_param", '{"a": 1}', '{"a": 1}'),
        ("str_param", "true", "true"),
    ],
)
def test_typed_values(param: str, raw: str, expected: Any) -> None:
    _, calls = parse_both(TYPES, xml_call("test_types", **{param: raw}))
    assert calls == [("test_types", {param: expected})]
    assert type(calls[0][1][param]) is type(expected)


def test_string_args_not_double_serialized() -> None:
    tools = [_tool("greet", {"message": {"type": "string"}})]
    text = (
        "<tool_call>\n<function=greet>\n<parameter=message>hello world</parameter>\n</function>\n</tool_call>"
    )
    _, calls = Qwen3CoderToolParser(tools).parse(text)
    assert json.loads(calls[0]["function"]["arguments"]) == {"message": "hello world"}
    assert '\\"hello world\\"' not in calls[0]["function"]["arguments"]


ANYOF = [
    _tool(
        "f",
        {
            "int_or_null": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "str_or_null": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "arr_or_null": {"anyOf": [{"type": "array"}, {"type": "null"}]},
            "obj_or_null": {"oneOf": [{"type": "object"}, {"type": "null"}]},
            "type_list": {"type": ["integer", "null"]},
            "str_int_null": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            "nullable_flag": {"type": "number", "nullable": True},
            "null_first": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        },
    )
]


@pytest.mark.parametrize(
    ("param", "raw", "expected"),
    [
        ("int_or_null", "5", 5),
        ("int_or_null", "None", None),
        ("str_or_null", "hello", "hello"),
        ("str_or_null", "42", "42"),
        ("str_or_null", "null", None),
        ("str_or_null", "None", None),
        ("arr_or_null", "[1, 2]", [1, 2]),
        ("obj_or_null", '{"key": "value", "count": 42}', {"key": "value", "count": 42}),
        ("type_list", "42", 42),
        ("str_int_null", "42", "42"),
        ("nullable_flag", "NULL", None),
        ("nullable_flag", "2.5", 2.5),
        ("null_first", "true", True),
    ],
)
def test_anyof_and_nullable(param: str, raw: str, expected: Any) -> None:
    assert parse_both(ANYOF, xml_call("f", **{param: raw})) == (None, [("f", {param: expected})])


def test_resolve_type_and_convert_directly() -> None:
    assert resolve_type({"type": "STRING"}).name == "string"
    assert resolve_type({"enum": [1, 2]}).name == "any"
    assert resolve_type({"properties": {}}).name == "object"
    assert resolve_type({"description": "untyped"}).name == "string"
    assert resolve_type("garbage").name == "string"
    assert convert_value("2", resolve_type({"enum": [1, 2]})) == 2
    assert convert_value("x", resolve_type({"enum": ["x", None]})) == "x"
    assert convert_value("null", resolve_type({"enum": ["x", None]})) is None
    assert convert_value("{1, 2}", resolve_type({"type": "array"})) == "{1, 2}"  # a set is not JSON
    schemas = ToolSchemas([WEATHER, {"bogus": True}, "junk", {"type": "function", "function": {"name": 3}}])
    assert schemas.is_param("get_current_weather", "city")
    assert not schemas.is_param("get_current_weather", "country")
    assert schemas.is_param("unknown_tool", "anything")
    assert not schemas.is_param("unknown_tool", "{{ k }}")


def test_responses_api_flat_tool_shape() -> None:
    flat = {"type": "function", "name": "calculate_area", "parameters": AREA["function"]["parameters"]}
    text = xml_call("calculate_area", precision="4")
    assert parse_both([flat], text) == (None, [("calculate_area", {"precision": 4})])


# ---------------------------------------------------------------------------- malformed output


def test_missing_closing_parameter_tag() -> None:
    text = (
        "Let me check the weather for you:\n<tool_call>\n<function=get_current_weather>\n"
        "<parameter=city>\nDallas\n<parameter=state>\nTX\n</parameter>\n"
        "<parameter=unit>\nfahrenheit\n</parameter>\n</function>\n</tool_call>"
    )
    content, calls = parse_both(TOOLS, text)
    assert content is not None and "Let me check the weather for you:" in content
    assert calls == [("get_current_weather", DALLAS)]


def test_missing_closing_parameter_before_function_end() -> None:
    text = (
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</function>\n</tool_call>\nok"
    )
    assert parse_both(TOOLS, text) == ("\nok", [("get_current_weather", {"city": "Dallas"})])


def test_function_without_gt_does_not_crash() -> None:
    text = "<tool_call>\n<function=get_current_weather\n<parameter=city>Dallas</parameter>\n</function>\n</tool_call>"
    content, calls = parse_both(TOOLS, text)
    assert calls == [] and content is None


def test_invalid_calls_are_filtered() -> None:
    text = (
        "<tool_call>\n<function=bad_func_no_gt\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>Dallas</parameter>\n"
        "<parameter=state>TX</parameter>\n</function>\n</tool_call>"
    )
    assert parse_both(TOOLS, text) == (None, [("get_current_weather", {"city": "Dallas", "state": "TX"})])


def test_phantom_jinja_call_is_rejected() -> None:
    text = (
        "<tool_call>\n<function={{ tc.name }}>\n<parameter={{ k }}>\n{{ v }}\n</parameter>\n"
        "</function>\n</tool_call>\n\n" + xml_call("write_file", path="out.txt", content="hello")
    )
    assert parse_both(WRITE_FILE, text) == (None, [("write_file", {"path": "out.txt", "content": "hello"})])


def test_declared_names_are_read_whatever_they_hold() -> None:
    """A declared function or parameter name with a space or a quote is read back as written (a phantom
    call's `{{ ... }}` name is still dropped: it is declared by no tool)."""
    tools = [_tool("my tool", {"a \"b": {"type": "integer"}})]
    text = "<tool_call>\n<function=my tool>\n<parameter=a \"b>\n3\n</parameter>\n</function>\n</tool_call>"
    assert parse_both(tools, text) == (None, [("my tool", {'a "b': 3})])
    phantom = "<tool_call>\n<function={{ tc.name }}>\n</function>\n</tool_call>"
    assert parse_both(tools, phantom) == (None, [])


def test_inline_empty_tool_call_keeps_surrounding_content() -> None:
    tools = [_tool("log", {"msg": {"type": "string"}})]
    text = "I'll show: <tool_call>example</tool_call>. Now real:\n" + xml_call("log", msg="hi")
    content, calls = parse_both(tools, text)
    assert calls == [("log", {"msg": "hi"})]
    assert content is not None and "I'll show:" in content and "Now real:" in content


def test_truncated_output_closes_the_call() -> None:
    base = "Writing.\n<tool_call>\n<function=write_file>\n<parameter=path>\na.txt\n</parameter>\n<parameter=content>\nline1\nline2"
    for cut in ("", "\n", "\n</param", "\n</parameter>", "\n</parameter>\n</func"):
        content, calls = parse_both(WRITE_FILE, base + cut)
        assert content == "Writing.\n"
        assert calls == [("write_file", {"path": "a.txt", "content": "line1\nline2"})], cut
    # <tool_call> is one token, so its prefix at the end is text; a line-start <function= prefix
    # may be a call cut off mid-tag and is dropped.
    assert parse_both(WRITE_FILE, "Hi <tool_c") == ("Hi <tool_c", [])
    assert parse_both(WRITE_FILE, "Use List<t") == ("Use List<t", [])
    assert parse_both(WRITE_FILE, "Hi\n<func") == ("Hi\n", [])
    assert parse_both(WRITE_FILE, "Hi <func") == ("Hi <func", [])
    assert parse_both(WRITE_FILE, "Hi <tool_call>\n") == ("Hi ", [])
    assert parse_both(WRITE_FILE, "Hi <tool_call>\n<function=wri") == ("Hi ", [])
    assert parse_both(WRITE_FILE, "<tool_call>\n<function=write_file>") == (None, [("write_file", {})])


def test_duplicate_parameter_first_wins() -> None:
    text = (
        "<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n"
        "<parameter=state>\nTX\n</parameter>\n</function>"
    )
    dup = text.replace("</function>", "<parameter=city>\nAustin\n</parameter>\n</function>")
    assert parse_both(TOOLS, dup) == (None, [("get_current_weather", {"city": "Dallas", "state": "TX"})])


def test_junk_between_parameters_is_ignored() -> None:
    text = (
        "<tool_call>\n<function=get_current_weather>\nsome junk </parameter> <b>\n<parameter=city>\nDallas\n"
        "</parameter>\n<parameter=state>\nTX\n</parameter>\n</function>\n</tool_call>"
    )
    assert parse_both(TOOLS, text) == (None, [("get_current_weather", {"city": "Dallas", "state": "TX"})])


# ---------------------------------------------------------------------------- literal tags in values

XML_TAGS_IN_CONTENT = (
    "char_deltas = [\n"
    '    "<tool_call>\\n",\n'
    '    "<parameter=query>\\n",\n'
    '    "\\n</parameter>\\n",\n'
    '    "</function>\\n",\n'
    "]\n"
)
PARAM_LIKE_LINES = 'TOOL_CALL_TEMPLATE = """\n</parameter>\n<parameter=new_string>\n#!/usr/bin/env python3\n</parameter>\n"""\n'
REAL_PARAM_NAME_LITERAL = 'doc = """\n<parameter=path>\nliteral/value\n</parameter>\n"""\n'
FULL_NESTED_CALL = (
    'doc = """\n<tool_call>\n<function=write_file>\n<parameter=path>\nliteral/value.txt\n</parameter>\n'
    '<parameter=content>\nhello\n</parameter>\n</function>\n</tool_call>\n"""\n'
)
INDENTED_NESTED_CALL = (
    "def test():\n    text = '''\n    <tool_call>\n    <function=write_file>\n    <parameter=content>\n"
    "    x\n    </parameter>\n    </function>\n    </tool_call>\n    '''\n"
)
LITERAL_VALUES = {
    "xml_tags": XML_TAGS_IN_CONTENT,
    "param_like_lines": PARAM_LIKE_LINES,
    "real_param_name": REAL_PARAM_NAME_LITERAL,
    "full_nested_call": FULL_NESTED_CALL,
    "indented_nested_call": INDENTED_NESTED_CALL,
    "json_like": '{\n  "name": "x",\n  "version": "1.0.0"\n}\n',
}


def write_file_output(content: str, path: str = "fixture.py") -> str:
    return (
        "<tool_call>\n<function=write_file>\n"
        f"<parameter=path>\n{path}\n</parameter>\n"
        f"<parameter=content>\n{content}</parameter>\n</function>\n</tool_call>"
    )


@pytest.mark.parametrize("case", list(LITERAL_VALUES))
def test_literal_tags_inside_values(case: str) -> None:
    value = LITERAL_VALUES[case]
    content, calls = parse_both(WRITE_FILE, write_file_output(value))
    assert content is None
    assert len(calls) == 1
    name, args = calls[0]
    assert name == "write_file"
    assert list(args) == ["path", "content"]
    assert args == {"path": "fixture.py", "content": value.rstrip("\n")}


def test_literal_tags_per_line_streaming() -> None:
    """The vLLM-style per-line deltas, where a literal ``</parameter>\\n`` arrives alone."""
    text = write_file_output(PARAM_LIKE_LINES, "test_template.py")
    _, calls = run_stream(Qwen3CoderToolParser(WRITE_FILE), text.splitlines(keepends=True))
    assert args_of(calls) == [
        ("write_file", {"path": "test_template.py", "content": PARAM_LIKE_LINES.rstrip("\n")})
    ]


def test_two_calls_second_embeds_out_of_schema_nested_call() -> None:
    nested = 'template = """\n<tool_call>\n<function=foo>\n<parameter=bar>baz</parameter>\n</function>\n</tool_call>\n"""\n'
    text = (
        "<tool_call>\n<function=foo>\n<parameter=bar>baz</parameter>\n</function>\n</tool_call>\n\n"
        + write_file_output(nested)
    )
    content, calls = parse_both(WRITE_FILE, text)
    assert content is None
    assert calls == [
        ("foo", {"bar": "baz"}),
        ("write_file", {"path": "fixture.py", "content": nested.rstrip("\n")}),
    ]


def test_unbalanced_literal_nesting_falls_back() -> None:
    value = "start\n<tool_call>\nnever closed"
    text = write_file_output(value + "\n") + "\nDone."
    content, calls = parse_both(WRITE_FILE, text)
    assert calls == [("write_file", {"path": "fixture.py", "content": value})]
    assert content == "\nDone."


@pytest.mark.parametrize("after", ["", "\n<tool_call>\n<function=write_file>\n<parameter=path>\nb.md\n</parameter>\n"
                                   "</function>\n</tool_call>"])
def test_unclosed_opener_line_in_a_value_is_prose(after: str) -> None:
    """A value that mentions the format on a line of its own (`<function=NAME>`, never closed) still
    ends at its own </parameter>: the call's real closers are not taken for the mention's."""
    value = "A call starts with:\n<function=NAME>"
    text = (f"<tool_call>\n<function=write_file>\n<parameter=content>\n{value}\n</parameter>\n"
            "<parameter=path>\nnotes.md\n</parameter>\n</function>\n</tool_call>" + after)
    content, calls = parse_both(WRITE_FILE, text)
    assert content is None
    assert calls[0] == ("write_file", {"content": value, "path": "notes.md"})
    assert len(calls) == (2 if after else 1)


# ---------------------------------------------------------------------------- streaming shape


def collect(parser: Any, chunks: list[str]) -> list[dict[str, Any]]:
    deltas: list[dict[str, Any]] = []
    for chunk in chunks:
        deltas += parser.feed(chunk)
    return deltas + parser.finish()


def test_streaming_shape_and_incremental_arguments() -> None:
    text = "I'll check the weather." + xml_call("get_current_weather", city="Dallas", state="TX")
    deltas = collect(Qwen3CoderToolParser(TOOLS), list(text))
    assert len(deltas) > 3
    assert deltas[0] == {"content": "I"}
    headers = [d for d in deltas if d.get("tool_calls") and "id" in d["tool_calls"][0]]
    assert len(headers) == 1
    header = headers[0]["tool_calls"][0]
    assert header["function"] == {"name": "get_current_weather", "arguments": ""}
    fragments = [
        d["tool_calls"][0]["function"]["arguments"]
        for d in deltas
        if d.get("tool_calls") and "id" not in d["tool_calls"][0]
    ]
    assert len(fragments) > 1
    assert json.loads("".join(fragments)) == {"city": "Dallas", "state": "TX"}
    assert reconstruct(deltas)[0] == "I'll check the weather."


def test_parameters_are_emitted_before_the_call_ends() -> None:
    """A typed parameter is emitted once the next tag shows it is complete."""
    parser = Qwen3CoderToolParser(TOOLS)
    head = "<tool_call>\n<function=calculate_area>\n<parameter=precision>\n2\n</parameter>\n"
    deltas = parser.feed(head)
    assert [d["tool_calls"][0]["function"].get("name") for d in deltas] == ["calculate_area"]
    deltas = parser.feed("<parameter=shape>\n")
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas] == [
        '{"precision": 2',
        ', "shape": "',
    ]
    deltas = parser.feed("circle\n")
    assert deltas == [{"tool_calls": [{"index": 0, "function": {"arguments": "circle"}}]}]


def test_string_values_stream_before_close() -> None:
    """Long file contents are streamed as they arrive (keeps idle watchdogs alive)."""
    parser = Qwen3CoderToolParser(WRITE_FILE)
    streamed = ""
    for d in parser.feed("<tool_call>\n<function=write_file>\n<parameter=content>\n")[1:]:
        streamed += d["tool_calls"][0]["function"]["arguments"]
    for line in ["line one\n", "x = '</parameter>'\n", "</parameter> literal\n", "last\n"]:
        for d in parser.feed(line):
            streamed += d["tool_calls"][0]["function"]["arguments"]
    assert streamed == '{"content": "line one\\nx = \'</parameter>\'\\n</parameter> literal\\nlast'
    rest = "".join(
        d["tool_calls"][0]["function"]["arguments"] for d in parser.feed("</parameter>\n</function>")
    )
    rest += "".join(d["tool_calls"][0]["function"]["arguments"] for d in parser.finish())
    assert json.loads(streamed + rest) == {
        "content": "line one\nx = '</parameter>'\n</parameter> literal\nlast"
    }


def test_no_markup_leaks_into_content_char_by_char() -> None:
    text = "Let me look <tool_call>\n<function=get_current_weather>\n<parameter=city>\nX\n</parameter>\n</function>\n</tool_call>"
    deltas = collect(Qwen3CoderToolParser(TOOLS), list(text))
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Let me look "
    assert "<" not in content


def test_whitespace_only_content_before_call_not_emitted() -> None:
    deltas = collect(Qwen3CoderToolParser(TOOLS), ["\n\n", SINGLE])
    assert all("content" not in d for d in deltas)


def test_multi_param_single_chunk() -> None:
    deltas = [
        "<tool_call>",
        "\n<function=get_current_weather>",
        "\n",
        "<parameter=city>\nDallas\n</parameter>\n<parameter=state>\nTX\n</parameter>\n<parameter=unit>\nfahrenheit\n</parameter>",
        "\n</function>",
        "\n</tool_call>",
    ]
    assert args_of(run_stream(Qwen3CoderToolParser(TOOLS), deltas)[1]) == [("get_current_weather", DALLAS)]


def test_speculative_params_and_close_in_one_delta() -> None:
    parser = Qwen3CoderToolParser(None)
    parser.feed("<tool_call>\n<function=test>\n")
    out = parser.feed("<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>")
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in out)
    assert json.loads(args) == {"city": "Paris"}


def test_two_calls_and_trailing_text_in_one_delta() -> None:
    two = xml_call("get_weather", city="Paris") + "\n" + xml_call("get_weather", city="London")
    content, calls = run_stream(Qwen3CoderToolParser(GET_WEATHER), [two + "\nAll done!"])
    assert args_of(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})]
    assert content == "\nAll done!"
    chunks = [
        "<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n</function>",
        "\n</tool_call>\nI hope this helps!",
    ]
    content, calls = run_stream(Qwen3CoderToolParser(GET_WEATHER), chunks)
    assert len(calls) == 1 and "I hope this helps!" in content


def test_anyof_object_streaming_not_double_encoded() -> None:
    tools = [_tool("update_record", {"data": {"anyOf": [{"type": "object"}, {"type": "null"}]}})]
    chunks = [
        "<tool_call>",
        "\n<function=update_record>",
        '\n<parameter=data>{"key": "value", "count": 42}</parameter>',
        "\n</function>",
        "\n</tool_call>",
    ]
    _, calls = run_stream(Qwen3CoderToolParser(tools), chunks)
    assert args_of(calls) == [("update_record", {"data": {"key": "value", "count": 42}})]


# ---------------------------------------------------------------------------- property test

PROPERTY_CASES: list[tuple[Any, str]] = (
    [(TOOLS, text) for text, _, _ in EXTRACT_CASES.values()]
    + [(WRITE_FILE, write_file_output(v)) for v in LITERAL_VALUES.values()]
    + [
        (TOOLS, "Plain answer with a < sign and <b>html</b>."),
        (TOOLS, "I'll show: <tool_call>example</tool_call>. Now real:\n" + SINGLE + "\nAll done!"),
        (TOOLS, "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>"),
        (
            TOOLS,
            "<tool_call>\n<function=get_current_weather\n<parameter=city>Dallas</parameter>\n</function>\n</tool_call>ok",
        ),
        (
            TOOLS,
            "Text\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n<parameter=state>\nTX",
        ),
        (TYPES, xml_call("test_types", obj_param="{'a': [1, 2]}", int_param="None", str_param="null\n")),
        (ANYOF, xml_call("f", str_or_null="None", obj_or_null="\"{'k': 1}\"", int_or_null="\n5\n")),
        (None, xml_call("x", a="</parameter>", b="<parameter=a>\n1") + "\n\n" + xml_call("y")),
        (WRITE_FILE, write_file_output("a\n</parameter>\n</function>\n</tool_call>\nb\n") + "\ntail"),
        (
            WRITE_FILE,
            '<tool_call>\n<function=write_file>\n<parameter=content>\nunicode é 中文 \\ " \t\n</parameter>\n</function>',
        ),
    ]
)


@pytest.mark.parametrize("index", range(len(PROPERTY_CASES)))
def test_streaming_equals_non_streaming_under_any_chunking(index: int) -> None:
    tools, text = PROPERTY_CASES[index]
    assert_stream_matches(Qwen3CoderToolParser, tools, text)


def test_streaming_equals_non_streaming_random_texts() -> None:
    """Random splices of tool-call fragments: never raises, always chunking-invariant."""
    pieces = [
        "<tool_call>\n",
        "</tool_call>\n",
        "<function=write_file>\n",
        "<function=get_weather>",
        "<function={{ x }}>\n",
        "<parameter=path>\n",
        "<parameter=content>\n",
        "<parameter=city>",
        "</parameter>\n",
        "</function>\n",
        "hello\n",
        "x < y ",
        "  ",
        "\n",
        "<tool_c",
        "</param",
        '{"a": 1}',
    ]
    rng = random.Random(1234)
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        tools = rng.choice([WRITE_FILE, GET_WEATHER, None])
        content, calls = Qwen3CoderToolParser(tools).parse(text)
        for chunks in (list(text), random_chunks(text, rng, 4), random_chunks(text, rng, 9)):
            s_content, s_calls = run_stream(Qwen3CoderToolParser(tools), chunks)
            assert (s_content or None) == content, text
            assert [c["function"] for c in s_calls] == [c["function"] for c in calls], text
        for call in calls:
            assert isinstance(json.loads(call["function"]["arguments"]), dict)


# ---------------------------------------------------------------------------- structural rules


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("a</parameter>b", "close followed by text"),
        ("a\n</parameter>\nmore text", "close followed by a text line"),
        ("a\n</parameter>\n<parameter=country>\nUS", "close followed by an unknown parameter"),
        ("a\n</parameter>\n<parameter=city>\nB", "close followed by the current parameter"),
        ("x\n</function>\nnot the end", "line-start </function> followed by text"),
    ],
)
def test_literal_closers_stay_in_value(value: str, why: str) -> None:
    text = xml_call("get_current_weather", city=value, state="TX")
    assert parse_both(TOOLS, text) == (None, [("get_current_weather", {"city": value, "state": "TX"})]), why


def test_empty_and_whitespace_values() -> None:
    text = "<tool_call>\n<function=get_current_weather>\n<parameter=city>\n</parameter>\n<parameter=state>\n\n\n</parameter>\n</function>\n</tool_call>"
    assert parse_both(TOOLS, text) == (None, [("get_current_weather", {"city": "", "state": "\n"})])


def test_big_integers_keep_precision() -> None:
    big = "123456789012345678901234567890"
    assert parse_both(TYPES, xml_call("test_types", int_param=big, num_param=big))[1] == [
        ("test_types", {"int_param": int(big), "num_param": int(big)})
    ]


def test_parse_does_not_disturb_streaming_state() -> None:
    parser = Qwen3CoderToolParser(TOOLS)
    first = parser.feed("Hi <tool_call>\n<function=get_current_weather>\n<parameter=city>\nX")
    assert parser.parse(SINGLE)[1][0]["function"]["name"] == "get_current_weather"
    rest = parser.feed("\n</parameter>\n</function>\n</tool_call>") + parser.finish()
    content, calls = reconstruct(first + rest)
    assert content == "Hi " and args_of(calls) == [("get_current_weather", {"city": "X"})]


def test_streaming_holds_text_after_a_literal_nested_opener() -> None:
    """Text after a line-start literal <tool_call> is held so the end-of-text fallback stays possible."""
    parser = Qwen3CoderToolParser(WRITE_FILE)
    out = parser.feed(
        "<tool_call>\n<function=write_file>\n<parameter=content>\nbefore\n<tool_call>\ninside\n"
    )
    streamed = "".join(
        d["tool_calls"][0]["function"]["arguments"] for d in out if "id" not in d["tool_calls"][0]
    )
    assert streamed == '{"content": "before'


def test_doubled_opening_tag_is_one_call_and_no_content() -> None:
    """A model slip seen with the demo model: <tool_call> written twice before <function=."""
    text = "<tool_call>\n<tool_call>\n<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>\n</tool_call>"
    parser = Qwen3CoderToolParser(TOOLS)
    content, calls = parser.parse(text)
    assert content is None
    assert [c["function"]["name"] for c in calls] == ["get_current_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Dallas"}
    for size in (1, 3, 7):
        p = Qwen3CoderToolParser(TOOLS)
        deltas = [d for i in range(0, len(text), size) for d in p.feed(text[i : i + size])] + p.finish()
        assert not any("content" in d for d in deltas)


def test_function_tag_mid_line_is_prose() -> None:
    """Explaining the format ("written as `<function=NAME>`") is content, not a call to NAME; a call
    whose <tool_call> the model left out still opens at a line start."""
    prose = "Each call is written as `<function=NAME>` followed by `<parameter=ARG>` lines.\nSo match the name first."
    assert parse_both(TOOLS, prose) == (prose, [])
    call = "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n</function>"
    assert parse_both(TOOLS, "Checking.\n  " + call) == ("Checking.\n  ", [("get_current_weather", {"city": "Dallas"})])


def test_stray_call_tags_are_dropped_alike_in_every_chunking() -> None:
    """<tool_call> / </tool_call> are dedicated tokens, never prose: a stray one is dropped by the parser
    itself, so streamed deltas and the whole text agree (the whitespace around it stays)."""
    assert parse_both(TOOLS, "Done.</tool_call> Bye") == ("Done. Bye", [])
    assert parse_both(TOOLS, "Step 1.\n\n</tool_call>Step 2.") == ("Step 1.\n\nStep 2.", [])
    assert parse_both(TOOLS, "<tool_call>\n") == (None, [])
    assert parse_both(TOOLS, "I show <tool_call>example</tool_call> here.") == ("I show example here.", [])


def test_text_between_function_end_and_tool_call_end_is_dropped() -> None:
    """A parameter written after its function closed is part of the malformed call, not content (the demo
    model does this when tool_choice names a tool it would not call); prose after a call that never
    writes </tool_call> stays content."""
    junk = "<tool_call>\n<function=get_current_weather>\n</function>\n<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>"
    assert parse_both(TOOLS, junk + "\nDone.") == ("\nDone.", [("get_current_weather", {})])
    unclosed = "<tool_call>\n<function=get_current_weather>\n</function>\nThat is all."
    assert parse_both(TOOLS, unclosed) == ("\nThat is all.", [("get_current_weather", {})])
    two = unclosed + "\n<tool_call>\n<function=calculate_area>\n</function>\n</tool_call>"
    assert parse_both(TOOLS, two) == ("\nThat is all.\n", [("get_current_weather", {}), ("calculate_area", {})])


def test_parameter_types_follow_refs_and_unions() -> None:
    """A local $ref is the type it points to; a union of non-string types takes the value's own JSON type."""
    from qwenserve.tool_parser.schema import convert_value, resolve_type

    root = {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}}}}}
    cases = [
        ({"$ref": "#/$defs/point"}, '{"x": 3}', {"x": 3}),
        ({"anyOf": [{"type": "boolean"}, {"type": "integer"}]}, "53", 53),
        ({"type": ["number", "boolean"]}, "true", True),
        ({"anyOf": [{"type": "integer"}, {"type": "object"}]}, '{"q": 1}', {"q": 1}),
        ({"type": ["string", "integer"]}, "53", "53"),  # with a string in the union, text stays text
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "null", None),
        ({"$ref": "#/$defs/missing"}, "x", "x"),
        ({"$ref": "#/$defs/point", "nullable": True}, "null", None),
        ({"type": "string", "enum": ["kg", "lb"]}, " kg\t", "kg"),  # whitespace around an enum value
        ({"type": "string", "enum": ["kg", " lb"]}, " lb", " lb"),  # ... unless it is part of the value
        ({"type": "string"}, " kg ", " kg "),
    ]
    for schema, raw, expected in cases:
        assert convert_value(raw, resolve_type(schema, root)) == expected, schema


def test_self_referencing_unions_resolve_at_once() -> None:
    """A type that refers to itself through a union (or unions nested many levels) is resolved in bounded
    work: building the parser's schema index for such a tool once took exponential time."""
    from qwenserve.tool_parser.schema import ToolSchemas

    loop = {"type": "object", "$defs": {"T": {"anyOf": [{"$ref": "#/$defs/T"}] * 4}},
            "properties": {"x": {"$ref": "#/$defs/T"}}}  # fmt: skip
    chain = {f"T{i}": {"anyOf": [{"$ref": f"#/$defs/T{i + 1}"}] * 3} for i in range(40)} | {"T40": {"type": "integer"}}
    deep = {"type": "object", "$defs": chain, "properties": {"x": {"$ref": "#/$defs/T0"}}}
    tools = ToolSchemas([{"type": "function", "function": {"name": n, "parameters": p}} for n, p in (("l", loop), ("d", deep))])
    assert tools.param_type("l", "x").name == "string" and tools.param_type("d", "x").name == "integer"


# ---------------------------------------------------------------------------- found by differential testing
# (against vLLM's qwen3_coder and SGLang's Qwen3CoderDetector: both split these as the model meant)

FORECAST = [_tool("forecast", {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}})]


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ("<parameter=units>\nmetric\n</parameter>\n", {"city": "Paris", "days": 3, "units": "metric"}),
        ("<parameter=days>\n4\n</parameter>\n", {"city": "Paris", "days": 3}),
        ("<parameter=units>\nmetric\n", {"city": "Paris", "days": 3, "units": "metric"}),
    ],
)
def test_undeclared_parameter_after_a_typed_value_is_not_swallowed(after: str, expected: dict[str, Any]) -> None:
    """An integer (or object...) value cannot hold markup, so whatever `<parameter=NAME>` follows its
    `</parameter>` starts the next parameter, even one the schema lacks or a repeat (first wins);
    only string values keep such lines as literal text."""
    text = (
        "<tool_call>\n<function=forecast>\n<parameter=city>\nParis\n</parameter>\n"
        f"<parameter=days>\n3\n</parameter>\n{after}</function>\n</tool_call>"
    )
    assert parse_both(FORECAST, text) == (None, [("forecast", expected)])
    missing_close = text.replace("3\n</parameter>\n", "3\n", 1)
    assert parse_both(FORECAST, missing_close) == (None, [("forecast", expected)])


@pytest.mark.parametrize(
    ("value", "expected"),
    [("city>\nParis", {"city": "Paris"}), ("city>Paris", {"city": "Paris"}),
     ("days>\n3", {"days": 3}), ("opts>\n{\"a\": 1}", {"opts": {"a": 1}})],
)
@pytest.mark.parametrize("after", ["", "\n<tool_call>\n<function=forecast>\n<parameter=days>\n1\n</parameter>\n"
                                   "</function>\n</tool_call>"])
def test_function_end_right_after_a_value_closes_it(value: str, expected: dict[str, Any], after: str) -> None:
    """`VALUE</function>` then `</tool_call>`: the model forgot `</parameter>` and closed the call on
    the value's own line; `</function>` is the call's closer, not the end of the value."""
    text = f"<tool_call>\n<function=forecast>\n<parameter={value}</function>\n</tool_call>{after}"
    content, calls = parse_both(FORECAST, text)
    assert content is None
    assert calls[0] == ("forecast", expected)
    assert len(calls) == (2 if after else 1)


@pytest.mark.parametrize(
    "value",
    ["see x</function>\n</tool_call>\nand more", "a</function> b", "x</function>\n</tool_call> tail",
     "x</function></tool_call>y"],
)
def test_mid_line_function_end_in_a_string_stays_literal(value: str) -> None:
    """Without the end of the call (or a next call) right after it, a mid-line `</function>` is text."""
    content, calls = parse_both(FORECAST, xml_call("forecast", city=value))
    assert content is None
    assert calls == [("forecast", {"city": value})]


@pytest.mark.parametrize("gap", ["", " ", "\t"])
def test_function_right_after_a_call_end_opens_a_call(gap: str) -> None:
    """`</tool_call><function=NAME>`: the model left out the next call's `<tool_call>`. `</tool_call>` is a
    dedicated token, never prose, so what follows it is no mention of the format: a call, not content
    that leaks the markup (and loses the call)."""
    second = "<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    text = "Checking.\n" + xml_call("get_weather", city="Paris") + gap + second + "\nDone."
    assert parse_both(GET_WEATHER, text) == (
        "Checking.\n\nDone.", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    )
    assert parse_both(GET_WEATHER, "</tool_call>" + gap + second) == (None, [("get_weather", {"city": "Rome"})])


TODOS = [_tool("todo_write", {"todos": {"type": "array", "items": {"type": "object"}}, "note": {"type": "string"}})]


@pytest.mark.parametrize("gap", [" ", ""])
def test_tags_on_one_line_of_an_array_value_stay_text(gap: str) -> None:
    """A typed value's `</parameter> <parameter=NAME>` on one line is text of one of its JSON strings
    (a todo about a parser): only a tag on a line of its own starts the next parameter whatever it names.
    Any NAME there cut the array in two and made up a parameter the tool does not have."""
    todos = [{"id": "1", "content": f"Handle </parameter>{gap}<parameter=foo> in the parser"}]
    text = xml_call("todo_write", todos=json.dumps(todos))
    assert parse_both(TODOS, text) == (None, [("todo_write", {"todos": todos})])
    # On the next line the same tag is structural, even for a name the schema lacks (first value wins).
    split = text.replace("\n</parameter>\n", "\n</parameter>\n<parameter=foo>\nx\n</parameter>\n", 1)
    assert parse_both(TODOS, split) == (None, [("todo_write", {"todos": todos, "foo": "x"})])
