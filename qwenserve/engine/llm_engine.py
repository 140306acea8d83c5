"""The synchronous engine: load a model, accept requests, run steps, produce outputs.

`step()` = schedule -> launch the model -> take the previous step's sampled tokens,
detokenize, check stop conditions -> RequestOutputs. Launching step N+1 before waiting
for step N keeps the GPU busy while the host does its bookkeeping; a sequence that
stops at step N has computed one token too many in step N+1, which is dropped. The
async wrapper drives the engine from its own thread.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qwenserve.config import EngineConfig, ModelConfig
from qwenserve.engine import guided
from qwenserve.engine.block_manager import BlockManager
from qwenserve.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from qwenserve.engine.guided import Guide, GuideCompiler
from qwenserve.engine.model_runner import ModelRunner, PendingStep, StepResult, kv_bytes_per_block, select_ops
from qwenserve.engine.outputs import (
    FINISH_GRAMMAR_DEAD_END,
    FINISH_GRAMMAR_TOO_SLOW,
    RequestOutput,
    TokenLogprob,
)
from qwenserve.engine.sampling_params import (
    CONTEXT_HINT,
    GENERATION_CONFIG_FIELDS,
    InvalidRequestError,
    SamplingParams,
)
from qwenserve.engine.scheduler import ScheduledBatch, Scheduler
from qwenserve.engine.sequence import PENDING_TOKEN, Sequence
from qwenserve.engine.startup import (
    check_kv_memory_fits,
    control_tokens,
    limit_cpu_threads,
    load_tokenizer,
    pick_device,
    pick_dtype,
    pick_step_tokens,
)
from qwenserve.model.loader import build_model, load_model_config, read_generation_config, resolve_model_path
from qwenserve.model.qwen3 import Ops

logger = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 512 << 20
_GPU_GRAPH_RESERVE = 512 << 20  # CUDA graph pools and the logits of the largest decode batch


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-queued-requests; retry later (HTTP 503)."""


@dataclass
class ModelInfo:
    """What the HTTP layer needs to know about the loaded model."""

    name: str
    path: Path
    max_model_len: int
    eos_token_ids: list[int]
    generation_defaults: dict[str, Any]
    chat_template: str | None
    is_demo: bool


