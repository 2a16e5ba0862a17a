"""`flowactors serve`: open a Runtime on a log and serve it with uvicorn until stopped.

The socket is bound before the log is opened (a busy port fails fast and leaves the log
alone). SIGINT and SIGTERM stop the server gracefully, then close the runtime cleanly: running
jobs stay `running` in the log and resume on the next open, as after any clean close.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from ..errors import FlowError
from ..runtime import Runtime
from .app import create_app
from .security import LOOPBACK_HOSTS, is_loopback, load_or_create_token, token_path

GRACEFUL_SECONDS = 2.0  # open event streams are cut after this, on shutdown


class ServeError(FlowError):
    """The server cannot start as asked (e.g. a non-loopback address without opt-in)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it a response
    # written in two parts waits for the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str, token: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else \
        "[::1]" if host in ("::", "[::]") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def config(app: Any) -> uvicorn.Config:
    """uvicorn's settings for serving `app`: no access log, no proxy headers trusted."""
    return uvicorn.Config(app, log_level="warning", access_log=False, proxy_headers=False,
                          server_header=False, lifespan="on",
                          timeout_graceful_shutdown=GRACEFUL_SECONDS)


class Server(uvicorn.Server):
    """uvicorn's server, ending the app's event streams first when it shuts down: an open
    stream never ends by itself, and would hold the shutdown for its whole grace period."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        hub = getattr(getattr(self.config.app, "state", None), "hub", None)
        if hub is not None:
            await hub.close()
        await super().shutdown(sockets)


def serve(db: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8600,
          allow_remote: bool = False, echo: Callable[[str], None] = print) -> None:
    """Serve the log at `db` until SIGINT/SIGTERM (then exit 130/143).

    Raises:
        ServeError: `host` is not a loopback address and `allow_remote` is False, or the
            port cannot be bound. TokenFileError, StoreLocked, LogCorrupted: as they say.
    """
    if not allow_remote and not is_loopback(host):
        raise ServeError(f"{host} is not a loopback address: anyone who can reach it could "
                         f"try the API; pass --allow-remote to serve there anyway")
    token = load_or_create_token(db)
    allowed = _allowed_hosts(host)
    sock = bind(host, port)
    previous = _exit_on_signals()
    try:
        with Runtime(db, handle_signals=False) as runtime:
            server = Server(config(create_app(runtime, token=token,
                                                      allowed_hosts=allowed)))
            echo(f"flowactors is serving {Path(db)} (token in {token_path(db)}); "
                 f"open the dashboard at:\n    {url_of(sock, host, token)}")
            server.run(sockets=[sock])
    finally:
        sock.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _allowed_hosts(host: str) -> tuple[str, ...]:
    if is_loopback(host):
        return LOOPBACK_HOSTS
    names = {host} if host not in ("0.0.0.0", "::", "[::]", "") else \
        {socket.gethostname(), socket.getfqdn()}
    return (*LOOPBACK_HOSTS, *sorted(names))


def _exit_on_signals() -> dict[int, Any]:
    """After uvicorn's graceful shutdown it raises the signal it caught again: let that end
    the process through the runtime's clean close (SystemExit), not the default handler."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}


class BackgroundServer:
    """An app served by uvicorn on a daemon thread: for tests, benchmarks and embedding.

    `with BackgroundServer(app) as server:` serves on a free loopback port (`server.url`)
    and stops (bounded) on exit.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = Server(config(app))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="flowactors-server")

    def start(self, timeout: float = 10.0) -> BackgroundServer:
        """Start serving; returns once uvicorn has started (RuntimeError if it cannot)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

