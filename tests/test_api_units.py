"""Fast checks of the API's pure helpers (no server): message normalisation, tool_choice
prefill in both tool-call formats, rendering with the demo model's real tokenizer and
template, sampling defaults, error `param` paths and logprob shapes."""

from __future__ import annotations

import json

import pytest

from qwenserve.api.chat import (
    ToolPlan,
    arguments_to_dict,
    content_to_text,
    normalize_messages,
    normalize_tools,
    plan_tools,
    render_chat,
)
from qwenserve.api.errors import APIError, aborted, format_loc
from qwenserve.api.logprobs import TextOffsets, byte_level_token_bytes, chat_logprobs, completion_logprobs
from qwenserve.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from qwenserve.api.sampling import build_sampling_params
from qwenserve.api.serving_chat import CallFilter
from qwenserve.api.serving_completions import fim_prompt, split_prompts
from qwenserve.engine.outputs import RequestOutput, TokenLogprob
from qwenserve.tool_parser import Qwen3CoderToolParser, Qwen3JsonToolParser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
SHELL = {"type": "function", "function": {"name": "run_shell_command", "parameters": None}}


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **kw)


def test_content_parts_are_joined_and_media_refused() -> None:
    assert content_to_text(None, "p") == ""
    assert content_to_text("x", "p") == "x"
    parts = [
        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "b"},
    ]
    assert content_to_text(parts, "p") == "a\nb"
    with pytest.raises(APIError) as err:
        content_to_text([{"type": "image_url", "image_url": {"url": "x"}}], "messages[0].content")
    assert err.value.status == 400 and err.value.param == "messages[0].content[0].type"
    for bad, param in [({"text": "a"}, "p[0].type"), ({"type": "text"}, "p[0].text"), ({"type": "text", "text": 5}, "p[0].text")]:
        with pytest.raises(APIError) as err:
            content_to_text([bad], "p")
        assert err.value.param == param


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"command": "ls"}', {"command": "ls"}),
        ({"a": 1}, {"a": 1}),
        ("", {}),
        (None, {}),
        ("not json", {}),
        ("[1, 2]", {}),
        ("null", {}),
        ("  ", {}),
    ],  # fmt: skip
)
def test_arguments_become_dicts_whatever_arrives(raw: object, expected: dict) -> None:
    assert arguments_to_dict(raw) == expected


def test_messages_are_plain_dicts() -> None:
    msgs = [
        ChatMessage(role="developer", content="be brief"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[
                {"id": "c1", "function": {"name": "run_shell_command", "arguments": '{"command":"ls"}'}}
            ],
        ),
        ChatMessage(role="tool", tool_call_id="c1", content=[{"type": "text", "text": "a.txt"}]),
    ]
    out = normalize_messages(msgs)
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["content"] == "" and out[1]["tool_calls"][0]["function"]["arguments"] == {"command": "ls"}
    assert out[2] == {"role": "tool", "content": "a.txt", "tool_call_id": "c1"}
    assert json.loads(json.dumps(out)) == out  # nothing but JSON types reaches Jinja


def test_parameterless_tools_get_an_empty_object_schema() -> None:
    tools = normalize_tools(chat(tools=[SHELL]).tools)
    assert tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_tool_choice_plans() -> None:
    assert plan_tools(chat(tools=[WEATHER], tool_choice="none"), xml=True).tools is None
    auto = plan_tools(chat(tools=[WEATHER]), xml=True)
    assert auto.parse and auto.forced_prefix == ""
    one = plan_tools(chat(tools=[WEATHER], tool_choice="required"), xml=True)
    assert one.forced_prefix == "<tool_call>\n<function=get_weather>\n"
    many = plan_tools(chat(tools=[WEATHER, SHELL], tool_choice="required"), xml=True)
    assert many.forced_prefix == "<tool_call>\n<function="
    named = {"type": "function", "function": {"name": "run_shell_command"}}
    assert plan_tools(chat(tools=[WEATHER, SHELL], tool_choice=named), xml=False).forced_prefix == (
        '<tool_call>\n{"name": "run_shell_command", "arguments": '
    )
    for bad in (chat(tool_choice="required"), chat(tools=[WEATHER], tool_choice={"function": {"name": "x"}})):
        with pytest.raises(APIError) as err:
            plan_tools(bad, xml=True)
        assert err.value.param == "tool_choice"


