"""Tests for the Hermes-style JSON-in-``<tool_call>`` parser (Qwen3 non-Coder models)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from test_tool_parser import CALL_ID, args_of, assert_stream_matches, random_chunks, reconstruct, run_stream

from qwenserve.tool_parser import Qwen3JsonToolParser

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def block(name: str, arguments: Any, key: str = "arguments") -> str:
    return "<tool_call>\n" + json.dumps({"name": name, key: arguments}) + "\n</tool_call>"


def parse_both(text: str, tools: Any = TOOLS) -> tuple[str | None, list[tuple[str, Any]]]:
    content, calls = assert_stream_matches(Qwen3JsonToolParser, tools, text)
    for call in calls:
        assert CALL_ID.match(call["id"]) and call["type"] == "function"
    return content, args_of(calls)


PARIS = block("get_weather", {"city": "Paris"})
LONDON = block("get_weather", {"city": "London"})


def test_no_calls_content_verbatim() -> None:
    text = "Just an answer, with <b>tags</b> and a < sign."
    assert Qwen3JsonToolParser(TOOLS).parse(text) == (text, [])
    assert parse_both(text) == (text, [])
    assert parse_both("  \n") == (None, [])


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (PARIS, None, [("get_weather", {"city": "Paris"})]),
        ("Let me check." + PARIS, "Let me check.", [("get_weather", {"city": "Paris"})]),
        (
            PARIS + "\n" + LONDON,
            None,
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})],
        ),
        (PARIS + "\nAll done!", "\nAll done!", [("get_weather", {"city": "Paris"})]),
        (block("list_files", {}), None, [("list_files", {})]),
        (block("unknown_tool", {"n": 1}), None, [("unknown_tool", {"n": 1})]),
        (block("get_weather", {"city": "Rome"}, key="parameters"), None, [("get_weather", {"city": "Rome"})]),
    ],
)
def test_extraction(text: str, content: str | None, calls: list[tuple[str, Any]]) -> None:
    assert parse_both(text) == (content, calls)


def test_missing_arguments_and_double_encoded_arguments() -> None:
    assert parse_both('<tool_call>\n{"name": "ping"}\n</tool_call>') == (None, [("ping", {})])
    encoded = block("get_weather", json.dumps({"city": "Oslo"}))
    assert parse_both(encoded) == (None, [("get_weather", {"city": "Oslo"})])


def test_closing_tag_inside_string_value() -> None:
    content = 'x = "</tool_call>"\n<tool_call>\n{"name": "nested"}\n</tool_call>\n'
    text = block("write_file", {"path": "a.py", "content": content}) + "\nDone"
    assert parse_both(text) == ("\nDone", [("write_file", {"path": "a.py", "content": content})])


def test_escaped_quotes_and_unicode() -> None:
    args = {"content": 'say "hi" \\ </tool_call> é 中文', "n": [1, {"a": None}]}
    assert parse_both(block("w", args)) == (None, [("w", args)])


def test_missing_closing_brace_is_repaired() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>after'
    assert parse_both(text) == ("after", [("get_weather", {"city": "Paris"})])


def test_python_literal_object_accepted() -> None:
    text = (
        "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Paris', 'metric': True}}\n</tool_call>"
    )
    assert parse_both(text) == (None, [("get_weather", {"city": "Paris", "metric": True})])


def test_invalid_json_is_kept_as_content() -> None:
    text = '<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>'
    assert parse_both("Before " + text + " after") == ("Before " + text + " after", [])


def test_a_list_of_calls_in_one_block_is_each_call() -> None:
    calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "list_files", "arguments": {}}]
    text = "Both.\n<tool_call>\n" + json.dumps(calls) + "\n</tool_call>"
    assert parse_both(text) == ("Both.\n", [("get_weather", {"city": "Paris"}), ("list_files", {})])
    # Cut off in the second call: the first stands.
    cut = '<tool_call>\n[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"na'
    assert parse_both(cut) == (None, [("get_weather", {"city": "Oslo"})])


def test_arguments_json_cannot_carry_are_kept_as_content() -> None:
    # Python's reader takes NaN, but no client's JSON parser would: the model's text stays, nothing is lost.
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"lat": NaN}}\n</tool_call>'
    assert parse_both("See " + text) == ("See " + text, [])


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n{"name": "{{ tool.name }}", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>',
        '<tool_call>\n{"name": 5}\n</tool_call>',
    ],
)
def test_wrong_shape_is_dropped(bad: str) -> None:
    assert parse_both(bad + "\nok" + PARIS) == ("\nok", [("get_weather", {"city": "Paris"})])


def test_a_declared_name_with_a_space_is_a_call() -> None:
    tools = [{"type": "function", "function": {"name": "my tool", "parameters": {"type": "object"}}}]
    assert parse_both(block("my tool", {"a": 1}), tools) == (None, [("my tool", {"a": 1})])


def test_literal_tool_call_in_prose_is_content() -> None:
    text = "I show <tool_call>example</tool_call> here."
    assert parse_both(text) == ("I show example here.", [])  # the text stays, the stray tags go


def test_truncated_block_is_closed() -> None:
    assert parse_both('<tool_call>\n{"name": "w", "arguments": {"content": "trunc') == (
        None,
        [("w", {"content": "trunc"})],
    )
    assert parse_both("Hi <tool_call>\n") == ("Hi ", [])
    assert parse_both("Hi <tool_ca") == ("Hi <tool_ca", [])  # <tool_call> is one token: a prefix is text


def test_junk_after_object_is_dropped() -> None:
    text = '<tool_call>\n{"name": "w", "arguments": {}} trailing junk\n</tool_call>x'
    assert parse_both(text) == ("x", [("w", {})])


def test_streaming_deltas_shape() -> None:
    parser = Qwen3JsonToolParser(TOOLS)
    deltas: list[dict[str, Any]] = []
    for ch in "Sure." + PARIS + LONDON:
        deltas += parser.feed(ch)
    deltas += parser.finish()
    content, calls = reconstruct(deltas)
    assert content == "Sure."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    headers = [d["tool_calls"][0] for d in deltas if d.get("tool_calls") and "id" in d["tool_calls"][0]]
    assert [h["index"] for h in headers] == [0, 1]
    assert all(h["function"]["arguments"] == "" for h in headers)
    assert parser.tool_calls_emitted == 2
    assert args_of(parser.tool_calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "London"}),
    ]


def test_no_markup_in_content_while_streaming() -> None:
    parser = Qwen3JsonToolParser(TOOLS)
    content = ""
    for ch in "Look: " + PARIS:
        content += "".join(d.get("content", "") for d in parser.feed(ch))
    content += "".join(d.get("content", "") for d in parser.finish())
    assert content == "Look: "


def test_streaming_equals_non_streaming_random() -> None:
    pieces = [
        "<tool_call>\n",
        "</tool_call>",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '{"name": "w", "arguments": {"c": "</tool_call>\\"{"}}',
        '{"name": "x"',
        "}",
        "{",
        '"',
        "\\",
        "text ",
        "\n",
        "<tool_c",
        "'",
        "[",
    ]
    rng = random.Random(99)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10)))
        content, calls = Qwen3JsonToolParser(TOOLS).parse(text)
        for chunks in (list(text), random_chunks(text, rng, 5)):
            s_content, s_calls = run_stream(Qwen3JsonToolParser(TOOLS), chunks)
            assert (s_content or None) == content, text
            assert [c["function"] for c in s_calls] == [c["function"] for c in calls], text
        for call in calls:
            assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_block_cut_off_inside_the_name_is_no_call() -> None:
    """Generation ended (max_tokens) inside the function name: no call to a truncated name."""
    assert parse_both('Let me check.\n<tool_call>\n{"name": "get_wea') == ("Let me check.\n", [])
    assert parse_both('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par') == (
        None,
        [("get_weather", {"city": "Par"})],
    )


def test_block_cut_off_inside_a_key_keeps_the_complete_members() -> None:
    """max_tokens ending a call inside a key: the call with what was complete, not raw markup as content."""
    assert parse_both('<tool_call>\n{"name": "get_weather", "argu') == (None, [("get_weather", {})])
    assert parse_both('<tool_call>\n{"name": "get_weather", "arguments": {"ci') == (None, [("get_weather", {})])
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "units": "metric", "da'
    assert parse_both(cut) == (None, [("get_weather", {"city": "Paris", "units": "metric"})])


@pytest.mark.parametrize(
    "value",
    ["x </tool_call> y", 'say "hi', "it's", "a } ] { [ , <"],
)
def test_python_literal_strings_are_strings_to_the_scanner(value: str) -> None:
    """A Python-literal slip quotes with ': a tag, quote or bracket inside such a value is text, not structure
    (the ``"`` made the scanner think a JSON string had opened and lost the call)."""
    text = "<tool_call>\n" + repr({"name": "write_file", "arguments": {"content": value, "n": 1}}) + "\n</tool_call>Done"
    assert parse_both(text) == ("Done", [("write_file", {"content": value, "n": 1})])


@pytest.mark.parametrize(
    ("first", "between", "content"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "\n", None),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "\nNow London.\n", "\nNow London.\n"),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}', "\n", None),  # its "}" left out too
    ],
)
def test_a_call_missing_its_closing_tag_ends_at_the_next_opening_tag(
    first: str, between: str, content: str | None
) -> None:
    """``<tool_call>`` is a dedicated token, never JSON: met before a block's ``</tool_call>``, it opens the
    next call (the next call was swallowed as junk up to its ``</tool_call>``, or both were lost)."""
    text = "<tool_call>\n" + first + between + LONDON
    assert parse_both(text) == (content, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "London"})])


