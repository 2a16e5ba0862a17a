"""The server's guards: the bearer token (kept in a 0600 file beside the log), the Host and
Origin checks, and which addresses count as loopback.

Every request for data (the API, the events, the metrics, the health check) must carry
`Authorization: Bearer TOKEN`; the dashboard's static shell holds no data and is served without
it. The Host header must name an allowed host, so a page from another site cannot reach the
server through a rebound DNS name; a request that carries an Origin must come from the server's
own origin, so no other site's page can post to it (there are no cookies either: a browser
sends the token only when our own script adds it).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ..errors import FlowError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PUBLIC_PATHS = ("/", "/static/")  # the dashboard's shell: HTML, JS and CSS, no data

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]


class TokenFileError(FlowError):
    """The token file cannot be read or created, or others may read it."""


def token_path(db: str | os.PathLike[str]) -> Path:
    """Where the token of the log at `db` is kept: `<db>.token`, beside it."""
    db = Path(db)
    return db.with_name(db.name + ".token")


def load_or_create_token(db: str | os.PathLike[str]) -> str:
    """The log's bearer token: read from `<db>.token`, or generated into it (mode 0600) on
    first use, the way Jupyter keeps its token.

    Raises:
        TokenFileError: the file is readable or writable by others than its owner, is empty,
            or cannot be read or written.
    """
    path = token_path(db)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise TokenFileError(f"cannot create the token file {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _read_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenFileError(f"the token file {path} is open to other users (mode "
                                 f"{stat.S_IMODE(mode):o}); run `chmod 600 {path}`")
        token = path.read_text().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise TokenFileError(f"the token file {path} is empty; delete it to get a new token")
    return token


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback
                               for info in infos)


def _host_name(netloc: str) -> str:
    """`netloc` ("host", "host:port", "[::1]:port") without its port, lower case."""
    try:
        name = urlsplit("//" + netloc).hostname
    except ValueError:
        return ""
    return name or ""


class Guard:
    """ASGI middleware: the Host and Origin checks and the bearer token, before any route.

    A rejected request gets 400 (bad Host), 403 (foreign Origin) or 401 (token) with a JSON
    body saying why (a JSON-RPC error object on `/rpc`), and reaches no route.
    """

    def __init__(self, app: ASGIApp, *, token: str, allowed_hosts: Iterable[str]) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self.allowed_hosts = frozenset(h.lower().strip("[]") for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # the last of repeated headers wins: they are checked
        host = headers.get(b"host", b"").decode("latin-1")
        path = scope["path"]
        if _host_name(host) not in self.allowed_hosts:
            await reject(send, path, 400, f"Host {host!r} is not allowed")
            return
        origin = headers.get(b"origin")
        if origin is not None and urlsplit(origin.decode("latin-1")).netloc.lower() \
                != host.lower():
            await reject(send, path, 403, f"cross-origin request from "
                                          f"{origin.decode('latin-1')!r} refused")
            return
        public = scope["method"] in ("GET", "HEAD") and (
            path == PUBLIC_PATHS[0] or path.startswith(PUBLIC_PATHS[1]))
        if not public and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                  self._expected):
            await reject(send, path, 401, "missing or wrong bearer token",
                         [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


_encoder = msgspec.json.Encoder()


async def reject(send: Any, path: str, status: int, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer `status` with a JSON body saying why: a JSON-RPC error object on `/rpc`."""
    if path == "/rpc":
        body = _encoder.encode({"jsonrpc": "2.0", "id": None,
                                "error": {"code": -32600, "message": message}})
    else:
        body = _encoder.encode({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
