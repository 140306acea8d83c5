"""What the route handlers share once the model is loaded: the engine, its tokenizer and
model facts, served names, the tool parser class, metrics and a tokenization thread."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qwenserve.api.errors import APIError, aborted, from_invalid_request, unavailable
from qwenserve.api.logprobs import byte_level_token_bytes
from qwenserve.api.metrics import Metrics
from qwenserve.api.segment_cache import SegmentEncoder
from qwenserve.config import env_number
from qwenserve.engine.guided import GRAMMAR_STEP_SECONDS, Guide
from qwenserve.engine.outputs import FINISH_GRAMMAR_DEAD_END, FINISH_GRAMMAR_TOO_SLOW, RequestOutput
from qwenserve.engine.sampling_params import CONTEXT_HINT, InvalidRequestError, SamplingParams
from qwenserve.tool_parser import Qwen3CoderToolParser, get_tool_parser_class

logger = logging.getLogger("qwenserve.api")

T = TypeVar("T")


# A spec that takes longer to compile (a regex such as `[a-z]{1,20000}`, a schema of thousands of properties)
# is refused rather than left to hold its client, and one of the two compile threads, with no answer.
GRAMMAR_COMPILE_SECONDS = env_number("QWENSERVE_GRAMMAR_COMPILE_SECONDS", 60.0, whole=False)


def new_id(prefix: str) -> str:
    """An OpenAI-style id such as chatcmpl-3f2a...; also the engine's request id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def item_id(prefix: str) -> str:
    """An id in the Responses API's and Anthropic's style: resp_..., fc_..., msg_..., toolu_..."""
    return f"{prefix}_{uuid.uuid4().hex}"


# Prompt texts longer than this many characters per context token are pre-counted (encode_prompt):
# real text runs 3-4 characters a token, so such a text is almost surely over the limit.
_PRECOUNT_CHARS_PER_TOKEN = 16
_PRECOUNT_MIN_CHARS = 1 << 18  # below this the whole text is counted (~0.3 s on 2 cores): the error gives its size
_PRECOUNT_SLICE = 1 << 16  # characters tokenized at a time while pre-counting
_SLICE_MARGIN = 8  # tokens a cut between two slices can add


