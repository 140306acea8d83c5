"""POST /v1/responses (the OpenAI Responses API) against a real `qwenserve serve` process.

One server for the module, the real OpenAI SDK as the client (`client.responses.create` and its
stream helper), httpx for the raw SSE and the 400s. The demo model's greedy answers are known (see
qwenserve/demo/build.py): Paris for the capital of France, a `run_shell_command` `ls` call when asked
to list files with the shell tool offered, and a short answer after the tool's output. The last tests
are unit tests of the request mapping and the output items, without the server.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_utils import REPO, ServerProcess, start_server

from qwenserve.api.errors import APIError
from qwenserve.api.protocol_responses import ResponsesRequest, chat_messages
from qwenserve.api.serving_responses import OutputItems
from qwenserve.demo.build import SHELL_TOOL

pytestmark = pytest.mark.slow

FRANCE = "What is the capital of France?"
LIST_FILES = "List the files in this directory"
# The demo's shell tool in the Responses (flat) shape.
SHELL = {"type": "function", **SHELL_TOOL["function"], "strict": False}
HEARTBEAT = 0.1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        tmp_path_factory.mktemp("responses"), "--log-requests", env={"QWENSERVE_HEARTBEAT_SECONDS": str(HEARTBEAT)}
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="anything", max_retries=0, timeout=300)


def first_turn_items(first: Any) -> list[dict[str, Any]]:
    """The second turn's input: the question, the model's call (as the SDK returned it), its output."""
    (call,) = first.output
    return [
        {"role": "user", "content": LIST_FILES},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "README.md\nmain.py"},
    ]


def event_types(events: list[Any]) -> list[str]:
    """The events' types without the heartbeats (a repeated `response.in_progress`, every 0.1 s here)."""
    return [e.type for i, e in enumerate(events) if i < 2 or e.type != "response.in_progress"]


def check_events(events: list[Any]) -> dict[str, Any]:
    """Check a stream's order and bookkeeping; fold it into {texts, arguments, final}."""
    assert [e.sequence_number for e in events] == list(range(len(events))), "sequence numbers 0, 1, 2 ..."
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    assert all(getattr(e, "response", final).id == final.id for e in events)
    texts: dict[int, str] = {}
    arguments: dict[int, str] = {}
    open_items: dict[int, Any] = {}
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert not open_items, "one item at a time"
            assert e.output_index == len(texts) + len(arguments)
            open_items[e.output_index] = e.item
            if e.item.type == "message":
                texts[e.output_index] = ""
            else:
                assert e.item.type == "function_call" and e.item.call_id.startswith("call_") and e.item.name
                arguments[e.output_index] = ""
        elif e.type == "response.output_text.delta":
            assert e.item_id == open_items[e.output_index].id and e.delta
            texts[e.output_index] += e.delta
        elif e.type == "response.output_text.done":
            assert e.text == texts[e.output_index], "text deltas concatenate to the done text"
        elif e.type == "response.function_call_arguments.delta":
            assert e.item_id == open_items[e.output_index].id
            arguments[e.output_index] += e.delta
        elif e.type == "response.function_call_arguments.done":
            assert e.arguments == arguments[e.output_index], "argument deltas concatenate to the done arguments"
            assert e.name == open_items[e.output_index].name  # a required field of the SDK's event type
        elif e.type == "response.output_item.done":
            added = open_items.pop(e.output_index)
            assert e.item.id == added.id and e.item.type == added.type
            assert final.output[e.output_index].id == e.item.id
        elif e.type == "response.in_progress":  # the heartbeat (every 0.1 s here)
            assert e.response.status == "in_progress" and e.response.output == []
        else:
            assert e.type in ("response.content_part.added", "response.content_part.done"), e.type
    assert not open_items, "every item added is done before the end"
    assert len(final.output) == len(texts) + len(arguments)
    usage = final.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    return {"texts": texts, "arguments": arguments, "final": final}


def message_event_types(n_deltas: int) -> list[str]:
    return [
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * n_deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]


# ---- non-streaming ----


