"""Decode-attention launch settings weighed inside the real decode graph (batch 1).

Usage on a GPU machine: python3 bench/tune_decode_attn.py CONFIG_DIR [--context 512 32768]
For each setting (--sweep warps: flash-decoding and merge warps; --sweep tiles: decode tile and
pipeline stages, then add+RMSNorm warps) the batch-1 graph is re-captured and replayed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tune_decode_moe import replay_ms, start_batch  # noqa: E402

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.kernels import attention, fused  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, nargs="*", default=[512, 32768])
    p.add_argument("--sweep", choices=["warps", "tiles"], default="warps")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=max(args.context) + 1024,
                                    max_num_seqs=1))
    if args.sweep == "warps":
        sweep_warps(engine, args.context)
    else:
        sweep_tiles(engine, args.context)


def sweep_warps(engine: LLMEngine, contexts: list[int]) -> None:
    defaults = attention.DECODE_NUM_WARPS, attention.DECODE_MERGE_NUM_WARPS
    for context in contexts:
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


def sweep_tiles(engine: LLMEngine, contexts: list[int]) -> None:
    """Decode tile and pipeline stages, then the add+RMSNorm warps."""
    defaults = attention.DECODE_TILE, attention.DECODE_NUM_STAGES
    for context in contexts:
        start_batch(engine, 1, context)
        for _ in range(3):
            replay_ms(engine, 1)
        base = replay_ms(engine, 1)
        print(f"ctx {context} defaults tile/stages {defaults}: step {base * 1000:.1f} us", flush=True)
        for tile in (128, 64, 32, 16):
            for stages in (3, 2, 1):
                attention.DECODE_TILE, attention.DECODE_NUM_STAGES = tile, stages
                ms = replay_ms(engine, 1)
                print(f"ctx {context} tile {tile} stages {stages}: step {ms * 1000:.1f} us ({(ms - base) * 1000:+.1f})",
                      flush=True)
        attention.DECODE_TILE, attention.DECODE_NUM_STAGES = defaults
        for warps in (1, 2, 4, 8, None):
            fused.ADD_RMS_NORM_WARPS = warps
            ms = replay_ms(engine, 1)
            print(f"ctx {context} add_rms_norm warps {warps}: step {ms * 1000:.1f} us ({(ms - base) * 1000:+.1f})", flush=True)

if __name__ == "__main__":
    main()
