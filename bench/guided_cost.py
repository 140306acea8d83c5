"""What structured output costs at decode: tokens per second of a plain request alone, of a guided one
alone, and of a plain one beside another plain one or beside a guided one (steps stop overlapping then).

Usage on a GPU machine (dummy weights of the config's shape):
    python3 bench/guided_cost.py CONFIG_DIR [--tokens 256]
The guide is a regex of lowercase letters and spaces, under which a random-weight model writes about as
long as without it; its mask is as costly per token as a JSON schema's string field.
"""

from __future__ import annotations

import argparse
import json
import time

from qwenserve.config import EngineConfig
from qwenserve.engine.guided import Guide
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams


def timed_generate(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list]:
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - start, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=4096, max_num_seqs=8))
    n = args.tokens
    prompt = [(13 * i) % 5000 + 100 for i in range(512)]
    plain = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    guided = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, guide=Guide("regex", "[a-z ]+"))
    engine.generate([prompt], guided)  # compile the guide and warm the eager sampling path
    figures = {}
    cases = (("plain alone", [plain]), ("guided alone", [guided]), ("plain beside plain", [plain, plain]),
             ("plain beside guided", [plain, guided]))
    for name, batch in cases:
        runs = []
        for r in range(3):
            prompts = [[t + r + i for t in prompt] for i in range(len(batch))]
            seconds, outs = timed_generate(engine, prompts, batch)
            runs.append(len(outs[0][0].token_ids) / seconds)  # the first request's tokens (plain when mixed)
        figures[name] = round(sorted(runs)[1], 1)  # median of 3; its 512-token prefill included
        print(name, figures[name], "tok/s per request", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