@pytest.mark.parametrize(
    ("parser", "xml", "continuation"),
    [
        (
            Qwen3CoderToolParser,
            True,
            "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
            "</function>\n</tool_call>",
        ),  # fmt: skip
        (Qwen3JsonToolParser, False, '{"city": "Paris", "days": 3}}\n</tool_call>'),
    ],
)
def test_forced_prefix_feeds_the_parser(parser: type, xml: bool, continuation: str) -> None:
    """The prefill is not generated, so the parser must see it first; streaming == whole text."""
    prefix = plan_tools(chat(tools=[WEATHER], tool_choice="required"), xml=xml).forced_prefix
    _, calls = parser([WEATHER]).parse(prefix + continuation)
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    p = parser([WEATHER])
    deltas = p.feed(prefix) + [d for ch in continuation for d in p.feed(ch)] + p.finish()
    args = "".join(tc["function"].get("arguments", "") for d in deltas for tc in d.get("tool_calls", []))
    assert json.loads(args) == {"city": "Paris", "days": 3}


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    from qwenserve.demo import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "tokenizer.json").exists():
        pytest.skip("demo model assets are not built")
    return transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def test_render_history_with_string_arguments(tokenizer) -> None:
    req = ChatCompletionRequest(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "List"}, {"type": "text", "text": "files"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "run_shell_command", "arguments": '{"command": "ls"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "a.txt"}]},
        ],  # fmt: skip
        tools=[SHELL],
    )
    text = render_chat(
        tokenizer, normalize_messages(req.messages), normalize_tools(req.tools), {"tokenize": True, "x": 1}
    )
    assert "List\nfiles" in text
    assert "<function=run_shell_command>\n<parameter=command>\nls\n</parameter>" in text
    assert "<tool_response>\na.txt\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_sampling_defaults_and_overrides() -> None:
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    p = build_sampling_params(chat(), defaults, max_tokens=None, logprobs=None)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    p = build_sampling_params(chat(temperature=0, top_k=-1, stop="x"), defaults, max_tokens=5, logprobs=2)
    assert p.temperature == 0 and p.top_k == 0 and p.stop == ["x"] and p.max_tokens == 5 and p.logprobs == 2
    assert (
        build_sampling_params(chat(), {"do_sample": False}, max_tokens=None, logprobs=None).temperature == 0
    )


def test_error_params_read_like_openai() -> None:
    assert format_loc(("body", "messages", 0, "role")) == "messages[0].role"
    assert format_loc(("body", "tool_choice", "literal['none','auto','required']")) == "tool_choice"
    assert format_loc(("body", "tools", 0, "function", "NamedToolChoice")) == "tools[0].function"
    assert format_loc(("body",)) is None
    assert format_loc(("query", "limit")) == "limit"  # a query parameter named as OpenAI names it
    assert format_loc(("body", "query")) == "query"  # a body field that happens to share the name


def test_completion_prompt_shapes_and_fim() -> None:
    assert split_prompts("a") == ["a"]
    assert split_prompts([1, 2]) == [[1, 2]]
    assert split_prompts(["a", "b"]) == ["a", "b"]
    assert split_prompts(CompletionRequest(prompt=[[1], [2, 3]]).prompt) == [[1], [2, 3]]
    assert fim_prompt("def f(", "):") == "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>"


