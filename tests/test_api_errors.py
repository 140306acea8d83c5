"""Errors, limits and lifecycle against a real server: OpenAI-shaped 400/401/404/405/503,
loading, a full queue, heartbeats while waiting, and aborts on client disconnect.

The server here is deliberately small: a 1024-token context, one running sequence and a
one-request waiting queue, an API key, and a 0.2 s heartbeat.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from server_utils import ServerProcess, start_server

pytestmark = pytest.mark.slow

KEY = "sekret-key"
CONTEXT = 1024
HI = [{"role": "user", "content": "What is the capital of France?"}]
MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        tmp_path_factory.mktemp("errors"),
        "--max-model-len", str(CONTEXT),
        "--max-num-seqs", "1",
        "--max-queued-requests", "1",
        "--log-requests",
        api_key=KEY,
        env={"QWENSERVE_HEARTBEAT_SECONDS": "0.2", "QWENSERVE_MAX_BODY_BYTES": str(MAX_BODY)},
    )  # fmt: skip
    yield srv
    srv.stop()


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_503_with_retry_after_while_loading(server: ServerProcess) -> None:
    seen = server.early_responses
    assert ("/health", 503) in [(p, s) for p, s, _ in seen], "the load window was never observed"
    models = [h for p, s, h in seen if p == "/v1/models" and s == 503]
    assert models and all("retry-after" in h for h in models)


def test_api_key_required_everywhere_but_health(server: ServerProcess) -> None:
    base = server.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                         ("POST", "/tokenize"), ("GET", "/docs"), ("GET", "/nope")]:  # fmt: skip
        assert_openai_error(httpx.request(method, base + path), 401)
        wrong = httpx.request(method, base + path, headers={"Authorization": "Bearer nope"})
        err = assert_openai_error(wrong, 401)
        assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_api_key")  # as OpenAI answers
    no_scheme = assert_openai_error(httpx.get(f"{base}/v1/models", headers={"Authorization": KEY}), 401)
    assert "Bearer scheme" in no_scheme["message"], no_scheme  # not "Missing API key": one was sent
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert good.models.list().data[0].id == "qwen3-coder-demo"


def test_browsers_on_this_machine_may_call_the_api(server: ServerProcess) -> None:
    """CORS: a page served from this machine passes the preflight (which carries no key) and reads the
    answer; a page from elsewhere does not. Every response carries an x-request-id, the client's if sent."""
    base = server.base_url
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    before = server.get("/metrics").text
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "http://[::1]:8080"):
        r = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": origin, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, r.headers
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    counted = 'qwenserve_requests_total{route="/v1/chat/completions",status="200"}'
    assert [line for line in server.get("/metrics").text.splitlines() if line.startswith(counted)] == [
        line for line in before.splitlines() if line.startswith(counted)
    ], "a granted preflight is no API request"
    r = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": "https://elsewhere.example", **preflight})
    assert "access-control-allow-origin" not in r.headers
    assert assert_openai_error(r, 403)["code"] == "origin_not_allowed"
    # A plain-text POST needs no preflight: refused outright, or the model would run for that page.
    body = json.dumps({"messages": HI, "max_tokens": 1})
    r = httpx.post(f"{base}/v1/chat/completions", content=body,
                   headers={"Origin": "https://elsewhere.example", "Content-Type": "text/plain", **server.headers})  # fmt: skip
    err = assert_openai_error(r, 403)
    assert err["code"] == "origin_not_allowed" and "--allowed-origins" in err["message"]
    r = httpx.get(f"{base}/v1/models", headers={"Origin": "http://localhost:3000", "x-request-id": "trace-7", **server.headers})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert r.headers["x-request-id"] == "trace-7" and "x-request-id" in r.headers["access-control-expose-headers"]
    good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    completion = good.chat.completions.create(model="m", messages=HI, max_tokens=1)
    assert completion._request_id and completion._request_id.startswith("req_")
    good.chat.completions.create(model="m", messages=HI, max_tokens=1, extra_headers={"x-request-id": "trace-8"})
    assert re.search(r"request chatcmpl-\w+: .* x-request-id=trace-8", server.log())  # findable in the log
    assert httpx.get(f"{base}/nope").headers["x-request-id"].startswith("req_")  # errors too


