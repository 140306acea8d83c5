"""Tensor/expert parallel on the full-size dummy model: greedy tokens and speed at one world size.

Usage on a machine with N GPUs (one process per world size, so each starts with empty GPUs):
    python3 bench/tp_check.py CONFIG_DIR --tp 1 --out tp1.json
    python3 bench/tp_check.py CONFIG_DIR --tp 2 --out tp2.json
    python3 bench/tp_check.py --compare tp1.json tp2.json
Records the greedy tokens (and their logprobs) of a few prompts, batch-1 decode tok/s at 512 context
and output tok/s of 64 streams (1024 in, 64 out). Tensor parallel runs eager (no CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from qwenserve.config import EngineConfig
from qwenserve.engine.llm_engine import LLMEngine
from qwenserve.engine.sampling_params import SamplingParams


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(150000) for _ in range(length)] for _ in range(count)]


def measure(config: str, tp: int) -> dict:
    engine = LLMEngine(EngineConfig(model=config, load_format="dummy", tensor_parallel_size=tp, max_model_len=4096,
                                    max_num_seqs=64))
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    outs = engine.generate(prompts(3, 512, 0), greedy)
    result = {"tp": tp, "tokens": [o[0].token_ids for o in outs],
              "logprobs": [[lp.logprob for lp in o[0].logprobs] for o in outs]}

    def timed(n: int, batch: list[list[int]]) -> float:
        start = time.perf_counter()
        engine.generate(batch, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        return time.perf_counter() - start

    one = prompts(1, 512, 1)
    timed(8, one)
    result["batch1_tok_s"] = 128 / (timed(129, one) - timed(1, one))
    streams = prompts(64, 1024, 2)
    timed(4, streams[:8])
    result["streams64_tok_s"] = 64 * 64 / timed(64, streams)
    engine.close()
    return result


def leading_equal(a: list, b: list) -> int:
    """How many tokens two sequences share before they first differ."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = runs[0]
    for run in runs:
        same = [leading_equal(a, b) for a, b in zip(base["tokens"], run["tokens"], strict=True)]
        drift = max(abs(x - y) for a, b in zip(base["logprobs"], run["logprobs"], strict=True) for x, y in zip(a[:4], b[:4], strict=False))
        print(f"tp {run['tp']}: batch-1 {run['batch1_tok_s']:.1f} tok/s, 64 streams {run['streams64_tok_s']:.0f} tok/s; "
              f"greedy tokens equal to tp {base['tp']} for the first {same} of 24; max |logprob diff| over the first "
              f"4 tokens {drift:.4f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config", nargs="?")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--compare", nargs="+")
    args = p.parse_args()
    if args.compare:
        compare(args.compare)
        return
    result = measure(args.config, args.tp)
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("tokens", "logprobs")}))


if __name__ == "__main__":
    main()
