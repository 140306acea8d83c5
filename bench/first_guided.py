"""What the first structured-output request costs right after the engine starts (time to first token).

    python3 bench/first_guided.py CONFIG_DIR [--skip-guided-warmup]

Runs batches of 15-token prompts on dummy weights: 16 plain requests (half greedy, half the model's sampling),
one guided request (json_object) alone, then beside 8 or 16 plain ones. --skip-guided-warmup starts the engine
as before 2026-12-03 (xgrammar's vocabulary view only, no guided step). Measured on an H200 (twenty-eighth
session): the first guided request waited 2,775.7 ms for its first token without the warm-up step, 24.6 ms with
it; every later one ~25-50 ms either way (docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from qwenserve.bench import model_sampling, random_prompt
from qwenserve.config import EngineConfig
from qwenserve.engine.guided import Guide
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams

# (greedy, guided) per request of a batch.
MIXED = [(i % 2 == 0, False) for i in range(16)]
BATCHES = [
    ("16 mixed greedy/sampled", MIXED),
    ("16 mixed greedy/sampled again", MIXED),
    ("1 guided (sampled) alone", [(False, True)]),
    ("1 guided alone again", [(False, True)]),
    ("16 mixed + 1 guided", MIXED + [(False, True)]),
    ("16 mixed + 1 guided again", MIXED + [(False, True)]),
    ("8 mixed + 1 guided", MIXED[:8] + [(False, True)]),
    ("8 mixed + 1 guided, greedy guide", MIXED[:8] + [(True, True)]),
    ("32 mixed + 0 guided", MIXED * 2),
]


def slowest_ttft(engine: LLMEngine, specs: list[tuple[bool, bool]], sampling: dict[str, Any], rng: random.Random) -> float:
    """Submit one batch at once, step it to the end; the slowest request's time to first token (seconds)."""
    start = time.perf_counter()
    first: dict[str, float] = {}
    for greedy, guided in specs:
        kw = {"temperature": 0.0} if greedy else dict(sampling)
        params = SamplingParams(**kw, max_tokens=16, ignore_eos=not guided, guide=Guide("json_object") if guided else None)
        engine.add_request(f"r{time.monotonic_ns()}", random_prompt(15, rng), params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids:
                first.setdefault(out.request_id, time.perf_counter() - start)
    return max(first.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="model config directory (dummy weights)")
    parser.add_argument("--skip-guided-warmup", action="store_true", help="start the engine as before 2026-12-03")
    args = parser.parse_args()
    if args.skip_guided_warmup:  # xgrammar's vocabulary view only, no guided step
        LLMEngine._warm_structured_output = lambda self, guided: self.guides.warm()
    engine = LLMEngine(EngineConfig(model=str(args.config), load_format="dummy", max_model_len=40000, max_num_seqs=32))
    sampling = model_sampling(args.config)
    rng = random.Random(0)
    for label, specs in BATCHES:
        print(f"{label:40s} slowest ttft {slowest_ttft(engine, specs, sampling, rng) * 1000:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