CHAT = "/v1/chat/completions"
BAD_INPUTS: list[tuple[str, Any, str | None]] = [
    (CHAT, b"{not json", None),
    (CHAT, b"", None),
    (CHAT, [1, 2], None),
    (CHAT, {"model": "m"}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
    ),  # fmt: skip
    (CHAT, {"messages": HI, "temperature": -1}, "temperature"),
    (CHAT, {"messages": HI, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": HI, "top_p": 0}, "top_p"),
    (CHAT, {"messages": HI, "n": 0}, "n"),
    (CHAT, {"messages": HI, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": HI, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    (CHAT, {"messages": HI, "seed": "abc"}, "seed"),
    (CHAT, {"messages": HI, "stop": 7}, "stop"),
    (CHAT, {"messages": HI, "tools": "all of them"}, "tools"),
    (CHAT, {"messages": HI, "tools": [{"type": "function"}]}, "tools[0].function"),
    (
        CHAT,
        {"messages": HI, "tools": [{"type": "function", "function": {"name": ""}}]},
        "tools[0].function.name",
    ),
    (CHAT, {"messages": HI, "tool_choice": "sometimes"}, "tool_choice"),
    (CHAT, {"messages": HI, "tool_choice": "required"}, "tool_choice"),
    (
        CHAT,
        {
            "messages": HI,
            "tools": [{"type": "function", "function": {"name": "a"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}},
        },
        "tool_choice",
    ),  # fmt: skip
    # OpenAI's types, not coerced: a string is not a count, a bool not a number or a stream flag.
    (CHAT, {"messages": HI, "max_tokens": "5"}, "max_tokens"),
    (CHAT, {"messages": HI, "max_tokens": True}, "max_tokens"),
    (CHAT, {"messages": HI, "n": "2"}, "n"),
    (CHAT, {"messages": HI, "stream": "yes"}, "stream"),
    (CHAT, {"messages": HI, "logprobs": "yes"}, "logprobs"),
    (CHAT, {"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": HI, "max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": HI, "top_logprobs": 3}, "top_logprobs"),
    # What the server cannot honour is refused, not silently ignored.
    (CHAT, {"messages": HI, "response_format": {"type": "bogus"}}, "response_format.type"),
    (CHAT, {"messages": HI, "response_format": "json"}, "response_format"),
    (CHAT, {"messages": HI, "logit_bias": {"785": -101}}, "logit_bias"),
    (CHAT, {"messages": HI, "logit_bias": {"785": "big"}}, "logit_bias"),
    (CHAT, {"messages": HI, "logit_bias": {"Paris": 5}}, "logit_bias"),
    (CHAT, {"messages": HI, "logit_bias": {"999999": 5}}, "logit_bias"),
    (CHAT, {"messages": HI, "logit_bias": {"151700": 5}}, "logit_bias"),  # a padding row of the model, no token
    (CHAT, {"messages": HI, "stop_token_ids": [151700]}, "stop_token_ids"),
    (CHAT, {"messages": HI, "logit_bias": {"01": 5, "1": -5}}, "logit_bias"),
    (CHAT, {"messages": HI, "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    # a stop id past the vocabulary indexes the logits when min_tokens bans it: once a crash of the step
    (CHAT, {"messages": HI, "stop_token_ids": [999999], "min_tokens": 1, "max_tokens": 3}, "stop_token_ids"),
    (CHAT, {"messages": HI, "stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**20], "min_tokens": 1}, "stop_token_ids"),
    # vLLM extensions this server would otherwise silently not apply
    (CHAT, {"messages": HI, "chat_template": "{{ messages }}"}, "chat_template"),
    (CHAT, {"messages": HI, "echo": True}, "echo"),
    (CHAT, {"messages": HI, "prompt_logprobs": 1}, "prompt_logprobs"),
    (CHAT, {"messages": HI, "stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    (CHAT, {"messages": HI, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    (CHAT, {"messages": HI, "function_call": "auto"}, "function_call"),
    # OpenAI features this server has no part of: refused rather than answered in text without them
    (CHAT, {"messages": HI, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
    (CHAT, {"messages": HI, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"messages": HI, "web_search_options": {}}, "web_search_options"),
    (CHAT, {"messages": HI, "audio": ["text"]}, "audio"),  # once a 500: the field's value passed for modalities'
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "echo": "no"}, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 0}, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2], "suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
    # Text no tokenizer can read: a lone UTF-16 surrogate escape, in any field (was a 500).
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', "messages[0].content"),
    (CHAT, b'{"model": "\\udc00", "stream": true, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
     b'{"name": "f", "description": "\\ud83d"}}]}', "tools[0].function.description"),
    ("/v1/completions", b'{"prompt": "a\\ud800"}', "prompt"),
    ("/tokenize", b'{"prompt": "a\\ud800"}', "prompt"),
    # Malformed messages and content parts, and values OpenAI or vLLM refuse.
    (CHAT, {"messages": [*HI, {"role": "function", "name": "f", "content": "1"}]}, "messages[1].role"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages[0].content[0].type"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    (CHAT, {"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"messages": HI, "top_k": -2}, "top_k"),
    (CHAT, {"messages": HI, "top_k": 2**63}, "top_k"),  # crashed the engine step, failing every request in it
    (CHAT, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
     b'{"name": "f", "parameters": {"\\udfff": ""}}}]}', "tools[0].function.parameters.\\udfff"),
    (CHAT, {"messages": HI, "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "temperature"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e400}', "repetition_penalty"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": '
     b'"f", "parameters": {"type": "object", "properties": {"q": {"enum": ["a", NaN]}}}}}]}',
     "tools[0].function.parameters.properties.q.enum[1]"),  # fmt: skip
    # More prompts than the queue (1 here) could ever hold: a 400, not a 503 that no retry cures.
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 1}, "prompt"),
    # ... or more sequences: n of them per prompt, which the requests behind it would wait for.
    ("/v1/completions", {"prompt": "a", "n": 2, "max_tokens": 1}, "n"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": HI}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    # Not coerced, as on every other route: a string, a bool or a float is no token id.
    ("/detokenize", {"tokens": ["1"]}, "tokens[0]"),
    ("/detokenize", {"tokens": [True]}, "tokens[0]"),
    ("/detokenize", {"tokens": [1.0]}, "tokens[0]"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_INPUTS, ids=[f"{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_gets_400_and_server_stays_healthy(
    server: ServerProcess, path: str, body: Any, param: str
) -> None:
    if isinstance(body, bytes):
        r = server.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.post(path, json=body)
    err = assert_openai_error(r, 400, param)
    assert err["type"] == "invalid_request_error"
    if param is None:
        assert err["param"] is None
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_json_nested_too_deep_is_a_400(server: ServerProcess) -> None:
    """Depth 500 in a free-form field was a RecursionError (a 500) while rendering."""
    deep = json.loads('{"a":' * 500 + "1" + "}" * 500)
    for body in (
        {"messages": HI, "chat_template_kwargs": {"x": deep}},
        {"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]},
        {"messages": [*HI, {"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": json.dumps(deep)}}]}]},
    ):  # fmt: skip
        err = assert_openai_error(server.post(CHAT, json=body), 400)
        assert "nested" in err["message"] and err["param"].split(".")[0].split("[")[0] in body
    assert server.post(CHAT, json={"messages": HI, "max_tokens": 1}).status_code == 200


def test_explicit_null_means_the_default(server: ServerProcess) -> None:
    """OpenAI types these "boolean or null" / "integer or null": null is the default, not a 400."""
    body = {"messages": HI, "max_tokens": 2, "stream": None, "n": None, "logprobs": None, "min_tokens": None,
            "parallel_tool_calls": None, "stream_options": None, "temperature": None}  # fmt: skip
    r = server.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    r = server.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "echo": None, "n": None, "stream": None})
    assert r.status_code == 200, r.text


def test_body_over_the_limit_is_a_413(server: ServerProcess) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    err = assert_openai_error(server.post(CHAT, json=big), 413)
    assert err["code"] == "request_too_large" and f"{MAX_BODY:,}" in err["message"]
    assert server.post(CHAT, json={"messages": HI, "max_tokens": 1}).status_code == 200


def test_chunked_body_over_the_limit_is_a_413(server: ServerProcess) -> None:
    """No Content-Length (chunked upload): the limit holds while the body is read."""

    def body() -> Iterator[bytes]:
        yield b'{"max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "metadata": {"x": "'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"a" * 65536
        yield b'"}}'

    err = assert_openai_error(server.post(CHAT, content=body()), 413)
    assert err["code"] == "request_too_large" and f"{MAX_BODY:,}" in err["message"]
    assert server.post(CHAT, json={"messages": HI, "max_tokens": 1}).status_code == 200


def test_body_that_is_not_utf8_is_a_400_invalid_json(server: ServerProcess) -> None:
    r = server.post(CHAT, content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')
    err = assert_openai_error(r, 400)
    assert err["code"] == "invalid_json" and "UTF-8" in err["message"], err
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = assert_openai_error(server.post(CHAT, content=deep, headers={"Content-Type": "application/json"}), 400)
    assert err["code"] == "invalid_json", err


def raw_exchange(server: ServerProcess, request: bytes, status: int) -> dict[str, Any]:
    """Send raw bytes, read the answer until the server closes; check its status line and that its body
    is an OpenAI-shaped error, and return that error."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(request)
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status) and b"application/json" in head.lower(), raw
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def test_request_that_is_not_http_is_an_openai_shaped_400(server: ServerProcess) -> None:
    """A request uvicorn cannot parse (here a space inside the header name) never reaches the app:
    its 400 has the OpenAI error shape too, and the server keeps serving."""
    err = raw_exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400)
    assert err["type"] == "invalid_request_error", err
    assert "Invalid HTTP request" in err["message"], err
    assert server.post(CHAT, json={"messages": HI, "max_tokens": 1}).status_code == 200


def test_a_compressed_body_is_a_415_naming_its_encoding(server: ServerProcess) -> None:
    body = gzip.compress(json.dumps({"messages": HI, "max_tokens": 1}).encode())
    r = server.post(CHAT, content=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    err = assert_openai_error(r, 415)
    assert "'gzip' is not supported" in err["message"] and err["code"] == "unsupported_content_encoding", err
    assert server.post(CHAT, json={"messages": HI, "max_tokens": 1}).status_code == 200


def test_json_body_without_content_type(server: ServerProcess) -> None:
    """`curl -d '{...}'` sends form encoding; the body is still read as JSON."""
    body = b'{"prompt": "Hello world"}'
    r = server.post("/tokenize", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["count"] == 2


def test_unknown_route_and_method(server: ServerProcess) -> None:
    assert_openai_error(server.get("/v1/embeddings"), 404)
    assert_openai_error(server.get(CHAT), 405)
    assert httpx.head(f"{server.base_url}/health").status_code == 200  # load balancers probe with HEAD
    for path in ("/v1/models", "/v1/models/qwen3-coder-demo", "/metrics", "/version"):  # as on every GET route
        r = httpx.head(server.base_url + path, headers=server.headers)
        assert r.status_code == 200 and not r.content, (path, r.status_code)


def test_base_url_without_v1_gets_the_fix_in_its_404(server: ServerProcess) -> None:
    """A client configured with http://host:port instead of http://host:port/v1."""
    err = assert_openai_error(server.post("/chat/completions", json={"messages": HI}), 404)
    assert "Did you mean /v1/chat/completions?" in err["message"]
    assert "Did you mean" not in assert_openai_error(server.post("/v1/nothing", json={}), 404)["message"]


def test_base_url_with_v1_twice_gets_the_fix_in_its_404(server: ServerProcess) -> None:
    """An Anthropic client (which adds /v1/messages itself) given the OpenAI base URL, http://host:port/v1."""
    r = server.post("/v1/v1/messages", json={"max_tokens": 5, "messages": HI}, headers={"x-api-key": KEY})
    assert r.status_code == 404 and r.json()["type"] == "error", r.text  # Anthropic's shape, read by its client
    message = r.json()["error"]["message"]
    assert "Did you mean /v1/messages?" in message and "http://HOST:PORT, without /v1" in message, message
    err = assert_openai_error(server.post("/v1/v1/chat/completions", json={"messages": HI}), 404)
    assert "Did you mean /v1/chat/completions?" in err["message"]


def test_route_with_a_trailing_slash_is_served_not_redirected(server: ServerProcess) -> None:
    """A base URL ending in '/' joined naively gives `/v1/chat/completions/`: served, no 307."""
    r = server.post(CHAT + "/", json={"messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert server.get("/v1/models/").json()["object"] == "list"
    assert_openai_error(server.post("/v1/nothing/", json={}), 404)


def test_refused_requests_are_logged_with_their_reason(server: ServerProcess) -> None:
    """A request refused before it reaches the engine still leaves one line in the server log."""
    assert_openai_error(server.post(CHAT, json={"messages": HI, "max_tokens": "5"}), 400, "max_tokens")
    assert_openai_error(server.get("/v1/refused-route-probe"), 404)
    assert_openai_error(server.get("/v1/probe%0A2026-01-01 00:00:00,000 ERROR forged"), 404)
    # The line is written once the response has gone out: wait for it rather than read the log at once.
    wait_for(lambda: "refused GET /v1/refused-route-probe" in server.log())
    wait_for(lambda: "refused GET /v1/probe\\n2026-01-01" in server.log())  # a path's line break stays escaped
    log = server.log()
    assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR forged") for line in log.splitlines())
    assert re.search(r"refused POST /v1/chat/completions: 400 invalid_request_error \(max_tokens\): ", log), log[-2000:]
    assert "refused GET /v1/refused-route-probe: 404 invalid_request_error: Unknown route" in log


def test_accepted_no_op_fields(server: ServerProcess) -> None:
    """The forms of unsupported fields that ask for nothing (text format, an empty bias) are fine."""
    body = {"messages": HI, "max_tokens": 3, "response_format": {"type": "text"}, "logit_bias": {},
            "top_logprobs": 0, "temperature": 0, "max_completion_tokens": 2, "echo": False,
            "guided_json": None, "prompt_logprobs": None, "modalities": ["text"], "audio": None,
            "web_search_options": None}  # fmt: skip
    r = server.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2  # max_completion_tokens wins over max_tokens


def test_prompt_longer_than_context_names_both_counts(server: ServerProcess) -> None:
    r = server.post(CHAT, json={"messages": [{"role": "user", "content": "hello " * 1500}]})
    err = assert_openai_error(r, 400, "messages")
    count = server.post(
        "/tokenize", json={"messages": [{"role": "user", "content": "hello " * 1500}]}
    ).json()["count"]
    assert str(count) in err["message"] and str(CONTEXT) in err["message"]


def test_a_long_prompt_is_refused_with_its_size(server: ServerProcess) -> None:
    """A text under 256k characters is counted whole, so the error gives its size (qwen-code's
    ~70k-character first turn against a small context), however many characters a token; one long in
    characters but short in tokens (a run of spaces) is served. (Over that: test_api_openai.)"""
    for path, body, param in [
        (CHAT, {"messages": [{"role": "user", "content": "hello " * 5000}]}, "messages"),
        ("/v1/completions", {"prompt": "hello " * 5000}, "prompt"),
    ]:
        err = assert_openai_error(server.post(path, json=body), 400, param)
        assert err["code"] == "context_length_exceeded" and str(CONTEXT) in err["message"]
        assert "more than" not in err["message"] and re.search(r"resulted in 500\d tokens", err["message"]), err
        assert err["message"].startswith(f"This model's maximum context length is {CONTEXT} tokens."), err
    spaces = " " * 20000 + "x"  # 158 tokens
    r = server.post("/v1/completions", json={"prompt": spaces, "max_tokens": 1})
    assert r.status_code == 200, r.text
    # Past the tokenizer's own model_max_length (the demo's 32,768): refused as well, and Transformers'
    # warning about "indexing errors" (nothing is run) stays out of the log.
    err = assert_openai_error(server.post(CHAT, json={"messages": [{"role": "user", "content": "hello " * 40000}]}), 400)
    assert re.search(r"resulted in 400\d\d tokens", err["message"]), err
    assert "indexing errors" not in server.log()


def test_max_tokens_beyond_context_is_clamped(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "hello " * 990}]
    r = server.post(CHAT, json={"messages": messages, "max_tokens": 32000, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= CONTEXT
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_lenient_request_shapes(server: ServerProcess) -> None:
    """What qwen-code and other clients send: extra fields, odd tools and history, all accepted."""
    body = {
        "model": "whatever",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "List", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "files"},
                ],
            },  # fmt: skip
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "hmm",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "not json"}},
                    {"id": "c2", "type": "function", "function": {"name": "noargs", "arguments": None}},
                    {"id": "c3", "type": "function", "function": {"name": "noargs", "arguments": ""}},
                    {"id": "c4", "type": "function", "function": {"name": "ls", "arguments": "[1, 2]"}},
                ],
            },  # fmt: skip
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "a.txt"}]},
            {"role": "tool", "tool_call_id": "c2", "content": ""},
            {"role": "tool", "tool_call_id": "c3", "content": None},
            {"role": "tool", "tool_call_id": "c4", "content": "b.txt"},
            {"role": "developer", "content": "Be brief."},
        ],
        "tools": [
            {"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "noargs", "parameters": None}},
            {"type": "function", "function": {"name": "bare"}},
            {
                "type": "function",
                "function": {
                    "name": "schema",
                    "strict": True,
                    "parameters": {
                        "$schema": "http://json-schema.org/draft-07/schema#",
                        "type": "object",
                        "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                        "additionalProperties": False,
                    },
                },
            },  # fmt: skip
        ],
        "max_tokens": 8,
        "temperature": 0,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.05,
        "stream": False,
        "chat_template_kwargs": {"enable_thinking": False, "tokenize": True, "tools": "ignored"},
        "reasoning": {"effort": "low"},
        "enable_thinking": False,
        "metadata": {"a": 1},
        "parallel_tool_calls": True,
        "vl_high_resolution_images": False,
        "some_future_field": {"x": [1, 2, 3]},
    }
    r = server.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "whatever"


def _metric(server: ServerProcess, name: str) -> float:
    return server.metrics().get(name, -1.0)


def _stream_lines(
    server: ServerProcess, body: dict[str, Any], sink: list[str], stop_after: int | None, path: str = CHAT
) -> None:
    """POST a streaming request, appending each `data:` payload to sink; hang up after `stop_after`."""
    with httpx.stream("POST", server.base_url + path, json=body, headers=server.headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                sink.append(line[6:])
                if stop_after is not None and len(sink) >= stop_after:
                    return  # leaving the context manager closes the connection mid-stream


def test_queue_full_heartbeat_and_disconnect_abort(server: ServerProcess) -> None:
    idle_usage = _metric(server, "qwenserve_kv_cache_usage_perc")
    long_body = {"messages": HI, "stream": True, "max_tokens": 900, "ignore_eos": True, "temperature": 0}
    # A occupies the only running slot; hang up after 20 chunks.
    a_lines: list[str] = []
    a_started = threading.Event()
    a_release = threading.Event()

    def run_a() -> None:
        with httpx.stream(
            "POST", server.base_url + CHAT, json=long_body, headers=server.headers, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    a_lines.append(line[6:])
                    if len(a_lines) == 5:
                        a_started.set()
                        a_release.wait(60)
                        return

    a = threading.Thread(target=run_a)
    a.start()
    assert a_started.wait(60)
    # B waits in the queue: it gets its role chunk, then heartbeats until A goes away.
    b_lines: list[str] = []
    b = threading.Thread(target=_stream_lines, args=(server, {**long_body, "max_tokens": 5}, b_lines, None))
    b.start()
    wait_for(lambda: _metric(server, "qwenserve_num_requests_waiting") == 1)
    time.sleep(0.7)  # several heartbeat periods
    # C finds the queue full: 503 with Retry-After, which clients retry.
    c = server.post(CHAT, json={"messages": HI, "max_tokens": 4})
    err = assert_openai_error(c, 503)
    assert c.headers.get("retry-after") and err["code"] == "queue_full"
    # A hangs up mid-stream: its request is aborted and B runs to completion.
    a_release.set()
    a.join(30)
    b.join(60)
    assert b_lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in b_lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    first_content = next(i for i, c in enumerate(chunks) if c["choices"][0]["delta"].get("content"))
    heartbeats = [c for c in chunks[1:first_content] if c["choices"][0]["delta"] == {}]
    assert len(heartbeats) >= 2, "empty-delta chunks keep the stream alive while waiting"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    wait_for(lambda: _metric(server, "qwenserve_num_requests_running") == 0)
    wait_for(lambda: _metric(server, "qwenserve_kv_cache_usage_perc") <= idle_usage)
    assert "finish=abort" in server.log()


def test_anthropic_stream_pings_while_it_waits(server: ServerProcess) -> None:
    """A /v1/messages stream queued behind another request sends Anthropic's `ping` events until its
    answer starts (they reset a client's idle timer), then the usual events."""
    release = threading.Event()
    holding = threading.Event()

    def hold_the_only_slot() -> None:
        body = {"messages": HI, "stream": True, "max_tokens": 900, "ignore_eos": True}
        with httpx.stream("POST", server.base_url + CHAT, json=body, headers=server.headers, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    holding.set()
                    release.wait(60)
                    return  # hangs up: the request is aborted and the slot freed

    events: list[str] = []

    def stream_messages() -> None:
        body = {"model": "m", "max_tokens": 4, "stream": True, "messages": HI}
        with httpx.stream("POST", server.base_url + "/v1/messages", json=body, headers={"x-api-key": KEY},
                          timeout=120) as r:  # fmt: skip
            events.extend(line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: "))

    holder = threading.Thread(target=hold_the_only_slot)
    holder.start()
    assert holding.wait(60)
    waiter = threading.Thread(target=stream_messages)
    waiter.start()
    try:
        wait_for(lambda: events.count("ping") >= 2)
        assert "message_start" not in events
    finally:
        release.set()
        holder.join(30)
        waiter.join(60)
    start = events.index("message_start")
    assert start >= 2 and set(events[:start]) == {"ping"}, events
    assert events[-2:] == ["message_delta", "message_stop"], events


def test_full_queue_is_always_a_503_never_a_500(server: ServerProcess) -> None:
    """Requests with n > 1 arriving together: each is admitted (200) or refused up front (503)."""
    body = {"messages": HI, "max_tokens": 12, "n": 3, "ignore_eos": True, "temperature": 0}
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(server.post(CHAT, json=body))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and {r.status_code for r in results} <= {200, 503}, [r.text for r in results]
    for r in results:
        if r.status_code == 503:
            assert assert_openai_error(r, 503)["code"] == "queue_full"
        else:
            assert len(r.json()["choices"]) == 3


def test_non_streaming_disconnect_aborts(server: ServerProcess) -> None:
    body = {"messages": HI, "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post(CHAT, json=body, timeout=1.0)
    wait_for(lambda: _metric(server, "qwenserve_num_requests_running") == 0, timeout=10)
    assert server.get("/health").status_code == 200


def test_log_requests_writes_bodies(server: ServerProcess) -> None:
    server.post(CHAT, json={"messages": [{"role": "user", "content": "log me please"}], "max_tokens": 2})
    assert "log me please" in server.log()


def test_sigterm_ends_requests_in_flight_with_openai_errors(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stopping the server with requests in flight: every client gets an OpenAI-shaped 503 (a stream:
    an error event, then [DONE]; a Responses stream: `response.failed`) and the process exits promptly."""
    srv = start_server(tmp_path_factory.mktemp("sigterm"), "--max-num-seqs", "3")
    try:
        long_body = {"messages": HI, "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
        stream_lines: list[str] = []
        streaming = threading.Thread(
            target=_stream_lines, args=(srv, {**long_body, "stream": True}, stream_lines, None)
        )
        plain: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: plain.append(srv.post(CHAT, json=long_body, timeout=60)))
        responses_body = {"input": HI, "max_output_tokens": 4000, "temperature": 0, "stream": True}
        response_events: list[str] = []
        responding = threading.Thread(
            target=_stream_lines, args=(srv, responses_body, response_events, None, "/v1/responses")
        )
        for client in (streaming, waiting, responding):
            client.start()
        wait_for(
            lambda: len(stream_lines) > 3
            and len(response_events) > 3
            and srv.metrics().get("qwenserve_num_requests_running", 0) == 3
        )
        srv.proc.terminate()
        for client in (streaming, waiting, responding):
            client.join(30)
        srv.proc.wait(30)
        assert stream_lines[-1] == "[DONE]" and len(stream_lines) < 1000, "the stream ended early, aborted"
        assert json.loads(stream_lines[-2])["error"]["code"] == "aborted"
        failed = json.loads(response_events[-1])
        assert failed["type"] == "response.failed", response_events[-3:]
        assert failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == "server_error"
        assert "aborted" in failed["response"]["error"]["message"]
        closed = json.loads(response_events[-2])
        assert closed["type"] == "response.output_item.done" and closed["item"]["status"] == "incomplete"
        err = assert_openai_error(plain[0], 503)
        assert err["code"] == "aborted" and plain[0].headers.get("retry-after")
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_gracefully_and_exit_0(tmp_path_factory: pytest.TempPathFactory, sig: str) -> None:
    """A supervisor's SIGTERM, or the SIGHUP of a closed terminal or a dropped ssh session: the stream in
    flight gets its 503 `aborted` event and [DONE] (a SIGHUP used to kill the process at once, cutting the
    stream off), and the process exits 0 (it used to die of the SIGTERM uvicorn raises again: 143)."""
    srv = start_server(tmp_path_factory.mktemp(f"stop-{sig.lower()}"))
    try:
        body = {"messages": HI, "max_tokens": 4000, "ignore_eos": True, "temperature": 0, "stream": True}
        lines: list[str] = []
        client = threading.Thread(target=_stream_lines, args=(srv, body, lines, None))
        client.start()
        wait_for(lambda: len(lines) > 3)
        srv.proc.send_signal(getattr(signal, sig))
        client.join(30)
        assert srv.proc.wait(30) == 0, srv.log()[-2000:]
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "aborted", lines[-3:]
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def test_nohup_keeps_serving_after_a_sighup(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`nohup qwenserve serve &` starts with SIGHUP ignored: closing the terminal must not stop it."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited through exec, as nohup passes it on
    try:
        srv = start_server(tmp_path_factory.mktemp("nohup"))
    finally:
        signal.signal(signal.SIGHUP, before)
    try:
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert srv.proc.poll() is None and httpx.get(f"{srv.base_url}/health", timeout=30).status_code == 200
    finally:
        srv.stop()


def test_sigterm_during_a_long_step_still_answers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A step can outlast the shutdown's grace period (a long prefill on a CPU): the client still gets
    its 503 `aborted` event and [DONE], not a dropped connection, and the process exits."""
    srv = start_server(
        tmp_path_factory.mktemp("sigterm-prefill"), "--max-model-len", "16384", "--max-num-batched-tokens", "16384"
    )
    try:
        body = {"messages": [{"role": "user", "content": "hello " * 12000}], "max_tokens": 5, "stream": True}
        lines: list[str] = []
        client = threading.Thread(target=_stream_lines, args=(srv, body, lines, None))
        client.start()
        wait_for(lambda: len(lines) >= 1)  # the role chunk: the prompt is now being prefilled
        time.sleep(1.0)
        srv.proc.terminate()
        client.join(30)
        srv.proc.wait(40)
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "aborted"
        assert "Traceback" not in srv.log() and "ERROR" not in srv.log()
    finally:
        srv.stop()


def test_a_request_head_without_end_is_a_431_and_the_server_serves_on(server: ServerProcess) -> None:
    """A request line or headers sent without end were kept whole, and a URL so sent held the event loop
    for seconds at a time (uvicorn joins it piece by piece): past the limit the answer is an OpenAI-shaped 431."""
    from qwenserve.api.launch import MAX_REQUEST_HEAD_BYTES

    # One byte past the limit, and no more: bytes left unread when the server closes would reset the
    # connection (a TCP RST) before the client reads the answer.
    err = raw_exchange(server, b"GET /" + b"a" * (MAX_REQUEST_HEAD_BYTES - 4), 431)
    assert err["code"] == "request_header_too_large", err
    assert server.post(CHAT, json={"messages": HI, "max_tokens": 1}).status_code == 200


def test_a_request_answered_before_its_body_arrived_gets_one_answer_and_the_connection_serves_on(
    server: ServerProcess,
) -> None:
    """A wrong key (or a 413, a 503 while loading) is answered before the body is read. The rest of that body,
    arriving after the answer, was counted as the next request's head: past 64 KiB the server wrote a second,
    bogus answer (431) and closed the connection, resetting a client still uploading its ~100 KB agent turn
    (it then saw a connection error, not the 401). The rest of the body is discarded and the connection serves on."""
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (MAX_BODY - 64) + b'"}]}'
    wrong_key = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(wrong_key + health)
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d+)", raw)
    assert statuses == [b"401", b"200"], raw[:2000]


class _FakeTransport:
    """What uvicorn's HTTP protocol writes to and closes, kept for the test to look at."""

    def __init__(self) -> None:
        self.closed = False
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@contextlib.contextmanager
def _protocol_connections() -> Iterator[Callable[[], tuple[Any, _FakeTransport]]]:
    """Connections of the server's HTTP protocol (json_error_protocol) on a loop of their own, fed bytes by
    hand, to an app that never answers: what the protocol does with a request's head, without sockets."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState as UvicornState

    from qwenserve.api.launch import json_error_protocol

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.Event().wait()  # a request still being answered

    loop = asyncio.new_event_loop()
    protocol_class = json_error_protocol()

    def connect() -> tuple[Any, _FakeTransport]:
        protocol = protocol_class(config=uvicorn.Config(app), server_state=UvicornState(), app_state={}, _loop=loop)
        transport = _FakeTransport()
        protocol.connection_made(transport)
        return protocol, transport

    try:
        yield connect
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def test_a_connection_whose_request_head_does_not_arrive_is_closed() -> None:
    """Connections that sent nothing, or a head that trickles in, were kept forever (no key is needed to open
    one): enough of them used up the process's file limit and locked every client out. The protocol now
    closes one whose head has not arrived when its timer fires; a request being served is left alone."""
    with _protocol_connections() as connect:
        idle, idle_transport = connect()
        slow, slow_transport = connect()
        slow.data_received(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        busy, busy_transport = connect()
        busy.data_received(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        for protocol in (idle, slow, busy):
            assert protocol._head_timer is not None  # armed when the connection opened
            protocol._head_timer.cancel()
            protocol._head_timed_out()  # as when it fires
        assert idle_transport.closed and slow_transport.closed and not busy_transport.closed


def test_a_request_head_over_the_limit_is_a_431_however_it_arrives() -> None:
    """The head's size was checked only while it was incomplete after a read, so a 100 KB header that
    arrived whole in one or two reads was served, though the limit is 64 KiB. A body in the same read as
    its head is not the head's: a request with a small head and a large body is served."""
    from qwenserve.api.launch import MAX_REQUEST_HEAD_BYTES

    big = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 100) + b"\r\n\r\n"
    with _protocol_connections() as connect:
        at_once, at_once_transport = connect()
        at_once.data_received(big)
        in_two, in_two_transport = connect()
        in_two.data_received(big[: len(big) // 2])
        in_two.data_received(big[len(big) // 2 :])
        for transport in (at_once_transport, in_two_transport):
            assert transport.closed and transport.written.startswith(b"HTTP/1.1 431 "), transport.written[:100]
            assert b"request_header_too_large" in transport.written

        body = b"x" * (2 * MAX_REQUEST_HEAD_BYTES)
        post, post_transport = connect()
        post.data_received(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        assert not post_transport.closed and post_transport.written == b"", post_transport.written[:100]
        # The blank line that ends a head may be split between two reads.
        split, split_transport = connect()
        split.data_received(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r" % len(body))
        split.data_received(b"\n" + body)
        assert not split_transport.closed and split_transport.written == b"", split_transport.written[:100]
