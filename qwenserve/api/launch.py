"""Run the app under uvicorn (uvloop when available) on a socket bound up front, so a busy
port fails at once with a clear message instead of after the model has loaded."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from qwenserve.api.banner import listen_url
from qwenserve.api.errors import APIError
from qwenserve.api.server import build_app, uvloop_available
from qwenserve.api.state import ServerSettings

logger = logging.getLogger("qwenserve.api")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket; raises OSError (port in use, bad address)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


# A request's head (request line and headers) must arrive whole within this many seconds of the connection
# opening or of the previous answer, and hold at most this many bytes. uvicorn waits forever for a head
# and keeps all of it: connections that send nothing (no key is needed to open one) piled up to the
# process's file limit and locked every client out, and a request line sent without end (its URL is joined
# piece by piece, in quadratic time) held the event loop for seconds at a time, stalling every request.
REQUEST_HEAD_SECONDS = 30.0
MAX_REQUEST_HEAD_BYTES = 64 * 1024


def json_error_protocol() -> type:
    """uvicorn's HTTP protocol (httptools when installed, as its "auto" picks, else h11), answering the
    one request it refuses itself, one it cannot parse, with an OpenAI-shaped 400 instead of plain text,
    so a client's error handling sees the same shape as for every other error; and closing a connection
    whose next request's head does not arrive in time (REQUEST_HEAD_SECONDS) or grows too large."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class JSONErrorProtocol(base):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _head_tail = b""  # the last bytes of the head so far: its blank line may span two reads
        # The request being served still has body bytes to come (httptools' callbacks): answered before its
        # body was read (a wrong key, a 413, a 503 while loading), the rest of the body is not the next head.
        _body_pending = False

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            # Counted before the parser sees them: a head that arrives whole in one read (a 100 KB header
            # sent at once) would otherwise be complete, and served, before its size was ever checked.
            if self._waiting_for_head() and not self._body_pending:
                self._head_bytes += self._head_part(data)
                if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                    if not self.transport.is_closing():
                        self._refuse(
                            431,
                            f"The request line and headers exceed this server's limit of "
                            f"{MAX_REQUEST_HEAD_BYTES:,} bytes.",
                            code="request_header_too_large",
                        )
                    return
            super().data_received(data)
            if not self._waiting_for_head():
                self._head_bytes = 0  # the head is complete: a body may be as large as the app allows
                self._head_tail = b""

        def _head_part(self, data: bytes) -> int:
            """How many bytes of `data` belong to the head being received: up to the blank line that ends
            it, or all of them. The body after that line (in the same read) is not the head's."""
            skipped = 0
            if not self._head_bytes:  # empty lines before a request line are ignored by the parser
                skipped = len(data) - len(data.lstrip(b"\r\n"))
                data = data[skipped:]
            seen = self._head_tail + data
            ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := seen.find(sep)) >= 0]
            self._head_tail = seen[-3:]
            return skipped + (max(0, min(ends) - (len(seen) - len(data))) if ends else len(data))

        def on_headers_complete(self) -> None:
            self._body_pending = True
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._body_pending = False
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()  # the next request's head has as long as the first one's

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            """No request is being served: the next one's head has not arrived whole yet."""
            return self.cycle is None or self.cycle.response_complete

        def _await_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_bytes = 0
            self._head_tail = b""
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(REQUEST_HEAD_SECONDS, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()  # an idle connection: no answer is owed, as for keep-alive's timeout

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, f"{msg} The request line, headers or body framing is not valid HTTP/1.1.")

        def _refuse(self, status: int, message: str, code: str | None = None) -> None:
            body = json.dumps(APIError(status, message, code=code).body()).encode()
            reason = b"Bad Request" if status == 400 else b"Request Header Fields Too Large"
            head = (
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, reason, len(body))
            )
            self.transport.write(head + body)
            self.transport.close()

    return JSONErrorProtocol


# SIGHUP (the terminal closed, an ssh session dropped) stops the server as SIGTERM does: uvicorn leaves it at
# its default action, which killed the process at once, cutting streams off without their error event.
_STOP_SIGNALS = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None
)


