"""Ranks 1..N-1 and rank 0's handle on them.

Rank 0 (the engine process) schedules and samples; every other rank only runs the model.
Each step rank 0 broadcasts a fixed-size header and one packed int64 payload (input ids,
positions, slot mapping, context lens, query_start_loc, block tables) through the gloo
control group; every rank, rank 0 included, unpacks the same payload into the model's
inputs, so all ranks run the very same forward and meet at the same all_reduces. Rank 0
alone computes logits and samples.

Commands: STEP (a forward), KV (allocate a KV pool of N blocks of this rank's kv heads),
FREE_MEMORY (the smallest free GPU memory over the ranks), STOP (leave the loop).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from qwenserve.config import ModelConfig
from qwenserve.distributed import parallel
from qwenserve.engine.model_runner import ForwardStep, ModelRunner, StepInputs, select_ops
from qwenserve.engine.scheduler import ScheduledBatch
from qwenserve.model.loader import build_model
from qwenserve.model.ops import AttentionMetadata
from qwenserve.model.qwen3 import Qwen3ForCausalLM

logger = logging.getLogger(__name__)

CMD_STEP, CMD_KV, CMD_FREE_MEMORY, CMD_STOP = range(4)
# [command, tokens, seqs, blocks per table, max query len, max context len, decode only, argument]
HEADER_LEN = 8
# Workers join the group before loading, rank 0 right after spawning them; allow slow starts.
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)
_JOIN_TIMEOUT_S = 30


@dataclass
class WorkerSpec:
    """What a worker needs to build its shard the way rank 0 builds its own."""

    path: Path
    model_config: ModelConfig
    world_size: int
    init_method: str
    device_type: str
    first_device_index: int  # rank r runs on cuda:(first_device_index + r)
    dtype: torch.dtype
    load_format: str
    seed: int
    max_positions: int
    block_size: int
    use_kernels: bool
    num_threads: int  # rank 0's torch op threads (CPU)

    def device(self, rank: int) -> torch.device:
        """The device `rank` runs on."""
        if self.device_type == "cuda":
            return torch.device("cuda", self.first_device_index + rank)
        return torch.device(self.device_type)


# -- the step message -----------------------------------------------------------------


def pack_step(inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) host int64 tensors describing one step."""
    num_tokens, num_seqs = len(inp.input_ids), len(inp.context_lens)
    max_blocks = len(inp.block_tables[0])
    header = torch.tensor(
        [CMD_STEP, num_tokens, num_seqs, max_blocks, inp.max_query_len, max(inp.context_lens),
         int(inp.is_decode_only), 0],
        dtype=torch.int64,
    )
    flat_tables = [b for table in inp.block_tables for b in table]
    payload = torch.tensor(
        inp.input_ids + inp.positions + inp.slot_mapping + inp.context_lens + inp.query_start_loc + flat_tables,
        dtype=torch.int64,
    )
    return header, payload


def payload_len(header: torch.Tensor) -> int:
    """Length of the step payload the `header` announces."""
    num_tokens, num_seqs, max_blocks = (int(v) for v in header[1:4])
    return 3 * num_tokens + 2 * num_seqs + 1 + num_seqs * max_blocks


def unpack_step(
    header: torch.Tensor, payload: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """The model's (input ids, positions, metadata) on `device`: one copy, then views."""
    num_tokens, num_seqs, max_blocks, max_query_len, max_context_len, decode_only = (int(v) for v in header[1:7])
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs, num_seqs + 1, num_seqs * max_blocks]
    ids, pos, slots, ctx, qsl, tables = payload.to(device, non_blocking=True).split(sizes)
    host_ctx, host_qsl = payload.split(sizes)[3:5]
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables.view(num_seqs, max_blocks).to(torch.int32),
        context_lens=ctx.to(torch.int32),
        query_start_loc=qsl.to(torch.int32),
        max_query_len=max_query_len,
        max_context_len=max_context_len,
        is_decode_only=bool(decode_only),
        host_query_start_loc=None if decode_only else host_qsl.tolist(),
        host_context_lens=None if decode_only else host_ctx.tolist(),
    )
    return ids, pos, meta


def _command(cmd: int, arg: int = 0) -> torch.Tensor:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0], header[7] = cmd, arg
    return header


# -- rank 0 ------------------------------------------------------------------------------


