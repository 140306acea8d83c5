"""POST /v1/messages and /v1/messages/count_tokens (the Anthropic Messages API) against a real `qwenserve
serve` process.

One server for the module (with an API key, so Anthropic's x-api-key is what authenticates), the real
`anthropic` SDK as the client, httpx for the raw SSE and the 400s. The demo model's greedy answers are
known (see qwenserve/demo/build.py): Paris for the capital of France, a `run_shell_command` `ls` call
when asked to list files with the shell tool offered, and a short answer after the tool's output. The
last tests are unit tests of the request mapping and the content blocks, without the server.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest
from server_utils import ServerProcess, start_server

from qwenserve.api.protocol_messages import MessagesRequest, chat_conversation, to_chat_request
from qwenserve.api.sampling import build_sampling_params
from qwenserve.api.serving_messages import ContentBlocks
from qwenserve.demo.build import SHELL_TOOL

pytestmark = pytest.mark.slow

KEY = "messages-test-key"
FRANCE = "What is the capital of France?"
PARIS = "The capital of France is Paris."
LIST_FILES = "List the files in this directory"
AFTER_TOOL = "Here are the files in this directory."
# The demo's shell tool in Anthropic's shape.
SHELL = {
    "name": SHELL_TOOL["function"]["name"],
    "description": SHELL_TOOL["function"]["description"],
    "input_schema": SHELL_TOOL["function"]["parameters"],
}
HEARTBEAT = 0.1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        tmp_path_factory.mktemp("messages"), "--log-requests", api_key=KEY,
        env={"QWENSERVE_HEARTBEAT_SECONDS": str(HEARTBEAT)},
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> anthropic.Anthropic:
    # The SDK appends /v1/messages to the base URL, as Claude Code's ANTHROPIC_BASE_URL is used.
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)


def ask(client: anthropic.Anthropic, content: str = FRANCE, **kw: Any) -> Any:
    return client.messages.create(model="my-model", max_tokens=kw.pop("max_tokens", 64),
                                  messages=[{"role": "user", "content": content}], **kw)  # fmt: skip


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def raw_events(server: ServerProcess, body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a raw stream, pings included."""
    body = {"model": "m", "max_tokens": 64, **body, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/messages", json=body, headers={"x-api-key": KEY},
                      timeout=120) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == event, "every data line repeats its event's type"
                yield event, data


# ---- non-streaming ----


def test_plain_answer(client: anthropic.Anthropic, server: ServerProcess) -> None:
    message = ask(client)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "my-model" and [b.type for b in message.content] == ["text"]
    assert text_of(message) == PARIS
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    usage = message.usage
    assert usage.output_tokens == 8 and usage.input_tokens + usage.cache_read_input_tokens > 0
    assert usage.cache_creation_input_tokens == 0
    assert re.search(rf"request {message.id}: prompt=\d+ cached=\d+ generated=8 .*finish=stop", server.log())


def test_system_blocks_and_ignored_fields(client: anthropic.Anthropic) -> None:
    """`system` as text blocks, cache_control on any block, thinking, metadata and the sampling fields
    this SDK sends only as extras: accepted, and the answer is the model's."""
    message = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=64,
        system=[{"type": "text", "text": "You are a helpful assistant.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": FRANCE, "cache_control": {"type": "ephemeral"}}]}],
        metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 2048}, service_tier="auto",
        extra_body={"temperature": 0, "top_p": 0.9, "top_k": 20},
    )  # fmt: skip
    assert text_of(message) == PARIS and message.model == "claude-sonnet-4-5"


def test_tool_use_round_trip(client: anthropic.Anthropic, server: ServerProcess) -> None:
    first = ask(client, LIST_FILES, tools=[SHELL])
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "run_shell_command" and call.input == {"command": "ls"}
    assert call.id.startswith("toolu_")
    assert re.search(rf"request {first.id}: .*finish=tool_calls tool_calls=1", server.log())

    # The assistant turn as the SDK returned it, and the tool's output as text blocks.
    second = client.messages.create(model="m", max_tokens=64, tools=[SHELL], messages=[
        {"role": "user", "content": LIST_FILES},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": [{"type": "text", "text": "README.md\nmain.py"}]}]},
    ])  # fmt: skip
    assert text_of(second) == AFTER_TOOL and second.stop_reason == "end_turn"
    # The call's id is kept as the chat call id, so the result pairs with it in the rendered history.
    assert f'"tool_use_id": "{call.id}"' in server.log()


