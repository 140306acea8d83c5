"""Triton kernels with the signatures of `qwenserve.model.ops` (bf16 on CUDA, Hopper-tuned).

Importing this package never needs Triton; `kernel_ops()` imports the kernels lazily, so
CPU-only installs (CI) can import it and simply keep the torch reference.

Wiring: `Ops(**kernel_ops())` (qwenserve.model.qwen3.Ops) when `kernels_available()`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable


def kernels_available() -> bool:
    """True when Triton is installed and a CUDA device is visible."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


def kernel_ops() -> dict[str, Callable]:
    """The Triton replacements, keyed by the field names of qwen3.Ops / functions of ops.py.

    Projections stay on cuBLAS (Ops.linear), except one-token qkv / o_proj: split-K GEMVs whose partial
    sums the next fused kernel adds (linear_unreduced, qwenserve.kernels.linear)."""
    from qwenserve.kernels.attention import paged_attention
    from qwenserve.kernels.fused import add_rms_norm, qk_norm_rope_cache, route
    from qwenserve.kernels.linear import linear_unreduced
    from qwenserve.kernels.moe import fused_moe, norm_routed_moe, routed_moe
    from qwenserve.kernels.norm import rms_norm

    return {
        "paged_attention": paged_attention,
        "fused_moe": fused_moe,
        "routed_moe": routed_moe,
        "norm_routed_moe": norm_routed_moe,
        "rms_norm": rms_norm,
        "add_rms_norm": add_rms_norm,
        "qk_norm_rope_cache": qk_norm_rope_cache,
        "route": route,
        "linear_unreduced": linear_unreduced,
    }


__all__ = ["kernel_ops", "kernels_available"]