def test_plain_answer(client: openai.OpenAI, server: ServerProcess) -> None:
    generated_before = server.metrics()["qwenserve_generation_tokens_total"]
    resp = client.responses.create(
        model="my-model", input=FRANCE, instructions="You are a helpful assistant.", temperature=0, metadata={"k": "v"}
    )
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.model == "my-model" and resp.instructions == "You are a helpful assistant."
    assert resp.output_text == "The capital of France is Paris."
    (item,) = resp.output
    assert item.type == "message" and item.id.startswith("msg_") and item.role == "assistant"
    assert item.status == "completed" and item.content[0].type == "output_text" and item.content[0].annotations == []
    assert resp.error is None and resp.incomplete_details is None and resp.metadata == {"k": "v"}
    assert resp.temperature == 0 and resp.tool_choice == "auto" and resp.tools == [] and resp.parallel_tool_calls
    usage = resp.usage
    assert usage.output_tokens == 8 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert server.metrics()["qwenserve_generation_tokens_total"] == generated_before + usage.output_tokens
    assert re.search(rf"request {resp.id}: prompt=\d+ cached=\d+ generated=8 .*finish=stop", server.log())
    assert f"request {resp.id} body: " in server.log()


def test_input_tokens_count_what_the_response_reads(client: openai.OpenAI) -> None:
    """`client.responses.input_tokens.count` renders the request exactly as /v1/responses does."""
    request = {"model": "m", "input": FRANCE, "instructions": "Be brief.", "tools": [SHELL]}
    counted = client.responses.input_tokens.count(**request)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == client.responses.create(**request, max_output_tokens=1).usage.input_tokens
    assert client.responses.input_tokens.count(model="m", input=FRANCE).input_tokens < counted.input_tokens
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.input_tokens.count(model="m", input=FRANCE, previous_response_id="resp_1")
    assert exc.value.body["param"] == "previous_response_id"
    first = client.responses.create(model="m", input=LIST_FILES, tools=[SHELL], temperature=0)
    rest = first_turn_items(first)[2:]
    continued = client.responses.input_tokens.count(model="m", input=rest, tools=[SHELL], previous_response_id=first.id)
    whole = client.responses.input_tokens.count(model="m", input=first_turn_items(first), tools=[SHELL])
    assert continued.input_tokens == whole.input_tokens


def test_input_items_of_every_text_shape(client: openai.OpenAI) -> None:
    resp = client.responses.create(
        model="m",
        temperature=0,
        input=[
            {"type": "message", "role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "input_text", "text": FRANCE}]},
        ],
    )
    assert resp.output_text == "The capital of France is Paris."


def test_tool_call_round_trip(client: openai.OpenAI, server: ServerProcess) -> None:
    first = client.responses.create(model="m", input=LIST_FILES, tools=[SHELL], temperature=0)
    assert first.status == "completed" and first.output_text == ""
    (call,) = first.output
    assert call.type == "function_call" and call.status == "completed" and call.name == "run_shell_command"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"command": "ls"}
    assert first.tools[0].name == "run_shell_command"
    assert re.search(rf"request {first.id}: .*finish=tool_calls tool_calls=1", server.log())

    second = client.responses.create(model="m", input=first_turn_items(first), tools=[SHELL], temperature=0)
    assert second.status == "completed"
    assert second.output_text == "Here are the files in this directory."
    assert [item.type for item in second.output] == ["message"]


def test_tool_choice(client: openai.OpenAI) -> None:
    named = {"type": "function", "name": "run_shell_command"}
    for choice in (named, "required"):
        resp = client.responses.create(model="m", input=FRANCE, tools=[SHELL], tool_choice=choice, temperature=0,
                                       max_output_tokens=40)  # fmt: skip
        assert [item.type for item in resp.output] == ["function_call"], choice
        assert resp.output[0].name == "run_shell_command" and json.loads(resp.output[0].arguments)
    resp = client.responses.create(model="m", input=LIST_FILES, tools=[SHELL], tool_choice="none", temperature=0)
    assert resp.output_text == "I can't see your files without a shell tool."


def test_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    resp = client.responses.create(model="m", input=FRANCE, temperature=0, max_output_tokens=3)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text == "The capital of" and resp.output[0].status == "incomplete"
    assert resp.usage.output_tokens == 3 and resp.max_output_tokens == 3