def test_logprob_shapes() -> None:
    lp = [TokenLogprob(1, "Hi", -0.5, [(1, "Hi", -0.5), (2, "Yo", float("-inf"))])]
    chat_lp = chat_logprobs(lp)["content"][0]
    assert chat_lp["bytes"] == list(b"Hi") and chat_lp["top_logprobs"][1]["logprob"] == -9999.0
    legacy = completion_logprobs([None, *lp], ["a", "Hi"], 0)
    assert legacy == {
        "tokens": ["a", "Hi"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"Hi": -0.5, "Yo": -9999.0}],
        "text_offset": [0, 1],
    }
    unlikely = TokenLogprob(3, "Zz", -7.0, [(1, "Hi", -0.5)])  # sampled outside the top 1
    assert completion_logprobs([unlikely], ["Zz"])["top_logprobs"] == [{"Hi": -0.5, "Zz": -7.0}]


def test_parallel_tool_calls_false_streams_only_the_first_call() -> None:
    """Two calls in one turn: with parallel_tool_calls false the stream carries the first one whole
    and nothing of the second."""
    two_calls = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    )
    p = Qwen3CoderToolParser([WEATHER])
    deltas = CallFilter(one_call=True).deltas([d for ch in two_calls for d in p.feed(ch)] + p.finish())
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert {tc["index"] for tc in calls} == {0} and sum(1 for tc in calls if tc.get("id")) == 1
    assert json.loads("".join(tc["function"].get("arguments", "") for tc in calls)) == {"city": "Paris"}


def test_forced_calls_keep_only_the_allowed_functions_renumbered() -> None:
    """tool_choice required / named: a call of another function is dropped whole and the next allowed
    call streams as index 0."""
    calls_text = (
        "<tool_call>\n<function=run_shell_command>\n<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    )
    p = Qwen3CoderToolParser([WEATHER])
    deltas = CallFilter(("get_weather",)).deltas([d for ch in calls_text for d in p.feed(ch)] + p.finish())
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert {tc["index"] for tc in calls} == {0} and [tc["function"]["name"] for tc in calls if tc.get("id")] == [
        "get_weather"
    ]
    assert json.loads("".join(tc["function"].get("arguments", "") for tc in calls)) == {"city": "Rome"}
    whole = Qwen3CoderToolParser([WEATHER]).parse(calls_text)[1]
    assert [c["function"]["name"] for c in CallFilter(("get_weather",)).calls(whole)] == ["get_weather"]


def test_logprob_bytes_rebuild_characters_split_across_tokens(tokenizer) -> None:
    """A token holding part of a UTF-8 character reads as U+FFFD, but its `bytes` are its own."""
    token_bytes = byte_level_token_bytes(tokenizer)
    text = "emoji 🐱 héllo"
    ids = tokenizer.encode(text, add_special_tokens=False)
    lps = [TokenLogprob(i, tokenizer.decode([i]), -1.0, [(i, tokenizer.decode([i]), -1.0)]) for i in ids]
    content = chat_logprobs(lps, token_bytes)["content"]
    assert any("\ufffd" in c["token"] for c in content)  # the cat emoji spans tokens
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8") == text
    assert content[0]["top_logprobs"][0]["bytes"] == content[0]["bytes"]


def test_text_offsets_count_characters_that_span_tokens(tokenizer) -> None:
    """The cat emoji takes three tokens: the offsets after it move by one character, not three."""
    text = "a 🐱 b"
    ids = tokenizer.encode(text, add_special_tokens=False)
    tokens = [tokenizer.decode([i]) for i in ids]
    out = completion_logprobs([None] * len(ids), tokens, 0, ids, byte_level_token_bytes(tokenizer))
    assert out["text_offset"][-1] == text.index(" b")
    assert out["text_offset"] == sorted(out["text_offset"])


def test_an_unexpected_exception_is_an_openai_500_that_keeps_the_connection() -> None:
    """The middleware answers the 500 itself rather than re-raising, which would make the server
    drop the client's keep-alive connection."""
    from starlette.routing import Route, Router
    from starlette.testclient import TestClient

    from qwenserve.api.middleware import InternalErrorMiddleware

    def boom(request: object) -> None:
        raise RuntimeError("kaput")

    app = InternalErrorMiddleware(Router(routes=[Route("/boom", boom)]))  # where it sits in the app: inside
    with TestClient(app, raise_server_exceptions=True) as client:  # a re-raise would fail the test here
        r = client.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["message"] == "Internal server error: RuntimeError: kaput"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_heartbeats_go_to_a_choice_still_running() -> None:
    """A choice's finish chunk is its last: later keep-alives name a running choice, or none."""
    from qwenserve.api.request_log import RequestTracker
    from qwenserve.api.serving_chat import _ChatContext
    from qwenserve.api.serving_completions import _CompletionContext

    class _State:
        def model_name(self, name: str | None) -> str:
            return "m"

    def beat_indexes(ctx: _ChatContext | _CompletionContext) -> list[int]:
        return [c["index"] for c in json.loads(ctx.heartbeat().removeprefix("data: "))["choices"]]

    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=2, stream=True)
    plan = ToolPlan(tools=None, parse=False)
    chat = _ChatContext(_State(), req, plan, "chatcmpl-1", RequestTracker("chatcmpl-1", None), [None, None])
    assert beat_indexes(chat) == [0]
    chat.chunk(0, {}, finish="stop")
    assert beat_indexes(chat) == [1]
    chat.chunk(1, {}, finish="length")
    assert beat_indexes(chat) == []

    creq = CompletionRequest(model="m", prompt=["a", "b"], stream=True)
    completion = _CompletionContext(_State(), creq, "cmpl-1", [None, None], prompt_only=False)
    completion._chunk(0, "", finish="stop")
    assert beat_indexes(completion) == [1]


