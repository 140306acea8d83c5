"""The process group and the collectives the model needs.

One process per device; rank 0 is the engine process. Two groups: the default group
(NCCL on GPU, gloo on CPU) carries the model's all_reduces, and a gloo `control` group
carries the per-step messages from rank 0 as host tensors, so workers never sync a GPU
to learn what to do next. At world size 1 no group exists and every helper is a no-op.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

# NVLink multicast (NVLS) is off on the machines we are lent; keep it off in every rank.
MULTICAST_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# Workers block on the control group between requests; an idle server must not time them out.
CONTROL_TIMEOUT = timedelta(days=365)

_control_group: dist.ProcessGroup | None = None


def apply_multicast_off_env() -> None:
    """Set the multicast-off variables in this process (children spawned later inherit them)."""
    os.environ.update(MULTICAST_OFF_ENV)


def gloo_available() -> bool:
    """Whether torch.distributed has the gloo backend (host-side messages between ranks)."""
    return dist.is_available() and dist.is_gloo_available()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous for one engine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(
    rank: int, world_size: int, init_method: str, device: torch.device, timeout: timedelta | None = None
) -> None:
    """Join the default group (NCCL for CUDA, gloo for CPU) and create the gloo control group.

    `timeout` bounds the rendezvous and the model's collectives (torch's default when None).
    """
    global _control_group
    apply_multicast_off_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    # A separate gloo group even on CPU, where the default one is gloo too: it has the long timeout.
    _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def destroy_process_group() -> None:
    """Tear down the process groups, if any; safe to call twice."""
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def get_world_size() -> int:
    """Number of ranks; 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def control_group() -> dist.ProcessGroup:
    """The gloo group that carries step messages between host processes."""
    if _control_group is None:
        raise RuntimeError("the process group is not initialised")
    return _control_group


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks in place and return it; the identity at world size 1."""
    if get_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_reduce_min(value: int) -> int:
    """The smallest of every rank's `value` (through the control group, on the host)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control_group())
    return int(t.item())


def broadcast_host(t: torch.Tensor) -> torch.Tensor:
    """Broadcast a host tensor from rank 0 through the control group (in place)."""
    dist.broadcast(t, src=0, group=control_group())
    return t