# ---- streaming ----


def test_streamed_answer(client: openai.OpenAI) -> None:
    with client.responses.stream(model="m", input=FRANCE, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    folded = check_events(events)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3, "text streams token by token"
    assert event_types(events) == [
        "response.created", "response.in_progress", *message_event_types(len(deltas)), "response.completed"
    ]  # fmt: skip
    assert folded["texts"] == {0: "The capital of France is Paris."}
    assert final.output_text == "The capital of France is Paris." and final.status == "completed"
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_streamed_tool_call_round_trip(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="m", input=LIST_FILES, tools=[SHELL], temperature=0, stream=True))
    folded = check_events(events)
    types = event_types(events)
    n_args = types.count("response.function_call_arguments.delta")
    assert n_args >= 1 and types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * n_args,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert json.loads(folded["arguments"][0]) == {"command": "ls"}
    first = folded["final"]
    assert first.output[0].arguments == folded["arguments"][0] and first.output[0].status == "completed"

    with client.responses.stream(model="m", input=first_turn_items(first), tools=[SHELL], temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert check_events(events)["texts"] == {0: "Here are the files in this directory."}
    assert final.output_text == "Here are the files in this directory."


def test_streamed_incomplete(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="m", input=FRANCE, temperature=0, max_output_tokens=3, stream=True))
    folded = check_events(events)
    assert events[-1].type == "response.incomplete"
    final = folded["final"]
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert folded["texts"] == {0: "The capital of"} and final.output[0].status == "incomplete"


