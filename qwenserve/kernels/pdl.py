"""Programmatic dependent launch (Hopper and later): the next kernel is launched while the
current one finishes, so the launch latency between the ~10 kernels of a layer overlaps work.

Every Triton kernel on the model's path takes a `PDL` constexpr: with it set, the kernel waits
(`gdc_wait`) for the previous kernel in the stream to complete and flush its memory before it
touches any, then lets the next kernel launch (`gdc_launch_dependents`). Waiting first makes
this safe whatever the previous kernel is (ours, cuBLAS, a copy). QWENSERVE_PDL=0 turns it off.
"""

from __future__ import annotations

import os

import torch

_enabled: dict[int, bool] = {}


def pdl_args() -> dict[str, bool]:
    """Launch kwargs for a Triton kernel with a `PDL` constexpr, on the current CUDA device."""
    if not torch.cuda.is_available():  # the Triton interpreter on CPU tensors
        return {"PDL": False, "launch_pdl": False}
    index = torch.cuda.current_device()
    on = _enabled.get(index)
    if on is None:
        on = os.environ.get("QWENSERVE_PDL", "1") != "0" and torch.cuda.get_device_capability(index)[0] >= 9
        _enabled[index] = on
    return {"PDL": on, "launch_pdl": on}