def test_tool_choice(client: anthropic.Anthropic) -> None:
    forced = ask(client, FRANCE, tools=[SHELL], tool_choice={"type": "any"}, max_tokens=40)
    assert [b.type for b in forced.content] == ["tool_use"] and forced.stop_reason == "tool_use"
    assert forced.content[0].name == "run_shell_command" and forced.content[0].input
    hidden = ask(client, LIST_FILES, tools=[SHELL], tool_choice={"type": "none"})
    assert text_of(hidden) == "I can't see your files without a shell tool." and hidden.stop_reason == "end_turn"


def test_stop_sequences_and_max_tokens(client: anthropic.Anthropic) -> None:
    stopped = ask(client, stop_sequences=["Paris", "Berlin"])
    assert text_of(stopped) == "The capital of France is "
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "Paris")
    cut = ask(client, max_tokens=3)
    assert text_of(cut) == "The capital of" and cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def test_prefill_continues_the_final_assistant_turn(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="m", max_tokens=32, messages=[
        {"role": "user", "content": FRANCE}, {"role": "assistant", "content": "The capital of France"}])  # fmt: skip
    assert text_of(message) == " is Paris."


def test_count_tokens_and_cached_usage(client: anthropic.Anthropic) -> None:
    """count_tokens is the prompt /v1/messages renders; a repeated prompt is read from the prefix cache,
    which usage reports as Anthropic does: input_tokens is the uncached rest."""
    system = f"Session {random.getrandbits(64):x}. " + "Answer questions about geography. " * 20  # never cached yet
    messages = [{"role": "user", "content": FRANCE}]
    counted = client.messages.count_tokens(model="m", system=system, messages=messages, tools=[SHELL])
    first = client.messages.create(model="m", max_tokens=16, system=system, messages=messages, tools=[SHELL])
    assert first.usage.cache_read_input_tokens == 0 and first.usage.input_tokens == counted.input_tokens
    again = client.messages.create(model="m", max_tokens=16, system=system, messages=messages, tools=[SHELL])
    usage = again.usage
    assert usage.cache_read_input_tokens > counted.input_tokens // 2
    assert usage.input_tokens + usage.cache_read_input_tokens == counted.input_tokens
    assert text_of(again) == text_of(first)


# ---- streaming ----


def test_streamed_answer_equals_the_plain_one(client: anthropic.Anthropic, server: ServerProcess) -> None:
    plain = ask(client)
    with client.messages.stream(model="my-model", max_tokens=64, messages=[{"role": "user", "content": FRANCE}]) as s:
        streamed_text = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed_text == text_of(final) == text_of(plain) == PARIS
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == plain.usage.output_tokens
    assert final.id.startswith("msg_") and final.model == "my-model"

    events = [(e, d) for e, d in raw_events(server, {"messages": [{"role": "user", "content": FRANCE}]}) if e != "ping"]
    kinds = [e for e, _ in events]
    n = kinds.count("content_block_delta")
    assert n > 3, "text streams token by token"
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * n, "content_block_stop",
                     "message_delta", "message_stop"]  # fmt: skip
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 8


def test_streamed_tool_use_and_stop_sequence(client: anthropic.Anthropic, server: ServerProcess) -> None:
    with client.messages.stream(model="m", max_tokens=64, tools=[SHELL],
                                messages=[{"role": "user", "content": LIST_FILES}]) as s:  # fmt: skip
        final = s.get_final_message()
    (call,) = final.content
    assert call.type == "tool_use" and call.input == {"command": "ls"} and final.stop_reason == "tool_use"

    body = {"tools": [SHELL], "messages": [{"role": "user", "content": LIST_FILES}]}
    events = [(e, d) for e, d in raw_events(server, body) if e != "ping"]
    kinds = [e for e, _ in events]
    n = kinds.count("content_block_delta")
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * n, "content_block_stop",
                     "message_delta", "message_stop"]  # fmt: skip
    block = events[1][1]["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "run_shell_command" and block["input"] == {}
    partial = "".join(d["delta"]["partial_json"] for e, d in events if e == "content_block_delta")
    assert json.loads(partial) == {"command": "ls"}

    body = {"messages": [{"role": "user", "content": FRANCE}], "stop_sequences": ["Paris"]}
    delta = [d for e, d in raw_events(server, body) if e == "message_delta"][0]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "Paris"}


