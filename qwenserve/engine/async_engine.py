"""The engine behind asyncio: the model steps on its own thread, requests stream back as they go.

The HTTP layer calls `add_request` (sync, raises at once for bad requests or a full
queue), iterates the returned stream, and calls `abort` when its client goes away.
Commands reach the engine thread through a queue; outputs come back to the event loop
with one `call_soon_threadsafe` per step, so the loop stays responsive during long
prefills.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from qwenserve.config import EngineConfig
from qwenserve.engine.guided import Guide
from qwenserve.engine.llm_engine import EngineStats, LLMEngine, ModelInfo, QueueFullError
from qwenserve.engine.outputs import RequestOutput
from qwenserve.engine.sampling_params import InvalidRequestError, SamplingParams

__all__ = [
    "AsyncEngine", "EngineStats", "ModelInfo", "QueueFullError", "InvalidRequestError", "EngineDeadError",
    "GenerationFailedError", "RequestAbortedError",
]

logger = logging.getLogger(__name__)


class GenerationFailedError(RuntimeError):
    """An engine step failed; every unfinished request (queued ones too) receives this, and the engine goes on."""


class EngineDeadError(RuntimeError):
    """The GPU reported a fault that leaves its context unusable: every request from then on gets this."""


def is_device_fault(err: BaseException) -> bool:
    """A CUDA error (illegal address, device-side assert): after one, no later kernel can run."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(err, accelerator_error)) or "CUDA error" in str(err)


class RequestAbortedError(RuntimeError):
    """The server is shutting down: requests in flight receive this at once, whatever the engine is doing."""


