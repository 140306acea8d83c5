"""The FastAPI app: routes, middlewares, and background model loading.

Uvicorn starts answering at once; the engine loads in the background, so /health says 503
(and every other route 503 + Retry-After) until the model is ready.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from qwenserve import __version__
from qwenserve.api.auth import APIKeyMiddleware
from qwenserve.api.banner import ready_banner
from qwenserve.api.chat import normalize_messages, normalize_tools, render_chat
from qwenserve.api.errors import APIError, bad_request, install_error_handlers, unavailable
from qwenserve.api.metrics import Metrics
from qwenserve.api.middleware import (
    AnthropicErrorsMiddleware,
    BodyLimitMiddleware,
    ForeignOriginMiddleware,
    InternalErrorMiddleware,
    JSONBodyMiddleware,
    LoadingGateMiddleware,
    RequestIdMiddleware,
    StatusCountMiddleware,
    TrailingSlashMiddleware,
)
from qwenserve.api.protocol import (
    MAX_JSON_DEPTH,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_text_path,
)
from qwenserve.api.protocol_messages import MessagesInput, MessagesRequest
from qwenserve.api.protocol_responses import ResponsesRequest
from qwenserve.api.serving_chat import ChatCompletions
from qwenserve.api.serving_completions import Completions
from qwenserve.api.serving_messages import Messages
from qwenserve.api.serving_responses import Responses
from qwenserve.api.state import ServerSettings, ServerState

logger = logging.getLogger("qwenserve.api")


@dataclass(frozen=True)
class Endpoints:
    """The handlers of the generation endpoints, built once the model is loaded."""

    chat: ChatCompletions
    completions: Completions
    responses: Responses
    messages: Messages


class AppContext:
    """Mutable per-app holder: the ServerState appears once the engine is ready."""

    def __init__(self, engine: Any, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics(stats=self._stats)
        self.state: ServerState | None = None
        self._endpoints: Endpoints | None = None  # set with `state`, once the model is loaded
        self.load_error: str | None = None
        self.exit_code = 0
        self.server: Any = None  # uvicorn.Server, so a failed load can stop it

    def _stats(self) -> Any | None:
        return self.engine.stats() if self.state is not None else None

    @property
    def ready(self) -> bool:
        return self.state is not None

    def require(self) -> ServerState:
        """The loaded server state, or a 503 while the model loads."""
        if self.state is None:
            raise unavailable("The model is still loading; retry shortly.", code="model_loading")
        return self.state

    def endpoints(self) -> Endpoints:
        """The generation endpoints' handlers (a 503 while the model loads)."""
        if self._endpoints is None:
            raise unavailable("The model is still loading; retry shortly.", code="model_loading")
        return self._endpoints

    async def load(self) -> None:
        """Load the engine; on failure log why and stop the server with exit code 1."""
        started = time.monotonic()
        try:
            await self.engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure ends the process with its message
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("failed to load the model: %s", self.load_error)
            self.exit_code = 1
            if self.server is not None:
                self.server.should_exit = True
            return
        freeze_startup_objects()
        state = ServerState(self.engine, self.settings, self.metrics)
        chat = ChatCompletions(state)
        self._endpoints = Endpoints(
            chat=chat, completions=Completions(state), responses=Responses(state, chat), messages=Messages(state, chat)
        )
        self.state = state
        info = state.model_info
        logger.info("model %s loaded in %.1fs", info.name, time.monotonic() - started)
        logger.info(
            "tool calls: parsed in %s, the format its chat template writes",
            "Qwen3-Coder's XML (<function=...>)" if state.xml_tools else "Qwen3's JSON (<tool_call>{...})",
        )
        banner = ready_banner(
            self.settings.host,
            self.settings.port,
            state.served_names[0],
            info.max_model_len,
            self.settings.api_key,
            info.is_demo,
            str(info.path),
        )
        print(banner, flush=True)


