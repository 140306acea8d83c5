"""Smoke test of the real server on a GPU: full-size dummy model, concurrent streaming chats,
a tool-call request, a streamed /v1/responses request, a disconnect, and /metrics. Run on a CUDA machine:

    python bench/gpu_server_smoke.py CONFIG_DIR

Prints what it saw and exits non-zero on the first failure.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_chat(client: httpx.Client, base: str, content: str, max_tokens: int, greedy: bool = True) -> tuple[int, float, str]:
    """Stream one chat; greedy=False sends no sampling fields, so the model's defaults apply (as for qwen-code).

    One shared client: a client per stream builds its own SSL context (~20 ms with the GIL held), and 16 of
    them at once added ~0.3 s to the streams' time to first token (2-core VM, demo server: 350-560 ms against
    166-173 ms through one OpenAI SDK client)."""
    body = {"model": "x", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}
    if greedy:
        body["temperature"] = 0
    start, first, chunks, finish = time.perf_counter(), None, 0, None
    with client.stream("POST", f"{base}/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    chunks += 1
                finish = choice.get("finish_reason") or finish
    return chunks, (first or time.perf_counter()) - start, str(finish)


def main() -> int:
    config = sys.argv[1]
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qwenserve", "serve", "--model", config, "--load-format", "dummy",
           "--port", str(port), "--max-model-len", "32768", "--max-num-seqs", "32"]
    log = open(os.path.join(os.environ.get("OUT", "."), "server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                print("server exited", proc.returncode)
                return 1
            time.sleep(2)
        print("ready after", round(400 - (deadline - time.time())), "s")
        schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]},
                  "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
                  "required": ["city", "ok", "n"], "additionalProperties": False}
        with cf.ThreadPoolExecutor(17) as pool, httpx.Client(limits=httpx.Limits(max_connections=32)) as client:
            guided = pool.submit(httpx.post, f"{base}/chat/completions", timeout=300, json={
                "model": "x", "max_tokens": 64, "messages": [{"role": "user", "content": "Answer in JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
            results = list(pool.map(lambda i: stream_chat(client, base, f"Write a story number {i}.", 64, i % 2 == 0), range(16)))
        print("16 concurrent streams, half greedy, half the model's sampling (chunks, ttft_s, finish):", results)
        assert all(r[0] > 10 and r[2] == "length" for r in results), results
        choice = guided.result().json()["choices"][0]
        print("json_schema beside them:", choice["finish_reason"], choice["message"]["content"])
        assert choice["finish_reason"] == "stop" and set(json.loads(choice["message"]["content"])) == {"city", "ok", "n"}
        tools = [{"type": "function", "function": {"name": "run_shell_command", "parameters": {
            "type": "object", "properties": {"command": {"type": "string"}}}}}]
        r = httpx.post(f"{base}/chat/completions", timeout=300, json={
            "model": "x", "max_tokens": 32, "tool_choice": "required", "tools": tools,
            "messages": [{"role": "user", "content": "List the files"}]})
        print("tool_choice=required:", r.status_code, r.json()["choices"][0]["finish_reason"])
        with httpx.stream("POST", f"{base}/responses", timeout=300, json={
                "model": "x", "stream": True, "max_output_tokens": 32, "input": "Write a story.",
                "tools": [{"type": "function", **tools[0]["function"]}]}) as s:
            kinds = [ln[7:] for ln in s.iter_lines() if ln.startswith("event: ")]
        print("/v1/responses stream:", len(kinds), "events:", kinds[:4], "...", kinds[-1])
        assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
        with httpx.stream("POST", f"{base}/chat/completions", timeout=60, json={
                "model": "x", "stream": True, "max_tokens": 5000, "messages": [{"role": "user", "content": "go"}]}) as s:
            for i, _ in enumerate(s.iter_lines()):
                if i > 5:
                    break  # disconnect mid-stream
        time.sleep(1)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        usage = [ln for ln in metrics.splitlines() if "kv_cache_usage" in ln and not ln.startswith("#")]
        running = [ln for ln in metrics.splitlines() if "num_requests_running" in ln and not ln.startswith("#")]
        print("after disconnect:", usage, running)
        return 0
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    raise SystemExit(main())