class RequestStream:
    """Async iterator over one request's outputs; ends when all its choices finished."""

    def __init__(self, request_id: str, n: int):
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._remaining = n

    def put(self, item: RequestOutput | BaseException) -> None:
        """Deliver an output (or the error that ends the stream) to the reader."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while self._remaining > 0:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self._remaining -= 1
            yield item


class AsyncEngine:
    """The LLMEngine on a thread of its own, for the asyncio server: requests and aborts are queued as
    commands the engine thread applies between steps, and each request's outputs come back on an
    async stream. Loading runs on another thread so the HTTP server answers (503) meanwhile."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # Requests queued as commands and not yet in the engine: sent (event loop) minus taken (engine
        # thread), one writer each; the queue's size would count aborts too.
        self._adds_sent = 0
        self._adds_taken = 0
        self._streams: dict[str, RequestStream] = {}
        self._stats = EngineStats(0, 0, 0, 0, 0.0, 0)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Load the model on a worker thread, then start stepping."""
        self._loop = asyncio.get_running_loop()
        if progress:
            progress("loading model")
        self.engine = await self._load()
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="qwenserve-engine", daemon=True)
        self._thread.start()
        if progress:
            progress("ready")

    async def _load(self) -> LLMEngine:
        """LLMEngine(config) on a daemon thread: a load cannot be interrupted, and the event loop's
        default executor would make a Ctrl-C during it wait for the whole checkpoint to be read."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[LLMEngine] = loop.create_future()

        def settle(engine: LLMEngine | None, err: BaseException | None) -> None:
            if done.done():
                return  # the server stopped while loading
            if err is not None:
                done.set_exception(err)
            else:
                done.set_result(engine)

        def load() -> None:
            engine, err = None, None
            try:
                engine = LLMEngine(self.config)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which re-raises it
                err = exc
            try:
                loop.call_soon_threadsafe(settle, engine, err)
            except RuntimeError:
                pass  # the event loop is gone: the process is exiting

        threading.Thread(target=load, name="qwenserve-load", daemon=True).start()
        return await done

    async def shutdown(self) -> None:
        """Stop the engine thread after its current step, then the tensor-parallel workers, if any."""
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)  # tensor-parallel workers, if any

    @property
    def dead_reason(self) -> str | None:
        """Why the engine can no longer serve (a GPU fault), or None while it can."""
        return None if self._dead is None else f"the engine stopped after a GPU fault: {self._dead}"

    @property
    def tokenizer(self) -> Any:
        return self._require().tokenizer

    @property
    def model_info(self) -> ModelInfo:
        return self._require().model_info

    def _require(self) -> LLMEngine:
        if self.engine is None:
            raise RuntimeError("the engine is still loading")
        return self.engine

    # -- requests ----------------------------------------------------------------

    def compile_guide(self, guide: Guide) -> Guide:
        """Compile a structured-output spec on the caller's thread (InvalidRequestError when it cannot be)."""
        return self._require().compile_guide(guide)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request and return its output stream; raises InvalidRequestError / QueueFullError."""
        engine = self._require()
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if self._closing:
            raise QueueFullError("the server is shutting down")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
        # Validate here, on the caller's thread, so errors surface at once; the engine thread applies it.
        engine.check_request(prompt_token_ids, params)
        # Requests the running batch still has room for do not wait: a burst at an idle server is
        # not refused for the slots it is about to fill (the stats may be a step old; so may this).
        free_slots = max(0, self.config.max_num_seqs - self._stats.num_running_seqs)
        not_taken = self._adds_sent - self._adds_taken
        if self._stats.num_waiting + not_taken - free_slots >= self.config.max_queued_requests:
            # The count races with the engine thread: name the bound, not a number that may read 0.
            raise QueueFullError(
                f"the queue is full ({self.config.max_queued_requests} requests waiting at most); retry shortly"
            )
        stream = RequestStream(request_id, params.n)
        self._streams[request_id] = stream
        self._adds_sent += 1
        self._commands.put(("add", (request_id, prompt_token_ids, params)))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent, thread-safe); its KV blocks are freed before the next step."""
        self._commands.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request in flight and refuse new ones (thread- and signal-safe): at shutdown,
        so each client gets the abort error while the HTTP server still drains its connections.

        The streams get their error now, from the event loop: the engine thread reads its commands
        only between steps, and one step (a long prefill on a CPU) can outlast the shutdown's grace
        period. The engine frees the requests' blocks when its step ends."""
        self._closing = True
        self._commands.put(("abort_all", None))
        streams = list(self._streams.values())  # one atomic copy: the engine thread pops entries
        if streams and self._loop is not None:
            err = RequestAbortedError("the server is shutting down")
            self._loop.call_soon_threadsafe(_put_all, [(stream, err) for stream in streams])

    def stats(self) -> EngineStats:
        """Counters as of the last step (refreshed by the engine thread, never blocking on a step)."""
        return self._stats

    # -- engine thread -------------------------------------------------------------

    def _run(self) -> None:
        engine = self._require()
        while not self._stopping.is_set():
            self._drain_commands(block=not engine.has_unfinished())
            if self._stopping.is_set():
                break
            try:
                # Sampled once the step is scheduled: a prompt prefilling through a long step (seconds on
                # a CPU) shows as running and holding its blocks, and aborted requests are gone.
                outputs = engine.step(on_scheduled=self._refresh_stats)
            except Exception as err:  # noqa: BLE001 - any model failure must reach every waiting client
                logger.exception("engine step failed")
                if is_device_fault(err):
                    self._dead = err  # before the clients hear of it, so they find the engine dead
                self._fail_all(err)
                if self._dead is not None:
                    logger.critical(
                        "the GPU reported a fault the engine cannot recover from; /health answers 503 and every "
                        "request is refused until the server is restarted"
                    )
                    self._refuse_while_dead()
                    return
                continue
            self._stats = engine.stats()
            if outputs:
                self._deliver(outputs)

    def _refresh_stats(self) -> None:
        self._stats = self._require().stats()

    def _refuse_while_dead(self) -> None:
        """Answer each request still arriving (it passed add_request's check just before the fault)
        with the engine's error, until the server stops: none may wait forever."""
        while not self._stopping.is_set():
            try:
                kind, arg = self._commands.get(timeout=0.5)
            except queue.Empty:
                continue
            stream = self._streams.pop(arg[0], None) if kind == "add" else None
            self._adds_taken += kind == "add"
            if stream is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(_put_all, [(stream, EngineDeadError(self.dead_reason))])

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = cmd
            if kind == "add":
                self._add(*arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "abort_all":
                for request_id in list(self._streams):
                    self._abort(request_id)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _abort(self, request_id: str) -> None:
        """End a request now: its final 'abort' outputs, or, when its "add" is still queued (it will
        then find no stream and stop there), an error for whoever iterates its stream."""
        outputs = self._require().abort(request_id)
        if outputs:
            self._deliver(outputs)
        elif (stream := self._streams.get(request_id)) is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_put_all, [(stream, RequestAbortedError("the request was aborted"))])
        self._streams.pop(request_id, None)

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            self._add_to_engine(request_id, prompt_token_ids, params)
        finally:
            # Counted in the stats first, then no longer as queued: the admission check may count the
            # request twice for a moment, never zero times.
            self._stats = self._require().stats()
            self._adds_taken += 1

    def _add_to_engine(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return  # aborted before it was queued
        try:
            # Checked and admitted at the front door: a second queue check here would race with it and
            # could only fail the request inside its stream (a 500), not as the clean 503 add_request raises.
            self._require().add_request(request_id, prompt_token_ids, params, admitted=True)
        except InvalidRequestError as err:  # a guide that fails to compile
            self._streams.pop(request_id, None)
            self._loop.call_soon_threadsafe(_put_all, [(stream, err)])
        except Exception as err:  # noqa: BLE001 - a bug adding one request must not stop the engine thread
            logger.exception("adding request %s failed", request_id)
            self._require().abort(request_id)
            self._streams.pop(request_id, None)
            self._loop.call_soon_threadsafe(_put_all, [(stream, GenerationFailedError(str(err)))])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        pairs = []
        done = set()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            pairs.append((stream, out))
            if out.finished and out.request_id not in self._require().requests:
                done.add(out.request_id)
        # Only after the loop: several choices of one request (n > 1) can finish in the same step.
        for request_id in done:
            self._streams.pop(request_id, None)
        if pairs and self._loop is not None:
            self._loop.call_soon_threadsafe(_put_all, pairs)

    def _fail_all(self, err: BaseException) -> None:
        """Abort everything in flight and hand each stream the error; the engine keeps serving."""
        engine = self._require()
        request_ids = list(engine.requests)
        for rid in request_ids:
            engine.abort(rid)
        pairs = [(self._streams.pop(rid), GenerationFailedError(str(err)))
                 for rid in request_ids if rid in self._streams]
        if pairs and self._loop is not None:
            self._loop.call_soon_threadsafe(_put_all, pairs)


def _put_all(pairs: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in pairs:
        stream.put(item)
