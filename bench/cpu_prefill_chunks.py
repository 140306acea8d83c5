"""Cold time to first token of qwen-code's real first turn on a CPU, for several prefill chunk sizes
(`--max-num-batched-tokens`), each against its own `qwenserve serve` of the demo model, in one run:

    python bench/cpu_prefill_chunks.py --chunks 8192 4096 2048 1024 --repeats 2

Each request starts with a new first character, so the prefix cache never helps. Prints one line per
request and a markdown table of the medians.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
FIRST_TURN = REPO / "tests" / "fixtures" / "qwen-code-0.24.4" / "first-turn.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_turn(base: str, body: dict) -> tuple[int, float]:
    """(prompt tokens, seconds) for the first turn with a unique first character: one token out."""
    body = json.loads(json.dumps(body))
    system = body["messages"][0]
    system["content"] = f"[{time.time_ns()}] {system['content']}"
    body.update(stream=False, max_tokens=1)
    body.pop("stream_options", None)
    start = time.perf_counter()
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=1800)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens"], time.perf_counter() - start


def measure(chunk: int, repeats: int, body: dict) -> list[float]:
    port = free_port()
    cmd = [sys.executable, "-m", "qwenserve", "serve", "--port", str(port), "--max-num-batched-tokens", str(chunk)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the server never became ready")
        times = []
        for i in range(repeats):
            tokens, seconds = cold_turn(base, body)
            print(f"chunk {chunk}: run {i + 1}: {tokens} prompt tokens in {seconds:.1f} s", flush=True)
            times.append(seconds)
        return times
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8192, 4096, 2048, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    body = json.loads(FIRST_TURN.read_text())
    results = {chunk: measure(chunk, args.repeats, body) for chunk in args.chunks}
    print("\n| --max-num-batched-tokens | cold TTFT, median | runs |\n|---:|---:|---|")
    for chunk, times in results.items():
        runs = ", ".join(f"{t:.1f}" for t in times)
        print(f"| {chunk} | {statistics.median(times):.1f} s | {runs} |")


if __name__ == "__main__":
    main()
