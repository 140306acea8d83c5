"""Decode-attention launch settings weighed inside the real decode graph (batch 1).

Usage on a GPU machine: python3 bench/tune_decode_attn.py CONFIG_DIR [--context 512 32768]
For each (flash-decoding warps, merge warps) the batch-1 graph is re-captured and replayed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tune_decode_moe import replay_ms, start_batch  # noqa: E402

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.kernels import attention  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, nargs="*", default=[512, 32768])
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=max(args.context) + 1024,
                                    max_num_seqs=1))
    defaults = attention.DECODE_NUM_WARPS, attention.DECODE_MERGE_NUM_WARPS
    for context in args.context:
        start_batch(engine, 1, context)
        for _ in range(3):
            replay_ms(engine, 1)  # settle clocks first: the first replays after a start run fast
        for warps in (8, 4, 2):
            for merge_warps in (1, 2, 4):
                attention.DECODE_NUM_WARPS, attention.DECODE_MERGE_NUM_WARPS = warps, merge_warps
                ms = replay_ms(engine, 1)
                print(f"ctx {context} decode warps {warps} merge warps {merge_warps}: step {ms * 1000:.1f} us", flush=True)
        attention.DECODE_NUM_WARPS, attention.DECODE_MERGE_NUM_WARPS = defaults
        print(f"ctx {context} defaults {defaults}: step {replay_ms(engine, 1) * 1000:.1f} us", flush=True)


if __name__ == "__main__":
    main()