def test_api_key_compares_the_raw_header_bytes() -> None:
    """A non-ASCII key (sent as its UTF-8 bytes) matches; a wrong one gets the 401."""
    import asyncio

    from qwenserve.api.auth import APIKeyMiddleware

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def status_for(header: bytes) -> int:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": "/v1/models", "method": "GET", "headers": [(b"authorization", header)]}
        asyncio.run(APIKeyMiddleware(app, "clé-secrète")(scope, receive, send))
        return sent[0]["status"]

    assert status_for("Bearer clé-secrète".encode()) == 200
    assert status_for(b"Bearer cle-secrete") == 401


def test_text_offsets_place_a_character_cut_short_before_the_next_token() -> None:
    """' ' + half an emoji, then ' include': the text reads ' \ufffd include', so ' include' starts at 2,
    and a stream fed token by token gets the offsets the whole text gets."""
    cut = [list(b" \xf0\x9f"), list(b" include")]
    whole = [list(b"a"), list(b" \xf0\x9f"), list(b"\x98\x80"), list(b" b")]  # 'a 😀 b'
    assert TextOffsets().take(cut) == [0, 2]
    assert TextOffsets().take(whole) == [0, 1, 2, 3]
    for tokens in (cut, whole):
        streamed = TextOffsets(5)
        assert [o for t in tokens for o in streamed.take([t])] == TextOffsets(5).take(tokens)
    assert TextOffsets().take([list(b"\xf0"), list(b"A")]) == [0, 1]  # a lone lead byte is its own U+FFFD


def test_banner_warns_when_the_context_cannot_hold_qwen_codes_first_turn() -> None:
    from qwenserve.api.banner import ready_banner

    small = ready_banner("127.0.0.1", 8000, "m", 4096, None, False, "/models/m")
    assert "WARNING" in small and "--max-model-len" in small and '"contextWindowSize": 4096' in small
    assert "WARNING" not in ready_banner("127.0.0.1", 8000, "m", 24560, None, False, "/models/m")  # serves 17.5k turns


