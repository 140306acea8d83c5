"""A/B of the qwen-code follow-up turn's TTFT in one engine, alternating: prefill splits on and off
(--toggle splits), or the prefill CUDA graphs on and off (--toggle graphs).

Each round renders qwen-code's first turn and its follow-up with a different first token, so the first
turn is cold and the follow-up finds only its own first turn cached. The first round of each arm warms
its kernels and is dropped. With --new-tokens N the follow-up is the first turn plus the first N tokens
of the real follow-up's own (a shorter tool result: 300 new tokens split, the real turn's 859 do not).

Usage on a GPU machine: python3 bench/ab_follow_up.py [--toggle graphs] [--rounds 6] [--new-tokens 150 300] [--profile]
(--profile: then one round per arm under torch.profiler, kernels by time, and one under cProfile, host time)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenserve.bench import DEFAULT_CONFIG, DEFAULT_FIXTURES, render_fixture, run_requests  # noqa: E402
from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.kernels import attention  # noqa: E402


def shortened_follow_up(first: list[int], follow: list[int], new_tokens: int) -> list[int]:
    """The first turn plus the first `new_tokens` tokens in which the follow-up departs from it."""
    shared = next(i for i, (a, b) in enumerate(zip(first, follow, strict=False)) if a != b)
    return first + follow[shared : shared + new_tokens]


ARMS = {"splits": ("splits", "no_splits"), "graphs": ("graphs", "eager")}


def set_arm(engine: LLMEngine, arm: str, prefill_graphs: object) -> None:
    """Prefill splits on or off (`splits` / `no_splits`), or the prefill CUDA graphs (`graphs` / `eager`)."""
    attention.PREFILL_SPLITS = arm != "no_splits"
    engine.runner.prefill_graphs = None if arm == "eager" else prefill_graphs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    p.add_argument("--rounds", type=int, default=6, help="rounds per arm, the first dropped")
    p.add_argument("--new-tokens", type=int, nargs="*", default=[None],
                   help="the follow-up's new tokens, one A/B each (default: all of them)")
    p.add_argument("--toggle", choices=sorted(ARMS), default="splits", help="what the two arms differ in")
    p.add_argument("--profile", action="store_true", help="then one round per arm under torch.profiler and one under cProfile")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=str(args.config), load_format="dummy", max_model_len=40960))
    prefill_graphs = engine.runner.prefill_graphs
    first = render_fixture(engine, args.fixtures / "first-turn.json")
    real_follow = render_fixture(engine, args.fixtures / "after-tool-call.json")
    arms, k = ARMS[args.toggle], 0
    for new_tokens in args.new_tokens:
        follow = real_follow if new_tokens is None else shortened_follow_up(first, real_follow, new_tokens)
        ttft_ms: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.rounds):
            for arm in arms:
                k += 1
                set_arm(engine, arm, prefill_graphs)
                run_requests(engine, [[first[0] + k] + first[1:]], 1)
                warm = run_requests(engine, [[follow[0] + k] + follow[1:]], 1)
                ttft_ms[arm].append(warm["ttft_s"][0] * 1000)
        summary = {arm: {"median_ms": statistics.median(v[1:]), "runs_ms": [round(x, 1) for x in v]}
                   for arm, v in ttft_ms.items()}
        summary["follow_up_tokens"] = len(follow)
        print(json.dumps(summary), flush=True)
        if args.profile:
            for arm in arms:
                k += 2
                profile_round(engine, arm, prefill_graphs, [first[0] + k] + first[1:], [follow[0] + k] + follow[1:])
    set_arm(engine, arms[0], prefill_graphs)


def profile_round(engine: LLMEngine, arm: str, prefill_graphs: object, first: list[int], follow: list[int]) -> None:
    """One round under torch.profiler (kernels by time), and one more under cProfile (host time)."""
    set_arm(engine, arm, prefill_graphs)
    run_requests(engine, [first], 1)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        warm = run_requests(engine, [follow], 1)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"{arm}: TTFT {warm['ttft_s'][0] * 1000:.1f} ms (under the profiler), kernels {gpu_us / 1000:.1f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
    first, follow = [first[0] + 1] + first[1:], [follow[0] + 1] + follow[1:]
    run_requests(engine, [first], 1)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    warm = profiler.runcall(run_requests, engine, [follow], 1)
    print(f"{arm}: TTFT {warm['ttft_s'][0] * 1000:.1f} ms (under cProfile)")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
