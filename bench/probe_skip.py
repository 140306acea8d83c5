"""Upper bound of a fusion: the batch-1 decode graph with one small kernel left out (timing only).

Usage on a GPU machine: PYTHONPATH=. python3 bench/probe_skip.py CONFIG_DIR [--context 512 32768] [--rounds 5]
Each variant swaps one op of the engine's Ops for a stand-in that returns fixed, finite tensors of
the right shape without a launch, re-captures the graph and replays it (rotated order, as
bench/ab_decode.py). The step's results are wrong; what it measures is what the kernel costs in
the graph, so the most any fusion that removes it could gain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tune_decode_moe import replay_ms, start_batch  # noqa: E402

from qwenserve.config import EngineConfig  # noqa: E402
from qwenserve.engine.llm_engine import LLMEngine  # noqa: E402


def skip_input_norm(real: Callable, batch: int, hidden: int) -> Callable:
    """add_rms_norm of a MoE layer's k expert terms (the next layer's input norm) with no launch.
    The stand-in tensors exist before the capture, so the graph holds no kernel that makes them."""
    h = torch.randn(batch, hidden, device="cuda", dtype=torch.bfloat16)
    residual_out = h.clone()

    def op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        if x.dim() == 3 and x.shape[1] == 8 and tuple(residual.shape) == (batch, hidden):  # MoE terms
            return h, residual_out
        return real(x, residual, weight, eps)

    return op


def skip_qk_norm(real: Callable, batch: int, hidden: int) -> Callable:
    """qk_norm_rope_cache with no launch (the cache keeps its old keys; q is fixed)."""
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)

    def op(qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, head_dim, eps, *rest):
        if qkv.shape[0] == batch and (num_heads, head_dim) == (32, 128):
            return q
        return real(
            qkv, q_weight, k_weight, cos_sin, positions, num_heads, num_kv_heads, head_dim, eps, *rest
        )

    return op


VARIANTS: dict[str, tuple[str, Callable] | None] = {
    "base": None,
    "no_input_norm": ("add_rms_norm", skip_input_norm),
    "no_qk_norm": ("qk_norm_rope_cache", skip_qk_norm),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--context", type=int, nargs="*", default=[512, 32768])
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    engine = LLMEngine(
        EngineConfig(
            model=args.config,
            load_format="dummy",
            max_model_len=max(args.context) + 1024,
            max_num_seqs=max(args.batch),
        )
    )
    ops = engine.model.ops
    names = list(VARIANTS)
    for context in args.context:
        for batch in args.batch:
            start_batch(engine, batch, context)
            for _ in range(3):
                replay_ms(engine, batch)
            times: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(args.rounds):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    patch = VARIANTS[name]
                    if patch is None:
                        times[name].append(replay_ms(engine, batch))
                        continue
                    field, make = patch
                    real = getattr(ops, field)
                    setattr(ops, field, make(real, batch, engine.model_config.hidden_size))
                    try:
                        times[name].append(replay_ms(engine, batch))
                    finally:
                        setattr(ops, field, real)
            base = statistics.median(times["base"])
            for name in names:
                ms = statistics.median(times[name])
                print(
                    f"ctx {context} batch {batch} {name}: step {ms * 1000:.1f} us ({(ms - base) * 1000:+.1f}); "
                    f"runs {[round(t * 1000, 1) for t in times[name]]}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
