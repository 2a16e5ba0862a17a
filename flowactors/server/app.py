"""`create_app(runtime, *, token)`: the ASGI app serving one Runtime.

A thin shell over the Runtime, like the CLI: `POST /rpc` (JSON-RPC 2.0, `rpc`), `GET /events`
(Server-Sent Events from the log, `events`), `GET /metrics` (Prometheus, `metrics`),
`GET /healthz`, and the dashboard (`static/`) at `/`. Every request passes the `Guard` first
(Host, Origin, bearer token). The app does not own the runtime: whoever opened it closes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..runtime import Runtime
from . import rpc
from .events import EventHub, EventStream
from .metrics import CONTENT_TYPE, Tally, render
from .security import LOOPBACK_HOSTS, Guard

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20


def create_app(runtime: Runtime, *, token: str, allowed_hosts: Iterable[str] = LOOPBACK_HOSTS,
               max_body_bytes: int = MAX_BODY_BYTES, max_streams: int = 64,
               event_buffer: int = 10_000) -> Any:
    """The ASGI app serving `runtime`: mount it in any ASGI server.

    Args:
        runtime: an open Runtime; the app serves it and never closes it.
        token: the bearer token every data request must carry (see `load_or_create_token`).
        allowed_hosts: names the Host header may carry (loopback names by default).
        max_body_bytes: the largest request body accepted (413 beyond).
        max_streams: `/events` streams open at once (503 beyond).
        event_buffer: recent events kept encoded in memory for the streams; a stream further
            behind reads the log.
    """
    tally = Tally()
    hub = EventHub(runtime, max_subscribers=max_streams, buffer_size=event_buffer,
                   on_events=tally)

    async def call_rpc(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _rpc_error(415, "the body must be JSON (Content-Type: application/json)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return _too_large(max_body_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _too_large(max_body_bytes)
        try:
            parsed = rpc.parse(bytes(body))
        except rpc.RpcError as exc:
            return _json(200, rpc.encode(rpc.ErrorResponse(error=exc.error, id=None)))
        if isinstance(parsed, list):
            answers = [a for raw in parsed
                       if (a := await rpc.handle(runtime, raw, run_in_threadpool)) is not None]
            return _json(200, rpc.encode(answers)) if answers else Response(status_code=204)
        answer = await rpc.handle(runtime, parsed, run_in_threadpool)
        return Response(status_code=204) if answer is None else _json(200, rpc.encode(answer))

    async def metrics(request: Request) -> Response:
        hub.start()
        body = render(runtime, tally, streams=hub.subscribers, log_position=hub.log_head())
        return Response(body, media_type=CONTENT_TYPE)

    async def healthz(request: Request) -> Response:
        if runtime.closing:
            return JSONResponse({"status": "closed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def dashboard(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.start()
        try:
            yield
        finally:
            await hub.close()

    app = Starlette(
        routes=[
            Route("/rpc", call_rpc, methods=["POST"]),
            Route("/events", EventStream(hub), methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/", dashboard, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(Guard, token=token, allowed_hosts=allowed_hosts)],
        lifespan=lifespan,
    )
    app.state.hub = hub
    return app


# The page runs only our own script, and is never framed by another site.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


def _json(status: int, body: bytes) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def _rpc_error(status: int, message: str) -> Response:
    error = rpc.Error(code=rpc.INVALID_REQUEST, message=message)
    return _json(status, rpc.encode(rpc.ErrorResponse(error=error, id=None)))


def _too_large(limit: int) -> Response:
    return _rpc_error(413, f"the request body is over the limit of {limit} bytes")
