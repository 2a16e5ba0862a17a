"""In-memory implementations of the ports (`flowactors.ports`): an event log, a control inbox
and a checkpoint store that hold everything in this process.

They pass the same contract suite as the SQLite log (`tests/test_ports.py`), so a test of
something above the log can run without a file where a file adds nothing. Nothing here is
durable beyond the process; the hash chain and head are the SQLite log's, row for row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone

from .codec import decode_event, encode_append
from .codec import digest as content_digest
from .control import ForkRequest, RequestCommand
from .errors import (
    BlobNotFound,
    ConcurrencyConflict,
    FlowError,
    InvalidTransition,
    LogCorrupted,
    StoreUnavailable,
)
from .events import Event, RecordedEvent
from .ports import Answer, Outcome, Request, VerifyReport
from .store import inbox as sqlite_inbox
from .store.chain import GENESIS_HASH, row_hash

__all__ = ["MemoryCheckpoints", "MemoryEventLog", "MemoryInbox"]


class MemoryCheckpoints:
    """A `CheckpointStore` in a dict."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        data = bytes(data)
        address = content_digest(data)
        with self._lock:
            self._data.setdefault(address, data)
        return address

    def get(self, address: str) -> bytes:
        with self._lock:
            data = self._data.get(address)
        if data is None:
            raise BlobNotFound(f"no checkpoint {address} in memory")
        actual = content_digest(data)
        if actual != address:
            raise LogCorrupted(f"checkpoint {address} does not match its address (its content "
                               f"hashes to {actual})")
        return data

    def has(self, address: str) -> bool:
        with self._lock:
            return address in self._data

    def delete(self, address: str) -> bool:
        with self._lock:
            self._data.pop(address, None)
        return True


