"""Stream safetensors shards into tensors that already exist (the model's parameters).

safetensors' own reader hands back one host tensor per name, which the loader then copied to the GPU: a
pageable copy per tensor, ~18,900 of them for Qwen3-Coder-30B-A3B, ran at ~2.5 GB/s even from the page
cache (12.5 s for half the model on the H200 host), below an NVMe disk's speed. Here a shard's bytes are
read in long runs straight into pinned host buffers, by several threads at once (one read() per run), and
each tensor goes to its destination with an asynchronous copy.
"""

from __future__ import annotations

import json
import os
import queue
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
BUFFER_BYTES = 256 << 20
READ_THREADS = 4


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: its dtype, shape and byte range in the file."""

    name: str
    # None: stored in a dtype this reader cannot convert, an error only if the model reads the tensor.
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    start: int
    end: int


_LFS_POINTER = b"version https://git-lfs"


def _header_json(path: Path) -> tuple[dict[str, Any], int]:
    """(the header, its length) of a safetensors file: 8-byte length, then JSON. A file that is not one
    (a Git LFS pointer left by a clone without git-lfs, a cut-off download) is refused naming it."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER))
        if head == _LFS_POINTER:
            raise ValueError(
                f"{path} is a Git LFS pointer, not the weights: fetch them (`git lfs pull` in the checkout, or "
                "`hf download` the model)"
            )
        f.seek(0)
        size = int.from_bytes(f.read(8), "little")
        if file_size < 8 or size > file_size - 8:
            raise ValueError(f"{path} is not a safetensors file, or was cut short ({file_size} bytes): download it again")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {exc}): download it again") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object): download it again")
    return header, size


def check_shard(path: Path) -> None:
    """Refuse, naming it, a weights file whose header cannot be read (before any reader meets it)."""
    _header_json(path)


def read_header(path: Path) -> list[TensorEntry]:
    """The shard's tensors in file order, from its header (8-byte length, then JSON)."""
    header, size = _header_json(path)
    data_start = 8 + size
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        # A tensor the model never reads may be stored in any dtype, as safetensors' reader allows.
        dtype = _DTYPES.get(info["dtype"])
        start, end = info["data_offsets"]
        entries.append(TensorEntry(name, dtype, tuple(info["shape"]), data_start + start, data_start + end))
    return sorted(entries, key=lambda e: e.start)


@dataclass
class _Run:
    """One read: `size` bytes from file offset `offset`, then (byte offset in the run, destination) copies."""

    offset: int
    size: int
    copies: list[tuple[int, TensorEntry, torch.Tensor]] = field(default_factory=list)