def freeze_startup_objects() -> None:
    """Keep what the process holds once the model is loaded (torch, transformers, the model's modules, the
    tokenizer: ~300k objects with the demo model) out of the garbage collector's full collections.

    They live as long as the server, yet each full collection walked them all with the GIL held, pausing the
    event loop and the engine thread between two decode steps (237-290 ms for the full-size model on an H200
    host, 166-207 ms for the demo model on 2 CPU cores; bench/gc_pause.py), every few tens of thousands of
    objects a busy server creates. The loading's own garbage is collected first, not kept for good."""
    gc.collect()
    gc.freeze()


def build_app(engine: Any, settings: ServerSettings) -> FastAPI:
    """The ASGI app for `engine` (an AsyncEngine that is not started yet)."""
    ctx = AppContext(engine, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(ctx.load())
        try:
            yield
        finally:
            task.cancel()
            if ctx.state is not None:
                ctx.state.close()
            await engine.shutdown()

    app = FastAPI(
        title="qwenserve",
        version=__version__,
        description="OpenAI-compatible server for Qwen3-Coder models.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    # add_middleware wraps outside-in in reverse order: counting sees every response,
    # auth runs before the loading gate so an unauthenticated caller learns nothing.
    app.add_middleware(InternalErrorMiddleware)  # innermost: see its docstring
    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(LoadingGateMiddleware, is_ready=lambda: ctx.ready)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    # Outside the key check: a browser's preflight carries no credentials.
    app.add_middleware(CORSMiddleware, **cors_options(settings.allowed_origins))
    # Outside CORS: a foreign page's preflight gets the same JSON 403 as its request, not CORS's plain 400.
    app.add_middleware(ForeignOriginMiddleware, allowed=lambda origin: origin_allowed(origin, settings.allowed_origins))
    app.add_middleware(StatusCountMiddleware, metrics=ctx.metrics)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(AnthropicErrorsMiddleware)  # outside every layer that may refuse a request
    app.add_middleware(TrailingSlashMiddleware)  # outermost: every layer sees the route's own path
    _add_ops_routes(app, ctx)
    _add_model_routes(app, ctx)
    _add_openai_routes(app, ctx)
    _add_anthropic_routes(app, ctx)
    _add_token_routes(app, ctx)
    return app


# Pages served from this machine, on any port: a local web UI may call the API, while any other site the
# user's browser opens may not (it would use the GPU, and read the answers).
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


def origin_allowed(origin: str, allowed_origins: list[str] | None) -> bool:
    """Whether a web page at `origin` may call the API: CORSMiddleware's own test under cors_options, so
    the 403 and the preflight answers cannot disagree. (Only requests carrying an Origin ask.)"""
    return CORSMiddleware(None, **cors_options(allowed_origins)).is_allowed_origin(origin)  # type: ignore[arg-type]


def cors_options(allowed_origins: list[str] | None) -> dict[str, Any]:
    """CORSMiddleware's settings: the given origins ("*": any), else pages served from this machine."""
    where: dict[str, Any] = {"allow_origin_regex": LOCAL_ORIGINS}
    if allowed_origins is not None:
        where = {"allow_origins": ["*"] if "*" in allowed_origins else allowed_origins}
    return {**where, "allow_methods": ["*"], "allow_headers": ["*"], "expose_headers": ["x-request-id"]}


# HEAD wherever GET is served, as HTTP expects (monitors and load balancers probe with it).
_GET = ["GET", "HEAD"]


def _add_ops_routes(app: FastAPI, ctx: AppContext) -> None:
    """/health, /version and /metrics: what a supervisor or a dashboard polls."""

    @app.api_route("/health", methods=_GET, tags=["ops"])
    async def health() -> Response:
        """200 when the model is loaded and serving, 503 while it loads."""
        if ctx.load_error:
            return APIError(503, f"Model failed to load: {ctx.load_error}", code="load_failed").response()
        if not ctx.ready:
            return unavailable("The model is still loading.", code="model_loading").response()
        if (dead := ctx.engine.dead_reason) is not None:
            return APIError(503, f"{dead}; restart the server.", code="engine_failed").response()
        return JSONResponse({"status": "ok"})

    @app.api_route("/version", methods=_GET, tags=["ops"])
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.api_route("/metrics", methods=_GET, tags=["ops"])
    async def metrics() -> Response:
        """Prometheus exposition of request, token, latency and KV cache series."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    """One card for both APIs: OpenAI's fields, then Anthropic's (`type`, `display_name`, `created_at`),
    so the anthropic SDK's `models.list()` reads a model too; each SDK ignores the other's fields."""
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "qwen",
        "root": str(state.model_info.path),
        "max_model_len": state.max_model_len,
        "type": "model",
        "display_name": name,
        "created_at": datetime.fromtimestamp(state.created, UTC).isoformat().replace("+00:00", "Z"),
    }


def _add_model_routes(app: FastAPI, ctx: AppContext) -> None:
    """/v1/models and /v1/models/{name}, read by OpenAI's and Anthropic's clients alike."""

    @app.api_route("/v1/models", methods=_GET, tags=["openai"])
    async def models() -> dict[str, Any]:
        """Every served model name (any name is accepted in requests), as a list both OpenAI's and
        Anthropic's clients read (Anthropic's pages by `first_id` / `last_id` / `has_more`)."""
        state = ctx.require()
        names = state.served_names
        return {
            "object": "list",
            "data": [_model_card(state, name) for name in names],
            "has_more": False,
            "first_id": names[0],
            "last_id": names[-1],
        }

    @app.api_route("/v1/models/{name:path}", methods=_GET, tags=["openai"])
    async def model(name: str) -> dict[str, Any]:
        """One served model (what `client.models.retrieve` asks for). Requests may name any model, but
        a client choosing among names learns here which ones this server lists (as vLLM answers)."""
        state = ctx.require()
        if name not in state.served_names:
            raise APIError(
                404,
                f"The model {name!r} is not served here (served: {', '.join(state.served_names)}); "
                "requests may use any name.",
                param="model",
                code="model_not_found",
            )
        return _model_card(state, name)


def _add_openai_routes(app: FastAPI, ctx: AppContext) -> None:
    """Chat completions, completions and the Responses API (with its kept responses)."""

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        """Chat completion, streaming (SSE) or not, with tool calls."""
        endpoints = ctx.endpoints()
        _refuse_bad_text(req)
        return await endpoints.chat.create(req, raw)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        """Text completion, with echo, logprobs and fill-in-the-middle via `suffix`."""
        endpoints = ctx.endpoints()
        _refuse_bad_text(req)
        return await endpoints.completions.create(req, raw)

    @app.post("/v1/responses", tags=["openai"])
    async def responses(req: ResponsesRequest, raw: Request) -> Response:
        """OpenAI Responses API on the chat path; finished responses are kept for `previous_response_id`."""
        endpoints = ctx.endpoints()
        _refuse_bad_text(req)
        return await endpoints.responses.create(req, raw)

    @app.api_route("/v1/responses/{response_id}", methods=_GET, tags=["openai"])
    async def retrieve_response(response_id: str, stream: str | None = None) -> dict[str, Any]:
        """A response this server kept (`client.responses.retrieve`); 404 once it is no longer kept."""
        if stream is not None and stream.lower() not in ("false", "0"):
            # The SDK would read a JSON body as a stream of no events; say why instead.
            raise bad_request(
                "Streaming a kept response again is not supported: retrieve it without 'stream'.",
                param="stream",
                code="unsupported_parameter",
            )
        return ctx.endpoints().responses.retrieve(response_id)

    @app.api_route("/v1/responses/{response_id}/input_items", methods=_GET, tags=["openai"])
    async def response_input_items(
        response_id: str, limit: int = 20, order: str = "desc", after: str | None = None
    ) -> dict[str, Any]:
        """A kept response's own input items (`client.responses.input_items.list`), newest first by default."""
        return ctx.endpoints().responses.input_items(response_id, limit, order, after)

    @app.delete("/v1/responses/{response_id}", tags=["openai"])
    async def delete_response(response_id: str) -> dict[str, Any]:
        """Forget a kept response (`client.responses.delete`)."""
        return ctx.endpoints().responses.delete(response_id)

    @app.post("/v1/responses/input_tokens", tags=["openai"])
    async def count_response_tokens(req: ResponsesRequest) -> dict[str, Any]:
        """The prompt's size in tokens, rendered as /v1/responses would render it (the OpenAI SDK's
        `client.responses.input_tokens.count`)."""
        endpoints = ctx.endpoints()
        _refuse_bad_text(req)
        return await endpoints.responses.count_input_tokens(req)


def _add_anthropic_routes(app: FastAPI, ctx: AppContext) -> None:
    """Anthropic's Messages API and its token count."""

    @app.post("/v1/messages", tags=["anthropic"])
    async def messages(req: MessagesRequest, raw: Request) -> Response:
        """Anthropic Messages API (Claude Code, qwen-code's Anthropic provider), on the chat path."""
        endpoints = ctx.endpoints()
        _refuse_bad_text(req)
        return await endpoints.messages.create(req, raw)

    @app.post("/v1/messages/count_tokens", tags=["anthropic"])
    async def count_message_tokens(req: MessagesInput) -> dict[str, int]:
        """The prompt's size in tokens, rendered as /v1/messages would render it."""
        endpoints = ctx.endpoints()
        _refuse_bad_text(req)
        return await endpoints.messages.count_tokens(req)


def _add_token_routes(app: FastAPI, ctx: AppContext) -> None:
    """vLLM's /tokenize and /detokenize."""

    @app.post("/tokenize", tags=["tokens"])
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's shape: `prompt` or chat `messages` in; count, max_model_len, tokens out."""
        state = ctx.require()
        _refuse_bad_text(req)
        tokens = await state.run_cpu(_tokenize, state, req)
        out: dict[str, Any] = {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}
        if req.return_token_strs:
            out["token_strs"] = state.tokenizer.convert_ids_to_tokens(tokens)
        return out

    @app.post("/detokenize", tags=["tokens"])
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        """vLLM's shape: `tokens` in, `prompt` (the decoded text) out."""
        state = ctx.require()
        vocab = len(state.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"Token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", param="tokens")
        return {"prompt": await state.run_cpu(state.decode, req.tokens)}


def _refuse_bad_text(req: Any) -> None:
    """400 for text no tokenizer can read, JSON too deep to render and numbers JSON cannot carry (each
    would otherwise fail deep inside as a 500)."""
    found = bad_text_path(req)
    if found is None:
        return
    param, problem = found
    if problem == "number":
        raise bad_request(
            f"'{param}' is NaN or infinite (NaN, Infinity or a number past a float's range), which is not a "
            "JSON number: send a finite value.",
            param=param,
        )
    if problem == "surrogate":
        raise bad_request(
            f"'{param}' contains a lone UTF-16 surrogate escape (such as \\ud800), which is not valid "
            "Unicode text; send well-formed UTF-8.",
            param=param,
            code="invalid_text",
        )
    raise bad_request(f"'{param}' is nested more than {MAX_JSON_DEPTH} levels deep.", param=param)


def _tokenize(state: ServerState, req: TokenizeRequest) -> list[int]:
    if req.messages is not None and req.prompt is not None:
        raise bad_request("Send either 'prompt' or 'messages', not both.", param="prompt")
    if req.messages is not None:
        if not req.messages:
            raise bad_request("'messages' must not be empty.", param="messages")
        text = render_chat(
            state.tokenizer,
            normalize_messages(req.messages),
            normalize_tools(req.tools),
            req.chat_template_kwargs,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
        return state.encode_prompt(text, "messages")
    if req.prompt is None:
        raise bad_request("Send either 'prompt' or 'messages'.", param="prompt")
    return state.encode_prompt(req.prompt, "prompt", add_special_tokens=req.add_special_tokens)


def uvloop_available() -> bool:
    """uvloop is optional (not on Windows); fall back to asyncio's loop."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return sys.platform != "win32"
