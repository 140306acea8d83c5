"""Tile configurations for the fused MoE kernels, keyed by device and by the number of tokens in the step.

The tables for the Qwen3-Coder-30B-A3B shape (E=128, inter 768, hidden 2048, top-8) were
measured with `bench/kernels.py --tune-moe` on an H100 and on an H200 (same SM90 chip, 43 %
more bandwidth: the GEMV-like decode sizes pick different tiles). Any other GPU uses the H100
table; QWENSERVE_MOE_TABLE=H100|H200 forces one (to compare them on one device).
Other shapes (tests, small models) fall back to `default_moe_config`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEConfig:
    """Tiles of the two grouped GEMMs; BLOCK_M is shared because the align pads to it."""

    block_m: int
    n1: int  # GEMM1 (gate+up -> act) BLOCK_N, over the inter columns
    k1: int
    warps1: int
    stages1: int
    n2: int  # GEMM2 (act -> out) BLOCK_N, over the hidden columns
    k2: int
    warps2: int
    stages2: int
    group_m: int = 8


# Tokens from which torch._grouped_mm replaces the Triton GEMMs (None: never). On the H100
# the Triton path was faster at every size measured (64..8192 tokens; at 8192: 1.66 ms vs
# 2.81 ms for the whole op), so it stays off.
GROUPED_MM_MIN_TOKENS: int | None = None

# (E, inter, hidden, top_k) -> sorted [(max_tokens, config)]: the first row whose
# max_tokens >= T is used. Filled from measurements (see module docstring).
_QWEN3_MOE = (128, 768, 2048, 8)
_H200_TABLES: dict[tuple[int, int, int, int], list[tuple[int, MoEConfig]]] = {
    _QWEN3_MOE: [
        # Measured on H200 (bench/kernels.py --tune-moe, cold L2, CUDA graph), 2026-11-24.
        # Batch 1: GEMM1 re-picked in the decode graph with routing inside GEMM1 (tune_decode_moe.py, 2026-11-30).
        # Batch 2: GEMM2 re-picked with both GEMMs routing (bench/ab_decode.py, 5 rotated rounds, eleventh
        # session): -7 us at 512, -11 us at 32k; the tuner's other leads (GEMM1 16x128 at batch 1, 64x128 at
        # batch 2) were order noise (-6 / +23 us in the A/B).
        (1, MoEConfig(16, 16, 64, 2, 6, 64, 64, 4, 5)),
        (2, MoEConfig(16, 128, 128, 4, 3, 128, 64, 4, 4)),
        (4, MoEConfig(16, 32, 256, 4, 3, 16, 128, 2, 4)),
        (8, MoEConfig(16, 32, 64, 4, 5, 32, 128, 2, 4)),
        (16, MoEConfig(16, 32, 256, 4, 3, 64, 128, 4, 4)),
        (32, MoEConfig(16, 32, 256, 4, 3, 32, 128, 2, 4)),
        (64, MoEConfig(16, 32, 256, 4, 3, 32, 128, 2, 4)),
        (128, MoEConfig(16, 32, 256, 4, 3, 128, 128, 4, 3)),
        (256, MoEConfig(32, 64, 128, 4, 3, 128, 128, 4, 3)),
        (512, MoEConfig(64, 64, 64, 4, 4, 128, 64, 8, 4)),
        (2048, MoEConfig(128, 128, 64, 8, 4, 128, 64, 8, 3)),
        (4096, MoEConfig(128, 128, 64, 8, 3, 128, 64, 8, 3)),
        (1 << 30, MoEConfig(128, 128, 64, 8, 4, 128, 64, 8, 3)),
    ],
}
_TABLES: dict[tuple[int, int, int, int], list[tuple[int, MoEConfig]]] = {
    _QWEN3_MOE: [
        # Measured on H100 80GB HBM3 (bench/kernels.py --tune-moe, cold L2, CUDA graph).
        (1, MoEConfig(16, 32, 128, 4, 4, 64, 64, 4, 5)),  # GEMM2 re-picked in the decode graph (tune_decode_moe.py)
        (2, MoEConfig(16, 32, 256, 4, 3, 64, 128, 4, 4)),
        (4, MoEConfig(16, 32, 256, 4, 3, 32, 128, 4, 4)),
        (8, MoEConfig(16, 64, 256, 4, 3, 64, 256, 4, 3)),
        (16, MoEConfig(16, 32, 256, 4, 3, 64, 256, 4, 3)),
        (32, MoEConfig(16, 32, 256, 4, 3, 32, 256, 4, 3)),
        (64, MoEConfig(16, 32, 256, 4, 3, 64, 256, 4, 3)),
        (128, MoEConfig(16, 128, 128, 4, 3, 64, 256, 4, 3)),
        (256, MoEConfig(32, 64, 128, 4, 3, 128, 128, 4, 3)),
        (512, MoEConfig(64, 64, 128, 4, 3, 64, 128, 4, 3)),
        (1024, MoEConfig(64, 128, 64, 8, 4, 128, 64, 8, 4)),
        (1 << 30, MoEConfig(128, 128, 64, 8, 4, 128, 64, 8, 3)),
    ],
}


def default_moe_config(num_tokens: int, num_experts: int, top_k: int) -> MoEConfig:
    """Heuristic tiles: small BLOCK_M when few rows land on each expert (decode), larger otherwise."""
    rows_per_expert = num_tokens * top_k / max(1, num_experts)
    if rows_per_expert <= 16:
        return MoEConfig(16, 64, 64, 4, 3, 64, 64, 4, 3)
    if rows_per_expert <= 64:
        return MoEConfig(64, 64, 64, 4, 3, 64, 64, 4, 3)
    return MoEConfig(128, 64, 64, 8, 3, 128, 64, 8, 3)


@functools.cache
def _device_tables() -> dict[tuple[int, int, int, int], list[tuple[int, MoEConfig]]]:
    """The tables measured on this GPU (or on the one QWENSERVE_MOE_TABLE names)."""
    name = os.environ.get("QWENSERVE_MOE_TABLE") or torch.cuda.get_device_name()
    return _H200_TABLES if "H200" in name else _TABLES


def get_moe_config(num_tokens: int, num_experts: int, inter: int, hidden: int, top_k: int) -> MoEConfig:
    """Config for a step of num_tokens tokens (a host int: the shape, never a device value)."""
    if not torch.cuda.is_available():
        return default_moe_config(num_tokens, num_experts, top_k)
    table = _device_tables().get((num_experts, inter, hidden, top_k))
    if table is None:
        return default_moe_config(num_tokens, num_experts, top_k)
    for max_tokens, cfg in table:
        if num_tokens <= max_tokens:
            return cfg
    return table[-1][1]


def set_moe_table(
    key: tuple[int, int, int, int],
    rows: list[tuple[int, MoEConfig]],
    grouped_mm_min_tokens: int | None = None,
) -> None:
    """Replace a shape's table on this device (used by the tuners to try candidates in-process)."""
    global GROUPED_MM_MIN_TOKENS
    _device_tables()[key] = sorted(rows, key=lambda r: r[0])
    GROUPED_MM_MIN_TOKENS = grouped_mm_min_tokens