@dataclass
class ServerSettings:
    """Options from the command line that the HTTP layer uses."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None
    log_requests: bool = False
    allowed_origins: list[str] | None = None  # CORS; None: pages served from this machine only


class ServerState:
    """Everything a request handler needs after the engine is ready."""

    def __init__(self, engine: Any, settings: ServerSettings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.model_info = engine.model_info
        self.served_names = settings.served_model_names or [self.model_info.name]
        self.created = int(time.time())  # /v1/models' `created`: when this model started serving
        template = self.model_info.chat_template or getattr(self.tokenizer, "chat_template", None)
        self.tool_parser_cls = get_tool_parser_class(template)  # XML when it writes `<function=`
        # Derived from the parser, so a forced call's opening is always in the syntax the parser reads.
        self.xml_tools = self.tool_parser_cls is Qwen3CoderToolParser
        self.token_bytes = byte_level_token_bytes(self.tokenizer)  # for logprobs' `bytes`
        self.segments = SegmentEncoder(self.tokenizer)
        # One thread: keeps template rendering and tokenization off the event loop while
        # never using the (not thread-safe for mutation) HF tokenizer from two threads at once.
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenserve-tokenize")
        # Structured-output compiles on a thread of their own: the first one also loads xgrammar and its
        # view of the vocabulary (~3 s), which on the tokenization thread would hold up every other request.
        # Two: a spec that compiles slowly (a huge schema) leaves the other for the rest.
        self._grammar = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwenserve-grammar")
        self.fim_stop_ids = self._token_ids(
            [
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_pad|>",
                "<|repo_name|>",
                "<|file_sep|>",
                "<|endoftext|>",
            ]
        )

    @property
    def max_model_len(self) -> int:
        return self.model_info.max_model_len

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return self.model_info.generation_defaults or {}

    def model_name(self, requested: str | None) -> str:
        """Echo whatever model name the client asked for (any name is served)."""
        return requested or self.served_names[0]

    def _token_ids(self, tokens: list[str]) -> list[int]:
        unk = getattr(self.tokenizer, "unk_token_id", None)
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in tokens]
        return [i for i in ids if isinstance(i, int) and i >= 0 and i != unk]

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a CPU-bound step (render, tokenize) on the tokenization thread."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    async def compile_guide(self, guide: Guide) -> Guide:
        """Compile a structured-output spec off the event loop (InvalidRequestError -> 400 naming its field;
        a 400 `grammar_too_slow` past GRAMMAR_COMPILE_SECONDS). A compile that overruns cannot be stopped: it
        finishes on its thread into the grammar cache, so the same spec asked again is then served."""
        compiling = asyncio.get_running_loop().run_in_executor(self._grammar, self.engine.compile_guide, guide)
        try:
            return await asyncio.wait_for(compiling, GRAMMAR_COMPILE_SECONDS)
        except TimeoutError:
            raise APIError(
                400,
                f"'{guide.param}' took over {GRAMMAR_COMPILE_SECONDS:g} s to compile: simplify it (smaller "
                "repetition counts such as {1,20000}, fewer properties or alternatives).",
                param=guide.param,
                code="grammar_too_slow",
            ) from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token text such as <|fim_prefix|> maps to its id. Chat prompts reuse
        the ids of the messages earlier prompts held (segment_cache)."""
        if add_special_tokens:
            return list(self.tokenizer.encode(text, add_special_tokens=True))
        return self.segments.encode(text)

    def encode_prompt(self, text: str, param: str, add_special_tokens: bool = False) -> list[int]:
        """encode() for a prompt, refusing at once one far over the context: a text over _PRECOUNT_MIN_CHARS
        characters and _PRECOUNT_CHARS_PER_TOKEN per context token is counted slice by slice and refused
        as soon as it is certainly too long, so a huge prompt holds the tokenizer thread (which serves
        every request) for about the context's worth of text, not for all of it."""
        limit = self.max_model_len
        if len(text) > max(_PRECOUNT_CHARS_PER_TOKEN * limit, _PRECOUNT_MIN_CHARS):
            counted = 0
            for n, start in enumerate(range(0, len(text), _PRECOUNT_SLICE), start=1):
                counted += len(self.tokenizer.encode(text[start : start + _PRECOUNT_SLICE], add_special_tokens=False))
                if counted - _SLICE_MARGIN * n > limit:  # a cut can split a token in two: never refuse on that
                    raise APIError(
                        400,
                        f"This model's maximum context length is {limit} tokens. However, your request resulted "
                        f"in more than {counted - _SLICE_MARGIN * n} tokens ({CONTEXT_HINT})",
                        param=param,
                        code="context_length_exceeded",
                    )
        return self.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        """Token ids to text, special tokens kept (what the model wrote)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt_param: str = "messages"
    ) -> AsyncIterator[RequestOutput]:
        """Submit to the engine, mapping its refusals to HTTP errors (400, 503).

        `prompt_param` is the request field a prompt-level error points at.
        """
        from qwenserve.engine.async_engine import EngineDeadError, QueueFullError

        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param=prompt_param)
        try:
            return _with_api_errors(self.engine.add_request(request_id, prompt_ids, params), params)
        except InvalidRequestError as exc:
            err = from_invalid_request(exc)
            if err.param in ("prompt", "messages"):
                err.param = prompt_param
            raise err from exc
        except QueueFullError as exc:
            raise unavailable(f"Server is busy: {exc}", retry_after=1, code="queue_full") from exc
        except EngineDeadError as exc:
            raise APIError(503, f"{exc}; restart the server.", code="engine_failed") from exc

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks now (a client went away)."""
        self.engine.abort(request_id)

    def close(self) -> None:
        """Stop the tokenizer and grammar threads without waiting for queued work."""
        self._cpu.shutdown(wait=False, cancel_futures=True)
        self._grammar.shutdown(wait=False, cancel_futures=True)


# A guided answer's grammar failures (the engine's finish reasons, which are also the error codes) -> messages.
_GRAMMAR_FAILURES = {
    FINISH_GRAMMAR_DEAD_END: (
        "The answer reached a point after which '{param}' allows no text at all, so no answer can satisfy it: "
        "some part of it matches nothing (an impossible 'pattern', an empty 'anyOf', ...). Fix that part."
    ),
    FINISH_GRAMMAR_TOO_SLOW: (
        f"'{{param}}' is too costly to follow: finding the tokens it allows took over {GRAMMAR_STEP_SECONDS:g}s "
        "for one token (an ambiguous regex or grammar, such as nested repetitions of '.*', costs more with every "
        "token), and every other request waits for it. Simplify it."
    ),
}


async def _with_api_errors(stream: AsyncIterator[RequestOutput], params: SamplingParams) -> AsyncIterator[RequestOutput]:
    """The engine's stream, its failures raised as API errors: the shutdown abort as the 503 `aborted`,
    a failed step as a 500, a GPU fault as a 503 naming what happened, and a guided answer that its
    grammar let run into a dead end, or grew too slow to follow, as a 400 naming the field that asked for it."""
    from qwenserve.engine.async_engine import EngineDeadError, GenerationFailedError, RequestAbortedError

    try:
        async for out in stream:
            if out.finish_reason in _GRAMMAR_FAILURES:
                param = params.guide.param if params.guide is not None else None
                raise APIError(400, _GRAMMAR_FAILURES[out.finish_reason].format(param=param), param=param,
                               code=out.finish_reason)  # fmt: skip
            yield out
    except RequestAbortedError as exc:
        raise aborted() from exc
    except GenerationFailedError as exc:
        raise APIError(500, f"Generation failed: {exc}", code="generation_failed") from exc
    except EngineDeadError as exc:
        raise APIError(503, f"{exc}; restart the server.", code="engine_failed") from exc
