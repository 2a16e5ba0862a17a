"""Helpers for the server's tests: a runtime served on a free loopback port, a JSON-RPC call,
and a Server-Sent Events reader (all bounded by timeouts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec

from flowactors import Runtime
from flowactors.server import BackgroundServer, create_app

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def served(runtime: Runtime, **options: Any) -> Iterator[tuple[BackgroundServer, httpx.Client]]:
    """The runtime's app served by uvicorn on a free port, and a client carrying the token.
    The server stops (bounded) on exit; the caller closes the runtime."""
    app = create_app(runtime, token=TOKEN, **options)
    with BackgroundServer(app) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=15) as client:
        yield server, client


def rpc(client: httpx.Client, method: str, request_id: Any = 1, **params: Any) -> dict:
    """One JSON-RPC call; returns the whole response object."""
    response = client.post("/rpc", json={"jsonrpc": "2.0", "id": request_id,
                                         "method": method, "params": params})
    assert response.status_code == 200, response.text
    return response.json()


def result(client: httpx.Client, method: str, **params: Any) -> Any:
    """A call's result; fails the test on an error object."""
    answer = rpc(client, method, **params)
    assert "error" not in answer, answer
    return answer["result"]


def spec_json(spec: Any) -> dict:
    return msgspec.to_builtins(spec)


class Frame(msgspec.Struct):
    id: int | None
    data: dict | None
    raw: bytes


def frames(response: httpx.Response) -> Iterator[Frame]:
    """The SSE frames of a streaming response, as they arrive (comments and `retry:` are
    skipped)."""
    buffer = b""
    for chunk in response.iter_bytes():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            fields = dict(line.split(b": ", 1) for line in block.split(b"\n")
                          if b": " in line and not line.startswith(b":"))
            if b"data" in fields:
                yield Frame(id=int(fields[b"id"]) if b"id" in fields else None,
                            data=json.loads(fields[b"data"]), raw=block)
