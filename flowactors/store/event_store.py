"""`EventStore`: one open log, the facade over the store's parts.

One SQLite file holds everything. Rows are never updated or deleted: triggers in the file
itself raise on UPDATE and DELETE (`schema`), so the rule holds for any connection, not only
ours. Each event row carries a SHA-256 chained over the previous row's hash and all its own
columns (`chain`), so `verify` (`integrity`) detects an edited, removed or reordered row.

Ownership: one owner (`connections.OwnerLock`) writes events, through the group-commit
`writer`. Read-only opens read freely (`reader`), even while the owner writes. A "requester"
open may only add requests (control commands, forks) to the `inbox`, which the owner reads and answers.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal


from ..codec import digest as content_digest
from ..codec import encode_append
from ..control import ForkRequest, RequestCommand
from ..errors import FlowError, LogCorrupted, LogNotFound, StoreUnavailable
from ..events import Event, RecordedEvent
from ..ports import Answer, Outcome, Request, VerifyReport
from . import blobs, inbox, integrity
from .blobs import SqliteCheckpoints
from .chain import GENESIS_HASH
from .connections import (
    OwnerLock,
    ReaderPool,
    close_owner,
    connect_owner,
    connect_requester,
    connect_ro,
)
from .open_check import OpenCheck
from .reader import Reader
from .schema import FORMAT_VERSION, check_header, check_schema, create_log_file, migrate
from .writer import Writer, _Append, _Call
from ..logs import get_logger

log = get_logger(__name__)

Mode = Literal["owner", "readonly", "requester"]
Synchronous = Literal["full", "normal", "off"]
_MODES = ("owner", "readonly", "requester")
_SYNCHRONOUS = ("full", "normal", "off")


class EventStore:
    """An open flowactors log: an `EventLog`, a `ControlInbox` and (through `checkpoints`)
    a `CheckpointStore` in one file (see `flowactors.ports`).

    Args:
        path: the SQLite file.
        mode: "owner" (the only writer of events; creates a missing log; takes the exclusive
            lock `<path>.lock`), "readonly" (reads only; never creates or changes the file) or
            "requester" (reads, and adds control requests to the inbox).
        synchronous: SQLite's `synchronous` for the owner's writes: "full" (durable against
            power loss, the default), "normal" (durable against a crash of the process) or "off".

    Raises:
        StoreLocked: mode "owner" and another open (in any process) owns the log.
        LogNotFound: mode "readonly" or "requester" and there is no file.
        LogCorrupted: the file is not a flowactors log, or has a newer format; it is not changed.

    The store is thread-safe. Use it as a context manager or call `close()`.
    """

    def __init__(self, path: str | os.PathLike[str], *, mode: Mode = "owner",
                 synchronous: Synchronous = "full") -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, not {synchronous!r}")
        self.path = os.fspath(path)
        self.mode: Mode = mode
        self.synchronous: Synchronous = synchronous
        self._closed = False
        self._pool = ReaderPool(self.path)
        self._reader = Reader(self.path, self._pool)
        self._lock: OwnerLock | None = None
        self._writer: Writer | None = None
        self._conn: sqlite3.Connection | None = None  # the requester's writes
        self._conn_lock = threading.Lock()  # serialises the requester's writes
        try:
            if mode == "owner":
                self._open_owner()
            else:
                self._open_other()
        except BaseException:
            self._release_resources()
            raise
        log.info("store_opened", path=self.path, mode=mode, synchronous=synchronous,
                 head_position=self._writer.head[0] if self._writer is not None else None)

    # --- opening and closing ---

    def _open_owner(self) -> None:
        check_header(self.path)  # before creating anything next to a foreign file
        self._lock = OwnerLock(self.path)
        exists = check_header(self.path)  # again: it may have changed before we held the lock
        if exists:
            self._validate_read_only()
        else:
            try:
                create_log_file(self.path)
            except (OSError, sqlite3.Error) as exc:
                raise StoreUnavailable(f"cannot create a log at {self.path}: {exc}") from None
            log.info("log_created", path=self.path, format_version=FORMAT_VERSION)
        conn, mode = connect_owner(self.path, self.synchronous)
        try:
            if mode != "wal":
                raise StoreUnavailable(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            check_schema(self.path, conn)
            if migrate(conn):
                log.info("log_migrated", path=self.path, change="inbox takes forks")
            head = self._reader.head() if exists else (0, GENESIS_HASH)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        self._writer = Writer(self.path, conn, head)
        self._writer.start()

    def _open_other(self) -> None:
        if not check_header(self.path):
            if os.path.exists(self.path):
                if os.path.getsize(self.path) == 0:
                    raise LogCorrupted(f"{self.path} is an empty file, not a flowactors log")
                raise LogCorrupted(
                    f"{self.path} is an empty SQLite database, not a flowactors log (its "
                    f"creation never committed, or the -wal file that held it is lost)")
            raise LogNotFound(f"no flowactors log at {self.path}")
        self._validate_read_only()
        if self.mode == "requester":
            self._conn = connect_requester(self.path, self.synchronous)

    def _validate_read_only(self) -> None:
        """Check the schema through a read-only connection, which never changes the file."""
        try:
            conn = connect_ro(self.path)
        except sqlite3.Error as exc:
            raise LogCorrupted(f"{self.path} is not a readable flowactors log: {exc}") from None
        try:
            check_schema(self.path, conn)
        finally:
            conn.close()

    def close(self) -> None:
        """Finish queued appends, stop the writer, close every connection; idempotent.

        A closed log is one file: the owner leaves no `-wal` or `-shm` beside it (unless
        another process was reading it at that moment). Appends made after close() raise
        StoreUnavailable.
        """
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.stop()
        self._release_resources()
        log.info("store_closed", path=self.path, mode=self.mode)

    def _release_resources(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.stop()  # a failed open, or close(): both threads end
        self._pool.close()
        if writer is not None and writer.conn is not None:
            close_owner(self.path, writer.conn)
            writer.conn = None  # type: ignore[assignment]
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def _readers(self) -> Any:
        """The open read connections (tests check that ended threads' ones closed)."""
        return self._pool.readers

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventStore({self.path!r}, mode={self.mode!r})"

    # --- appending (owner) ---

    def append(self, stream: str, events: Iterable[Event], expected_version: int, *,
               blobs: Iterable[bytes] = (), releases: Iterable[str] = ()
               ) -> list[RecordedEvent]:
        """Append events to a stream, durably; return them as recorded.

        Args:
            stream: the job id; a non-empty string.
            events: at least one event.
            expected_version: the stream's version this append was decided on (0: new stream).
            blobs: payloads to store in the same transaction; the stream references each by
                its digest (`codec.digest`).
            releases: digests the stream no longer references; a blob that no stream references
                any more is deleted in the same transaction.

        Raises:
            ConcurrencyConflict: the stream is not at `expected_version`; nothing was written.
            StoreUnavailable: the transaction failed (e.g. disk full) or the store is closed.
            ValueError, TypeError: bad arguments.
        """
        return self._submit(stream, events, expected_version, blobs, releases).result()

    def append_many(self, appends: Sequence[tuple[str, Sequence[Event], int]]
                    ) -> list[list[RecordedEvent] | FlowError]:
        """Append to many streams at once, as `append` does for one: all are queued before
        any is waited for, so they share group commits (a restarted runtime records the
        recovery of a thousand jobs this way, in one transaction instead of a thousand).

        Returns, for each append in order, its recorded events or the FlowError that refused
        it (ConcurrencyConflict, StoreUnavailable); one append's refusal fails no other.
        """
        queued = [self._submit(stream, events, expected) for stream, events, expected in appends]
        results: list[list[RecordedEvent] | FlowError] = []
        for item in queued:  # every one, in order: each passes the wake-up on to the next
            try:
                results.append(item.result())
            except FlowError as exc:
                results.append(exc)
        return results

    def _submit(self, stream: str, events: Iterable[Event], expected_version: int,
                blobs: Iterable[bytes] = (), releases: Iterable[str] = ()) -> _Append:
        """Queue an append without waiting; `.result()` waits (the two halves of `append`)."""
        events, encoded = encode_append(stream, expected_version, events)
        blob_rows = [(content_digest(blob), bytes(blob)) for blob in blobs] if blobs else []
        released = list(releases) if releases else []
        if released and not all(type(d) is str for d in released):
            raise TypeError(f"releases of stream {stream!r} must be digests (str)")
        item = _Append(stream, expected_version, events, encoded, blob_rows, released)
        self._owner_writer("append").submit(item)
        return item

    def _call_in_writer(self, fn: Callable[[sqlite3.Connection], Any]) -> _Call:
        """Queue `fn(connection)` to run in the writer thread, between batches."""
        return self._owner_writer("write").call(fn)

    def _owner_writer(self, what: str) -> Writer:
        if self._writer is None:
            raise self._not_writable(what)
        return self._writer

    def _not_writable(self, what: str) -> StoreUnavailable:
        if self._writer is not None:
            return self._writer.not_writable(what)
        if self._closed:
            return StoreUnavailable(f"{self.path}: the store is closed, cannot {what}")
        return StoreUnavailable(
            f"{self.path} is open in mode {self.mode!r}: only the owner can {what}")

    # --- reading (every mode) ---

    def read_all(self, from_position: int = 1, to_position: int | None = None, *,
                 verify_chain: bool = False, hashes: bool = True) -> Iterator[RecordedEvent]:
        """Yield recorded events in position order, from `from_position` to `to_position`
        (inclusive; None: to the end of the log, including events appended meanwhile).

        Reads in chunks of positions, each from a fresh snapshot, so a long replay does not
        hold one read transaction (which would keep the WAL from being checkpointed).

        Args:
            verify_chain: also recompute each row's hash from the previous one (from the
                start of the log), so edited, removed or reordered events are refused, not
                served: what a runtime does when it opens a log.
            hashes: False leaves each event's `hash` empty: a replay that does not need them
                (its chain checked elsewhere) reads a sixth less.

        Raises:
            LogCorrupted: a row does not decode, or (verify_chain) breaks the hash chain; the
                message names its position.
        """
        return self._reader.read_all(from_position, to_position, verify_chain, hashes)

    def read_stream(self, stream: str, from_version: int = 1) -> Iterator[RecordedEvent]:
        """Yield one stream's recorded events in version order, from `from_version`.

        Raises:
            LogCorrupted: a row does not decode (the message names its position).
        """
        return self._reader.read_stream(stream, from_version)

    def stored_stream(self, stream: str, from_version: int = 1
                      ) -> Iterator[tuple[int, int, str, int, bytes]]:
        """One stream's rows as stored, in version order: (position, version, type,
        schema_version, data), for a reader that decodes a few (`codec.decode_event`)."""
        return self._reader.stored_stream(stream, from_version)

    def read_types(self, types: Sequence[str]) -> Iterator[RecordedEvent]:
        """Every event of these types (tags), in position order: a scan of one column, for
        the few kinds of event a check needs out of a long log."""
        return self._reader.read_types(types)

    def stored_rows(self, from_position: int = 1, to_position: int | None = None,
                    stream: str | None = None) -> Iterator[tuple[Any, ...]]:
        """Rows exactly as stored, not decoded: (position, stream, version, type,
        schema_version, recorded_at as text, data as MessagePack), up to the head now."""
        end = self.head()[0] if to_position is None else to_position
        return self._reader.stored_rows(from_position, end, stream)

    def stream_version(self, stream: str) -> int:
        """The stream's head version: the version of its last event, 0 if it has none."""
        known = self._writer.heads.get(stream) if self._writer is not None else None
        if known is not None:
            return known
        return self._reader.stream_version(stream)

    def streams_starting_with(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` streams whose name starts with `prefix`, in name order (a range scan
        of the events index over each stream's first event)."""
        return self._reader.streams_starting_with(prefix, limit)

    def streams(self) -> dict[str, int]:
        """Every stream with its head version."""
        return self._reader.streams()

    def head(self) -> tuple[int, str]:
        """(position of the last event, its hash as hex); (0, 64 zeros) for an empty log."""
        position, hash_ = self._writer.head if self._writer is not None else self._reader.head()
        return position, hash_.hex()

    def check_chain(self, to_position: int | None = None) -> None:
        """Recompute the hash chain (up to `to_position`), without decoding events.

        Raises:
            LogCorrupted: naming the first row that breaks the chain, or a row unreadable.
        """
        self._reader.check_chain(to_position)

    def check_meanwhile(self, *, chain_process: bool) -> OpenCheck:
        """Start checking what a replay of the whole log does not check itself, while the
        caller replays `OpenCheck.events()`; see `OpenCheck`.

        Args:
            chain_process: also check the hash chain, in a process of its own (worth it for a
                long log on a machine with a second core). If the process cannot start, or
                not asked, `OpenCheck.checks_chain` is False: replay with `verify_chain`.
        """
        head = self._writer.head if self._writer is not None else self._reader.head()
        return OpenCheck(self.path, self._reader, head, chain_process)

    def verify(self, expected_head: str | None = None, *,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Check the whole log: the hash chain over every column of every event, gap-free
        positions, contiguous versions per stream, that every event decodes, every blob matches
        its address and every referenced blob exists, and SQLite's integrity_check.

        Args:
            expected_head: a head hash recorded earlier (e.g. printed by a previous verify). The
                log must still contain it — at its head, or earlier if the log grew since — else
                its tail was cut off or its chain rewritten.
            progress: called as progress(events_done, events_total) after each chunk.

        Returns the first problem found; never raises for a corrupt log.
        """
        return integrity.verify(self.path, connect_ro(self.path), expected_head, progress)

    # --- blobs ---

    def get_blob(self, digest: str) -> bytes:
        """The blob stored under this digest.

        Raises:
            BlobNotFound: no such blob (never stored, or released and deleted).
            LogCorrupted: the stored bytes do not hash to their address.
        """
        return blobs.checked(self.path, digest, self._reader.query(blobs.SELECT_DATA, (digest,)))

    def has_blob(self, digest: str) -> bool:
        """Whether a blob is stored under this digest."""
        return bool(self._reader.query(blobs.SELECT_EXISTS, (digest,)))

    @property
    def checkpoints(self) -> SqliteCheckpoints:
        """The blobs of this log as a `CheckpointStore` (writes: owner only)."""
        return SqliteCheckpoints(self)

    # --- the inbox ---

    def request(self, job_id: str, command: RequestCommand,
                fork: ForkRequest | None = None) -> int:
        """Leave a request (a fork's with its ForkRequest) for the owner; return its id.
        Modes "requester" and "owner".

        Raises:
            InvalidRequest: an unknown command, a fork without its arguments (or another
                command with some), a job_id that is not a non-empty str the log can store.
            StoreUnavailable: read-only open, closed store, the write failed, or a fork to a
                log whose inbox does not take forks (an older owner).
        """
        args = inbox.check_request(job_id, command, fork)
        return self._inbox_write(inbox.insert_request(self.path, job_id, command, args),
                                 "request")

    def answer(self, request_id: int, outcome: Outcome, reason: str = "") -> None:
        """Record the owner's decision on a request (owner only).

        Raises:
            ValueError: outcome is not applied or rejected.
            InvalidTransition: no such request, or it is answered already.
        """
        inbox.check_outcome(outcome)
        if self.mode != "owner":
            raise self._not_writable("answer requests")
        self._inbox_write(inbox.insert_answer(self.path, request_id, outcome, reason),
                          "answer requests")

    def _inbox_write(self, fn: Callable[[sqlite3.Connection], Any], what: str) -> Any:
        try:
            if self.mode == "owner":
                return self._call_in_writer(fn).result()
            if self.mode != "requester":
                raise self._not_writable(what)
            with self._conn_lock:
                if self._conn is None:
                    raise self._not_writable(what)
                return fn(self._conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: cannot {what}: {exc}") from None

    def pending_requests(self, after_id: int = 0) -> list[Request]:
        """Requests with an id above `after_id` that have no answer yet, oldest first."""
        return inbox.requests_of(self.path, self._reader.query(inbox.SELECT_PENDING,
                                                               (after_id,)))

    def answer_of(self, request_id: int) -> Answer | None:
        """The answer to a request, or None while it is pending (or unknown)."""
        return inbox.answer_from(self.path, request_id,
                                 self._reader.query(inbox.SELECT_ANSWER, (request_id,)))
