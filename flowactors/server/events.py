"""Server-Sent Events driven by the log: `GET /events`.

One `EventHub` per app tails the log in position order: it polls the runtime's head position
(kept in memory by the store, no query) and reads the new events from the log itself, so what it
serves is exactly what was committed, gap-free and in order, whichever job wrote it. Each event
is encoded once (its `flowactors export` line) and kept in a bounded buffer of recent frames.

A subscriber is a cursor: a log position. It takes the frames after its cursor from the buffer,
or, when it is further behind than the buffer reaches, reads them from the log; then it waits
for the hub's next read. Each frame's `id:` is its position, so a client that reconnects with
`Last-Event-ID` resumes right after the last event it received: it misses nothing and sees
nothing twice. A slow subscriber holds no queue: it is just a cursor further back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs

import msgspec
from starlette.concurrency import run_in_threadpool

from ..errors import FlowError, JobNotFound
from ..events import RecordedEvent
from ..logs import get_logger
from ..history import history_line
from ..runtime import Runtime

log = get_logger(__name__)

Frame = tuple[int, str, bytes]  # position, job id, the encoded SSE frame
_json = msgspec.json.Encoder()


def frame_of(recorded: RecordedEvent) -> Frame:
    """One SSE frame: `id:` the log position, `data:` the event's export line."""
    return (recorded.position, recorded.stream,
            b"id: %d\ndata: %s\n\n" % (recorded.position, history_line(recorded)))


class EventHub:
    """Tails the log for every SSE subscriber of one app.

    Args:
        runtime: the runtime whose log is served.
        max_subscribers: streams open at once; more are refused with 503.
        buffer_size: recent frames kept in memory; a subscriber further behind reads the log.
        poll_interval: seconds between looks at the log's head position.
        chunk: events read from the log at a time.
        on_events: called (on a worker thread) with each batch of events read, in order.
    """

    def __init__(self, runtime: Runtime, *, max_subscribers: int = 64,
                 buffer_size: int = 10_000, poll_interval: float = 0.005, chunk: int = 1000,
                 keepalive: float = 15.0,
                 on_events: Callable[[Sequence[RecordedEvent]], None] | None = None) -> None:
        self.runtime = runtime
        self.max_subscribers = max_subscribers
        self.buffer_size = buffer_size
        self.poll_interval = poll_interval
        self.chunk = chunk
        self.keepalive = keepalive
        self.on_events = on_events
        self.head = 0  # every event up to here has been read (and is buffered, or older)
        self.subscribers = 0
        self.closed = False
        self._frames: list[Frame] = []
        self._tick: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # --- the tail ---

    def start(self) -> None:
        """Start tailing from the log's current head, on the running event loop (once)."""
        if self._task is None:
            self.head = self.log_head()
            self._tick = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop tailing; open streams end."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._wake()

    def log_head(self) -> int:
        return self.runtime.store.head()[0]

    async def _run(self) -> None:
        try:
            while not self.closed:
                if self.log_head() <= self.head:
                    await asyncio.sleep(self.poll_interval)
                    continue
                frames = await run_in_threadpool(self._read, self.head)
                if frames:
                    self._frames.extend(frames)
                    if len(self._frames) > 2 * self.buffer_size:
                        del self._frames[:-self.buffer_size]
                    self.head = frames[-1][0]
                    self._wake()
        except FlowError as exc:  # the runtime closed its log, or cannot read it
            if not self.runtime.closing:
                log.error("event_tail_failed", error=str(exc))
        finally:
            self.closed = True
            self._wake()

    def _read(self, after: int) -> list[Frame]:
        events = list(self.runtime.store.read_all(after + 1, after + self.chunk, hashes=False))
        if events and self.on_events is not None:
            self.on_events(events)
        return [frame_of(r) for r in events]

    def _wake(self) -> None:
        if self._tick is not None:
            self._tick.set()
            self._tick = asyncio.Event()

    # --- subscribers ---

    def frames_after(self, cursor: int) -> list[Frame] | None:
        """The buffered frames after `cursor` ([] when there are none yet); None when the
        buffer no longer reaches back to it."""
        frames = self._frames
        if not frames or cursor >= self.head:
            return [] if cursor >= self.head else None
        first = frames[0][0]
        if cursor + 1 < first:
            return None
        return frames[cursor + 1 - first:]

    def read_log(self, cursor: int) -> list[Frame]:
        """Frames after `cursor` read from the log (up to the hub's head), for a subscriber
        the buffer no longer covers."""
        end = min(cursor + self.chunk, self.head)
        return [frame_of(r) for r in self.runtime.store.read_all(cursor + 1, end, hashes=False)]

    async def wait(self, timeout: float) -> None:
        """Until the hub reads new events (or closes), at most `timeout` seconds."""
        tick = self._tick
        if tick is None or self.closed:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tick.wait(), timeout)


class EventStream:
    """The ASGI endpoint of `GET /events[?job=ID][&after=POSITION]`.

    The stream starts after `Last-Event-ID` (a reconnect), else after `?after=` (0: the whole
    log), else at the log's head (only what comes next).
    """

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        hub = self.hub
        hub.start()
        try:
            job, cursor = self._parse(scope)
        except ValueError as exc:
            await _reply(send, 400, str(exc))
            return
        except JobNotFound as exc:
            await _reply(send, 404, str(exc))
            return
        if hub.subscribers >= hub.max_subscribers:
            await _reply(send, 503, f"too many event streams open (at most "
                                    f"{hub.max_subscribers}); try again later",
                         [(b"retry-after", b"1")])
            return
        hub.subscribers += 1
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            await send({"type": "http.response.body", "body": b"retry: 1000\n\n",
                        "more_body": True})
            loop = asyncio.get_running_loop()
            stream = loop.create_task(self._stream(send, job, cursor))
            gone = loop.create_task(_disconnected(receive))
            done, pending = await asyncio.wait({stream, gone},
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if stream in done:
                stream.result()  # an OSError: the client went away mid-write
                await send({"type": "http.response.body", "body": b""})  # the hub closed
        except OSError:  # the client went away mid-write
            pass
        finally:
            hub.subscribers -= 1

    def _parse(self, scope: dict[str, Any]) -> tuple[str | None, int]:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        job = query.get("job", [None])[-1]
        if job is not None:
            self.hub.runtime.status(job)  # JobNotFound
        last_id = dict(scope["headers"]).get(b"last-event-id")
        after = last_id.decode("latin-1") if last_id else query.get("after", [None])[-1]
        if after is None:
            return job, self.hub.log_head()
        try:
            cursor = int(after)
            if cursor < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"Last-Event-ID / after must be a log position, got {after!r}"
                             ) from None
        head = self.hub.log_head()
        if cursor > head:
            raise ValueError(f"position {cursor} is beyond the log's head ({head})")
        return job, cursor

    async def _stream(self, send: Any, job: str | None, cursor: int) -> None:
        hub = self.hub
        while True:
            frames = hub.frames_after(cursor)
            if frames is None:
                frames = await run_in_threadpool(hub.read_log, cursor)
            if frames:
                cursor = frames[-1][0]
                body = b"".join(f for _, stream, f in frames if job is None or stream == job)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                continue
            if hub.closed:
                return
            before = hub.head
            await hub.wait(hub.keepalive)
            if hub.head == before and not hub.closed:
                await send({"type": "http.response.body", "body": b": keep-alive\n\n",
                            "more_body": True})


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reply(send: Any, status: int, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _json.encode({"error": message})
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