def test_bodies_and_events_validate_against_the_sdk_types(server: ServerProcess) -> None:
    """The SDK builds its objects without validating them; a stricter client validates: every field the
    SDK's types require is there (usage's cache_write_tokens was missing), in the body and every event."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    for body in ({"input": FRANCE, "temperature": 0}, {"input": LIST_FILES, "tools": [SHELL], "temperature": 0},
                 {"input": FRANCE, "temperature": 0, "max_output_tokens": 3}):  # fmt: skip
        r = httpx.post(f"{server.base_url}/v1/responses", json={"model": "m", **body}, timeout=120)
        Response.model_validate(r.json(), strict=False)
        events = TypeAdapter(ResponseStreamEvent)
        lines = raw_stream_lines(server, {"model": "m", **body})
        for data in (line[len("data: "):] for line in lines if line.startswith("data: ")):
            events.validate_python(json.loads(data))


def raw_stream_lines(server: ServerProcess, body: dict[str, Any]) -> Iterator[str]:
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        yield from r.iter_lines()


def test_keep_alive_during_a_long_prefill(server: ServerProcess) -> None:
    rng = random.Random(time.time_ns())  # never a prefix-cache hit, so the prefill takes its time
    prompt = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(3000))
    lines = list(raw_stream_lines(server, {"input": prompt, "max_output_tokens": 2, "temperature": 0}))
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == events, "every data line follows its event line"
    waiting = events[: events.index("response.output_item.added")]
    # Events, not comment lines: Codex's idle timeout counts only events.
    assert waiting[:2] == ["response.created", "response.in_progress"] and waiting.count("response.in_progress") >= 3
    assert set(waiting) == {"response.created", "response.in_progress"}
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert all(d["response"]["output"] == [] for d in datas if d["type"] == "response.in_progress")
    assert events[-1] == "response.incomplete"


def test_client_disconnect_aborts(server: ServerProcess) -> None:
    body = {"input": FRANCE, "max_output_tokens": 4000, "ignore_eos": True}
    response_id = None
    lines = raw_stream_lines(server, body)
    try:
        for line in lines:
            if line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                response_id = response_id or data["response"]["id"]
                if data["type"] == "response.output_text.delta":
                    break
    finally:
        lines.close()  # closes the connection mid-stream
    pattern = rf"request {response_id}: .*finish=abort"
    deadline = time.monotonic() + 30
    while not re.search(pattern, server.log()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(pattern, server.log()), "the engine request is aborted when the client goes away"


def test_namespace_tools_and_hosted_web_search_as_codex_sends_them(client: openai.OpenAI) -> None:
    """Codex CLI sends its sub-agent tools in a `namespace` and a hosted `web_search` on every turn: the
    namespace's functions reach the model under their own names (a call's item names its namespace, by
    which Codex routes it), and web search, which this server cannot run, is left out instead of a 400."""
    namespace = {"type": "namespace", "name": "shell_ns", "description": "Tools that run commands.", "tools": [SHELL]}
    tools = [{"type": "web_search", "external_web_access": False}, namespace]
    resp = client.responses.create(model="m", input=LIST_FILES, tools=tools, temperature=0, max_output_tokens=40)
    (call,) = resp.output
    assert call.type == "function_call" and call.name == "run_shell_command" and call.namespace == "shell_ns"
    assert json.loads(call.arguments) == {"command": "ls"}
    with client.responses.stream(model="m", input=LIST_FILES, tools=tools, temperature=0) as stream:
        events = list(stream)
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(item.name, item.namespace) for item in added] == [("run_shell_command", "shell_ns")]
    assert events[-1].response.output[0].namespace == "shell_ns"
    # The call goes back in the next turn's input as Codex sends it, namespace and all.
    items = [{"role": "user", "content": LIST_FILES}, call.model_dump(exclude_none=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": "README.md\nmain.py"}]  # fmt: skip
    assert client.responses.create(model="m", input=items, tools=tools, temperature=0).status == "completed"
    # Web search alone: no tools at all, the prompt a plain one's.
    alone = client.responses.create(model="m", input=FRANCE, tools=tools[:1], temperature=0, max_output_tokens=3)
    plain = client.responses.create(model="m", input=FRANCE, temperature=0, max_output_tokens=3)
    assert alone.usage.input_tokens == plain.usage.input_tokens


def test_codex_first_turn_as_sent(server: ServerProcess) -> None:
    """Codex CLI's real first request (tests/fixtures/codex-0.171.0): its namespace and web_search tools, its
    developer messages, reasoning / include / store / client_metadata, streamed. Only the output is cut short."""
    body = json.loads((REPO / "tests" / "fixtures" / "codex-0.171.0" / "first-turn.json").read_text())
    lines = list(raw_stream_lines(server, {**body, "max_output_tokens": 16}))
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    final = datas[-1]["response"]
    assert datas[-1]["type"] in ("response.completed", "response.incomplete"), datas[-1]["type"]
    assert final["usage"]["input_tokens"] > 8000, "the developer messages and every tool are in the prompt"
    assert final["tools"] == body["tools"], "the tools are echoed as sent"
    assert final["output"] and {item["type"] for item in final["output"]} <= {"message", "function_call"}


def test_an_image_a_tool_returned_reaches_the_model_as_a_note(client: openai.OpenAI) -> None:
    """Codex's view_image answers with an input_image: the model, which reads text, gets a note in its
    place (a 400 would fail every later turn, which carries the output along); the prompt is exactly
    the one with the note written as text."""
    call = {**CALL, "id": "fc_1"}

    def turn(output: list[dict[str, Any]]) -> Any:
        items = [{"role": "user", "content": "Look at the picture"}, call,
                 {"type": "function_call_output", "call_id": "call_1", "output": output}]  # fmt: skip
        return client.responses.create(model="m", input=items, tools=[SHELL], temperature=0, max_output_tokens=2)

    image = turn([{"type": "input_text", "text": "shot.png:"},
                  {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}])  # fmt: skip
    note = turn([{"type": "input_text", "text": "shot.png:"},
                 {"type": "input_text", "text": "[image omitted: this model reads text only]"}])  # fmt: skip
    assert image.status == note.status == "incomplete"
    assert image.usage.input_tokens == note.usage.input_tokens


# ---- errors ----

CALL = {"type": "function_call", "call_id": "call_1", "name": "run_shell_command", "arguments": '{"command": "ls"}'}
BAD_REQUESTS = [
    ({"model": "m"}, "input", "invalid_value"),
    ({"input": []}, "input", None),
    ({"input": "hi", "previous_response_id": "resp_123"}, "previous_response_id", "previous_response_not_found"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation", "unsupported_parameter"),
    ({"input": "hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type",
     "unsupported_parameter"),  # fmt: skip
    ({"input": "hi", "tool_choice": {"type": "web_search"}, "tools": [{"type": "web_search"}]}, "tool_choice",
     "unsupported_parameter"),  # fmt: skip
    ({"input": "hi", "tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "custom", "name": "f"}]}]},
     "tools[0].tools[0].type", "unsupported_parameter"),  # fmt: skip
    ({"input": "hi", "tools": [{"type": "namespace", "name": "ns", "tools": []}]}, "tools[0].tools", None),
    ({"input": "hi", "tools": [SHELL, {"type": "namespace", "name": "ns", "tools": [SHELL]}]}, "tools", None),
    ({"input": "hi", "tools": [{"name": "f"}]}, "tools[0].type", None),
    ({"input": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name", None),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type", "invalid_value"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nonsense"}}}},
     "text.format.schema", None),  # fmt: skip
    ({"input": "hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": [SHELL]}, "tool_choice", None),
    ({"input": [{"role": "user", "content": "hi"}, {**CALL, "call_id": ""}]}, "input[1].call_id", None),
    ({"input": [{"role": "user", "content": "hi"}, CALL, {"type": "function_call_output", "call_id": "call_2",
                                                          "output": "x"}]}, "input[2].call_id", None),  # fmt: skip
    ({"input": [{"role": "user", "content": "hi"}, {**CALL, "arguments": {"command": "ls"}}]}, "input[1].arguments",
     None),  # fmt: skip
    ({"input": [{"role": "tool", "content": "hi"}]}, "input[0].role", None),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type", "unsupported_content"),  # fmt: skip
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id", "item_not_found"),
    ({"input": [{"type": "item_reference"}]}, "input[0].id", "item_not_found"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", None),
    ({"input": "hi", "temperature": "0"}, "temperature", "invalid_value"),
    ({"input": "hi", "background": True}, "background", "unsupported_parameter"),
    # Chat's names, which a Responses request would otherwise have had ignored.
    ({"input": "hi", "max_tokens": 5}, "max_tokens", "unsupported_parameter"),
    ({"input": "hi", "max_completion_tokens": 5}, "max_completion_tokens", "unsupported_parameter"),
    ({"input": "hi", "response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"input": "hi", "n": 2}, "n", "unsupported_parameter"),
    ({"input": "hi", "guided_regex": "(a"}, "guided_regex", None),
    ({"input": "hi", "guided_regex": "a", "text": {"format": {"type": "json_object"}}}, "guided_regex", None),
    ({"input": "hi", "stop_token_ids": [10**9]}, "stop_token_ids", None),
    # Echoed in the answer, where JSON cannot carry them (a 500 before).
    ({"input": "hi", "tools": [{**SHELL, "parameters": {"type": "object", "default": float("inf")}}]},
     "tools[0].parameters.default", None),  # fmt: skip
    ({"input": [{"role": "user", "content": [1.5]}]}, "input[0].content[0]", None),
    ({"input": "hi", "text": {"verbosity": float("nan")}}, "text.verbosity", None),  # an extra field, echoed
    ({"input": "hi", "text": {"verbosity": "\ud800"}}, "text.verbosity", "invalid_text"),
    ({"input": [{"role": "user", "content": [None]}]}, "input[0].content[0]", None),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_REQUESTS, ids=[p for _, p, _ in BAD_REQUESTS])
def test_bad_requests_are_400_naming_the_field(
    server: ServerProcess, body: dict[str, Any], param: str, code: str | None
) -> None:
    # json.dumps writes NaN and Infinity as Python's reader takes them (httpx's json= refuses to).
    r = server.post("/v1/responses", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code and error["type"] == "invalid_request_error", error
    assert error["message"]


def test_previous_response_id_continues_a_kept_response(client: openai.OpenAI) -> None:
    """A response is kept (OpenAI's default, store true): the next turn may send only what is new."""
    first = client.responses.create(model="m", input=LIST_FILES, tools=[SHELL], temperature=0)
    assert first.store is True
    (call,) = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "README.md\nmain.py"}
    second = client.responses.create(
        model="m", input=[result], tools=[SHELL], temperature=0, previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    assert second.output_text == "Here are the files in this directory."
    stateless = client.responses.create(model="m", input=first_turn_items(first), tools=[SHELL], temperature=0)
    assert second.usage.input_tokens == stateless.usage.input_tokens  # the same prompt, rebuilt from the store
    # A third turn continues the chain: every earlier turn's items come back, the first included.
    third = client.responses.create(
        model="m", input=FRANCE, tools=[SHELL], temperature=0, max_output_tokens=4, previous_response_id=second.id
    )
    whole = [*first_turn_items(first), *(item.model_dump(exclude_none=True) for item in second.output)]
    counted = client.responses.input_tokens.count(model="m", input=[*whole, {"role": "user", "content": FRANCE}],
                                                  tools=[SHELL])  # fmt: skip
    assert third.usage.input_tokens == counted.input_tokens > second.usage.input_tokens
    with pytest.raises(openai.BadRequestError, match="not found") as exc:
        client.responses.create(model="m", input="hi", previous_response_id="resp_abc")
    assert exc.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as exc:  # an error in the new items names them as sent
        client.responses.create(model="m", input=[{**result, "call_id": "call_nope"}], previous_response_id=first.id)
    assert exc.value.body["param"] == "input[0].call_id"


def test_item_reference_reads_a_kept_item(client: openai.OpenAI) -> None:
    """The Vercel AI SDK's default (store true) sends an earlier assistant message back by its id."""
    first = client.responses.create(model="m", input=FRANCE, temperature=0)
    (message,) = first.output
    history = [{"role": "user", "content": FRANCE}]
    question = {"role": "user", "content": LIST_FILES}
    by_reference = client.responses.create(
        model="m", temperature=0, tools=[SHELL], input=[*history, {"type": "item_reference", "id": message.id}, question]
    )  # fmt: skip
    by_value = client.responses.create(
        model="m", temperature=0, tools=[SHELL], input=[*history, message.model_dump(exclude_none=True), question]
    )  # fmt: skip
    assert by_reference.usage.input_tokens == by_value.usage.input_tokens
    assert [item.type for item in by_reference.output] == [item.type for item in by_value.output] == ["function_call"]


def test_retrieve_delete_and_store_false(client: openai.OpenAI) -> None:
    kept = client.responses.create(model="m", input=FRANCE, temperature=0)
    retrieved = client.responses.retrieve(kept.id)
    assert retrieved.id == kept.id and retrieved.output_text == kept.output_text and retrieved.status == "completed"
    with pytest.raises(openai.BadRequestError, match="without 'stream'"):  # was a JSON body read as no events
        list(client.responses.retrieve(kept.id, stream=True))
    (question,) = client.responses.input_items.list(kept.id).data
    assert question.type == "message" and question.role == "user" and question.content[0].text == FRANCE
    three = client.responses.create(model="m", max_output_tokens=1, input=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    newest = client.responses.input_items.list(three.id, limit=2)
    assert [item.content[0].text for item in newest.data] == ["c", "b"] and newest.has_more
    rest = client.responses.input_items.list(three.id, after=newest.last_id)
    assert [item.content[0].text for item in rest.data] == ["a"] and not rest.has_more
    assert [i.content[0].text for i in client.responses.input_items.list(three.id, order="asc").data] == ["a", "b", "c"]
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="m", input="hi", previous_response_id=kept.id)
    unkept = client.responses.create(model="m", input=FRANCE, temperature=0, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    with pytest.raises(openai.BadRequestError, match="store: false"):
        client.responses.create(model="m", input=[{"type": "item_reference", "id": unkept.output[0].id}])


def test_accepted_and_ignored_fields(client: openai.OpenAI) -> None:
    resp = client.responses.create(
        model="m", input=FRANCE, temperature=0, store=True, reasoning={"effort": "high", "summary": "auto"},
        include=["reasoning.encrypted_content"], truncation="auto", prompt_cache_key="k", user="u",
        parallel_tool_calls=False, text={"format": {"type": "text"}, "verbosity": "low"}, top_p=0.9,
        extra_body={"top_k": 20, "repetition_penalty": 1.05, "seed": 1},
    )  # fmt: skip
    assert resp.output_text == "The capital of France is Paris." and resp.user == "u"
    assert resp.top_p == pytest.approx(0.9) and resp.parallel_tool_calls is False
    assert (resp.reasoning.effort, resp.reasoning.summary) == ("high", "auto")  # echoed, as OpenAI does


def test_logit_bias_applies_as_on_chat(server: ServerProcess, client: openai.OpenAI) -> None:
    (token,) = server.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    resp = client.responses.create(model="m", input=FRANCE, temperature=0, max_output_tokens=3,
                                   extra_body={"logit_bias": {str(token): 100}})
    assert resp.output_text.startswith("HelloHello"), resp.output_text


# ---- unit tests of the mapping (no server) ----


def test_function_call_items_become_chat_history() -> None:
    req = ResponsesRequest(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": LIST_FILES},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Listing."}]},
            CALL,
            {**CALL, "call_id": "call_2"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "call_1", "output": "README.md"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "a"}]},
        ],
    )
    messages = chat_messages(req)
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assistant = messages[2]
    assert assistant.content == "Listing." and [c.id for c in assistant.tool_calls] == ["call_1", "call_2"]
    assert assistant.tool_calls[0].function.arguments == {"command": "ls"}
    assert (messages[3].tool_call_id, messages[3].content) == ("call_1", "README.md")
    assert messages[4].content == "a"