def test_banner_lines_paste_into_a_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwenserve.api.banner import ready_banner

    banner = ready_banner("127.0.0.1", 8000, "my coder (local)", 32768, None, False, "/m")
    assert "export OPENAI_MODEL='my coder (local)'" in banner
    monkeypatch.setenv("QWENSERVE_API_KEY", "s3cret")
    from_env = ready_banner("127.0.0.1", 8000, "m", 32768, "s3cret", False, "/m")
    assert 'export OPENAI_API_KEY="$QWENSERVE_API_KEY"' in from_env and "s3cret" not in from_env
    assert "'<the --api-key you set>'" in ready_banner("127.0.0.1", 8000, "m", 32768, "other", False, "/m")
    assert "from other machines" in ready_banner("0.0.0.0", 8000, "m", 32768, "k", False, "/m")
    assert "from other machines" not in banner


def test_listen_line_writes_an_ipv6_address_in_brackets() -> None:
    from qwenserve.api.banner import listen_url

    assert listen_url("::", 8000) == "http://[::]:8000"  # was http://:::8000
    assert listen_url("fe80::1", 80) == "http://[fe80::1]:80"
    assert listen_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert listen_url("", 8000) == "http://0.0.0.0:8000"


def _samples(metrics: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Metrics registry as parsed by Prometheus' own text-format parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = metrics.render().decode()  # type: ignore[attr-defined]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _output(index: int, generated: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", index, "x", [7], None, finish, num_prompt_tokens=5, num_cached_tokens=0,
                         num_generated_tokens=generated)  # fmt: skip


def test_finish_reasons_are_counted_per_choice_and_a_failure_as_error() -> None:
    """qwenserve_request_finished_total counts generations: n choices are n samples, each under its own
    reason (a request whose choices ended differently was one sample labelled "length,stop"), and the
    choices of a failed request count as "error" (they were "none"), an aborted one's as "abort" (also when
    the server aborted it, shutting down)."""
    from qwenserve.api.metrics import Metrics
    from qwenserve.api.request_log import RequestTracker

    metrics = Metrics(lambda: None)
    mixed = RequestTracker("a", metrics, 5, n=3)
    for step in (1, 2):
        for index in range(3):
            mixed.observe(_output(index, step, {0: "length", 1: "stop"}.get(index) if step == 2 else None))
    mixed.set_finish(2, "tool_calls")
    mixed.done()
    failed = RequestTracker("b", metrics, 5, n=2)
    failed.observe(_output(0, 1, "stop"))
    failed.fail(APIError(500, "Generation failed: boom", code="generation_failed"))
    left = RequestTracker("c", metrics, 5, n=2)
    left.done(finish="abort")
    RequestTracker("d", metrics, 5).fail(aborted())  # the server shutting down
    finished = {dict(labels)["finish_reason"]: value for (name, labels), value in _samples(metrics).items()
                if name == "qwenserve_request_finished_total"}  # fmt: skip
    assert finished == {"length": 1, "stop": 2, "tool_calls": 1, "error": 1, "abort": 3}
    assert _samples(metrics)[("qwenserve_generation_tokens_total", ())] == 2 * 3 + 1


def test_inter_token_latency_is_observed_per_choice() -> None:
    """With n > 1 the choices' tokens interleave: the gap to the token of another choice in the same step
    (~0 s) is no inter-token latency. Each choice observes one gap per token after its first."""
    from qwenserve.api.metrics import Metrics
    from qwenserve.api.request_log import RequestTracker

    metrics = Metrics(lambda: None)
    tracker = RequestTracker("a", metrics, 5, n=3)
    for step in (1, 2, 3, 4):
        for index in range(3):
            tracker.observe(_output(index, step, "length" if step == 4 else None))
    tracker.done()
    samples = _samples(metrics)
    assert samples[("qwenserve_inter_token_latency_seconds_count", ())] == 3 * (4 - 1)
    assert samples[("qwenserve_time_to_first_token_seconds_count", ())] == 1


