"""Running the app for `perm serve`: bind first, then serve with a bounded graceful shutdown.

The socket is bound before the model loads, so a busy port or a bad host is one clear
`ServeError` (perm serve: exit 1), not uvicorn's startup-failure exit. On SIGTERM or
Ctrl-C the app's `begin_shutdown()` runs at once: new requests get 503, and everything
accepted is answered or refused with 503 within the app's shutdown timeout; uvicorn's own
graceful timeout is only a backstop behind that.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from perm_lite.errors import PermError


class ServeError(PermError):
    """The server could not listen or start."""


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening)."""
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ServeError(f"cannot listen on {where}: {getattr(exc, 'strerror', None) or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (is another server running there? choose another --port)" if exc.errno == 98 else ""
        raise ServeError(f"cannot listen on {where}: {exc.strerror or exc}{hint}") from None
    return sock


def make_server(app: Any, shutdown_timeout: float, log_level: str = "warning"):
    """A uvicorn Server whose SIGTERM/SIGINT (or `handle_exit`) starts the app's shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first and self.loop is not None:
                self.loop.call_soon_threadsafe(app.state.begin_shutdown)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=shutdown_timeout + 5,  # a backstop: the app answers first
    )
    return Server(config)


def serve(app: Any, sock: socket.socket, shutdown_timeout: float, log_level: str = "warning") -> None:
    """Serve `app` (from create_app) on a bound socket until SIGTERM/SIGINT."""
    server = make_server(app, shutdown_timeout, log_level)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's startup failure
        raise ServeError("the server failed to start (see the log above)") from None
    finally:
        sock.close()
    if not server.started:
        raise ServeError("the server failed to start (see the log above)")
