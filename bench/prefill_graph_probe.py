"""How much of a short follow-up turn's prefill is the host's launching, and what would a CUDA graph of the
step save? The real step (qwen-code's first turn cached, then the first N new tokens of its follow-up) is
caught as the engine prepares it, then its model forward is timed eager and replayed from a CUDA graph.

Usage on a GPU machine: python3 bench/prefill_graph_probe.py [--new-tokens 150 300 859] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ab_follow_up import shortened_follow_up  # noqa: E402
from qwenserve.bench import DEFAULT_CONFIG, DEFAULT_FIXTURES, render_fixture, run_requests  # noqa: E402
from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402


def catch_step(engine: LLMEngine, prompt: list[int]) -> tuple:
    """Run `prompt` for one token; returns the (ids, positions, metadata) of its first multi-token step."""
    runner, caught = engine.runner, []
    prepare = runner.prepare

    def spy(batch, inp=None):
        prepared = prepare(batch, inp)
        if not caught and prepared[3].max_query_len > 1:
            caught.append(prepared[1:])
        return prepared

    runner.prepare, graphs, runner.prefill_graphs = spy, runner.prefill_graphs, None  # the eager step
    try:
        run_requests(engine, [prompt], 1)
    finally:
        runner.prepare, runner.prefill_graphs = prepare, graphs
    return caught[0]


def timed_ms(fn, repeats: int = 10) -> tuple[float, float]:
    """Median (wall until the GPU is done, host time to enqueue) of `fn`, in ms."""
    walls, hosts = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        enqueued = time.perf_counter()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) * 1000)
        hosts.append((enqueued - start) * 1000)
    return statistics.median(walls), statistics.median(hosts)


@torch.inference_mode()
def probe(engine: LLMEngine, ids: torch.Tensor, pos: torch.Tensor, meta) -> dict:
    model = engine.runner.model
    eager_ms, eager_host_ms = timed_ms(lambda: model(ids, pos, meta))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(ids, pos, meta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(ids, pos, meta)
    graph_ms, graph_host_ms = timed_ms(graph.replay)
    return {"tokens": ids.shape[0], "eager_ms": eager_ms, "eager_host_ms": eager_host_ms,
            "graph_ms": graph_ms, "graph_host_ms": graph_host_ms, "splits": meta.prefill_splits}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[150, 300, 859])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=str(args.config), load_format="dummy", max_model_len=40960))
    first = render_fixture(engine, args.fixtures / "first-turn.json")
    follow = render_fixture(engine, args.fixtures / "after-tool-call.json")
    results = []
    for k, new_tokens in enumerate(args.new_tokens, start=1):
        turn = shortened_follow_up(first, follow, new_tokens)
        run_requests(engine, [[first[0] + k] + first[1:]], 1)  # its own first turn, cached
        row = probe(engine, *catch_step(engine, [turn[0] + k] + turn[1:]))
        row["new_tokens"] = new_tokens
        results.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prefill_graph_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