def test_client_disconnect_aborts_and_frees_kv(server: ServerProcess) -> None:
    idle_blocks = server.metrics()["qwenserve_kv_cache_usage_perc"]
    body = {"messages": [{"role": "user", "content": FRANCE}], "max_tokens": 4000, "ignore_eos": True}
    events = raw_events(server, body)
    message_id = None
    try:
        for event, data in events:
            message_id = message_id or data.get("message", {}).get("id")
            if event == "content_block_delta":
                break
    finally:
        events.close()  # closes the connection mid-stream
    wait_for(lambda: re.search(rf"request {message_id}: .*finish=abort", server.log()) is not None)
    wait_for(lambda: server.metrics()["qwenserve_num_requests_running"] == 0)
    wait_for(lambda: server.metrics()["qwenserve_kv_cache_usage_perc"] <= idle_blocks)


def test_failure_mid_stream_is_an_error_event(client: anthropic.Anthropic) -> None:
    """A JSON schema part no text can match ends the answer when it is reached: after the stream began,
    that is Anthropic's `error` event, which the SDK raises."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "[^\\s\\S]"}}, "required": ["a"]}
    with pytest.raises(anthropic.APIStatusError) as exc:  # noqa: PT012 - the error arrives while iterating
        with client.messages.stream(model="m", max_tokens=32, messages=[{"role": "user", "content": FRANCE}],
                                    output_config={"format": {"type": "json_schema", "schema": schema}}) as s:  # fmt: skip
            s.get_final_message()
    assert exc.value.type == "invalid_request_error" and "no text at all" in exc.value.api_message


# ---- errors ----

BAD_REQUESTS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens", "invalid_value"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens", None),
    ({"max_tokens": "5", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens", "invalid_value"),
    ({"max_tokens": 5, "messages": []}, "messages", None),
    ({"max_tokens": 5, "messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role", None),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
     "messages[0].content[0].type", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].type", "unsupported_content"),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type", "unsupported_content"),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "video", "source": {}}]}]}]},
     "messages[0].content[0].content[0].type", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "ls"}]}]}, "messages[0].content[0].input", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages[0].content[0]", None),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", "unsupported_parameter"),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [{"input_schema": {}}]},
     "tools[0].name", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [SHELL],
      "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "required"}},
     "tool_choice.type", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "temperature": "0"}, "temperature",
     "invalid_value"),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "system": [{"type": "image"}]}, "system[0]",
     None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "mcp_servers": [{"url": "x"}]},
     "mcp_servers", "unsupported_parameter"),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x", "is_error": "yes"}]}]},
     "messages[0].content[0].is_error", None),  # fmt: skip
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [SHELL],
      "tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"}}, "tool_choice.disable_parallel_tool_use",
     None),  # fmt: skip
    # A forced call's own markup holds a newline: the answer would end before the call (was a 200 with no call).
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "tools": [SHELL],
      "tool_choice": {"type": "any"}, "stop_sequences": ["\n"]}, "stop_sequences", None),  # fmt: skip
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_REQUESTS, ids=[p for _, p, _ in BAD_REQUESTS])
def test_bad_requests_are_400s_in_both_shapes(
    server: ServerProcess, body: dict[str, Any], param: str, code: str | None
) -> None:
    r = server.post("/v1/messages", json={"model": "m", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert r.json()["type"] == "error", "Anthropic's shape"
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code, error
    assert error["message"]


@pytest.mark.parametrize("thread", [{"type": "create"}, {"type": "continue", "previous_message_id": "msg_1"}])
def test_a_message_thread_is_refused_so_the_tool_runner_resends_the_history(
    server: ServerProcess, thread: dict[str, Any]
) -> None:
    """The anthropic SDKs' tool runner threads by default (`thread: {"type": "create"}`, then `continue` turns
    that carry only the new tool results, without the history, system or tools). Ignored, a continue turn
    reached the model out of context. Refused with Anthropic's `thread_unsupported_request` error code, the
    runner (unsupportedRequestBehavior 'continue_unthreaded') resends the turn with the whole history."""
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": FRANCE}], "thread": thread}
    r = server.post("/v1/messages", json=body, headers={"anthropic-beta": "message-threads-2026-08-12"})
    assert r.status_code == 400 and r.headers.get("x-should-retry") == "false", r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "thread", error
    assert error["details"]["error_code"] == "thread_unsupported_request", error
    assert isinstance(error["details"]["unsupported"], list), error
    r = server.post("/v1/messages", json={**body, "thread": None})
    assert r.status_code == 200, r.text


def test_sdk_raises_bad_request_with_the_reason(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.create(model="m", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])  # fmt: skip
    assert exc.value.type == "invalid_request_error"
    assert exc.value.api_message == "Content blocks of type 'image' are not supported: this model reads text only."


def test_an_image_a_tool_returned_reaches_the_model_as_a_note(client: anthropic.Anthropic) -> None:
    """Claude Code's Read of an image file answers with an image block: the model gets a note in its place
    (a 400 would fail every later turn, which carries the result along), the same tokens as the note
    written as text. An image the user sends is still a 400 (see above)."""
    def counted(block: dict[str, Any]) -> int:
        messages = [
            {"role": "user", "content": "Look at shot.png"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [block]}]},
        ]
        return client.messages.count_tokens(model="m", messages=messages).input_tokens

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert counted(image) == counted({"type": "text", "text": "[image omitted: this model reads text only]"})
    assert counted(image) != counted({"type": "text", "text": "[image]"}), "the count sees the block's text"


def test_claude_code_tool_search_and_hosted_tool_history_are_read(client: anthropic.Anthropic) -> None:
    """Claude Code answers its ToolSearch call with tool_reference blocks (a 400 there made it retry twice,
    then turn tool search off and lose the cached prompt); a search_result carries text; an assistant turn
    from Anthropic's hosted tools (server_tool_use and its result) is history this server drops."""
    def counted(result: list[dict[str, Any]], assistant: list[dict[str, Any]] | None = None) -> int:
        messages = [
            {"role": "user", "content": "Fetch the page"},
            {"role": "assistant", "content": [*(assistant or []), {"type": "tool_use", "id": "t1", "name": "ToolSearch", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": result}]},
        ]  # fmt: skip
        return client.messages.count_tokens(model="m", messages=messages).input_tokens

    text = counted([{"type": "text", "text": "Tool 'WebFetch' is now available."}])
    assert counted([{"type": "tool_reference", "tool_name": "WebFetch"}]) == text
    search = {"type": "search_result", "title": "Docs", "source": "https://x.example",
              "content": [{"type": "text", "text": "The answer is 42."}]}  # fmt: skip
    assert counted([search]) == counted([{"type": "text", "text": "Docs https://x.example\nThe answer is 42."}])
    hosted = [{"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {"query": "x"}},
              {"type": "web_search_tool_result", "tool_use_id": "srv_1", "content": []}]  # fmt: skip
    assert counted([{"type": "text", "text": "Tool 'WebFetch' is now available."}], hosted) == text
    with pytest.raises(anthropic.BadRequestError) as exc:
        counted([{"type": "tool_reference"}])
    assert "tool_name" in exc.value.api_message


def test_context_overflow_in_anthropic_words(client: anthropic.Anthropic) -> None:
    """Claude Code compacts its history on 'prompt is too long'; qwen-code reads OpenAI's words after it."""
    long_text = "hello " * 40_000  # ~40k tokens: over the demo's 32,768
    counted = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": long_text}])
    assert counted.input_tokens > 32_768, "count_tokens counts a prompt however long"
    with pytest.raises(anthropic.BadRequestError) as exc:
        ask(client, long_text)
    message = exc.value.api_message
    assert message.startswith(f"prompt is too long: {counted.input_tokens} tokens > 32768 maximum.")
    assert "This model's maximum context length is 32768 tokens" in message


def test_models_list_reads_in_anthropics_shape(client: anthropic.Anthropic) -> None:
    """The one /v1/models answer carries Anthropic's fields too: the SDK's `models.list()` /
    `models.retrieve()` get a name, a date and the paging fields instead of None."""
    models = client.models.list()
    assert [m.id for m in models.data] == ["qwen3-coder-demo"]
    card = models.data[0]
    assert card.type == "model" and card.display_name == "qwen3-coder-demo"
    assert card.created_at.year >= 2026 and card.created_at.tzinfo is not None
    assert models.has_more is False and models.first_id == models.last_id == "qwen3-coder-demo"
    assert client.models.retrieve("qwen3-coder-demo").created_at == card.created_at
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("not-served")


def test_wrong_key_is_an_authentication_error(server: ServerProcess) -> None:
    wrong = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as exc:
        ask(wrong)
    assert exc.value.type == "authentication_error" and exc.value.api_message == "Incorrect API key."
    r = httpx.post(f"{server.base_url}/v1/messages/count_tokens", json={"messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["message"] == "Missing API key: send 'x-api-key: <key>'."
    # The OpenAI routes keep their own shape.
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={}, timeout=30)
    assert r.status_code == 401 and "type" not in r.json() and r.json()["error"]["type"] == "invalid_request_error"


def test_refusals_say_not_to_retry(server: ServerProcess) -> None:
    """Claude Code retries a 401 ten times (about three minutes of backoff) unless the answer says
    `x-should-retry: false`, as Anthropic's does: a wrong key must fail at once. Other 4xx say so too."""
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": FRANCE}]}
    r = httpx.post(f"{server.base_url}/v1/messages", json=body, headers={"x-api-key": "wrong"}, timeout=30)
    assert r.status_code == 401 and r.headers.get("x-should-retry") == "false", r.headers
    assert r.headers.get("www-authenticate") == "Bearer", "the error's own headers are kept"
    r = server.post("/v1/messages", json={**body, "max_tokens": 0})
    assert r.status_code == 400 and r.headers.get("x-should-retry") == "false", r.headers
    r = server.post("/v1/messages/count_tokens", json={"messages": "hi"})
    assert r.status_code == 400 and r.headers.get("x-should-retry") == "false", r.headers
    # The OpenAI routes are unchanged.
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={}, timeout=30)
    assert r.status_code == 401 and "x-should-retry" not in r.headers


# ---- unit tests of the mapping (no server) ----


def test_blocks_become_chat_history() -> None:
    req = MessagesRequest(
        max_tokens=8,
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0.a1f; cc_entrypoint=cli;"},
                {"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
        messages=[
            {"role": "user", "content": LIST_FILES},
            {"role": "user", "content": [{"type": "text", "text": "Please."}]},  # same role: one turn
            {"role": "system", "content": [{"type": "text", "text": "cwd: /tmp"}]},  # in place, as Claude Code sends
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Listing."},
                {"type": "tool_use", "id": "toolu_1", "name": "run_shell_command", "input": {"command": "ls"}},
                {"type": "tool_use", "id": "toolu_2", "name": "run_shell_command", "input": {"command": "pwd"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "README.md"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "denied"}]},
                {"type": "text", "text": "And now?"}]},
        ],
    )  # fmt: skip
    conversation = chat_conversation(req)
    messages = conversation.messages
    assert [m.role for m in messages] == ["system", "user", "system", "assistant", "tool", "tool", "user"]
    assert messages[0].content == "Be brief.\nUse tools." and messages[1].content == f"{LIST_FILES}\nPlease."
    assert messages[2].content == "cwd: /tmp"
    assistant = messages[3]
    assert assistant.content == "Listing." and [c.id for c in assistant.tool_calls] == ["toolu_1", "toolu_2"]
    assert assistant.tool_calls[1].function.arguments == {"command": "pwd"}
    assert [(m.tool_call_id, m.content) for m in messages[4:6]] == [("toolu_1", "README.md"), ("toolu_2", "Error: denied")]
    assert messages[6].content == "And now?" and not conversation.prefill


def test_the_temperature_thinking_forces_leaves_the_models_default() -> None:
    """qwen-code's Anthropic provider turns thinking on and so sends temperature 1, the only value Anthropic
    takes with thinking, on every request: the model, which does not think, samples with its own defaults
    (greedy for the demo model's do_sample false). A temperature of 1 without thinking, or another value
    with it, is the client's choice and applies."""

    def temperature(**fields: Any) -> float:
        req = MessagesRequest(max_tokens=8, messages=[{"role": "user", "content": FRANCE}], **fields)
        params = build_sampling_params(to_chat_request(req), {"do_sample": False}, max_tokens=8, logprobs=None)
        return params.temperature

    assert temperature(thinking={"type": "enabled", "budget_tokens": 2048}, temperature=1.0) == 0.0
    assert temperature(thinking={"type": "adaptive"}, temperature=1) == 0.0
    assert temperature(thinking={"type": "enabled", "budget_tokens": 2048}) == 0.0
    assert temperature(temperature=1.0) == 1.0
    assert temperature(thinking={"type": "disabled"}, temperature=1.0) == 1.0
    assert temperature(thinking={"type": "enabled", "budget_tokens": 2048}, temperature=0.5) == 0.5


def test_content_blocks_keep_the_model_order() -> None:
    blocks = ContentBlocks()
    header = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}
    events = blocks.add({"content": "Let me look."})
    events += blocks.add({"tool_calls": [header]})
    events += blocks.add({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": 1}'}}]})
    events += blocks.add({"tool_calls": [{**header, "index": 1, "id": "call_b"}]})  # no arguments: input {}
    events += blocks.add({"content": "Done."})
    events += blocks.close()
    assert [b["type"] for b in blocks.blocks] == ["text", "tool_use", "tool_use", "text"]
    assert [b["input"] for b in blocks.blocks[1:3]] == [{"x": 1}, {}]
    assert blocks.blocks[3] == {"type": "text", "text": "Done."}
    starts = [e[1]["index"] for e in events if e[0] == "content_block_start"]
    stops = [e[1]["index"] for e in events if e[0] == "content_block_stop"]
    assert starts == stops == [0, 1, 2, 3]