class MemoryEventLog:
    """An `EventLog` in a list, with blobs referenced per stream as the SQLite log does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[tuple[RecordedEvent, tuple[str, int, bytes]]] = []
        self._versions: dict[str, int] = {}
        self._head = (0, GENESIS_HASH)
        self._refs: dict[str, set[str]] = {}  # digest -> the streams that reference it
        self.checkpoints = MemoryCheckpoints()
        self.path = "<memory>"
        self._closed = False

    def append(self, stream: str, events: Iterable[Event], expected_version: int, *,
               blobs: Iterable[bytes] = (), releases: Iterable[str] = ()
               ) -> list[RecordedEvent]:
        events, encoded = encode_append(stream, expected_version, events)
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the in-memory log is closed, cannot append")
            current = self._versions.get(stream, 0)
            if current != expected_version:
                raise ConcurrencyConflict(
                    f"stream {stream!r} is at version {current}, the append expected "
                    f"{expected_version} (in memory); nothing was written")
            now = datetime.now(timezone.utc)
            ts = now.isoformat(timespec="microseconds")
            position, prev = self._head
            recorded = []
            for version, (event, (type_, schema_version, data)) in enumerate(
                    zip(events, encoded), start=current + 1):
                position += 1
                prev = row_hash(prev, position, stream, version, type_, schema_version, ts, data)
                one = RecordedEvent(position=position, stream=stream, version=version,
                                    type=type_, schema_version=schema_version, recorded_at=now,
                                    event=event, hash=prev.hex())  # type: ignore[arg-type]
                self._rows.append((one, (ts, schema_version, data)))
                recorded.append(one)
            self._head = (position, prev)
            self._versions[stream] = current + len(events)
            for digest in releases:
                holders = self._refs.get(digest, set())
                holders.discard(stream)
                if not holders:
                    self._refs.pop(digest, None)
                    self.checkpoints.delete(digest)
            for blob in blobs:
                self._refs.setdefault(self.checkpoints.put(blob), set()).add(stream)
        return recorded

    def append_many(self, appends: Sequence[tuple[str, Sequence[Event], int]]
                    ) -> list[list[RecordedEvent] | FlowError]:
        results: list[list[RecordedEvent] | FlowError] = []
        for stream, events, expected in appends:
            try:
                results.append(self.append(stream, events, expected))
            except FlowError as exc:
                results.append(exc)
        return results

    def read_all(self, from_position: int = 1, to_position: int | None = None
                 ) -> Iterator[RecordedEvent]:
        start = max(from_position, 1) - 1
        with self._lock:
            rows = self._rows[start:to_position]
        return (recorded for recorded, _ in rows)

    def read_stream(self, stream: str, from_version: int = 1) -> Iterator[RecordedEvent]:
        if type(stream) is not str:
            raise TypeError(f"stream must be a str, not {stream!r}")
        with self._lock:
            rows = list(self._rows)
        return (r for r, _ in rows if r.stream == stream and r.version >= from_version)

    def read_types(self, types: Sequence[str]) -> Iterator[RecordedEvent]:
        """Every event of these types (tags), in position order."""
        wanted = frozenset(types)
        with self._lock:
            rows = list(self._rows)
        return (r for r, _ in rows if r.type in wanted)

    def stream_version(self, stream: str) -> int:
        with self._lock:
            return self._versions.get(stream, 0)

    def streams(self) -> dict[str, int]:
        with self._lock:
            return dict(self._versions)

    def head(self) -> tuple[int, str]:
        with self._lock:
            position, hash_ = self._head
        return position, hash_.hex()

    def get_blob(self, digest: str) -> bytes:
        return self.checkpoints.get(digest)

    def has_blob(self, digest: str) -> bool:
        return self.checkpoints.has(digest)

    def verify(self, expected_head: str | None = None, *,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Recompute the chain from the encoded rows, and check they decode."""
        expected = bytes.fromhex(expected_head) if expected_head is not None else None
        with self._lock:
            rows = list(self._rows)
            blobs = list(self._refs)
        prev, found = GENESIS_HASH, expected == GENESIS_HASH
        versions: dict[str, int] = {}
        checked = 0

        def report(problem: str | None = None, at: int | None = None) -> VerifyReport:
            return VerifyReport(ok=problem is None, events_checked=checked,
                                blobs_checked=len(blobs) if problem is None else 0,
                                head_position=len(rows), head_hash=prev.hex(),
                                first_bad_position=at, problem=problem)

        for position, (recorded, (ts, schema_version, data)) in enumerate(rows, 1):
            prev = row_hash(prev, position, recorded.stream, recorded.version, recorded.type,
                            schema_version, ts, data)
            if prev.hex() != recorded.hash or recorded.position != position:
                return report(f"event at position {position} does not match its hash", position)
            if recorded.version != versions.get(recorded.stream, 0) + 1:
                return report(f"stream {recorded.stream!r} skips a version at position "
                              f"{position}", position)
            versions[recorded.stream] = recorded.version
            try:
                decode_event(recorded.type, schema_version, data)
            except LogCorrupted as exc:
                return report(f"event at position {position} does not decode: {exc}", position)
            found = found or prev == expected
            checked += 1
        if progress is not None:
            progress(checked, len(rows))
        if expected is not None and not found:
            return report(f"the expected head hash {expected.hex()} is not in the chain",
                          len(rows) + 1)
        for digest in blobs:
            try:
                self.checkpoints.get(digest)
            except (BlobNotFound, LogCorrupted) as exc:
                return report(str(exc))
        return report()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def __enter__(self) -> MemoryEventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MemoryInbox:
    """A `ControlInbox` in two lists."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._answers: dict[int, Answer] = {}

    def request(self, job_id: str, command: RequestCommand,
                fork: ForkRequest | None = None) -> int:
        args = sqlite_inbox.check_request(job_id, command, fork)
        with self._lock:
            request = Request(id=len(self._requests) + 1, job_id=job_id, command=command,
                              requested_at=datetime.now(timezone.utc), args=args)
            self._requests.append(request)
        return request.id

    def pending_requests(self, after_id: int = 0) -> list[Request]:
        with self._lock:
            return [r for r in self._requests[after_id:] if r.id not in self._answers]

    def answer(self, request_id: int, outcome: Outcome, reason: str = "") -> None:
        sqlite_inbox.check_outcome(outcome)
        with self._lock:
            if not 1 <= request_id <= len(self._requests):
                raise InvalidTransition(f"no request {request_id} in memory")
            if request_id in self._answers:
                raise InvalidTransition(f"request {request_id} in memory is already answered")
            self._answers[request_id] = Answer(request_id=request_id, outcome=outcome,
                                               reason=reason,
                                               answered_at=datetime.now(timezone.utc))

    def answer_of(self, request_id: int) -> Answer | None:
        with self._lock:
            return self._answers.get(request_id)