def test_an_opening_tag_inside_a_string_value_stays_text() -> None:
    args = {"content": "<tool_call>\n{\"name\": \"x\"}\n"}
    assert parse_both(block("write_file", args) + LONDON) == (
        None,
        [("write_file", args), ("get_weather", {"city": "London"})],
    )
    py = "<tool_call>\n" + repr({"name": "write_file", "arguments": {"content": "<tool_call>"}}) + "\n</tool_call>"
    assert parse_both(py) == (None, [("write_file", {"content": "<tool_call>"})])


def test_raw_line_breaks_inside_string_values_are_accepted() -> None:
    """A real newline/CR inside a JSON string (a file's lines) is what the model meant by ``\\n``: the call
    is kept, its arguments re-encoded as valid JSON (it was kept as content, markup and all)."""
    text = '<tool_call>\n{"name": "write_file", "arguments": {"path": "a.py", "content": "l1\nl2\r\n\tl3"}}\n</tool_call>'
    content, calls = parse_both(text)
    assert (content, calls) == (None, [("write_file", {"path": "a.py", "content": "l1\nl2\r\n\tl3"})])
    inner = '{"name": "write_file", "arguments": ' + json.dumps('{"content": "x\ny"}') + "}"
    assert parse_both("<tool_call>\n" + inner + "\n</tool_call>") == (None, [("write_file", {"content": "x\ny"})])
