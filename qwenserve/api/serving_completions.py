"""POST /v1/completions: raw prompts (text or token ids, one or several), echo, logprobs, and
fill-in-the-middle through `suffix` with Qwen's FIM tokens."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from qwenserve.api.errors import APIError, aborted, bad_request
from qwenserve.api.logprobs import TextOffsets, completion_logprobs, shown_logprobs
from qwenserve.api.protocol import CompletionRequest
from qwenserve.api.request_log import RequestTracker, log_request_body
from qwenserve.api.sampling import build_sampling_params
from qwenserve.api.state import ServerState, new_id
from qwenserve.api.streaming import (
    SSE_DONE,
    heartbeat_without_choices,
    merge_streams,
    respond,
    sse,
)
from qwenserve.api.structured_output import request_guide
from qwenserve.engine.outputs import RequestOutput, TokenLogprob

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def fim_prompt(prefix: str, suffix: str) -> str:
    """Qwen2.5/3-Coder fill-in-the-middle layout (prefix, suffix, then the middle to write)."""
    return f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """The `prompt` field as a list of prompts, each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("'prompt' must not be empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


@dataclass
class _Sub:
    """One prompt of the request and its engine stream."""

    pos: int
    request_id: str
    prompt_text: str
    prompt_ids: list[int]  # what `echo` returns (without the FIM wrapping)
    tracker: RequestTracker
    stream: AsyncIterator[RequestOutput] | None = None
    finished: bool = False
    offsets: dict[int, TextOffsets] = field(default_factory=dict)  # per choice, continued chunk by chunk
    echoed: bool = False  # the echo chunks were sent (streaming)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # from the engine, with echo + logprobs


class Completions:
    """Handler for /v1/completions."""

    def __init__(self, state: ServerState):
        self.state = state

    def _tokenize(
        self, req: CompletionRequest, prompts: list[str | list[int]]
    ) -> list[tuple[str, list[int], list[int]]]:
        """(echo text, echo ids, ids to submit) per prompt."""
        out = []
        vocab = len(self.state.tokenizer)
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if req.suffix is None:
                    ids = self.state.encode_prompt(p, "prompt")
                    out.append((p, ids, ids))
                    continue
                # FIM (editors send one per keystroke): the bare prompt's ids only when they are echoed.
                submit = self.state.encode_prompt(fim_prompt(p, req.suffix), "prompt")
                out.append((p, self.state.encode_prompt(p, "prompt") if req.echo else [], submit))
                continue
            if req.suffix is not None:
                raise bad_request("'suffix' needs a text prompt, not token ids.", param="suffix")
            if any(not 0 <= t < vocab for t in p):
                raise bad_request(
                    f"prompt[{i}] holds token ids outside the vocabulary (0..{vocab - 1}).", param="prompt"
                )
            out.append((self.state.decode(p), list(p), list(p)))
        return out

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        """Validate, submit every prompt, answer."""
        state = self.state
        base_id = new_id("cmpl")
        if state.settings.log_requests:
            log_request_body(base_id, req)
        if req.best_of is not None and req.best_of != req.n:
            # best_of == n is the default; picking the n best of more candidates is not implemented.
            raise bad_request(
                f"'best_of' must equal 'n' ({req.n}) on this server, got {req.best_of}.",
                param="best_of",
                code="unsupported_parameter" if req.best_of > req.n else None,
            )
        # echo + max_tokens 0 scores the prompt alone (how evaluation harnesses ask for prompt
        # logprobs): the engine still samples one token, which the answer leaves out.
        prompt_only = req.echo and req.max_tokens == 0
        max_tokens = 1 if prompt_only else req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
        params = build_sampling_params(
            req,
            state.generation_defaults,
            max_tokens=max_tokens,
            logprobs=req.logprobs,
            extra_stop_token_ids=state.fim_stop_ids if req.suffix is not None else None,
            # The echoed prompt's logprobs; with `suffix` the model reads a FIM-wrapped prompt instead.
            prompt_logprobs=req.logprobs if req.echo and req.suffix is None else None,
            guide=request_guide(req),
        )
        prompts = split_prompts(req.prompt)
        queue = state.engine.config.max_queued_requests
        if len(prompts) * req.n > queue:  # a 503 "retry shortly" would never succeed
            # Each prompt's n sequences are queued work the requests behind this one wait for (first come,
            # first served): one request may hold no more of them than the queue holds requests.
            raise bad_request(
                f"{len(prompts)} prompts x n={req.n} = {len(prompts) * req.n} sequences in one request; this "
                f"server queues at most {queue} requests (--max-queued-requests): send at most that many "
                "sequences per request.",
                param="prompt" if req.n == 1 else "n",
            )
        if params.guide is not None:
            await state.compile_guide(params.guide)
        encoded = await state.run_cpu(self._tokenize, req, prompts)
        subs = []
        try:
            for pos, (text, echo_ids, ids) in enumerate(encoded):
                rid = base_id if len(encoded) == 1 else f"{base_id}-{pos}"
                sub = _Sub(pos, rid, text, echo_ids, RequestTracker(rid, state.metrics, len(ids), n=req.n))
                sub.stream = state.add_request(rid, ids, params, prompt_param="prompt")
                subs.append(sub)
        except APIError:
            _abort_all(state, subs)
            raise
        ctx = _CompletionContext(state, req, base_id, subs, prompt_only)
        return await respond(raw, base_id, ctx, req.stream, ctx.stream, ctx.collect)


def _abort_all(state: ServerState, subs: list[_Sub]) -> None:
    for sub in subs:
        if not sub.finished:
            sub.finished = True
            state.abort(sub.request_id)
            sub.tracker.done(finish="abort")


class _CompletionContext:
    def __init__(
        self, state: ServerState, req: CompletionRequest, request_id: str, subs: list[_Sub], prompt_only: bool
    ):
        self.state = state
        self.prompt_only = prompt_only
        self.req = req
        self.request_id = request_id
        self.subs = subs
        self.model = state.model_name(req.model)
        self.created = int(time.time())
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.finished_choices: set[int] = set()  # indexes whose finish_reason chunk went out

    def close_if_unfinished(self) -> None:
        _abort_all(self.state, self.subs)

    def _index(self, sub: _Sub, out_index: int) -> int:
        return sub.pos * self.req.n + out_index

    def _chunk(self, index: int, text: str, logprobs: Any = None, finish: str | None = None) -> str:
        payload: dict[str, Any] = {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        }
        if self.include_usage:
            payload["usage"] = None
        if finish is not None:
            self.finished_choices.add(index)
        return sse(payload)

    def heartbeat(self) -> str:
        """An empty text for a choice still running (a finish chunk is a choice's last)."""
        index = next((i for i in range(len(self.subs) * self.req.n) if i not in self.finished_choices), None)
        if index is None:
            return sse(heartbeat_without_choices(self.request_id, "text_completion", self.created, self.model,
                                                 self.include_usage))
        return self._chunk(index, "")

    def _echo(self, sub: _Sub) -> tuple[str, Any]:
        """Echoed prompt text and, with logprobs, its tokens' logprobs (none for the first token,
        none at all with `suffix`)."""
        if not self.req.echo:
            return "", None
        if self.req.logprobs is None:
            return sub.prompt_text, None
        tokens = [self.state.decode([t]) for t in sub.prompt_ids]
        items = sub.prompt_logprobs if sub.prompt_logprobs and len(sub.prompt_logprobs) == len(tokens) else None
        return sub.prompt_text, completion_logprobs(
            items or [None] * len(tokens), tokens, 0, sub.prompt_ids, self.state.token_bytes
        )

    def _observe(self, sub: _Sub, out: RequestOutput) -> RequestOutput:
        """Take an engine output in: keep the prompt's logprobs, hide the token a prompt-only request
        samples anyway, and count it."""
        if out.prompt_logprobs is not None:
            sub.prompt_logprobs = out.prompt_logprobs
        if self.prompt_only:
            finish = "length" if out.finish_reason not in (None, "abort") else out.finish_reason
            out = replace(out, text="", token_ids=[], logprobs=None, num_generated_tokens=0, finish_reason=finish)
        elif out.logprobs:
            out = replace(out, logprobs=shown_logprobs(out))
        sub.tracker.observe(out)
        return out

    def _echo_chunks(self, sub: _Sub) -> list[str]:
        """The echo chunk of each of the prompt's choices (streaming), once."""
        if sub.echoed:
            return []
        sub.echoed = True
        text, lp = self._echo(sub)
        chunks = []
        for k in range(self.req.n):
            sub.offsets[k] = TextOffsets(len(text))
            if text:
                chunks.append(self._chunk(self._index(sub, k), text, lp))
        return chunks

    def _logprobs(self, out: RequestOutput, offsets: TextOffsets) -> Any:
        if self.req.logprobs is None or not out.logprobs:
            return None
        return self._generated_logprobs(out.logprobs, offsets)

    def _generated_logprobs(self, lps: list[TokenLogprob], offsets: TextOffsets | int) -> dict[str, Any]:
        tokens, ids = [lp.token for lp in lps], [lp.token_id for lp in lps]
        return completion_logprobs(lps, tokens, offsets, ids, self.state.token_bytes)

    def usage(self) -> dict[str, Any]:
        usages = [s.tracker.usage() for s in self.subs]
        prompt = sum(u["prompt_tokens"] for u in usages)
        completion = sum(u["completion_tokens"] for u in usages)
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def stream(self) -> AsyncIterator[str]:
        """SSE body: echo first, then text deltas, a finish per choice, usage, [DONE]."""
        # Echoed prompt logprobs arrive with the prompt's first output: its echo waits for it.
        echo_waits = self.req.echo and self.req.logprobs is not None
        for sub in self.subs if not echo_waits else []:
            for chunk in self._echo_chunks(sub):
                yield chunk
        streams = [s.stream for s in self.subs]
        async for pos, out in merge_streams(streams):  # type: ignore[arg-type]
            sub = self.subs[pos]
            out = self._observe(sub, out)
            for chunk in self._echo_chunks(sub):
                yield chunk
            lp = self._logprobs(out, sub.offsets.setdefault(out.index, TextOffsets()))
            finish = _finish(out.finish_reason)
            if out.text or lp or finish:
                yield self._chunk(self._index(sub, out.index), out.text, lp, finish)
        for sub in self.subs:
            sub.finished = True
            sub.tracker.done()
        if self.include_usage:
            yield sse(
                {
                    "id": self.request_id,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self.usage(),
                }
            )
        yield SSE_DONE


    def log_error(self, exc: APIError) -> None:
        for sub in self.subs:  # one line per prompt
            sub.tracker.fail(exc)

    def stream_error(self, exc: APIError) -> str:
        """A mid-stream failure: the error event, then [DONE]."""
        self.log_error(exc)
        return sse(exc.body()) + SSE_DONE

    async def collect(self) -> dict[str, Any]:
        """Run every prompt to completion and build the text_completion body."""
        n = self.req.n
        texts: dict[int, str] = {}
        lps: dict[int, list[Any]] = {}
        reasons: dict[int, str] = {}
        streams = [s.stream for s in self.subs]
        async for pos, out in merge_streams(streams):  # type: ignore[arg-type]
            sub = self.subs[pos]
            out = self._observe(sub, out)
            idx = self._index(sub, out.index)
            texts[idx] = texts.get(idx, "") + out.text
            lps.setdefault(idx, []).extend(out.logprobs or [])
            if out.finish_reason is not None:
                reasons[idx] = _finish(out.finish_reason) or "stop"
        for sub in self.subs:
            sub.finished = True
            sub.tracker.done()
        choices = []
        for sub in self.subs:
            echo_text, echo_lp = self._echo(sub)
            for k in range(n):
                idx = self._index(sub, k)
                choices.append(
                    self._choice(
                        idx,
                        echo_text,
                        echo_lp,
                        texts.get(idx, ""),
                        lps.get(idx, []),
                        reasons.get(idx, "stop"),
                    )
                )
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _choice(
        self, idx: int, echo: str, echo_lp: Any, text: str, lps: list[Any], reason: str
    ) -> dict[str, Any]:
        logprobs = None
        if self.req.logprobs is not None:
            gen = self._generated_logprobs(lps, len(echo))
            if echo_lp:
                gen = {k: echo_lp[k] + gen[k] for k in gen}
            logprobs = gen
        return {"index": idx, "text": echo + text, "logprobs": logprobs, "finish_reason": reason}


def _finish(reason: str | None) -> str | None:
    if reason == "abort":
        raise aborted()
    return reason
