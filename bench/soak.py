"""Soak test for a qwenserve server: hours of realistic mixed load, then a health verdict.

Starts `python -m qwenserve serve` (or attaches to `--base-url`), runs `--concurrency` workers for
`--minutes` sending a randomized mix of requests (chat streaming and not, with and without the tools of
qwen-code's real first turn, multi-turn agent conversations that resend a growing prefix, /v1/responses,
/v1/completions, n > 1, logprobs, JSON schemas, stop strings, seeds, clients that disconnect mid-stream and
invalid requests), samples the server's RSS and its /metrics KV gauges every few seconds, then checks:

- every request got the answer its kind expects (no 5xx, no unexpected status, no broken stream, no
  request past `--request-timeout`);
- once idle, the KV pool is all free again (prefix-cached blocks count as free: see
  qwenserve/engine/block_manager.py) and nothing is running or waiting;
- the agent conversations' `cached_tokens` grow turn by turn (prefix caching works under load);
- the server's RSS does not trend up after the warm-up, throughput does not collapse over time;
- the server log holds no traceback and no ERROR line.

It prints a JSON summary (also written to `--out`) and exits 1 when a check failed.

    python bench/soak.py --minutes 35 --concurrency 6 -- --log-requests
    python bench/soak.py --base-url http://gpu-box:8000 --minutes 120 --concurrency 32 --max-tokens 512
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests/fixtures/qwen-code-0.24.4/first-turn.json"
GOOD_OUTCOMES = {"ok", "expected_4xx", "disconnected"}
WORDS = (
    "alpha beta gamma delta file list directory python function class error test build server cache "
    "token stream request model value index parse write read shell command module import return loop "
    "branch merge commit review patch bug fix refactor rename variable string number array object map"
).split()
QUESTIONS = [
    "What is the capital of France?",
    "List the files in this directory",
    "What is 2 + 2?",
    "Say hello.",
    "Write a haiku about caches.",
]
DEFAULT_MIX = (
    "conversation=20,chat=10,chat_stream=10,chat_tools=8,responses=8,completions=8,chat_n=5,"
    "logprobs=5,json_schema=5,stop=5,seed=3,disconnect=8,invalid=5"
)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


class CheckError(Exception):
    """A response that broke its contract: the outcome to count it under and what was wrong."""

    def __init__(self, outcome: str, detail: str, status: int | None = None):
        super().__init__(detail)
        self.outcome, self.detail, self.status = outcome, detail, status


class Disconnected(Exception):  # noqa: N818 - a planned outcome, not an error
    """The client hung up on purpose."""


# -- configuration ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--base-url", help="attach to a running server (e.g. http://127.0.0.1:8000) instead of starting one"
    )
    p.add_argument("--model", help="--model for the started server (none: the built-in demo model)")
    p.add_argument(
        "--server-args",
        default="",
        help="extra arguments for the started server, one string (--server-args='--log-requests');\n"
        "or put them after a lone --: soak.py --minutes 5 -- --log-requests",
    )
    p.add_argument("--port", type=int, default=0, help="port for the started server (0: a free one)")
    p.add_argument(
        "--server-log", type=Path, help="server log file (written when started, read when attached)"
    )
    p.add_argument("--server-pid", type=int, help="pid of an attached server, for its RSS")
    p.add_argument("--api-key", default=os.environ.get("QWENSERVE_API_KEY", "soak"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument(
        "--warmup-minutes", type=float, help="excluded from the RSS trend (default: 15%% of --minutes)"
    )
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--mix", default=DEFAULT_MIX, help="scenario=weight,... (0 disables one)")
    p.add_argument("--max-tokens", type=int, default=64, help="upper bound of max_tokens for normal requests")
    p.add_argument("--prompt-words", type=int, default=40, help="upper bound of random words in a prompt")
    p.add_argument(
        "--conv-prefix",
        choices=["qwen-code", "synthetic"],
        default="qwen-code",
        help="qwen-code: the real system prompt, reminders and 14 tools (~17k tokens);\n"
        "synthetic: --prefix-words of system prompt and the --conv-tools tools",
    )
    p.add_argument("--prefix-words", type=int, default=1500)
    p.add_argument("--conv-tools", default="run_shell_command,read_file,glob,grep_search")
    p.add_argument("--conv-max-turns", type=int, default=8)
    p.add_argument(
        "--conv-max-tokens",
        type=int,
        default=24000,
        help="start a new conversation past this prompt (at most 3/4 of the context)",
    )
    p.add_argument("--tool-result-words", type=int, default=150)
    p.add_argument(
        "--max-tools", type=int, default=3, help="most tools sent by a chat_tools / responses request"
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="a scenario running longer is stuck")
    p.add_argument(
        "--idle-timeout", type=float, default=180.0, help="wait this long for the server to go idle"
    )
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument(
        "--max-rss-slope",
        type=float,
        default=30.0,
        help="MB per 10 min after warm-up, of the per-minute lowest RSS (checked after 10 min)",
    )
    p.add_argument(
        "--min-cache-growth",
        type=float,
        default=0.9,
        help="fraction of conversation turns whose cached_tokens must exceed the turn before's",
    )
    p.add_argument(
        "--min-throughput-ratio",
        type=float,
        default=0.3,
        help="last third's ok/min over the first post-warm-up third's, at least",
    )
    p.add_argument("--strict-seed", action="store_true", help="a seeded pair that differs is a failure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON summary (with all samples) here")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.server_args = shlex.join([*shlex.split(args.server_args), *argv[cut + 1 :]])
    if args.warmup_minutes is None:
        args.warmup_minutes = 0.15 * args.minutes
    args.weights = parse_mix(args.mix)
    return args


def parse_mix(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, weight = item.partition("=")
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        weights[name] = float(weight)
    return {k: v for k, v in weights.items() if v > 0}


# -- the server process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """`python -m qwenserve serve` with its output in args.server_log."""
    args.port = args.port or free_port()
    cmd = [sys.executable, "-m", "qwenserve", "serve", "--port", str(args.port), "--api-key", args.api_key]
    cmd += (["--model", args.model] if args.model else []) + shlex.split(args.server_args)
    args.server_log = args.server_log or Path(f"soak-server-{args.port}.log")
    args.base_url = f"http://127.0.0.1:{args.port}"
    args.server_cmd = shlex.join(cmd)
    log = open(args.server_log, "wb")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


async def wait_ready(
    client: httpx.AsyncClient, proc: subprocess.Popen[bytes] | None, timeout: float
) -> float:
    """Seconds until GET /v1/models answers 200 (GET /health answers during the load)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/v1/models")).status_code == 200:
                return time.monotonic() - start
        await asyncio.sleep(1.0)
    raise SystemExit(f"the server was not ready after {timeout:.0f}s")


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGINT (as Ctrl-C), then SIGKILL after 30 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def tree_rss_mb(pid: int) -> float | None:
    """RSS of `pid` and its descendants (tensor-parallel workers), from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            if p == pid:
                return None
    return total / 1024


# -- workload material --------------------------------------------------------------------------


@dataclass
class Material:
    """Fixed inputs shared by every worker: the tools and the conversation prefix."""

    tools: list[dict[str, Any]]
    conv_system: dict[str, Any]
    conv_user_parts: list[dict[str, Any]]
    conv_tools: list[dict[str, Any]]
    max_model_len: int = 32768


def load_material(args: argparse.Namespace) -> Material:
    fixture = json.loads(FIXTURE.read_text())
    tools = fixture["tools"]
    if args.conv_prefix == "qwen-code":
        return Material(tools, fixture["messages"][0], fixture["messages"][1]["content"][:-1], tools)
    rng = random.Random(1234)  # the same prefix in every worker and every run
    system = {"role": "system", "content": " ".join(rng.choice(WORDS) for _ in range(args.prefix_words))}
    names = set(args.conv_tools.split(","))
    return Material(tools, system, [], [t for t in tools if t["function"]["name"] in names])


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def prompt(rng: random.Random, max_words: int) -> str:
    if rng.random() < 0.5:
        return rng.choice(QUESTIONS)
    return f"{rng.choice(QUESTIONS)} Context: {words(rng, rng.randint(1, max_words))}"


def flat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat tool as a Responses API function tool."""
    return {"type": "function", **tool["function"]}