class StagedCopier:
    """Copies file byte ranges into tensors on `device` through host buffers (pinned for a GPU).

    Several threads read runs at once (a single thread's read() from the page cache or an NVMe disk tops
    out well below what the copies to a GPU take), each into its own buffer, and issue the buffer's
    copies; a buffer is refilled once its copies are done. `close` hands the buffers' page-locked memory
    back: PyTorch would keep it cached for the server's lifetime."""

    def __init__(self, device: torch.device, buffer_bytes: int = BUFFER_BYTES, threads: int = READ_THREADS):
        self.device = device
        self.cuda = device.type == "cuda"
        self.threads = threads if hasattr(os, "preadv") else 1
        self.capacity = buffer_bytes
        self.free: queue.SimpleQueue[tuple[torch.Tensor, torch.cuda.Event | None]] = queue.SimpleQueue()
        for _ in range(self.threads):
            self.free.put((torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=self.cuda), None))

    def copy_shard(self, path: Path, jobs: list[tuple[TensorEntry, torch.Tensor]]) -> None:
        """Each entry's bytes into its destination (same shape, any dtype); `jobs` in file order."""
        runs = list(self._runs(jobs))
        with open(path, "rb", buffering=0) as f:
            if self.threads == 1:
                for run in runs:
                    self._do(f, run)
            else:
                with ThreadPoolExecutor(self.threads, thread_name_prefix="qwenserve-load") as pool:
                    for done in [pool.submit(self._do, f, run) for run in runs]:
                        done.result()  # re-raises a failed read here
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Drop the buffers and return their page-locked host memory to the OS."""
        while not self.free.empty():
            self.free.get()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer that is freed
            _empty_pinned_cache()

    def _runs(self, jobs: list[tuple[TensorEntry, torch.Tensor]]) -> Iterator[_Run]:
        """Consecutive tensors grouped into reads of at most a buffer; a larger tensor in several."""
        run: _Run | None = None
        for entry, dest in jobs:
            if run is not None and entry.end - run.offset > self.capacity:
                yield run
                run = None
            if entry.end - entry.start <= self.capacity:
                run = run or _Run(entry.start, 0)
                run.copies.append((entry.start - run.offset, entry, dest))
                run.size = entry.end - run.offset
                continue
            if entry.dtype != dest.dtype or not dest.is_contiguous():
                yield _Run(entry.start, entry.end - entry.start, [(0, entry, dest)])  # converted whole, on the host
                continue
            flat = dest.view(-1).view(torch.uint8)
            for at in range(0, entry.end - entry.start, self.capacity):
                piece = min(self.capacity, entry.end - entry.start - at)
                part = TensorEntry(entry.name, torch.uint8, (piece,), entry.start + at, entry.start + at + piece)
                yield _Run(part.start, piece, [(0, part, flat[at : at + piece])])
        if run is not None:
            yield run

    @torch.no_grad()  # grad mode is per thread: the pool's threads copy into parameters too
    def _do(self, f: BinaryIO, run: _Run) -> None:
        """Read one run into a free buffer and issue its copies; the buffer is free again once they are done."""
        if run.size > self.capacity:  # a tensor to convert that no buffer holds: rare, so a buffer of its own
            data = torch.empty(run.size, dtype=torch.uint8)
            _read_exact(f, memoryview(data.numpy()), run.offset)
            _place(data, *run.copies[0][1:])
            return
        buffer, copied = self.free.get()
        try:
            if copied is not None:
                copied.synchronize()
            _read_exact(f, memoryview(buffer.numpy())[: run.size], run.offset)
            for at, entry, dest in run.copies:
                _place(buffer[at : at + entry.end - entry.start], entry, dest)
            if self.cuda:
                # On the destination's stream: a pool thread's current device is cuda:0 whatever --device says.
                copied = torch.cuda.Event()
                copied.record(torch.cuda.current_stream(self.device))
        finally:
            self.free.put((buffer, copied))


def _empty_pinned_cache() -> None:
    """Free the pinned host blocks PyTorch caches but no tensor uses (the public call is newer than 2.11)."""
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


def _read_exact(f: BinaryIO, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset` (positional reads, so threads share one open file)."""
    got = 0
    while got < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(f.fileno(), [view[got:]], offset + got)
        else:  # one thread only (see StagedCopier): seek + read is safe
            f.seek(offset + got)
            n = f.readinto(view[got:]) or 0
        if not n:
            raise ValueError(f"{Path(f.name).name} ends before byte {offset + len(view)}: truncated file")
        got += n


def _place(data: torch.Tensor, entry: TensorEntry, dest: torch.Tensor) -> None:
    """Copy one tensor's bytes (`data`, uint8 on the host) into `dest`, converting its dtype if needed."""
    if entry.dtype == dest.dtype and dest.is_contiguous():
        dest.view(-1).view(torch.uint8).copy_(data, non_blocking=True)
        return
    # A copy of the bytes is aligned for the dtype (a run may place a tensor at any byte offset), and the
    # conversion then runs on the host, before the buffer is reused.
    typed = data.clone().view(entry.dtype).view(entry.shape)
    dest.copy_(typed)
