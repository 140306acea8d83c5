"""Structured output (response_format, text.format, vLLM's guided_* / structured_outputs) through
a real server on the demo model, and the engine's guided sequences beside unguided ones.

The demo model knows nothing about JSON, so what it writes under a grammar is the grammar's doing:
a tight schema leaves it one shape, and logit_bias pushes it toward text the grammar must refuse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from server_utils import ServerProcess, start_server

from qwenserve.config import EngineConfig
from qwenserve.demo.build import SHELL_TOOL  # the tool schema the demo model was trained on
from qwenserve.engine.guided import Guide
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
LIST_FILES = [{"role": "user", "content": "List the files in this directory"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Lyon", "Nice"]},
        "capital": {"type": "boolean"},
        "rank": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["city", "capital", "rank"],
    "additionalProperties": False,
}


def assert_matches_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"city", "capital", "rank"}, value
    assert value["city"] in ("Paris", "Lyon", "Nice") and isinstance(value["capital"], bool), value
    assert isinstance(value["rank"], int) and 1 <= value["rank"] <= 9, value


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("structured"), "--max-model-len", "2048")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)


def token_id(server: ServerProcess, text: str) -> int:
    (tid,) = server.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    return tid


def test_json_schema_output_validates_streamed_or_not(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model="m", messages=ASK, response_format=fmt, max_tokens=64, temperature=temperature, seed=7
        )
        assert r.choices[0].finish_reason == "stop", r
        assert_matches_schema(r.choices[0].message.content)
        stream = client.chat.completions.create(
            model="m", messages=ASK, response_format=fmt, max_tokens=64, temperature=temperature, seed=7, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == r.choices[0].message.content


def test_a_ref_beside_annotations_is_enforced(client: openai.OpenAI) -> None:
    """Pydantic writes `{"$ref": ..., "description": ...}`: an annotation beside a reference is fine (a
    constraint there is refused: BAD), and the reference itself is followed."""
    city = {"type": "string", "enum": ["Paris", "Lyon", "Nice"]}
    schema = {**SCHEMA, "$defs": {"city": city}, "properties": {
        **SCHEMA["properties"], "city": {"$ref": "#/$defs/city", "description": "a French city", "x-order": 1}}}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    r = client.chat.completions.create(model="m", messages=ASK, response_format=fmt, max_tokens=64, temperature=0)
    assert_matches_schema(r.choices[0].message.content)


def test_json_object_holds_against_a_bias_toward_braces(server: ServerProcess, client: openai.OpenAI) -> None:
    """Biased to '{' and '}' the model alone writes five braces; JSON mode makes that '{}' and then the end."""
    bias = {str(token_id(server, "{")): 100, str(token_id(server, "}")): 100}
    free = client.chat.completions.create(model="m", messages=ASK, max_tokens=5, temperature=0, logit_bias=bias)
    assert re.fullmatch(r"[{}]{5}", free.choices[0].message.content), free
    r = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=20, temperature=0, logit_bias=bias, response_format={"type": "json_object"}
    )
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("{}", "stop")


def test_choice_regex_and_grammar(server: ServerProcess, client: openai.OpenAI) -> None:
    choices = ["Paris", "Lyon, France", 'say "Nice"']
    for seed in range(4):
        r = client.chat.completions.create(
            model="m", messages=ASK, max_tokens=20, temperature=1.0, seed=seed, n=2, extra_body={"guided_choice": choices}
        )
        assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices), r
    r = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=30, temperature=0.8, seed=1,
        extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,4}", "disable_any_whitespace": False}},
    )  # fmt: skip
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", r.choices[0].message.content), r
    r = client.completions.create(
        model="m", prompt="The answer:", max_tokens=30, temperature=0,
        extra_body={"guided_grammar": 'root ::= "yes" | "no" | ("maybe " [0-9])'},
    )  # fmt: skip
    assert re.fullmatch(r"yes|no|maybe [0-9]", r.choices[0].text), r


def test_completions_and_responses_take_a_schema(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="m", prompt="France:", max_tokens=64, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert_matches_schema(r.choices[0].text)
    fmt = {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}
    resp = client.responses.create(model="m", input="France?", max_output_tokens=64, text={"format": fmt})
    assert resp.status == "completed"
    assert_matches_schema(resp.output_text)
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "answer"


BAD = [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}},
     "response_format.json_schema.strict"),  # fmt: skip
    # Keywords the grammar would not enforce are refused, not answered with JSON that may break them.
    ({"guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "guided_json"),
    ({"guided_json": {"type": "object", "properties": {"a": {"not": {"const": 3}}}}}, "guided_json"),
    ({"guided_json": {"type": "string", "pattern": "^a+$", "maxLength": 3}}, "guided_json"),
    ({"guided_json": {"$ref": "https://example.com/schema.json"}}, "guided_json"),
    # xgrammar compiles a node with a "$ref" as the reference alone: the bound was not enforced.
    ({"guided_json": {"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x", "maximum": 9}}, "guided_json"),
    ({"guided_json": {"type": "integer", "minimum": 1, "multipleOf": 2}}, "guided_json"),
    ({"guided_regex": "[^\\s\\S]"}, "guided_regex"),  # matches nothing
    ({"guided_json": {"anyOf": []}}, "guided_json"),  # xgrammar reads it as the empty text
    ({"guided_json": {"type": "array", "items": {"oneOf": []}, "minItems": 1}}, "guided_json"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    # A schema sent as a string is parsed here: too deep for the request's own check, or for Python's parser.
    ({"guided_json": '{"type": "array", "items": ' * 100 + "{}" + "}" * 100}, "guided_json"),
    ({"guided_json": "[" * 5000 + "]" * 5000}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),  # fmt: skip
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
     "response_format.json_schema.schema"),  # fmt: skip
    # xgrammar's failed checks and its JSON reader's type errors, in words.
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "string"}}, "required": [1, 2]}}, "guided_json"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": 'root ::= undefined_rule'}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
    # Without the call's grammar the demo model went on to call a tool it was never offered.
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}, "min_tokens": 5,
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "min_tokens"),  # fmt: skip
    ({"tool_choice": "required", "min_tokens": 5, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "min_tokens"),  # fmt: skip
    # The forced answer would stop at its first token with no call at all.
    ({"tool_choice": "required", "stop": ["x", "<tool_call>"], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "stop"),  # fmt: skip
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}, "stop": "<function=",
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "stop"),  # fmt: skip
    # The forced call's own newlines, function name, parameter names or markup tokens would end it just as soon.
    ({"tool_choice": "required", "stop": ["\n"], "tools": [SHELL_TOOL]}, "stop"),
    ({"tool_choice": "required", "stop": "run_shell", "tools": [SHELL_TOOL]}, "stop"),
    ({"tool_choice": {"type": "function", "function": {"name": "run_shell_command"}}, "stop": ["command"],
      "tools": [SHELL_TOOL]}, "stop"),  # fmt: skip
    ({"tool_choice": "required", "stop_token_ids": [151657], "tools": [SHELL_TOOL]}, "stop_token_ids"),
    # vLLM's guided fields shape the whole answer (response_format only a text reply: see
    # test_tools_beside_a_reply_format), so a forced call would have to match both.
    ({"guided_json": {"type": "object"}, "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),  # fmt: skip
]


@pytest.mark.parametrize(("extra", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_specs_are_400_naming_the_field(server: ServerProcess, extra: dict[str, Any], param: str) -> None:
    r = server.post(CHAT, json={"messages": ASK, "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "[" not in err["message"][:3] and ".cc:" not in err["message"], err  # no C++ source locations
    assert "Check failed" not in err["message"] and "is<" not in err["message"], err  # nor its checks
    assert server.post(CHAT, json={"messages": ASK, "max_tokens": 2}).status_code == 200


def test_a_schema_part_that_matches_nothing_ends_in_an_error(server: ServerProcess) -> None:
    """The string may start (a quote is allowed) but its pattern admits no character: no valid answer
    exists, so the answer is a 400 naming the field (mid-stream: an error event), never a "stop" with
    broken JSON."""
    impossible = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}},
                  "required": ["a"]}  # fmt: skip
    body = {"messages": ASK, "max_tokens": 20, "guided_json": impossible}
    r = server.post(CHAT, json=body, headers={"x-request-id": "dead-end-1"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "guided_json" and err["code"] == "grammar_dead_end", err
    logged = [line for line in server.log().splitlines() if "x-request-id=dead-end-1" in line]
    assert len(logged) == 1 and 'error="The answer reached' in logged[0] and "finish=abort" not in logged[0], logged
    streamed = server.post(CHAT, json={**body, "stream": True})
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "grammar_dead_end", events
    assert not any('"finish_reason": "stop"' in e or '"finish_reason":"stop"' in e for e in events), events
    assert server.post(CHAT, json={"messages": ASK, "max_tokens": 2}).status_code == 200
    # Its request line is its one line: not also a "refused" line, as for a request the engine never saw
    # (that one is written once the response is out: by now, two requests later, it would be there).
    assert "(guided_json): The answer reached" not in server.log(), server.log()[-3000:]


def test_choices_beyond_the_basic_plane(client: openai.OpenAI) -> None:
    """A choice holding an emoji (two UTF-16 code units in JSON) comes back whole."""
    choices = ["party 🎉", "日本語", 'quote " and \\ backslash']
    for seed in range(3):
        r = client.chat.completions.create(
            model="m", messages=ASK, max_tokens=20, temperature=1.0, seed=seed, extra_body={"guided_choice": choices}
        )
        assert r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop", r


def test_responses_text_format_needs_its_schema_and_echoes_text(server: ServerProcess) -> None:
    chat_form = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}  # the chat API's shape
    r = server.post("/v1/responses", json={"input": "hi", "max_output_tokens": 4, "text": {"format": chat_form}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format.name", r.text
    body = {"input": "hi", "max_output_tokens": 40, "text": {"format": {"type": "json_object"}, "verbosity": "low"}}
    r = server.post("/v1/responses", json=body)
    assert r.status_code == 200 and r.json()["text"] == {"format": {"type": "json_object"}, "verbosity": "low"}


def test_guided_requests_leave_other_outputs_unchanged() -> None:
    """While a guided request runs, each step samples only after the previous step's tokens are processed
    (its forward already launched): the other requests' greedy, seeded and penalised outputs must be exactly
    what they are alone, also when a guided sequence with penalties ends while the next step is running."""
    engine = LLMEngine(EngineConfig())
    assert engine.overlap_steps
    prompts = [engine.tokenizer.encode(t) for t in ("What is the capital of France?", "List the files", "hello")]
    plain = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=12, ignore_eos=True)]  # fmt: skip
    alone = [engine.generate([p], plain[i])[0][0].token_ids for i, p in enumerate(prompts)]
    guide = Guide("json_schema", json.dumps(SCHEMA))
    choice = Guide("choice", json.dumps(["yes", "no"]))
    mixed = engine.generate(
        [*prompts, prompts[0], prompts[1]],
        [*plain, SamplingParams(temperature=0, max_tokens=64, guide=guide),
         SamplingParams(temperature=0.8, seed=2, n=2, repetition_penalty=1.3, max_tokens=8, guide=choice)],
    )  # fmt: skip
    assert [m[0].token_ids for m in mixed[:3]] == alone
    assert_matches_schema(mixed[3][0].text)
    assert {c.text for c in mixed[4]} <= {"yes", "no"} and all(c.finish_reason == "stop" for c in mixed[4])
    assert not engine.runner.penalties.row_of  # every penalised sequence gave its row back
    # A guided request that arrives while an unguided step is in flight.
    engine.add_request("plain", prompts[1], plain[1])
    outputs = engine.step() + engine.step() + engine.step()
    engine.add_request("guided", prompts[2], SamplingParams(temperature=0.7, seed=3, max_tokens=64, guide=guide))
    while engine.has_unfinished():
        outputs += engine.step()
    tokens = {rid: [t for o in outputs if o.request_id == rid for t in o.token_ids] for rid in ("plain", "guided")}
    assert tokens["plain"] == alone[1]
    assert_matches_schema(engine.tokenizer.decode(tokens["guided"], skip_special_tokens=True))
    assert engine._num_guided_requests == 0 and engine.block_manager.usage() == 0


COUNT_TOOL = {"type": "function", "function": {"name": "set_count", "parameters": {
    "type": "object", "required": ["count", "unit"],
    "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 9}, "unit": {"type": "string", "enum": ["kg", "lb"]}},
}}}  # fmt: skip
NOTE_TOOL = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 12}}, "required": ["text"]}}}  # fmt: skip


def test_forced_tool_calls_follow_their_schemas(client: openai.OpenAI) -> None:
    """tool_choice named or required: the demo model knows neither tool, yet every answer is calls of
    the allowed functions whose arguments hold the schema's required, typed values."""
    for seed in range(3):
        for choice in ({"type": "function", "function": {"name": "set_count"}}, "required"):
            for stream in (False, True):
                kwargs = dict(model="m", messages=ASK, max_tokens=120, temperature=1.0, seed=seed, tools=[COUNT_TOOL, NOTE_TOOL],
                              tool_choice=choice, parallel_tool_calls=False)  # fmt: skip
                if stream:
                    chunks = list(client.chat.completions.create(**kwargs, stream=True))
                    calls: dict[int, dict[str, str]] = {}
                    for c in chunks:
                        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                            call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                            call["name"] += tc.function.name or ""
                            call["arguments"] += tc.function.arguments or ""
                    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                    got = list(calls.values())
                else:
                    r = client.chat.completions.create(**kwargs)
                    finish = [r.choices[0].finish_reason]
                    got = [{"name": t.function.name, "arguments": t.function.arguments} for t in r.choices[0].message.tool_calls]
                assert finish == ["tool_calls"] and len(got) == 1, (choice, stream, got)
                args = json.loads(got[0]["arguments"])
                if got[0]["name"] == "set_count":
                    assert set(args) == {"count", "unit"} and 1 <= args["count"] <= 9 and args["unit"] in ("kg", "lb"), args
                else:
                    assert choice == "required" and got[0]["name"] == "note" and isinstance(args["text"], str), got


