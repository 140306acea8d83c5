"""NCCL all_reduce latency between the GPUs of this host, at the sizes a decode step reduces.

Usage on a multi-GPU machine: python3 bench/allreduce_latency.py [--world 2]
Tensor-parallel decode all-reduces the hidden state twice per layer (96 times a step for
Qwen3-Coder-30B-A3B), so this latency bounds its batch-1 speed.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwenserve.distributed.parallel import MULTICAST_OFF_ENV, free_port


def run(rank: int, world: int, port: int) -> None:
    os.environ.update(MULTICAST_OFF_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for numel in (2048, 64 * 2048, 1024 * 2048):
        x = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
        for _ in range(20):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        if rank == 0:
            print(f"world {world}: all_reduce of {numel} bf16: {(time.perf_counter() - start) / 200 * 1e6:.1f} us", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args()
    mp.spawn(run, args=(args.world, free_port()), nprocs=args.world)


if __name__ == "__main__":
    main()
