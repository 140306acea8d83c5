"""Run the app under uvicorn (uvloop when available) on a socket bound up front, so a busy
port fails at once with a clear message instead of after the model has loaded."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import uvicorn

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


class _Server(uvicorn.Server):
    """uvicorn, plus: the first SIGINT / SIGTERM aborts the engine's requests, so every client still
    connected gets an OpenAI-style 503 (streams: an error event, then [DONE]) while uvicorn drains
    connections, instead of being cut off when its grace period ends."""

    def __init__(self, config: uvicorn.Config, on_exit: Any):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


def run_server(engine: Any, settings: ServerSettings, log_level: str = "info") -> int:
    """Serve until interrupted; returns the process exit code (1 when the model failed to load)."""
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        logger.error(
            "cannot listen on %s:%s: %s (is another server running? try --port)",
            settings.host,
            settings.port,
            exc,
        )
        return 1
    settings.port = sock.getsockname()[1]  # --port 0 picks a free port
    app = build_app(engine, settings)
    config = uvicorn.Config(
        app,
        loop="uvloop" if uvloop_available() else "asyncio",
        log_level=log_level,
        log_config=None,  # keep the root logging setup from the CLI
        access_log=False,  # one line per request comes from our own request log
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, on_exit=engine.abort_all)
    ctx = app.state.ctx
    ctx.server = server
    logger.info("listening on http://%s:%d (model loading in the background)", settings.host, settings.port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises the Ctrl-C it caught once it has shut down: that is the normal way out.
        if not ctx.ready and ctx.exit_code == 0:
            # The load runs on a worker thread that cannot be interrupted; exiting the normal way
            # would wait minutes for it to finish reading a large checkpoint.
            logger.info("stopped while the model was loading")
            logging.shutdown()
            os._exit(130)
        return 130
    return ctx.exit_code
