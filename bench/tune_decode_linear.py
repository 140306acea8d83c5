"""cuBLAS against the skinny Triton GEMM for the decode projections, inside the real decode graph.

Usage on a GPU machine: python3 bench/tune_decode_linear.py CONFIG_DIR [--batch 1 4 16]
For each batch: the step with cuBLAS projections, then with qkv / o_proj / router on
kernels/linear.py for each candidate tile (the other projections on their current tiles).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from tune_decode_moe import replay_ms, start_batch  # noqa: E402

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402
from qwenserve.kernels import linear as skinny  # noqa: E402
from qwenserve.kernels import moe  # noqa: E402

TILES = [(16, 256, 2, 4), (16, 128, 2, 4), (16, 512, 4, 2), (32, 256, 4, 3), (32, 128, 4, 4), (16, 256, 4, 3),
         (64, 128, 4, 4), (32, 64, 4, 5), (16, 128, 1, 4), (16, 64, 2, 6)]


# Best tiles at batch 1 from the joint sweep (H100).
BEST = {"qkv": (32, 128, 4, 4), "o_proj": (16, 256, 4, 3), "router": (16, 256, 4, 3)}


def measure_alone(engine: LLMEngine, args: argparse.Namespace, shapes: dict) -> None:
    ops = engine.model.ops
    for batch in args.batch:
        start_batch(engine, batch, args.context)
        for name, shape in shapes.items():
            skinny.LINEAR_CONFIGS[shape] = BEST[name]
        ops.linear, moe.ROUTER_LINEAR = F.linear, F.linear
        base = replay_ms(engine, batch)
        print(f"batch {batch} cuBLAS: step {base * 1000:.1f} us", flush=True)
        for name in shapes:
            skinny_qkv_o = name in ("qkv", "o_proj")
            ops.linear = (lambda x, w, n=name: skinny.linear(x, w) if w.shape == shapes[n] else F.linear(x, w)) \
                if skinny_qkv_o else F.linear
            moe.ROUTER_LINEAR = skinny.linear if name == "router" else F.linear
            ms = replay_ms(engine, batch)
            print(f"batch {batch} only {name} skinny {BEST[name]}: step {ms * 1000:.1f} us ({(ms - base) * 1000:+.1f})",
                  flush=True)
        ops.linear, moe.ROUTER_LINEAR = F.linear, F.linear


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--alone", action="store_true", help="one projection at a time on the skinny kernel, at its best tile")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.config, load_format="dummy", max_model_len=4096,
                                    max_num_seqs=max(args.batch)))
    cfg = engine.model_config
    shapes = {
        "qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim, cfg.hidden_size),
        "o_proj": (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim),
        "router": (cfg.num_experts, cfg.hidden_size),
    }
    ops = engine.model.ops
    if args.alone:
        measure_alone(engine, args, shapes)
        return
    for batch in args.batch:
        start_batch(engine, batch, args.context)
        ops.linear, moe.ROUTER_LINEAR = F.linear, F.linear
        print(f"batch {batch} cuBLAS: step {replay_ms(engine, batch) * 1000:.1f} us", flush=True)
        ops.linear, moe.ROUTER_LINEAR = skinny.linear, skinny.linear
        for name, shape in shapes.items():
            results = []
            for tile in TILES:
                skinny.LINEAR_CONFIGS[shape] = tile
                ms = replay_ms(engine, batch)
                results.append((ms, tile))
                print(f"batch {batch} {name} {tile}: step {ms * 1000:.1f} us", flush=True)
            best = min(results)
            skinny.LINEAR_CONFIGS[shape] = best[1]
            print(f"batch {batch} best {name}: {best[1]} {best[0] * 1000:.1f} us", flush=True)
        print(f"batch {batch} all skinny, best tiles: step {replay_ms(engine, batch) * 1000:.1f} us", flush=True)
        print("LINEAR_CONFIGS =", skinny.LINEAR_CONFIGS, flush=True)
        ops.linear, moe.ROUTER_LINEAR = F.linear, F.linear
        print(f"batch {batch} cuBLAS again: step {replay_ms(engine, batch) * 1000:.1f} us", flush=True)


if __name__ == "__main__":
    main()