# -- results ------------------------------------------------------------------------------------


@dataclass
class Results:
    """Every request's outcome and latency, plus the scenario-specific checks."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    examples: list[dict[str, Any]] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)
    conv_turns: int = 0
    conv_checked: int = 0
    conv_grew: int = 0
    conv_cache_ratio: list[float] = field(default_factory=list)
    seed_pairs: int = 0
    seed_mismatches: int = 0
    tool_calls: int = 0

    def record(
        self, scenario: str, outcome: str, seconds: float, detail: dict[str, Any] | None = None
    ) -> None:
        self.outcomes[(scenario, outcome)] += 1
        self.latencies[scenario].append(seconds)
        if outcome == "ok":
            self.ok_times.append(time.monotonic())
        if outcome not in GOOD_OUTCOMES and len(self.examples) < 25:
            self.examples.append({"scenario": scenario, "outcome": outcome, **(detail or {})})

    def bad_count(self) -> int:
        return sum(n for (_, outcome), n in self.outcomes.items() if outcome not in GOOD_OUTCOMES)


@dataclass
class Ctx:
    """What a scenario gets: the client, the material, its worker's RNG and conversation."""

    client: httpx.AsyncClient
    args: argparse.Namespace
    material: Material
    results: Results
    rng: random.Random
    worker: int
    seq: int = 0
    conversation: list[dict[str, Any]] = field(default_factory=list)
    conv_last_cached: int = -1
    last_request: dict[str, Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        self.seq += 1
        rid = f"soak-w{self.worker}-{self.seq}"
        self.last_request["x-request-id"] = rid
        return {"x-request-id": rid}

    def max_tokens(self) -> int:
        return self.rng.randint(1, self.args.max_tokens)


# -- HTTP helpers ---------------------------------------------------------------------------------


def summarize_body(body: Any) -> Any:
    """The body as sent, with long strings and lists cut so a failure example stays readable."""
    if isinstance(body, str):
        return body if len(body) <= 300 else f"{body[:150]}...<{len(body)} chars>...{body[-100:]}"
    if isinstance(body, list):
        items = [summarize_body(x) for x in body[-6:]]
        return items if len(body) <= 6 else [f"<{len(body) - 6} earlier items>", *items]
    if isinstance(body, dict):
        return {k: summarize_body(v) for k, v in body.items()}
    return body


def check_status(resp: httpx.Response, text: str) -> None:
    if resp.status_code >= 500:
        raise CheckError("http_5xx", text[:2000], resp.status_code)
    if resp.status_code != 200:
        raise CheckError("unexpected_status", text[:2000], resp.status_code)


async def post_json(ctx: Ctx, path: str, body: dict[str, Any]) -> dict[str, Any]:
    ctx.last_request.update(path=path, body=body)
    resp = await ctx.client.post(path, json=body, headers=ctx.headers())
    check_status(resp, resp.text)
    try:
        return resp.json()
    except ValueError as err:
        raise CheckError("bad_response", f"not JSON: {resp.text[:500]}") from err


@contextlib.asynccontextmanager
async def post_stream(
    ctx: Ctx, path: str, body: dict[str, Any]
) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
    """POST and yield an iterator of SSE (event, data) pairs; leaving the block early hangs up."""
    ctx.last_request.update(path=path, body=body)
    async with ctx.client.stream("POST", path, json=body, headers=ctx.headers()) as resp:
        if resp.status_code != 200:
            check_status(resp, (await resp.aread()).decode(errors="replace"))
        yield sse_events(resp)


async def sse_events(resp: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    event = ""
    async for line in resp.aiter_lines():
        if not line:
            event = ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()


def load_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as err:
        raise CheckError("bad_response", f"stream chunk is not JSON: {data[:300]}") from err
    if "error" in chunk:
        raise CheckError("stream_error", json.dumps(chunk)[:1000])
    return chunk


def expect(cond: bool, detail: str) -> None:
    if not cond:
        raise CheckError("bad_response", detail)


# -- response checks ------------------------------------------------------------------------------

FINISH = {"stop", "length", "tool_calls"}


def check_chat(resp: dict[str, Any], n: int = 1) -> list[dict[str, Any]]:
    """A non-streamed chat completion: n choices, each finished, with usage; returns the choices."""
    expect(resp.get("object") == "chat.completion", f"object is {resp.get('object')!r}")
    choices = resp.get("choices") or []
    expect(
        sorted(c["index"] for c in choices) == list(range(n)),
        f"choice indexes {[c['index'] for c in choices]}",
    )
    for c in choices:
        expect(c.get("finish_reason") in FINISH, f"finish_reason {c.get('finish_reason')!r}")
        expect(c["message"]["role"] == "assistant", "message role is not assistant")
        if c["finish_reason"] == "tool_calls":
            expect(bool(c["message"].get("tool_calls")), "finish tool_calls without tool_calls")
    usage = resp.get("usage") or {}
    expect(usage.get("prompt_tokens", 0) > 0 and "completion_tokens" in usage, f"usage {usage}")
    return choices


@dataclass
class ChatStream:
    """A streamed chat completion, put back together."""

    content: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    finish: dict[int, str] = field(default_factory=dict)
    calls: dict[int, dict[int, dict[str, str]]] = field(default_factory=lambda: defaultdict(dict))
    logprobs: int = 0
    usage: dict[str, Any] | None = None
    chunks: int = 0
    done: bool = False

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        self.usage = chunk.get("usage") or self.usage
        for c in chunk.get("choices") or []:
            delta, i = c.get("delta") or {}, c["index"]
            self.content[i] += delta.get("content") or ""
            self.logprobs += len((c.get("logprobs") or {}).get("content") or [])
            for call in delta.get("tool_calls") or []:
                slot = self.calls[i].setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] += fn.get("name") or ""
                slot["arguments"] += fn.get("arguments") or ""
            if c.get("finish_reason"):
                self.finish[i] = c["finish_reason"]

    def check(self, n: int, want_usage: bool) -> None:
        expect(self.done, "stream ended without data: [DONE]")
        expect(sorted(self.finish) == list(range(n)), f"finished choices {sorted(self.finish)} of {n}")
        expect(all(f in FINISH for f in self.finish.values()), f"finish reasons {self.finish}")
        for i, f in self.finish.items():
            expect(f != "tool_calls" or bool(self.calls[i]), "finish tool_calls without a streamed call")
        expect(not want_usage or (self.usage or {}).get("prompt_tokens", 0) > 0, f"usage chunk {self.usage}")


async def read_chat_stream(ctx: Ctx, body: dict[str, Any], hang_up_after: int | None = None) -> ChatStream:
    out = ChatStream()
    async with post_stream(ctx, "/v1/chat/completions", body) as events:
        async for _, data in events:
            if data == "[DONE]":
                out.done = True
                break
            out.add(load_chunk(data))
            if hang_up_after is not None and out.chunks >= hang_up_after:
                raise Disconnected
    if hang_up_after is None:
        out.check(body.get("n", 1), bool((body.get("stream_options") or {}).get("include_usage")))
    return out


def check_tool_calls(ctx: Ctx, calls: list[dict[str, str]]) -> None:
    """Every call has an id and a name, and its arguments are a JSON object."""
    for call in calls:
        ctx.results.tool_calls += 1
        expect(bool(call.get("id")) and bool(call.get("name")), f"tool call without id or name: {call}")
        try:
            args = json.loads(call["arguments"] or "{}")
        except ValueError as err:
            raise CheckError("bad_response", f"tool call arguments are not JSON: {call}") from err
        expect(isinstance(args, dict), f"tool call arguments are not an object: {call}")


# -- scenarios ------------------------------------------------------------------------------------


def chat_body(ctx: Ctx, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "soak",
        "messages": [{"role": "user", "content": prompt(ctx.rng, ctx.args.prompt_words)}],
        "max_tokens": ctx.max_tokens(),
    }
    if ctx.rng.random() < 0.5:
        body["temperature"] = round(ctx.rng.uniform(0, 1.2), 2)
    return {**body, **extra}


async def sc_chat(ctx: Ctx) -> None:
    check_chat(await post_json(ctx, "/v1/chat/completions", chat_body(ctx)))


async def sc_chat_stream(ctx: Ctx) -> None:
    body = chat_body(ctx, stream=True)
    if ctx.rng.random() < 0.7:
        body["stream_options"] = {"include_usage": True}
    await read_chat_stream(ctx, body)


def tool_subset(ctx: Ctx) -> list[dict[str, Any]]:
    return ctx.rng.sample(ctx.material.tools, ctx.rng.randint(1, max(1, ctx.args.max_tools)))


async def sc_chat_tools(ctx: Ctx) -> None:
    tools = tool_subset(ctx)
    if not any(t["function"]["name"] == "run_shell_command" for t in tools) and ctx.rng.random() < 0.5:
        tools.append(next(t for t in ctx.material.tools if t["function"]["name"] == "run_shell_command"))
    content = ctx.rng.choice(["List the files in this directory", prompt(ctx.rng, ctx.args.prompt_words)])
    body = chat_body(ctx, tools=tools, messages=[{"role": "user", "content": content}])
    if ctx.rng.random() < 0.5:
        check_tool_calls(ctx, await chat_stream_calls(ctx, {**body, "stream": True}))
        return
    choice = check_chat(await post_json(ctx, "/v1/chat/completions", body))[0]
    calls = [{"id": c["id"], **c["function"]} for c in choice["message"].get("tool_calls") or []]
    check_tool_calls(ctx, calls)


async def chat_stream_calls(ctx: Ctx, body: dict[str, Any]) -> list[dict[str, str]]:
    out = await read_chat_stream(ctx, body)
    return list(out.calls[0].values())


def new_conversation(ctx: Ctx) -> None:
    m = ctx.material
    task = f"{ctx.rng.choice(QUESTIONS)} (task {ctx.worker}-{ctx.seq}: {words(ctx.rng, 12)})"
    user = {"role": "user", "content": [*m.conv_user_parts, {"type": "text", "text": task}]}
    ctx.conversation, ctx.conv_last_cached = [m.conv_system, user], -1


async def sc_conversation(ctx: Ctx) -> None:
    """One turn of an agent session: resend the whole history plus what the last turn added."""
    if not ctx.conversation:
        new_conversation(ctx)
    body = {
        "model": "soak",
        "messages": ctx.conversation,
        "tools": ctx.material.conv_tools,
        "max_tokens": ctx.max_tokens(),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = await read_chat_stream(ctx, body)
    check_tool_calls(ctx, list(out.calls[0].values()))
    track_cache(ctx, out.usage or {})
    extend_conversation(ctx, out)


def track_cache(ctx: Ctx, usage: dict[str, Any]) -> None:
    res, cached = ctx.results, (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    res.conv_turns += 1
    res.conv_cache_ratio.append(cached / max(1, usage.get("prompt_tokens", 1)))
    if ctx.conv_last_cached >= 0:
        res.conv_checked += 1
        res.conv_grew += cached > ctx.conv_last_cached
    ctx.conv_last_cached = cached
    turns = sum(m["role"] == "assistant" for m in ctx.conversation) + 1
    limit = min(ctx.args.conv_max_tokens, ctx.material.max_model_len * 3 // 4)
    if turns >= ctx.args.conv_max_turns or usage.get("prompt_tokens", 0) > limit:
        ctx.conversation = []


def extend_conversation(ctx: Ctx, out: ChatStream) -> None:
    if not ctx.conversation:
        return
    calls = list(out.calls[0].values())
    msg: dict[str, Any] = {"role": "assistant", "content": out.content[0] or None}
    if calls:
        msg["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ]
    ctx.conversation = [*ctx.conversation, msg]
    for c in calls:
        text = f"Command output:\n{words(ctx.rng, ctx.args.tool_result_words)}\nExit Code: 0"
        ctx.conversation.append(
            {"role": "tool", "tool_call_id": c["id"], "content": [{"type": "text", "text": text}]}
        )
    if not calls:
        ctx.conversation.append({"role": "user", "content": prompt(ctx.rng, ctx.args.prompt_words)})


async def sc_responses(ctx: Ctx) -> None:
    body: dict[str, Any] = {
        "model": "soak",
        "input": prompt(ctx.rng, ctx.args.prompt_words),
        "max_output_tokens": ctx.max_tokens(),
    }
    if ctx.rng.random() < 0.3:
        body["instructions"] = "You are a helpful assistant."
    namespaced: set[str] = set()
    if ctx.rng.random() < 0.4:
        body["tools"] = [flat_tool(t) for t in tool_subset(ctx)]
        body["input"] = [{"role": "user", "content": "List the files in this directory"}]
        if ctx.rng.random() < 0.5:  # as Codex CLI sends them: in a namespace, beside a hosted web search
            namespaced = {t["name"] for t in body["tools"]}
            body["tools"] = [
                {"type": "namespace", "name": "agent", "description": "The agent's tools.", "tools": body["tools"]},
                {"type": "web_search", "external_web_access": False},
            ]
    if ctx.rng.random() < 0.5:
        await read_responses_stream(ctx, {**body, "stream": True}, namespaced=namespaced)
    else:
        check_response(await post_json(ctx, "/v1/responses", body), namespaced)


def check_response(resp: dict[str, Any], namespaced: Collection[str] = ()) -> None:
    """A Response's shape; a call of a namespaced tool names its namespace (`agent`)."""
    expect(resp.get("object") == "response", f"object is {resp.get('object')!r}")
    expect(resp.get("status") in {"completed", "incomplete"}, f"status {resp.get('status')!r}")
    usage = resp.get("usage") or {}
    expect(usage.get("input_tokens", 0) > 0, f"usage {usage}")
    for item in resp.get("output") or []:
        expect(item.get("type") in {"message", "function_call"}, f"output item {item.get('type')!r}")
        if item["type"] == "function_call":
            expect(
                isinstance(json.loads(item["arguments"] or "{}"), dict), f"arguments {item['arguments']!r}"
            )
            expect(
                item.get("namespace") == ("agent" if item["name"] in namespaced else None),
                f"call of {item['name']!r} names namespace {item.get('namespace')!r}",
            )


async def read_responses_stream(
    ctx: Ctx, body: dict[str, Any], hang_up_after: int | None = None, namespaced: Collection[str] = ()
) -> None:
    last_seq, final, count = -1, None, 0
    async with post_stream(ctx, "/v1/responses", body) as events:
        async for event, data in events:
            if data == "[DONE]":
                break
            chunk = load_chunk(data)
            expect(chunk.get("type") == event, f"event {event!r} holds type {chunk.get('type')!r}")
            expect(
                chunk.get("sequence_number", -1) > last_seq, f"sequence_number {chunk.get('sequence_number')}"
            )
            last_seq, count = chunk["sequence_number"], count + 1
            if event in {"response.completed", "response.incomplete", "response.failed"}:
                final = chunk["response"]
            if hang_up_after is not None and count >= hang_up_after:
                raise Disconnected
    expect(final is not None, f"stream ended after {count} events without response.completed")
    check_response(final, namespaced)


async def sc_completions(ctx: Ctx) -> None:
    body: dict[str, Any] = {
        "model": "soak",
        "prompt": f"def {ctx.rng.choice(WORDS)}_{ctx.seq}(",
        "max_tokens": ctx.max_tokens(),
    }
    kind = ctx.rng.choice(["plain", "stream", "echo_logprobs", "batch", "suffix"])
    if kind == "echo_logprobs":
        body.update(echo=True, logprobs=2, max_tokens=min(body["max_tokens"], 8))
    elif kind == "batch":
        body["prompt"] = [body["prompt"], prompt(ctx.rng, ctx.args.prompt_words)]
    elif kind == "suffix":
        body["suffix"] = "\n    return result\n"
    if kind == "stream":
        await read_completion_stream(ctx, {**body, "stream": True})
        return
    resp = await post_json(ctx, "/v1/completions", body)
    want = 2 if kind == "batch" else 1
    choices = resp.get("choices") or []
    expect(
        sorted(c["index"] for c in choices) == list(range(want)),
        f"completion choices {len(choices)} of {want}",
    )
    expect(
        all(c.get("finish_reason") in FINISH and isinstance(c.get("text"), str) for c in choices),
        "bad choice",
    )
    if kind == "echo_logprobs":
        lp = choices[0].get("logprobs") or {}
        expect(len(lp.get("tokens") or []) == len(lp.get("token_logprobs") or []) > 0, f"echo logprobs {lp}")


async def read_completion_stream(ctx: Ctx, body: dict[str, Any], hang_up_after: int | None = None) -> None:
    finished, chunks, done = set(), 0, False
    async with post_stream(ctx, "/v1/completions", body) as events:
        async for _, data in events:
            if data == "[DONE]":
                done = True
                break
            chunks += 1
            for c in load_chunk(data).get("choices") or []:
                if c.get("finish_reason"):
                    finished.add(c["index"])
            if hang_up_after is not None and chunks >= hang_up_after:
                raise Disconnected
    expect(done and finished == {0}, f"completion stream done={done} finished={finished}")


async def sc_chat_n(ctx: Ctx) -> None:
    n = ctx.rng.randint(2, 3)
    body = chat_body(ctx, n=n, temperature=0.8)
    if ctx.rng.random() < 0.5:
        await read_chat_stream(ctx, {**body, "stream": True, "stream_options": {"include_usage": True}})
    else:
        check_chat(await post_json(ctx, "/v1/chat/completions", body), n)


async def sc_logprobs(ctx: Ctx) -> None:
    k = ctx.rng.randint(0, 5)
    body = chat_body(ctx, logprobs=True, top_logprobs=k)
    if ctx.rng.random() < 0.4:
        out = await read_chat_stream(ctx, {**body, "stream": True})
        expect(out.logprobs > 0 or not out.content[0], "streamed content without logprobs")
        return
    choice = check_chat(await post_json(ctx, "/v1/chat/completions", body))[0]
    entries = (choice.get("logprobs") or {}).get("content")
    expect(isinstance(entries, list), f"logprobs {choice.get('logprobs')}")
    expect(bool(entries) or not choice["message"].get("content"), "content without logprobs")
    for e in entries:
        expect(e["logprob"] <= 1e-4 and len(e["top_logprobs"]) == k, f"logprob entry {e}")


async def sc_json_schema(ctx: Ctx) -> None:
    fmt: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    if ctx.rng.random() < 0.3:
        fmt = {"type": "json_object"}
    msg = [{"role": "user", "content": "Describe a person as JSON with name, age and tags."}]
    body = chat_body(ctx, messages=msg, response_format=fmt, max_tokens=max(48, ctx.args.max_tokens))
    choice = check_chat(await post_json(ctx, "/v1/chat/completions", body))[0]
    if choice["finish_reason"] != "stop":
        return
    try:
        value = json.loads(choice["message"]["content"])
    except (TypeError, ValueError) as err:
        raise CheckError(
            "bad_response", f"finish stop but not JSON: {choice['message']['content']!r}"
        ) from err
    expect(isinstance(value, dict), f"not an object: {value!r}")
    if fmt["type"] == "json_schema":
        expect(set(value) == {"name", "age", "tags"}, f"keys {sorted(value)} break the schema")


async def sc_stop(ctx: Ctx) -> None:
    stops = ctx.rng.sample([" is", ".", "\n", " the", "e"], ctx.rng.randint(1, 2))
    body = chat_body(ctx, stop=stops, temperature=0)
    if ctx.rng.random() < 0.5:
        out = await read_chat_stream(ctx, {**body, "stream": True})
        text, finish = out.content[0], out.finish[0]
    else:
        choice = check_chat(await post_json(ctx, "/v1/chat/completions", body))[0]
        text, finish = choice["message"]["content"] or "", choice["finish_reason"]
    expect(not any(s in text for s in stops), f"stop {stops} found in output {text!r} (finish {finish})")


async def sc_seed(ctx: Ctx) -> None:
    """The same seeded sampled request twice: the answers should match (counted, failing with --strict-seed)."""
    body = chat_body(ctx, seed=ctx.rng.randint(0, 2**31), temperature=1.0, top_p=1.0)
    first = check_chat(await post_json(ctx, "/v1/chat/completions", body))[0]["message"]["content"]
    second = check_chat(await post_json(ctx, "/v1/chat/completions", body))[0]["message"]["content"]
    ctx.results.seed_pairs += 1
    if first != second:
        ctx.results.seed_mismatches += 1
        if ctx.args.strict_seed:
            raise CheckError("seed_mismatch", f"{first!r} != {second!r}")


async def sc_disconnect(ctx: Ctx) -> str | None:
    """Hang up: after a few chunks of a stream, or before the answer starts."""
    kind = ctx.rng.choice(["chat", "chat", "responses", "completions", "early_stream", "early_plain"])
    k = ctx.rng.randint(1, 6)
    long = max(64, ctx.args.max_tokens * 4)
    if kind == "chat":
        await read_chat_stream(
            ctx, chat_body(ctx, stream=True, max_tokens=long, ignore_eos=True), hang_up_after=k
        )
    elif kind == "responses":
        body = {
            "model": "soak",
            "input": prompt(ctx.rng, 20),
            "max_output_tokens": long,
            "stream": True,
            "ignore_eos": True,
        }
        await read_responses_stream(ctx, body, hang_up_after=k + 4)
    elif kind == "completions":
        body = {
            "model": "soak",
            "prompt": "Once upon a time",
            "max_tokens": long,
            "stream": True,
            "ignore_eos": True,
        }
        await read_completion_stream(ctx, body, hang_up_after=k)
    else:
        return await hang_up_early(ctx, kind == "early_stream")
    raise CheckError("bad_response", "the stream ended before the client could hang up")


async def hang_up_early(ctx: Ctx, stream: bool) -> str:
    """A long prompt, abandoned after 0.2-3 s (during its prefill, on a slow server); "ok" if answered by then."""
    msg = [{"role": "user", "content": words(ctx.rng, ctx.rng.randint(200, 2000))}]
    body = chat_body(ctx, messages=msg, max_tokens=max(64, ctx.args.max_tokens * 4), ignore_eos=True)
    call: Awaitable[Any] = (
        read_chat_stream(ctx, {**body, "stream": True})
        if stream
        else post_json(ctx, "/v1/chat/completions", body)
    )
    try:
        await asyncio.wait_for(call, timeout=ctx.rng.uniform(0.2, 3.0))
    except TimeoutError:
        raise Disconnected from None
    return "ok"


INVALID: list[tuple[str, str, Any, int]] = [
    ("POST", "/v1/chat/completions", {"model": "soak", "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": "soak"}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "soak", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "soak", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
        400,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "soak", "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
        400,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "soak",
            "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True},
        },
        400,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "soak", "messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]},
        400,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "soak", "messages": [{"role": "user", "content": "hi"}], "n": 0},
        400,
    ),
    ("POST", "/v1/chat/completions", b'{"model": "soak", "messages": [', 400),
    ("POST", "/v1/completions", {"model": "soak"}, 400),
    ("POST", "/v1/responses", {"model": "soak", "input": "hi", "previous_response_id": "resp_1"}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {
            "model": "soak",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}},
            },
        },
        400,
    ),
    ("GET", "/v1/models/no-such-model", None, 404),
    ("GET", "/v1/no-such-route", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
]


async def sc_invalid(ctx: Ctx) -> str:
    """A request the server must refuse with the expected 4xx and an OpenAI-shaped error."""
    method, path, body, want = ctx.rng.choice(INVALID)
    ctx.last_request.update(
        path=f"{method} {path}", body=body if not isinstance(body, bytes) else body.decode()
    )
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    resp = await ctx.client.request(method, path, headers=ctx.headers(), **kwargs)
    if resp.status_code >= 500:
        raise CheckError("http_5xx", resp.text[:2000], resp.status_code)
    if resp.status_code != want:
        raise CheckError("unexpected_status", f"wanted {want}: {resp.text[:1000]}", resp.status_code)
    try:
        err = resp.json()["error"]
        ok = (
            isinstance(err["message"], str)
            and isinstance(err["type"], str)
            and "param" in err
            and "code" in err
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    expect(ok, f"not an OpenAI-shaped error: {resp.text[:500]}")
    return "expected_4xx"


SCENARIOS: dict[str, Callable[[Ctx], Awaitable[str | None]]] = {
    "conversation": sc_conversation,
    "chat": sc_chat,
    "chat_stream": sc_chat_stream,
    "chat_tools": sc_chat_tools,
    "responses": sc_responses,
    "completions": sc_completions,
    "chat_n": sc_chat_n,
    "logprobs": sc_logprobs,
    "json_schema": sc_json_schema,
    "stop": sc_stop,
    "seed": sc_seed,
    "disconnect": sc_disconnect,
    "invalid": sc_invalid,
}


# -- running ------------------------------------------------------------------------------------------


async def run_one(ctx: Ctx, name: str) -> None:
    """Run one scenario under the stuck-request timeout and record its outcome (a scenario returns one
    other than "ok", or raises Disconnected or CheckError)."""
    ctx.last_request = {}
    start = time.monotonic()
    detail = None
    try:
        outcome = await asyncio.wait_for(SCENARIOS[name](ctx), timeout=ctx.args.request_timeout) or "ok"
    except Disconnected:
        outcome = "disconnected"
    except CheckError as err:
        outcome, detail = err.outcome, {"status": err.status, "detail": err.detail}
    except TimeoutError:
        outcome, detail = "timeout", {"detail": f"no answer within {ctx.args.request_timeout:.0f}s"}
    except (httpx.HTTPError, OSError) as err:
        outcome, detail = "transport_error", {"detail": f"{type(err).__name__}: {err}"}
    if detail is not None:
        detail.update(seconds=round(time.monotonic() - start, 2), **summarize_body(ctx.last_request))
        if "conversation" in name:  # the prefix is the same in every request: drop it from the report
            ctx.conversation = []
    ctx.results.record(name, outcome, time.monotonic() - start, detail)


async def worker(ctx: Ctx, deadline: float) -> None:
    names, weights = list(ctx.args.weights), list(ctx.args.weights.values())
    while time.monotonic() < deadline:
        await run_one(ctx, ctx.rng.choices(names, weights)[0])


def parse_metrics(text: str) -> dict[str, Any]:
    """The engine gauges and qwenserve_requests_total by status from a /metrics page."""
    gauges: dict[str, float] = {}
    by_status: Counter[str] = Counter()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("qwenserve_requests_total{"):
            status = name.split('status="', 1)[1].split('"', 1)[0]
            by_status[status] += int(float(value))
        elif "{" not in name:
            gauges[name] = float(value)
    return {"gauges": gauges, "by_status": dict(by_status)}


async def fetch_metrics(client: httpx.AsyncClient) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError):
        resp = await client.get("/metrics", timeout=30)
        if resp.status_code == 200:
            return parse_metrics(resp.text)
    return None


async def sample(client: httpx.AsyncClient, pid: int | None, results: Results, t0: float) -> dict[str, Any]:
    m = await fetch_metrics(client)
    g = (m or {}).get("gauges", {})
    return {
        "t": round(time.monotonic() - t0, 1),
        "rss_mb": tree_rss_mb(pid) if pid else None,
        "kv_usage": g.get("qwenserve_kv_cache_usage_perc"),
        "kv_free": g.get("qwenserve_kv_cache_free_blocks"),
        "kv_cached": g.get("qwenserve_kv_cache_cached_blocks"),
        "running": g.get("qwenserve_num_requests_running"),
        "waiting": g.get("qwenserve_num_requests_waiting"),
        "ok": len(results.ok_times),
        "bad": results.bad_count(),
        "metrics_ok": m is not None,
    }


async def sampler(
    client: httpx.AsyncClient,
    pid: int | None,
    results: Results,
    t0: float,
    every: float,
    samples: list[dict[str, Any]],
) -> None:
    while True:
        samples.append(await sample(client, pid, results, t0))
        await asyncio.sleep(every)


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> tuple[dict[str, Any] | None, float, bool]:
    """Poll /metrics until nothing runs or waits and every KV block is free (prefix-cached blocks count as
    free); the last page, the wait, and whether it got there."""
    start, m = time.monotonic(), None
    while time.monotonic() - start < timeout:
        m = await fetch_metrics(client)
        g = (m or {}).get("gauges", {})
        busy = g.get("qwenserve_num_requests_running", 1) or g.get("qwenserve_num_requests_waiting", 1)
        if not busy and g.get("qwenserve_kv_cache_free_blocks") == g.get("qwenserve_kv_cache_blocks"):
            return m, time.monotonic() - start, True
        await asyncio.sleep(1.0)
    return m, time.monotonic() - start, False


# -- verdict ----------------------------------------------------------------------------------------------


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per 10 minutes."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return None if var == 0 else 600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def rss_summary(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    pts = [(s["t"], s["rss_mb"]) for s in samples if s["rss_mb"] is not None]
    if not pts:
        return {"available": False}
    after = [p for p in pts if p[0] >= warmup_s] or pts[-1:]
    slope = slope_per_10min(after)
    floor = slope_per_10min(minute_minima(after))
    return {
        "available": True,
        "start": round(pts[0][1], 1),
        "after_warmup": round(after[0][1], 1),
        "end": round(pts[-1][1], 1),
        "max": round(max(p[1] for p in pts), 1),
        "growth_after_warmup": round(pts[-1][1] - after[0][1], 1),
        "slope_mb_per_10min": None if slope is None else round(slope, 2),
        "floor_slope_mb_per_10min": None if floor is None else round(floor, 2),
    }


def minute_minima(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lowest RSS of each minute: the floor a leak raises, without the transient peaks of prefills."""
    by_minute: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        by_minute[int(p[0] // 60)].append(p)
    return [min(ps, key=lambda p: p[1]) for _, ps in sorted(by_minute.items())]


def throughput(results: Results, t0: float, warmup_s: float, end: float) -> dict[str, Any]:
    """Ok requests per minute in the first and last thirds after the warm-up."""
    span = (end - t0 - warmup_s) / 3
    if span <= 0:
        return {}
    start = t0 + warmup_s
    first = sum(start <= t < start + span for t in results.ok_times)
    last = sum(end - span <= t <= end for t in results.ok_times)
    return {
        "ok_per_min_first_third": round(first / span * 60, 2),
        "ok_per_min_last_third": round(last / span * 60, 2),
        "ratio": round(last / first, 3) if first else None,
    }


def latency_summary(results: Results) -> dict[str, dict[str, float]]:
    out = {}
    for name, xs in sorted(results.latencies.items()):
        xs = sorted(xs)
        out[name] = {
            "n": len(xs),
            "p50": round(xs[len(xs) // 2], 2),
            "p95": round(xs[int(len(xs) * 0.95)], 2),
            "max": round(xs[-1], 2),
        }
    return out


def scan_log(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {"available": False}
    lines = path.read_text(errors="replace").splitlines()
    level = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (ERROR|CRITICAL|WARNING) ")
    levels = [(m.group(1) if (m := level.match(line)) else "") for line in lines]
    pick = {
        "tracebacks": [
            i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")
        ],
        "errors": [i for i, lv in enumerate(levels) if lv in {"ERROR", "CRITICAL"}],
        "warnings": [i for i, lv in enumerate(levels) if lv == "WARNING"],
    }
    out: dict[str, Any] = {"available": True, "lines": len(lines)}
    for key, idx in pick.items():
        out[key] = len(idx)
        out[f"{key}_first"] = ["\n".join(x[:300] for x in lines[max(0, i - 1) : i + 15]) for i in idx[:3]]
    return out


def verdict(args: argparse.Namespace, s: dict[str, Any]) -> list[str]:
    """The failed checks, in words."""
    fails = []
    if s["requests"]["bad"]:
        fails.append(f"{s['requests']['bad']} requests with a bad outcome: {s['requests']['by_outcome']}")
    if s["requests"]["total"] == 0:
        fails.append("no request was sent")
    kv = s["kv_at_end"]
    if not kv.get("idle"):
        fails.append(f"not idle {args.idle_timeout:.0f}s after the load stopped: {kv}")
    if s["server_5xx"]:
        fails.append(f"/metrics counts {s['server_5xx']} responses with a 5xx status")
    log = s["server_log"]
    if log.get("tracebacks") or log.get("errors"):
        fails.append(f"server log: {log.get('tracebacks')} tracebacks, {log.get('errors')} ERROR lines")
    slope = s["rss_mb"].get("floor_slope_mb_per_10min")
    if slope is not None and s["duration_s"] - s["warmup_s"] >= 600 and slope > args.max_rss_slope:
        fails.append(f"RSS floor grows {slope:.1f} MB / 10 min after warm-up (limit {args.max_rss_slope})")
    conv = s["conversation"]
    if conv["checked"] and conv["grew"] / conv["checked"] < args.min_cache_growth:
        fails.append(f"cached_tokens grew on {conv['grew']} of {conv['checked']} follow-up turns")
    ratio = s["throughput"].get("ratio")
    if ratio is not None and ratio < args.min_throughput_ratio:
        fails.append(f"throughput fell to {ratio:.0%} of the first post-warm-up third")
    if s.get("probe_after_idle") != "ok":
        fails.append(f"a request after the soak did not succeed: {s.get('probe_after_idle')}")
    return fails


def build_summary(
    args: argparse.Namespace, results: Results, samples: list[dict[str, Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    by_outcome: Counter[str] = Counter()
    by_scenario: dict[str, dict[str, int]] = defaultdict(dict)
    for (name, outcome), n in results.outcomes.items():
        by_outcome[outcome] += n
        by_scenario[name][outcome] = n
    warmup_s = args.warmup_minutes * 60
    t0, t_end = extra.pop("_t0"), extra.pop("_t_end")
    usage = [s["kv_usage"] for s in samples if s["kv_usage"] is not None]
    cached = [s["kv_cached"] for s in samples if s["kv_cached"] is not None]
    ratios = results.conv_cache_ratio
    return {
        **extra,
        "warmup_s": warmup_s,
        "requests": {
            "total": sum(by_outcome.values()),
            "bad": results.bad_count(),
            "by_outcome": dict(by_outcome),
            "by_scenario": dict(by_scenario),
            "tool_calls": results.tool_calls,
        },
        "latency_s": latency_summary(results),
        "conversation": {
            "turns": results.conv_turns,
            "checked": results.conv_checked,
            "grew": results.conv_grew,
            "mean_cached_ratio": round(statistics.fmean(ratios), 3) if ratios else None,
        },
        "seed": {"pairs": results.seed_pairs, "mismatches": results.seed_mismatches},
        "rss_mb": rss_summary(samples, warmup_s),
        "kv_during": {
            "max_usage": max(usage, default=None),
            "max_cached_blocks": max(cached, default=None),
            "min_free_blocks": min((x["kv_free"] for x in samples if x["kv_free"] is not None), default=None),
            "max_waiting": max((x["waiting"] or 0 for x in samples), default=None),
            "samples": len(samples),
            "metrics_failures": sum(not s["metrics_ok"] for s in samples),
        },
        "throughput": throughput(results, t0, warmup_s, t_end),
        "failure_examples": results.examples,
    }


# -- main ----------------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, proc: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    """Wait for the server, run the workers until the deadline, then measure the idle server."""
    limits = httpx.Limits(
        max_connections=args.concurrency * 2 + 8, max_keepalive_connections=args.concurrency * 2
    )
    headers = {"Authorization": f"Bearer {args.api_key}"}
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        ready_s = await wait_ready(client, proc, args.startup_timeout)
        before = (await fetch_metrics(client) or {}).get("by_status", {})  # the 503s of wait_ready
        models = (await client.get("/v1/models")).json()["data"]
        material = load_material(args)
        material.max_model_len = models[0].get("max_model_len", material.max_model_len)
        pid = proc.pid if proc else args.server_pid
        results, samples = Results(), []
        t0 = time.monotonic()
        task = asyncio.create_task(sampler(client, pid, results, t0, args.sample_seconds, samples))
        await run_workers(client, args, material, results, t0 + args.minutes * 60)
        t_end = time.monotonic()
        end_metrics, idle_wait, idle = await wait_idle(client, args.idle_timeout)
        samples.append(await sample(client, pid, results, t0))
        task.cancel()
        probe = await probe_request(client)
    by_status = {st: n - before.get(st, 0) for st, n in (end_metrics or {}).get("by_status", {}).items()}
    extra = {
        "base_url": args.base_url,
        "server_cmd": getattr(args, "server_cmd", None),
        "model": models[0]["id"],
        "ready_s": round(ready_s, 1),
        "duration_s": round(t_end - t0, 1),
        "concurrency": args.concurrency,
        "kv_at_end": kv_state((end_metrics or {}).get("gauges", {}), idle, idle_wait),
        "server_requests_by_status": by_status,
        "server_5xx": sum(n for st, n in by_status.items() if st.startswith("5")),
        "probe_after_idle": probe,
        "_t0": t0,
        "_t_end": t_end,
    }
    return build_summary(args, results, samples, extra) | {"samples": samples}


async def run_workers(
    client: httpx.AsyncClient, args: argparse.Namespace, material: Material, results: Results, deadline: float
) -> None:
    ctxs = [
        Ctx(client, args, material, results, random.Random(args.seed * 1000 + i), i)
        for i in range(args.concurrency)
    ]
    await asyncio.gather(*(worker(c, deadline) for c in ctxs))


def kv_state(g: dict[str, float], idle: bool, idle_wait: float) -> dict[str, Any]:
    """The KV pool once the load stopped: `used` counts blocks held by requests (cached blocks are free)."""
    return {
        "idle": idle,
        "idle_wait_s": round(idle_wait, 1),
        "blocks": g.get("qwenserve_kv_cache_blocks"),
        "free": g.get("qwenserve_kv_cache_free_blocks"),
        "used": None if not g else g["qwenserve_kv_cache_blocks"] - g["qwenserve_kv_cache_free_blocks"],
        "cached": g.get("qwenserve_kv_cache_cached_blocks"),
        "running": g.get("qwenserve_num_requests_running"),
        "waiting": g.get("qwenserve_num_requests_waiting"),
    }


async def probe_request(client: httpx.AsyncClient) -> str:
    body = {"model": "soak", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    try:
        resp = await client.post("/v1/chat/completions", json=body, timeout=120)
        return "ok" if resp.status_code == 200 else f"{resp.status_code}: {resp.text[:300]}"
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None if args.base_url else start_server(args)
    try:
        summary = asyncio.run(soak(args, proc))
    finally:
        exit_code = stop_server(proc) if proc else None
    summary["server_exit_code"] = exit_code
    summary["server_log"] = scan_log(args.server_log)
    summary["failures"] = verdict(args, summary)
    summary["passed"] = not summary["failures"]
    samples = summary.pop("samples")
    if args.out:
        args.out.write_text(json.dumps({**summary, "samples": samples}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