def test_calls_forced_where_a_schema_does_not_compile(server: ServerProcess, client: openai.OpenAI) -> None:
    """A tool whose schema xgrammar cannot compile (a property's schema is a list) is called with its
    parameter names holding any values. Forced by the call's opening alone, the demo model went on to call
    tools it was never offered (`run_shell_command`), or named one first and answered nothing (required)."""
    tool = {"type": "function", "function": {"name": "t_15", "parameters": {
        "type": "object", "properties": {"p": [1, 2], "q": {"type": "integer"}}}}}  # fmt: skip
    other = {"type": "function", "function": {"name": "other", "parameters": {
        "type": "object", "properties": {"x": [3]}}}}  # fmt: skip
    hello = [{"role": "user", "content": "hello"}]
    for choice in ({"type": "function", "function": {"name": "t_15"}}, "required"):
        kwargs = dict(model="m", messages=hello, max_tokens=60, temperature=0, tools=[tool], tool_choice=choice)
        r = client.chat.completions.create(**kwargs)
        assert [t.function.name for t in r.choices[0].message.tool_calls] == ["t_15"], r
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert {tc.index for tc in deltas} == {0} and [tc.function.name for tc in deltas if tc.id] == ["t_15"]
    r = client.chat.completions.create(model="m", messages=hello, max_tokens=60, temperature=1.0, seed=3, n=3,
                                       tools=[tool, other], tool_choice="required")  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, r
        assert {t.function.name for t in choice.message.tool_calls} <= {"t_15", "other"}, r
    resp = server.post("/v1/responses", json={"input": "hello", "max_output_tokens": 60, "temperature": 0,
                                               "tools": [{"type": "function", **tool["function"]}],
                                               "tool_choice": "required"}).json()  # fmt: skip
    assert [item["name"] for item in resp["output"] if item["type"] == "function_call"] == ["t_15"], resp