def test_function_call_output_needs_its_call() -> None:
    req = ResponsesRequest(input=[{"type": "function_call_output", "call_id": "call_9", "output": "x"}])
    with pytest.raises(APIError) as exc:
        chat_messages(req)
    assert exc.value.param == "input[0].call_id"


def test_output_items_keep_the_model_order() -> None:
    items = OutputItems()
    header = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
    events = items.add({"content": "Let me look."})
    events += items.add({"tool_calls": [header]})
    events += items.add({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": 1}'}}]})
    events += items.add({"tool_calls": [{**header, "index": 1, "id": "call_b"}]})  # no arguments: "{}"
    events += items.add({"content": "Done."})
    events += items.close("completed")
    assert [i["type"] for i in items.items] == ["message", "function_call", "function_call", "message"]
    assert [i["arguments"] for i in items.items[1:3]] == ['{"x": 1}', "{}"]
    assert items.items[3]["content"][0]["text"] == "Done."
    added = [e for e in events if e[0] == "response.output_item.added"]
    assert [e[1]["output_index"] for e in added] == [0, 1, 2, 3]
    second_call_args = [e[1]["delta"] for e in events if e[0].endswith("arguments.delta") and e[1]["output_index"] == 2]
    assert second_call_args == ["{}"], "argument deltas always add up to the done arguments"


def test_response_store_keeps_recent_conversations_within_its_size() -> None:
    from qwenserve.api.response_store import ResponseStore

    def body(n: int) -> dict[str, Any]:
        return {"output": [{"id": f"msg_{n}", "type": "message", "content": "x" * 100}]}

    user = {"role": "user", "content": "hi"}
    store = ResponseStore(max_bytes=1000)
    store.put("resp_0", None, [user], body(0))
    store.put("resp_1", "resp_0", [user], body(1))
    assert [item.get("id") for item in store.conversation("resp_1") or []] == [None, "msg_0", None, "msg_1"]
    for n in range(2, 8):  # others fill the store; continuing resp_1 keeps its chain among the recent
        store.put(f"resp_{n}", None, [user], body(n))
        assert store.conversation("resp_1") is not None
    assert store.get("resp_2") is None and store.item("msg_2") is None  # the least recently used left first
    assert store.item("msg_0") is not None and store.item("msg_7") is not None
    assert store.delete("resp_0") and not store.delete("resp_0")
    assert store.conversation("resp_1") is None  # its start is gone: it cannot be continued
    store.put("resp_big", None, [{"role": "user", "content": "y" * 2000}], body(99))
    assert store.get("resp_big") is None and store.get("resp_7") is not None  # too big to keep, nothing evicted
