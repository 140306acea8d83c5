"""Stream safetensors shards into tensors that already exist (the model's parameters).

safetensors' own reader hands back one host tensor per name, which the loader then copied to the GPU: a
pageable copy per tensor, ~18,900 of them for Qwen3-Coder-30B-A3B, ran at ~2.5 GB/s even from the page
cache (12.5 s for half the model on the H200 host), below an NVMe disk's speed. Here a shard's bytes are
read in long runs straight into two pinned host buffers (one read() per run: the next read overlaps the
copies out of the last one) and each tensor goes to its destination with an asynchronous copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
BUFFER_BYTES = 256 << 20


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: its dtype, shape and byte range in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> list[TensorEntry]:
    """The shard's tensors in file order, from its header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data_start = 8 + size
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: {name} is stored as {info['dtype']}, which this loader does not read")
        start, end = info["data_offsets"]
        entries.append(TensorEntry(name, dtype, tuple(info["shape"]), data_start + start, data_start + end))
    return sorted(entries, key=lambda e: e.start)


class StagedCopier:
    """Copies file byte ranges into tensors on `device` through two host buffers (pinned for a GPU)."""

    def __init__(self, device: torch.device, buffer_bytes: int = BUFFER_BYTES):
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # when each buffer's copies are done
        self.turn = 0

    @property
    def capacity(self) -> int:
        return self.buffers[0].numel()

    def copy_shard(self, path: Path, jobs: list[tuple[TensorEntry, torch.Tensor]]) -> None:
        """Each entry's bytes into its destination (same shape, any dtype); `jobs` in file order."""
        with open(path, "rb", buffering=0) as f:
            i = 0
            while i < len(jobs):
                run_start, j = jobs[i][0].start, i
                while j < len(jobs) and jobs[j][0].end - run_start <= self.capacity:
                    j += 1
                if j == i:  # a tensor larger than a buffer
                    self._copy_large(f, *jobs[i])
                    i += 1
                    continue
                buf = self._read(f, run_start, jobs[j - 1][0].end - run_start)
                for entry, dest in jobs[i:j]:
                    _place(buf[entry.start - run_start : entry.end - run_start], entry, dest)
                self._release()
                i = j
        if self.cuda:
            torch.cuda.synchronize()

    def _read(self, f: BinaryIO, offset: int, size: int) -> torch.Tensor:
        """The next free buffer, holding `size` bytes of the file from `offset`."""
        self.turn ^= 1
        pending = self.copied[self.turn]
        if pending is not None:
            pending.synchronize()  # its last copies must have left before it is overwritten
        view = memoryview(self.buffers[self.turn].numpy())[:size]
        f.seek(offset)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{getattr(f, 'name', 'shard')} ends before byte {offset + size}: truncated file")
            got += n
        return self.buffers[self.turn][:size]

    def _release(self) -> None:
        """Mark the current buffer's copies as issued: it is reused once they are done."""
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
            self.copied[self.turn] = event

    def _copy_large(self, f: BinaryIO, entry: TensorEntry, dest: torch.Tensor) -> None:
        size = entry.end - entry.start
        if entry.dtype != dest.dtype:  # converted on the host: rare (a float32 checkpoint's embeddings)
            host = torch.empty(size, dtype=torch.uint8)
            f.seek(entry.start)
            f.readinto(memoryview(host.numpy()))
            _place(host, entry, dest)
            return
        flat = dest.view(-1).view(torch.uint8)
        for offset in range(0, size, self.capacity):
            piece = min(self.capacity, size - offset)
            flat[offset : offset + piece].copy_(self._read(f, entry.start + offset, piece), non_blocking=True)
            self._release()


def _place(data: torch.Tensor, entry: TensorEntry, dest: torch.Tensor) -> None:
    """Copy one tensor's bytes (`data`, uint8 on the host) into `dest`, converting its dtype if needed."""
    if entry.dtype == dest.dtype and dest.is_contiguous():
        dest.view(-1).view(torch.uint8).copy_(data, non_blocking=True)
        return
    # A copy of the bytes is aligned for the dtype (a run may place a tensor at any byte offset).
    typed = data.clone().view(entry.dtype).view(entry.shape)
    dest.copy_(typed, non_blocking=True)