class _Server(uvicorn.Server):
    """uvicorn, plus: the first SIGINT / SIGTERM / SIGHUP aborts the engine's requests, so every client still
    connected gets an OpenAI-style 503 (streams: an error event, then [DONE]) while uvicorn drains
    connections, instead of being cut off when its grace period ends; a second Ctrl-C exits at once. After a
    SIGTERM or SIGHUP the process exits 0 once it has shut down (uvicorn would raise the signal again and die
    of it: exit 143); after Ctrl-C, 130 as before."""

    def __init__(self, config: uvicorn.Config, on_exit: Any):
        super().__init__(config)
        self._on_exit = on_exit
        self.stop_signal: int | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            self.stop_signal = sig
            self._on_exit()
        elif sig == signal.SIGINT:
            # A second Ctrl-C: uvicorn would skip the app's shutdown and the cancelled lifespan task
            # would log a traceback. Nothing here outlives the process (the KV cache is memory), so
            # leave at once, as the user asked.
            logger.info("interrupted again: exiting now")
            logging.shutdown()
            os._exit(130)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # A SIGHUP already ignored stays ignored: `nohup qwenserve serve` must outlive its terminal. (SIGINT
        # is caught even when ignored, as uvicorn does: a shell script's `serve &` starts with it ignored.)
        stop_signals = [
            sig for sig in _STOP_SIGNALS
            if sig in (signal.SIGINT, signal.SIGTERM) or signal.getsignal(sig) is not signal.SIG_IGN
        ]  # fmt: skip
        original = {sig: signal.signal(sig, self.handle_exit) for sig in stop_signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        if self.stop_signal == signal.SIGINT:
            signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt: the exit code 130 of a Ctrl-C


# Enough for every connection a box of clients keeps open; what vLLM raises its own limit to.
OPEN_FILES_WANTED = 65536


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise this process's soft limit on open files toward `wanted` (never above the hard limit, never
    lower); returns the soft limit now in force. Each connection holds a file: at a distribution's usual
    1,024, a burst of clients (or idle connections awaiting their timeout) would make accept() fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # a sandbox that refuses; the old limit still serves
            logger.debug("could not raise the open-file limit from %d: %s", soft, exc)
            return soft
        return target
    return soft


def run_server(engine: Any, settings: ServerSettings, log_level: str = "info") -> int:
    """Serve until interrupted; returns the process exit code (1 when the model failed to load)."""
    raise_open_file_limit()
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            hint = "is another server running? try --port"
        else:  # a name that does not resolve, an address this machine does not have
            hint = "--host takes an address of this machine: 127.0.0.1 for local clients, 0.0.0.0 for any"
        logger.error("cannot listen on %s:%s: %s (%s)", settings.host or "''", settings.port, exc, hint)
        return 1
    settings.port = sock.getsockname()[1]  # --port 0 picks a free port
    app = build_app(engine, settings)
    config = uvicorn.Config(
        app,
        loop="uvloop" if uvloop_available() else "asyncio",
        http=json_error_protocol(),
        log_level=log_level,
        log_config=None,  # keep the root logging setup from the CLI
        access_log=False,  # one line per request comes from our own request log
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, on_exit=engine.abort_all)
    ctx = app.state.ctx
    ctx.server = server
    logger.info("listening on %s (model loading in the background)", listen_url(settings.host, settings.port))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # The Ctrl-C caught is raised again once the server has shut down: that is the normal way out.
        _exit_now_if_loading(ctx, 130)
        return 130
    if server.stop_signal is not None:  # SIGTERM / SIGHUP
        _exit_now_if_loading(ctx, 0)
    return ctx.exit_code


def _exit_now_if_loading(ctx: Any, code: int) -> None:
    """Stopped before the model was loaded: the load runs on a worker thread that cannot be interrupted,
    and exiting the normal way would wait minutes for it to finish reading a large checkpoint."""
    if not ctx.ready and ctx.exit_code == 0:
        logger.info("stopped while the model was loading")
        logging.shutdown()
        os._exit(code)