class WorkerGroup:
    """Rank 0's side: spawns ranks 1..N-1, joins the process group as rank 0, sends commands."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        parallel.apply_multicast_off_env()  # before spawning: the children inherit the environment
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=worker_main, args=(rank, spec), name=f"qwenserve-rank{rank}", daemon=True)
            for rank in range(1, spec.world_size)
        ]
        for proc in self.procs:
            proc.start()
        self.device = spec.device(0)
        try:
            parallel.init_process_group(0, spec.world_size, spec.init_method, self.device, RENDEZVOUS_TIMEOUT)
        except Exception:
            for proc in self.procs:  # they would wait for rank 0 until the rendezvous times out
                proc.terminate()
            raise
        self.closed = False
        self.broken: str | None = None  # set when rank 0 failed mid-forward: the ranks are out of step
        atexit.register(self.close)
        logger.info("tensor parallel: %d ranks (%s)", spec.world_size, ", ".join(str(p.pid) for p in self.procs))

    def send(self, header: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        """Broadcast a command header (and its payload) to every worker."""
        self._check_alive()
        parallel.broadcast_host(header)
        if payload is not None:
            parallel.broadcast_host(payload)

    def allocate_kv(self, num_blocks: int) -> None:
        """Every worker drops its KV pool and allocates one of `num_blocks` blocks."""
        self.send(_command(CMD_KV, num_blocks))

    def min_free_memory(self, free: int) -> int:
        """The least free GPU memory over all ranks, rank 0's `free` included."""
        self.send(_command(CMD_FREE_MEMORY))
        return parallel.all_reduce_min(free)

    def close(self) -> None:
        """Stop the workers (STOP, then join; terminate what does not exit) and leave the group."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        stopped = False
        if self.broken is None and all(p.is_alive() for p in self.procs):
            try:
                parallel.broadcast_host(_command(CMD_STOP))
                stopped = True
            except RuntimeError as err:  # a worker died meanwhile: terminate below
                logger.warning("could not send STOP to the workers: %s", err)
        if stopped:
            # NCCL tears a communicator down collectively: rank 0 leaves with the workers, who leave on
            # STOP. Joining them first left them waiting in theirs until they were killed (2 H200s).
            parallel.destroy_process_group()
        for proc in self.procs:
            proc.join(_JOIN_TIMEOUT_S if self.broken is None else 0)
            if proc.is_alive():
                logger.warning("rank %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join(_JOIN_TIMEOUT_S)
        parallel.destroy_process_group()  # a no-op when it already ran above

    def _check_alive(self) -> None:
        if self.broken is not None:
            raise RuntimeError(f"the tensor-parallel ranks are out of step ({self.broken}); restart the server")
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited (code {dead[0].exitcode})")


class DistributedModelRunner(ModelRunner):
    """ModelRunner on rank 0 that ships every step to the workers before running its own shard."""

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        workers: WorkerGroup,
    ):
        workers.allocate_kv(num_blocks)
        super().__init__(model, cfg, num_blocks, block_size, device, dtype)
        self.workers = workers
        self._in_flight = False  # a step was sent and rank 0's forward has not finished it yet

    def _forward_done(self, *_: object) -> None:
        self._in_flight = False

    def forward(self, batch: ScheduledBatch) -> ForwardStep:
        # Hooked per step: a hook left on the model would keep this runner (and its KV pool) alive.
        hook = self.model.register_forward_hook(self._forward_done)
        try:
            return super().forward(batch)
        except Exception as err:
            # Failing after the model's forward (logits, sampling) leaves the ranks in step; failing inside it
            # leaves the workers in a collective that rank 0 will never join.
            if self._in_flight:
                self.workers.broken = f"rank 0 failed during a forward: {type(err).__name__}: {err}"
            raise
        finally:
            hook.remove()

    def prepare(
        self, batch: ScheduledBatch, inp: StepInputs | None = None
    ) -> tuple[StepInputs, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Pack the batch's inputs, send them to the workers and unpack the same bytes for rank 0."""
        inp = inp or self._host_inputs(batch)
        if inp.pending_rows:
            raise RuntimeError("tensor parallel steps run one at a time: every input id must be known on the host")
        header, payload = pack_step(inp)
        self.workers.send(header, payload)
        self._in_flight = True
        # Rank 0 unpacks the very bytes it sent, so every rank runs on identical inputs.
        ids, pos, meta = unpack_step(header, payload.pin_memory() if self.pin else payload, self.device)
        return inp, ids, pos, meta


# -- ranks 1..N-1 -------------------------------------------------------------------------


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Entry point of a spawned worker: join the group, build this rank's shard, replay steps."""
    parallel.apply_multicast_off_env()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    device = spec.device(rank)
    parallel.init_process_group(rank, spec.world_size, spec.init_method, device, RENDEZVOUS_TIMEOUT)
    try:
        if device.type == "cpu":
            torch.set_num_threads(spec.num_threads)
        torch.manual_seed(spec.seed)
        model = build_model(
            spec.model_config, spec.path, device, spec.dtype, spec.load_format, ops=select_ops(device, spec.use_kernels),
            max_positions=spec.max_positions, seed=spec.seed, rank=rank, world_size=spec.world_size,
        )
        _serve(model, spec, device)
    finally:
        parallel.destroy_process_group()


@torch.inference_mode()
def _serve(model: Qwen3ForCausalLM, spec: WorkerSpec, device: torch.device) -> None:
    runner: ModelRunner | None = None
    while True:
        header = parallel.broadcast_host(torch.empty(HEADER_LEN, dtype=torch.int64))
        cmd, arg = int(header[0]), int(header[7])
        if cmd == CMD_STEP:
            payload = parallel.broadcast_host(torch.empty(payload_len(header), dtype=torch.int64))
            if runner is None:
                raise RuntimeError("rank 0 sent a step before allocating the KV pool")
            ids, pos, meta = unpack_step(header, payload, device)
            model(ids, pos, meta)  # rank 0 takes the logits; this rank's part arrived through all_reduce
        elif cmd == CMD_KV:
            runner = None  # free the old pool (the profiling probe) before allocating the new one
            model.release_kv_cache()
            runner = ModelRunner(model, spec.model_config, arg, spec.block_size, device, spec.dtype)
        elif cmd == CMD_FREE_MEMORY:  # asked only while the pool is sized: the runner is the probe
            runner = None
            model.release_kv_cache()
            free = 0
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the profiling step's activations, as rank 0 does
                free = torch.cuda.mem_get_info(device)[0]
            parallel.all_reduce_min(free)
        elif cmd == CMD_STOP:
            return
        else:
            raise RuntimeError(f"unknown command {cmd} from rank 0")