def test_forced_calls_keep_call_markup_out_of_values(server: ServerProcess, client: openai.OpenAI) -> None:
    """Pushed hard toward '<tool_call>', a string value still cannot hold it (the parser would read a
    second call there); a tool whose schema the grammar cannot enforce is still called by its own name."""
    bias = {str(token_id(server, "<tool_call>")): 100}
    for seed in range(3):
        r = client.chat.completions.create(
            model="m", messages=ASK, max_tokens=60, temperature=1.0, seed=seed, tools=[NOTE_TOOL], logit_bias=bias,
            tool_choice={"type": "function", "function": {"name": "note"}}, parallel_tool_calls=False,
        )  # fmt: skip
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "note" and "<tool_call>" not in json.loads(call.function.arguments)["text"]
    loose = {"type": "function", "function": {"name": "loose", "parameters": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}  # fmt: skip
    for seed in range(3):
        r = client.chat.completions.create(
            model="m", messages=ASK, max_tokens=60, temperature=1.0, seed=seed, tools=[COUNT_TOOL, loose],
            tool_choice="required",
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls or []
        assert r.choices[0].finish_reason in ("tool_calls", "length"), r
        assert calls and all(c.function.name in ("set_count", "loose") for c in calls), r


def test_a_named_tool_choice_is_one_call(server: ServerProcess, client: openai.OpenAI) -> None:
    """A named function is called once, as OpenAI and vLLM answer it (the demo model, left free, calls a
    parameterless tool again and again: an agent would run every repeat); "required" may call several."""
    now = {"type": "function", "function": {"name": "now"}}
    body = {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [now], "temperature": 0,
            "max_tokens": 60}  # fmt: skip
    several = server.post(CHAT, json={**body, "tool_choice": "required"}).json()["choices"][0]["message"]
    assert len(several["tool_calls"]) > 1, several  # what the one-call rule has to hold back
    named = {**body, "tool_choice": {"type": "function", "function": {"name": "now"}}}
    r = server.post(CHAT, json=named).json()["choices"][0]
    assert [c["function"]["name"] for c in r["message"]["tool_calls"]] == ["now"] and r["finish_reason"] == "tool_calls"
    streamed = server.post(CHAT, json={**named, "stream": True}).text
    indexes = {c["index"] for line in streamed.splitlines() if line.startswith("data: {")
               for ch in json.loads(line[6:])["choices"] for c in ch["delta"].get("tool_calls") or []}  # fmt: skip
    assert indexes == {0}, streamed
    resp = client.responses.create(model="m", input="What time is it?", tools=[{"type": "function", "name": "now"}],
                                   tool_choice={"type": "function", "name": "now"}, temperature=0, max_output_tokens=60)
    assert [item.name for item in resp.output if item.type == "function_call"] == ["now"], resp.output


def test_a_forced_answer_cut_short_holds_no_markup(server: ServerProcess) -> None:
    """Under a forced call's grammar the answer is nothing but calls, whose opening tag the grammar may
    spell in several tokens: cut by max_tokens inside a second call's opening, no '<tool_ca' reaches
    the content (streamed or not)."""
    now = {"type": "function", "function": {"name": "now"}}
    body = {"messages": [{"role": "user", "content": "List the files in this directory"}], "tools": [now],
            "tool_choice": "required", "temperature": 0}  # fmt: skip
    for max_tokens in range(10, 40, 2):
        r = server.post(CHAT, json={**body, "max_tokens": max_tokens})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message["content"] is None, (max_tokens, message)
        streamed = server.post(CHAT, json={**body, "max_tokens": max_tokens, "stream": True}).text
        assert '"content": "' not in streamed.replace('"content": ""', ""), (max_tokens, streamed)


def test_tools_beside_a_reply_format(server: ServerProcess, client: openai.OpenAI) -> None:
    """OpenAI applies response_format / text.format to a text reply only (the Agents SDK and pydantic-ai
    send tools with an output type): asked to list files the demo model still calls its tool, asked
    something else it answers in the format, and a forced call with a format is the call."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    body = {"tools": [SHELL_TOOL], "response_format": fmt, "temperature": 0, "max_tokens": 60}
    for stream in (False, True):
        calls = client.chat.completions.create(model="m", messages=LIST_FILES, stream=stream, **body)
        if stream:
            chunks = list(calls)
            names = [tc.function.name for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []
                     if tc.function and tc.function.name]  # fmt: skip
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            names = [tc.function.name for tc in calls.choices[0].message.tool_calls or []]
            finish = [calls.choices[0].finish_reason]
        assert names == ["run_shell_command"] and finish == ["tool_calls"], (stream, names, finish)
    # The tiny model, given the choice, always opens a call; pushed to a reply, the reply keeps the format.
    no_call = {str(token_id(server, "{")): 100}
    reply = client.chat.completions.create(model="m", messages=ASK, logit_bias=no_call, **body)
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls, reply
    assert_matches_schema(reply.choices[0].message.content)
    json_mode = server.post(CHAT, json={**body, "messages": ASK, "logit_bias": no_call,
                                        "response_format": {"type": "json_object"}}).json()  # fmt: skip
    # Any object: the demo model writes one key to max_tokens, but a reply it is, not a call.
    assert json_mode["choices"][0]["message"]["content"].startswith('{"'), json_mode
    assert not json_mode["choices"][0]["message"].get("tool_calls"), json_mode
    for choice in ("required", {"type": "function", "function": {"name": "run_shell_command"}}):
        forced = server.post(CHAT, json={**body, "messages": ASK, "tool_choice": choice}).json()
        assert [c["function"]["name"] for c in forced["choices"][0]["message"]["tool_calls"]] == ["run_shell_command"]
    resp = client.responses.create(
        model="m", input=LIST_FILES[0]["content"], tools=[{"type": "function", **SHELL_TOOL["function"]}],
        text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}}, temperature=0, max_output_tokens=60,
    )  # fmt: skip
    assert [item.name for item in resp.output if item.type == "function_call"] == ["run_shell_command"], resp.output


def test_allowed_tools_restrict_calls_and_keep_the_prompt(server: ServerProcess, client: openai.OpenAI) -> None:
    """tool_choice allowed_tools: every tool stays in the prompt (the same tokens as an `auto` turn, so the
    prefix cache still hits), `required` forces a call of an allowed one, and under `auto` a call the model
    opens can only be of an allowed one (asked to list files, the demo model calls run_shell_command, which
    is offered but not allowed: the grammar turns that call into one of `note`)."""
    tools = [SHELL_TOOL, NOTE_TOOL]
    body = {"messages": LIST_FILES, "tools": tools, "temperature": 0, "max_tokens": 60}
    free = server.post(CHAT, json=body).json()
    assert [c["function"]["name"] for c in free["choices"][0]["message"]["tool_calls"]] == ["run_shell_command"]

    def allowed(mode: str) -> dict[str, Any]:
        return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": [{"type": "function", "function": {"name": "note"}}]}}

    forced = server.post(CHAT, json={**body, "tool_choice": allowed("required")}).json()
    assert [c["function"]["name"] for c in forced["choices"][0]["message"]["tool_calls"]] == ["note"], forced
    steered = server.post(CHAT, json={**body, "tool_choice": allowed("auto")}).json()
    assert [c["function"]["name"] for c in steered["choices"][0]["message"]["tool_calls"]] == ["note"], steered
    for answer in (forced, steered):
        assert answer["usage"]["prompt_tokens"] == free["usage"]["prompt_tokens"]
    resp = client.responses.create(
        model="m", input=LIST_FILES[0]["content"], tools=[{"type": "function", **t["function"]} for t in tools], temperature=0,
        max_output_tokens=60, tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "note"}]},
    )  # fmt: skip
    assert [item.name for item in resp.output if item.type == "function_call"] == ["note"], resp.output
    unknown = {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "nope"}}]}}
    bad = server.post(CHAT, json={**body, "tool_choice": unknown})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice.allowed_tools.tools[0]", bad.text


def test_a_grammar_too_slow_to_follow_ends_its_request_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Masks are filled on the engine thread, so an ambiguous grammar (`(.*){1,50}x`: minutes a step after a
    few tokens) would stall every request: a sequence whose mask takes over GRAMMAR_STEP_SECONDS is ended
    with `grammar_too_slow`, its KV freed, and the others run on unchanged. (The limit is set below any
    mask's time here, so the test does not depend on how fast this machine is.)"""
    from qwenserve.engine import guided

    engine = LLMEngine(EngineConfig())
    prompts = [engine.tokenizer.encode(t) for t in ("What is the capital of France?", "hello")]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = engine.generate([prompts[0]], plain)[0][0].token_ids
    monkeypatch.setattr(guided, "GRAMMAR_STEP_SECONDS", -1.0)
    slow = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, guide=Guide("regex", "(.*){1,3}x"))
    mixed = engine.generate(prompts, [plain, slow])
    assert mixed[0][0].token_ids == alone and mixed[0][0].finish_reason == "length"
    assert mixed[1][0].finish_reason == "grammar_too_slow" and len(mixed[1][0].token_ids) <= 1, mixed[1]
    assert engine._num_guided_requests == 0 and engine.block_manager.usage() == 0


def test_a_spec_too_slow_to_compile_is_refused_and_the_server_serves_on(tmp_path: Path) -> None:
    """A regex with a huge repetition count takes seconds to compile: past the compile limit (set far
    below any compile here, so the test does not depend on this machine's speed) it is a 400
    `grammar_too_slow` naming the field, not a request left waiting, and plain requests are served."""
    srv = start_server(tmp_path, env={"QWENSERVE_GRAMMAR_COMPILE_SECONDS": "0.001"})
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for stream in (False, True):
            slow = srv.post("/v1/chat/completions", json={**body, "stream": stream, "guided_regex": "[a-z]{1,20000}"})
            assert slow.status_code == 400, slow.text
            error = slow.json()["error"]
            assert error["code"] == "grammar_too_slow" and error["param"] == "guided_regex", error
        plain = srv.post("/v1/chat/completions", json=body)
        assert plain.status_code == 200, plain.text
    finally:
        srv.stop()