@dataclass
class EngineStats:
    """A snapshot of the queues and the KV pool, for /metrics."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    num_cached_blocks: int
    num_running_seqs: int = 0  # sequences (n > 1 counts n): what --max-num-seqs bounds


@dataclass
class _SeqState:
    """Per-sequence output bookkeeping that the scheduler does not need."""

    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    new_text: list[str] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    held_siblings: list[Sequence]  # n > 1: admitted once the first has its prompt cached
    guided: bool = False


class LLMEngine:
    """Requests in, outputs out, one `step` at a time: loads the model and sizes the KV pool, then each
    step schedules a batch (scheduler), runs it (model runner, CUDA graphs for decode) and turns the
    sampled tokens into text, stop checks and logprobs. Single-threaded; AsyncEngine serves it."""

    def __init__(self, config: EngineConfig):
        self.device = pick_device(config.device)
        self.config = config = replace(
            config, max_num_batched_tokens=pick_step_tokens(config.max_num_batched_tokens, self.device)
        )
        if config.tensor_parallel_size > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)  # rank r runs on cuda:r
        self.dtype = pick_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        self.workers: Any = None  # qwenserve.distributed.worker.WorkerGroup when tensor_parallel_size > 1
        self.requests: dict[str, _Request] = {}
        self.seq_states: dict[int, _SeqState] = {}
        self._in_flight: PendingStep | None = None  # launched, its tokens not yet processed
        # Unfinished requests with a grammar: only while there are any does a step look for guided rows.
        self._num_guided_requests = 0
        try:
            self._load()
        except BaseException:
            self.close()  # workers already started must not outlive a failed load
            raise

    # -- loading ---------------------------------------------------------------

    def _load(self) -> None:
        """Model, KV pool, scheduler and runner, in that order; then the decode graphs and a warm-up."""
        cfg = self.config
        path, name, is_demo = self._model_source()
        self.model_config: ModelConfig = load_model_config(path)
        self.tokenizer = load_tokenizer(path)
        # Ids a request may name: those that are tokens (the model's rows past the tokenizer's are padding).
        self.num_token_ids = min(self.model_config.vocab_size, len(self.tokenizer))
        self.control_tokens = control_tokens(self.tokenizer)
        max_len = self._context_length()
        if self.device.type == "cpu":
            limit_cpu_threads(self.model_config)
        ops = select_ops(self.device, cfg.use_kernels)
        self.uses_kernels = ops != Ops()
        world = cfg.tensor_parallel_size
        if world > 1:
            self._start_workers(path, max_len)
        self.model = build_model(
            self.model_config, path, self.device, self.dtype, cfg.load_format, ops=ops, max_positions=max_len,
            seed=cfg.seed, world_size=world,
        )
        self.max_positions = max_len
        num_blocks = self._num_kv_blocks()
        self.max_model_len = max_len = self._fit_context_to_pool(max_len, num_blocks)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = self._new_runner(num_blocks)
        self.runner.sampler_kernels = self.uses_kernels
        # Tensor-parallel ranks receive their input ids from the host, so they run one step at a time.
        self.overlap_steps = cfg.async_scheduling and self.workers is None
        # The torch reference MoE syncs with the host, so only the kernel path can be captured.
        # Tensor parallel runs eager: workers would have to capture and replay the same graphs.
        if self.device.type == "cuda" and self.uses_kernels and not cfg.enforce_eager and self.workers is None:
            self.runner.capture_graphs(cfg.max_num_seqs, max_len)
        self.model_info = self._model_info(path, name, is_demo)
        self.guides = GuideCompiler(self.tokenizer, self.model_config.vocab_size, self.model_info.eos_token_ids)
        if self.device.type == "cuda":
            self._warmup()
        logger.info(
            "loaded %s on %s (%s): %d KV blocks of %d tokens (%d tokens), max_model_len %d",
            name, self.device, self.dtype, self.block_manager.num_usable_blocks, cfg.block_size,
            self.block_manager.num_usable_blocks * cfg.block_size, max_len,
        )

    def _model_source(self) -> tuple[Path, str, bool]:
        """(checkpoint directory, the name to serve, whether it is the built-in demo model)."""
        if self.config.model is None:
            from qwenserve.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME

            return DEMO_MODEL_DIR, DEMO_MODEL_NAME, True
        return resolve_model_path(self.config.model), self.config.model.rstrip("/"), False

    def _context_length(self) -> int:
        """--max-model-len, else the model's own; past what the model was trained for only with a warning."""
        trained = self.model_config.max_position_embeddings
        max_len = self.config.max_model_len or trained
        if max_len > trained:
            logger.warning(
                "--max-model-len %d is beyond the %d positions this model was trained for "
                "(max_position_embeddings in its config.json): answers past that length may degrade",
                max_len,
                trained,
            )
        return max_len

    def _fit_context_to_pool(self, max_len: int, num_blocks: int) -> int:
        """The context length the KV pool can hold one sequence of: an explicit --max-model-len that does
        not fit is an error; the model's default is lowered with a warning."""
        pool_tokens = (num_blocks - 1) * self.config.block_size
        if pool_tokens >= max_len:
            return max_len
        if self.config.max_model_len is not None:
            raise ValueError(
                f"--max-model-len {self.config.max_model_len} needs {max_len} tokens of KV cache but only "
                f"{pool_tokens} fit; lower --max-model-len or give the cache more memory (--kv-cache-memory / "
                f"--gpu-memory-utilization)"
            )
        logger.warning(
            "KV pool holds %d tokens: max_model_len lowered from %d (give the cache more memory with "
            "--kv-cache-memory%s)", pool_tokens, max_len,
            "" if self.device.type == "cuda" else f"; a CPU's default is {_CPU_DEFAULT_KV_BYTES >> 20} MiB",
        )
        return pool_tokens

    def _model_info(self, path: Path, name: str, is_demo: bool) -> ModelInfo:
        """What the server needs to know about the model: names, limits, EOS ids, sampling defaults, template."""
        gen = read_generation_config(path)
        return ModelInfo(
            name=name,
            path=path,
            max_model_len=self.max_model_len,
            eos_token_ids=self.model_config.eos_token_ids or [self.tokenizer.eos_token_id],
            generation_defaults={k: gen[k] for k in ("do_sample", *GENERATION_CONFIG_FIELDS) if k in gen},
            chat_template=getattr(self.tokenizer, "chat_template", None),
            is_demo=is_demo,
        )

    def _start_workers(self, path: Path, max_positions: int) -> None:
        """Spawn ranks 1..N-1 and join the process group as rank 0 (tensor_parallel_size > 1)."""
        from qwenserve.distributed.parallel import free_port
        from qwenserve.distributed.sharding import validate_parallel
        from qwenserve.distributed.worker import WorkerGroup, WorkerSpec

        cfg, world = self.config, self.config.tensor_parallel_size
        validate_parallel(self.model_config, world)
        first = self.device.index or 0
        if self.device.type == "cuda" and first + world > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size {world} needs GPUs {first}..{first + world - 1} but "
                f"{torch.cuda.device_count()} are visible"
            )
        if self.device.type == "cuda":
            # Measured on 2 H200s (docs/DISTRIBUTED.md): 12.6 tok/s at batch 1 against 314 on one GPU.
            logger.warning(
                "tensor parallel runs eager and one step at a time: it lets a model too large for one GPU "
                "serve, but decodes far slower than one GPU; use it only when the model does not fit on one"
            )
        self.workers = WorkerGroup(WorkerSpec(
            path=path, model_config=self.model_config, world_size=world,
            init_method=f"tcp://127.0.0.1:{free_port()}", device_type=self.device.type, first_device_index=first,
            dtype=self.dtype, load_format=cfg.load_format, seed=cfg.seed, max_positions=max_positions,
            block_size=cfg.block_size, use_kernels=cfg.use_kernels, num_threads=torch.get_num_threads(),
        ))

    def _new_runner(self, num_blocks: int) -> ModelRunner:
        """A runner with a KV pool of `num_blocks` (on every rank when tensor parallel)."""
        if self.workers is None:
            return ModelRunner(self.model, self.model_config, num_blocks, self.config.block_size, self.device, self.dtype)
        from qwenserve.distributed.worker import DistributedModelRunner

        return DistributedModelRunner(
            self.model, self.model_config, num_blocks, self.config.block_size, self.device, self.dtype, self.workers
        )

    def close(self) -> None:
        """Stop the tensor-parallel workers (a no-op on one process; also runs at exit)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        # Per rank: each holds only its kv heads, so the same budget buys proportionally more blocks.
        per_block = kv_bytes_per_block(self.model_config, cfg.block_size, self.dtype, cfg.tensor_parallel_size)
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
            check_kv_memory_fits(budget, per_block, self.device)
        elif self.device.type == "cuda":
            activation_peak = self._profile_activations()
            free, total = torch.cuda.mem_get_info(self.device)
            if self.workers is not None:  # size every rank's pool for the fullest GPU
                free = self.workers.min_free_memory(free)
            used = total - free  # weights, the CUDA context and anything else on the GPU
            budget = int(total * cfg.gpu_memory_utilization) - used - activation_peak - _GPU_GRAPH_RESERVE
        else:
            budget = _CPU_DEFAULT_KV_BYTES
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ValueError(
                f"no memory left for the KV cache ({budget / 2**30:.2f} GiB budget, {per_block} bytes per block): "
                f"raise --gpu-memory-utilization or set --kv-cache-memory"
            )
        return int(num_blocks)

    @torch.inference_mode()
    def _profile_activations(self) -> int:
        """Run the largest step this engine will ever schedule and return the memory it needed
        beyond the weights, so the KV pool can take everything else."""
        cfg = self.config
        num_tokens = min(cfg.max_num_batched_tokens, self.max_positions)
        blocks = -(-num_tokens // cfg.block_size) + 1
        probe = self._new_runner(blocks)
        seq = Sequence("profile", 0, [0] * num_tokens, SamplingParams(temperature=0.0), seed=0)
        seq.block_table = list(range(1, blocks))
        batch = ScheduledBatch()
        batch.add(seq, num_tokens)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        probe.execute(batch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del probe
        self.model.release_kv_cache()  # the layers still held the probe's pool: free it before measuring
        torch.cuda.empty_cache()
        return int(peak)

    def _warmup(self) -> None:
        """Compile the kernels' variants now rather than inside the first users' requests: one
        prefill per MoE tile bucket, alone and on a cached prefix, then a mixed batch."""
        start = time.perf_counter()
        budget = self.config.max_num_batched_tokens
        # One prompt per tile-config bucket of the MoE (powers of two) and the full chunk budget.
        lengths = sorted({min(1 << i, budget) for i in range(14)} | {budget})
        lengths = [n for n in lengths if n < self.max_model_len - 40]
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        vocab = min(self.model_config.vocab_size, 1000)
        for n in lengths:
            prompt = [(7 * i + n) % vocab for i in range(n)]
            self.generate([prompt], params)
            self.generate([prompt + [1] * 37], params)  # on a cached prefix
        self.generate([[i % vocab] * (5 + i) for i in range(24)], params)  # a batch of short prefills and decodes
        # The sampler's kernels for the model's defaults, top-k 20 with a repetition penalty, which is
        # what qwen-code gets (compiling them inside its first request cost that request ~7 s); other
        # top-k sizes compile on first use (~5 s, once per machine: Triton caches them on disk).
        for repetition_penalty in (1.0, 1.05):
            sampled = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=repetition_penalty,
                                     seed=0, max_tokens=3, ignore_eos=True)
            self.generate([[1, 2, 3]], sampled)
        self.generate([[1, 2, 3]], SamplingParams(temperature=0.0, repetition_penalty=1.05, max_tokens=3, ignore_eos=True))
        self._warm_structured_output(replace(sampled, ignore_eos=False, guide=Guide("json_object")))
        self.block_manager.reset_prefix_cache()
        logger.info(
            "warmed up %d prefill shapes, the sampler and structured output in %.1fs", len(lengths), time.perf_counter() - start
        )

    def _warm_structured_output(self, guided: SamplingParams) -> None:
        """xgrammar's vocabulary view, then one `guided` request: the first guided step of a process (masked
        sampling outside the CUDA graphs) took ~2.7 s on an H200 and stalled the whole batch it joined."""
        if self.guides.warm():
            self.generate([[1, 2, 3]], guided)

    # -- requests ----------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if this request can never run."""
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if n_prompt >= self.max_model_len:
            raise InvalidRequestError(
                # OpenAI's words: clients (qwen-code, litellm, aider, LangChain) recognise a full context by
                # them, and qwen-code reads both numbers from them, to compress or fall back instead of failing.
                f"This model's maximum context length is {self.max_model_len} tokens. However, your request "
                f"resulted in {n_prompt} tokens (the prompt must leave room for at least one generated token; "
                f"{CONTEXT_HINT})",
                param="messages",
                code="context_length_exceeded",
            )
        vocab = self.num_token_ids
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        # Stop ids index the logits (min_tokens bans them there): one past the vocabulary would fail the
        # whole step on a CPU, and assert on the device, killing the process, on a GPU.
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"stop token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="stop_token_ids"
            )
        bad = [t for t in params.logit_bias or {} if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="logit_bias"
            )

    def compile_guide(self, guide: Guide) -> Guide:
        """Compile a structured-output spec (InvalidRequestError when it cannot be): the server does it
        off the engine thread, before add_request, which otherwise compiles it itself."""
        return self.guides.compile(guide)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, admitted: bool = False
    ) -> None:
        """Queue a request; its max_tokens is clamped to the room left in the context.

        `admitted`: the caller already ran check_request and the queue limit (AsyncEngine does, on the
        caller's thread, where refusing is still a clean 400 / 503), so the engine thread does not
        walk a 20k-token prompt a second time between steps.
        """
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
        if not admitted:
            self.check_request(prompt_token_ids, params)
        if not admitted and self.num_waiting_requests() >= self.config.max_queued_requests:
            raise QueueFullError(
                f"the queue is full ({self.config.max_queued_requests} requests waiting at most); retry shortly"
            )
        if params.guide is not None:
            self.guides.compile(params.guide)
        room = self.max_model_len - len(prompt_token_ids)
        base_seed = params.seed if params.seed is not None else random.getrandbits(32)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, prompt_token_ids, params, seed=(base_seed + i) & 0xFFFFFFFF)
            seq.max_tokens = min(params.max_tokens or room, room)
            if params.min_tokens:
                eos = () if params.ignore_eos else tuple(self.model_info.eos_token_ids)
                seq.min_tokens_banned = tuple(dict.fromkeys((*eos, *params.stop_token_ids)))
            if params.guide is not None:
                seq.matcher = self.guides.matcher(params.guide)
            self.seq_states[seq.seq_id] = _SeqState(
                detok=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                stop=StopStringMatcher(params.stop, params.include_stop_str_in_output),
            )
            seqs.append(seq)
        self.requests[request_id] = _Request(request_id, seqs, held_siblings=seqs[1:], guided=params.guide is not None)
        self._num_guided_requests += params.guide is not None
        self.scheduler.add(seqs[0])

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Drop a request now and free its blocks; returns its final 'abort' outputs."""
        req = self._pop_request(request_id)
        if req is None:
            return []
        outputs = []
        for seq in req.seqs:
            if seq.is_finished:
                continue
            self.scheduler.finish(seq)
            self.runner.release(seq)
            seq.finish_reason = "abort"
            outputs.append(self._make_output(seq))
        for seq in req.seqs:
            self.seq_states.pop(seq.seq_id, None)
        return outputs

    def _pop_request(self, request_id: str) -> _Request | None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self._num_guided_requests -= req.guided
        return req

    def has_unfinished(self) -> bool:
        """Whether any request is still waiting or running."""
        return bool(self.requests)

    def num_waiting_requests(self) -> int:
        """Requests with a sequence still waiting to be scheduled (n > 1 counts once, like the queue limit)."""
        return len({seq.request_id for seq in self.scheduler.waiting})

    def stats(self) -> EngineStats:
        """Queue and KV cache figures for /metrics and the logs."""
        bm = self.block_manager
        return EngineStats(
            num_running=len({seq.request_id for seq in self.scheduler.running}),  # n > 1 counts once
            num_waiting=self.num_waiting_requests(),
            num_kv_blocks=bm.num_usable_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage(),
            num_cached_blocks=bm.num_cached_blocks,
            num_running_seqs=len(self.scheduler.running),
        )

    # -- stepping ----------------------------------------------------------------

    def step(self, on_scheduled: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Launch the next step, then return the outputs of the one before it (or of this one
        when steps do not overlap). `on_scheduled` runs once the step's batch is chosen, before
        any model work: what stats() says then holds for the whole step."""
        batch = self.scheduler.schedule()
        if on_scheduled is not None:
            on_scheduled()
        if not self.overlap_steps:
            return self._process(self._launch(batch) if batch else None)
        done = self._in_flight
        if self._num_guided_requests and any(seq.matcher is not None for seq in batch.seqs):
            # Structured output: a matcher masks this step's sample only once it has accepted the previous
            # step's token, so the sampling is enqueued after those tokens are processed, while this
            # step's forward runs.
            fwd = self.runner.forward(batch)
            self._account_computed(batch)
            outputs = self._process(done)
            self._in_flight = self.runner.sample(fwd)
            self._account_samples(self._in_flight)
            return outputs
        self._in_flight = self._launch(batch) if batch else None
        return self._process(done)

    def _process(self, step: PendingStep | None) -> list[RequestOutput]:
        return self._process_samples(self.runner.collect(step)) if step is not None else []

    def _launch(self, batch: ScheduledBatch) -> PendingStep:
        step = self.runner.launch(batch)
        self._account_computed(batch)
        self._account_samples(step)
        return step

    def _account_computed(self, batch: ScheduledBatch) -> None:
        """The batch's tokens have KV now (its forward is enqueued): count them, cache full blocks."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += num_new
            self.block_manager.commit_full_blocks(seq)
        self._release_siblings(batch.seqs)

    def _account_samples(self, step: PendingStep) -> None:
        """A PENDING_TOKEN at the end of each sequence that samples in `step`, where its id will go."""
        for seq in step.seqs:
            step.token_indices.append(seq.num_tokens)
            if seq.is_finished:  # since the forward (structured output's late sampling): its token is dropped
                continue
            seq.token_ids.append(PENDING_TOKEN)
            seq.num_pending_tokens += 1
            # Certain to stop on this token whatever it is: give it no further step.
            seq.draining = seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len

    def _release_siblings(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.index != 0 or seq.num_computed_tokens < seq.num_prompt_tokens:
                continue
            req = self.requests.get(seq.request_id)
            if req and req.held_siblings:
                for sibling in req.held_siblings:
                    self.scheduler.add(sibling)
                req.held_siblings = []

    def _process_samples(self, result: StepResult) -> list[RequestOutput]:
        self._record_prompt_logprobs(result)
        outputs = []
        for row, (seq, index, token_id) in enumerate(
            zip(result.seqs, result.token_indices, result.token_ids, strict=True)
        ):
            if seq.is_finished:  # stopped (or aborted) on an earlier token: this one was extra
                continue
            seq.token_ids[index] = token_id
            seq.num_pending_tokens -= 1
            self.block_manager.commit_full_blocks(seq)
            state = self.seq_states[seq.seq_id]
            state.new_ids.append(token_id)
            if seq.params.logprobs is not None and result.logprobs is not None:
                state.new_logprobs.append(self._token_logprob(result, row, token_id, seq.params.logprobs))
            grammar = self._advance_grammar(seq, token_id)
            if grammar == "dead_end":
                seq.finish_reason = FINISH_GRAMMAR_DEAD_END
            elif grammar == "too_slow":
                seq.finish_reason = FINISH_GRAMMAR_TOO_SLOW
            else:
                self._check_stop(seq, token_id, state, grammar_ended=grammar == "terminated")
            if seq.finish_reason is not None:
                del seq.token_ids[index + 1 :]  # the token already launched after this one
                seq.num_pending_tokens = 0
            outputs.append(self._make_output(seq))
            if seq.finish_reason is not None:
                self._finish(seq)
        return outputs

    def _record_prompt_logprobs(self, result: StepResult) -> None:
        """Append the step's prompt-token logprobs to their sequences, each position once."""
        decode = self.tokenizer.decode
        for p in result.prompt_logprobs:
            seq, recorded = p.seq, p.seq.prompt_logprobs
            if recorded is None or seq.is_finished:
                continue
            k = seq.params.prompt_logprobs or 0
            for i, (lp, top_vals, top_ids) in enumerate(zip(p.logprobs, p.top_logprobs, p.top_ids, strict=True)):
                token_pos = p.first_pos + 1 + i
                if token_pos != len(recorded):  # already recorded before a preemption
                    continue
                token_id = seq.token_ids[token_pos]
                top = [(tid, decode([tid]), v) for tid, v in zip(top_ids[:k], top_vals[:k], strict=True)]
                recorded.append(TokenLogprob(token_id, decode([token_id]), lp, top))

    def _token_logprob(self, result: StepResult, row: int, token_id: int, k: int) -> TokenLogprob:
        decode = self.tokenizer.decode
        top = []
        if k > 0 and result.top_ids is not None:
            top = [
                (tid, decode([tid]), lp)
                for tid, lp in zip(result.top_ids[row][:k], result.top_logprobs[row][:k], strict=True)
            ]
        return TokenLogprob(token_id, decode([token_id]), result.logprobs[row], top)

    @staticmethod
    def _advance_grammar(seq: Sequence, token_id: int) -> str | None:
        """Feed a guided sequence's new token to its matcher: "terminated" when the grammar is complete,
        "dead_end" when the token is outside it, "too_slow" when its last mask took too long, else None (unguided
        sequences too)."""
        if seq.matcher is None:
            return None
        if seq.grammar_too_slow:  # checked first: accepting a token costs such a grammar as much as its mask
            logger.warning(
                "request %s: its grammar took over %ss to compute one step's allowed tokens; ending it",
                seq.request_id,
                guided.GRAMMAR_STEP_SECONDS,
            )
            return "too_slow"
        if not seq.matcher.accept_token(token_id):
            # Only when the mask allowed no token at all: the text so far leads nowhere the grammar allows
            # (a part of the schema no text can match), so no valid answer can follow.
            logger.warning("request %s: its grammar allows no token after this text; ending it", seq.request_id)
            return "dead_end"
        return "terminated" if seq.matcher.is_terminated() else None

    def _check_stop(self, seq: Sequence, token_id: int, state: _SeqState, grammar_ended: bool = False) -> None:
        params = seq.params
        is_stop_token = token_id in params.stop_token_ids or (
            not params.ignore_eos and token_id in self.model_info.eos_token_ids
        )
        # min_tokens: stop tokens are masked in the sampler until then, and stop strings do not match.
        active = seq.num_known_output_tokens >= params.min_tokens
        if is_stop_token and seq.num_known_output_tokens > params.min_tokens:
            seq.finish_reason, seq.stop_reason = "stop", token_id
        else:
            piece, token_text = state.detok.add(token_id), self.control_tokens.get(token_id)
            if token_text is None:
                text, matched = state.stop.add(piece, active)
            else:
                text, matched = state.stop.add_control(piece, active, token_text)
            state.new_text.append(text)
            if matched is not None:
                seq.finish_reason, seq.stop_reason = "stop", matched
                return
            if grammar_ended:
                seq.finish_reason, seq.stop_reason = "stop", token_id
            elif seq.num_known_output_tokens >= seq.max_tokens or seq.num_known_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            # Release what was held back: a partial character, or a prefix of a stop string.
            text, matched = state.stop.add(state.detok.flush(), active)
            if matched is not None:
                seq.finish_reason, seq.stop_reason = "stop", matched
            state.new_text.append(text if matched is not None else text + state.stop.flush())

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.runner.release(seq)
        req = self.requests.get(seq.request_id)
        if req is not None and all(s.is_finished for s in req.seqs):
            self._pop_request(seq.request_id)
            for s in req.seqs:
                self.seq_states.pop(s.seq_id, None)

    def _make_output(self, seq: Sequence) -> RequestOutput:
        state = self.seq_states[seq.seq_id]
        out = RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            text="".join(state.new_text),
            token_ids=state.new_ids,
            logprobs=state.new_logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_generated_tokens=seq.num_known_output_tokens,
            stop_reason=seq.stop_reason,
        )
        if seq.prompt_logprobs is not None and not state.prompt_logprobs_sent:
            out.prompt_logprobs, state.prompt_logprobs_sent = seq.prompt_logprobs, True
        state.new_text, state.new_ids, state.new_logprobs = [], [], []
        return out

    # -- offline convenience ---------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[RequestOutput]]:
        """Run prompts to completion; returns, per prompt, the merged output of each choice."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{i}-{random.getrandbits(32):08x}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(rid, prompt, p)
        merged: dict[tuple[str, int], RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                key = (out.request_id, out.index)
                if key in merged:
                    prev = merged[key]
                    prev.text += out.text
                    prev.token_ids = prev.token_ids + out.token_ids
                    if out.logprobs is not None:
                        prev.logprobs = (prev.logprobs or []) + out.logprobs
                    prev.finish_reason, prev.stop_reason = out.finish_reason, out.stop_reason
                    prev.num_generated_tokens = out.num_generated_tokens
                    prev.num_cached_tokens = out.num_cached_tokens
                    prev.prompt_logprobs = prev.prompt_logprobs or out.prompt_logprobs
                else:
                    merged[key] = out
        return [
            [merged[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, params_list, strict=True)
        ]