@pytest.mark.parametrize("leave_after", ["finish", "usage"])
def test_a_client_leaving_once_the_answer_is_complete_is_logged_and_counted(
    leave_after: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up after the finish chunk, or after the usage chunk, before [DONE]: the stream is
    closed at a `yield` its own log line comes after. The request was still logged with no line at all
    (after the usage chunk: no tokens counted either) or as finish=abort though its answer was complete."""
    import asyncio

    from qwenserve.api.metrics import Metrics
    from qwenserve.api.request_log import RequestTracker
    from qwenserve.api.serving_chat import _ChatContext
    from qwenserve.api.streaming import guarded

    class _State:
        def model_name(self, name: str | None) -> str:
            return "m"

        def abort(self, request_id: str) -> None:
            pass

    async def outputs() -> object:
        yield _output(0, 1)
        yield _output(0, 2, "stop")

    async def main() -> None:
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                    stream_options={"include_usage": True})  # fmt: skip
        tracker = RequestTracker("chatcmpl-1", metrics, 5)
        ctx = _ChatContext(_State(), req, ToolPlan(tools=None, parse=False), "chatcmpl-1", tracker, [None])
        events = guarded(ctx.stream(outputs()), "chatcmpl-1", ctx.stream_error, ctx.close_if_unfinished)
        async for event in events:
            if leave_after == "finish" and '"finish_reason":"stop"' in event or '"choices":[],"usage":{' in event:
                break
        await events.aclose()

    metrics = Metrics(lambda: None)
    with caplog.at_level("INFO", logger="qwenserve.api"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request chatcmpl-1:")]
    assert len(lines) == 1 and "generated=2" in lines[0] and "finish=stop" in lines[0], lines
    samples = _samples(metrics)
    assert samples[("qwenserve_request_finished_total", (("finish_reason", "stop"),))] == 1
    assert samples[("qwenserve_generation_tokens_total", ())] == 2


def test_requests_to_a_stored_response_are_counted_under_their_route() -> None:
    """GET / DELETE /v1/responses/{id} and its input_items are routes, not unknown paths: they were counted
    as route="other", with every probe of a path nothing serves."""
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, Router
    from starlette.testclient import TestClient

    from qwenserve.api.metrics import Metrics
    from qwenserve.api.middleware import StatusCountMiddleware

    def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    metrics = Metrics(lambda: None)
    routes = [Route("/v1/responses/{rid}", ok, methods=["GET", "DELETE"]), Route("/v1/responses/{rid}/input_items", ok)]
    with TestClient(StatusCountMiddleware(Router(routes=routes), metrics)) as client:
        client.get("/v1/responses/resp_1")
        client.delete("/v1/responses/resp_2")
        client.get("/v1/responses/resp_1/input_items")
        client.get("/v1/nothing/here")
    counted = {dict(labels)["route"]: value for (name, labels), value in _samples(metrics).items()
               if name == "qwenserve_requests_total"}  # fmt: skip
    assert counted == {"/v1/responses/{id}": 2, "/v1/responses/{id}/input_items": 1, "other": 1}


class _Node:
    """A cycle's member (collectable only by the cycle collector), weakly referable."""

    def __init__(self) -> None:
        self.peer: _Node | None = None


def test_startup_objects_are_frozen_and_its_garbage_collected_first() -> None:
    import gc
    import weakref

    from qwenserve.api.server import freeze_startup_objects

    held = [[i] for i in range(1000)]  # what the loaded server keeps: out of every full collection from now on
    a, b = _Node(), _Node()
    a.peer, b.peer = b, a
    garbage = weakref.ref(a)
    del a, b  # loading's own garbage: a cycle nothing refers to
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= len(held)
        assert garbage() is None  # collected, not frozen for good
    finally:
        gc.unfreeze()
