"""The append-only SQLite event log: events, content-addressed blobs, the control inbox.

One SQLite file in WAL mode holds everything. Rows are never updated or deleted: triggers in the
file itself raise on UPDATE and DELETE, so the rule holds for any connection, not only ours.
Each event row carries a SHA-256 chained over the previous row's hash and all its own columns,
so `verify` detects an edited, removed or reordered row.

Writes go through one daemon writer thread (group commit): `append` encodes its events in the
caller's thread, queues them and blocks; the writer drains everything queued, checks each
append's expected version against its in-memory head map, writes all accepted appends in ONE
transaction (one fsync) and only then wakes their callers. An append therefore returns only
once it is durable, and one stream's conflict never fails another stream's append. (How the
writer keeps a hundred appending threads from stalling it on the GIL: see `_commit`,
`_Append` and `_INSERT_ROWS`.)

Ownership: one owner (an exclusive `flock` on `<path>.lock`) writes events. Read-only opens read
freely, even while the owner writes. A "requester" open may only add control requests to the
inbox (`request`), which the owner reads (`pending_requests`) and answers (`answer`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import queue
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import msgspec
import sqlite_utils

from . import chain
from .chain import GENESIS_HASH, read_only_uri, row_hash
from .codec import decode_event, encode_event
from .logs import get_logger
from .codec import digest as content_digest
from .errors import (
    BlobNotFound,
    ConcurrencyConflict,
    FlowError,
    InvalidRequest,
    InvalidTransition,
    LogCorrupted,
    LogNotFound,
    StoreLocked,
    StoreUnavailable,
    one_line,
)
from .events import EVENT_TYPES, Event, IterationCompleted, RecordedEvent, event_tag
from .faults import armed, fault_point

__all__ = [
    "APPLICATION_ID",
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "Answer",
    "EventStore",
    "Request",
    "VerifyReport",
    "row_hash",
]

log = get_logger(__name__)

FORMAT_VERSION = 1
"""The layout of the file; stored in `meta` and in `PRAGMA user_version`."""
APPLICATION_ID = 0x466C4163  # b"FlAc": PRAGMA application_id, bytes 68..71 of the file header
Mode = Literal["owner", "readonly", "requester"]
Synchronous = Literal["full", "normal", "off"]
Command = Literal["pause", "resume", "cancel"]
Outcome = Literal["applied", "rejected"]

_MODES = ("owner", "readonly", "requester")
_SYNCHRONOUS = ("full", "normal", "off")
_COMMANDS = ("pause", "resume", "cancel")
_OUTCOMES = ("applied", "rejected")
_BUSY_TIMEOUT_MS = 10_000
_READ_CHUNK = 2_000  # positions per query when streaming the log
_FETCH_ROWS = 256  # rows per fetch within such a query
# The writer's connection does not checkpoint the WAL itself (copying WAL pages into the
# database file and syncing it takes a commit's time); a checkpointer thread with its own
# connection does, in parallel, every _CHECKPOINT_ROWS appended rows. The writer's own
# autocheckpoint stays on as a backstop at a much larger WAL.
_CHECKPOINT_ROWS = 4_096
_WRITER_AUTOCHECKPOINT_PAGES = 50_000
_STREAM_CHUNK = 256  # versions per query when reading one stream

_frame = msgspec.msgpack.Encoder().encode  # the writer inlines `row_hash` (its hot loop)
_sha256 = hashlib.sha256


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """A control request another process left in the inbox."""

    id: int
    job_id: str
    command: Command
    requested_at: datetime


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """The owner's decision on a request: applied, or rejected with a reason."""

    request_id: int
    outcome: Outcome
    reason: str
    answered_at: datetime


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `EventStore.verify` found. `ok` is False as soon as one problem is found."""

    ok: bool
    events_checked: int
    blobs_checked: int
    head_position: int
    head_hash: str
    first_bad_position: int | None = None
    problem: str | None = None


# --- the schema ---------------------------------------------------------------------------
#
# Key layout of `events`. `position` is the rowid, so appends land on the right edge of the
# table b-tree. Uniqueness of (stream, version) is enforced by the unique index
# events_version_stream on (version, stream): the same constraint, ordered by version first.
# Running jobs append at similar versions, so a group commit of 100 streams touches a few index
# leaves near the right edge, where (stream, version) order dirties one leaf per stream and
# commit. Measured (SQLite 3.40,
# synchronous=FULL, 100 interleaved streams, 4 events per stream and commit, rows/s):
#                                              (stream, version)   (version, stream)
#   fresh log, 400-row commits                       130k                187k
#   fresh log, 100-row commits                       105k                154k
#   2000 finished 60-event jobs, 400-row commits      62k                136k
#   5000 finished 200-event jobs, 400-row commits     90k                 60k
# Only a log dominated by much longer finished jobs favours (stream, version). Per-stream reads
# use the same index with point lookups (version = ? AND stream = ?) over consecutive versions
# (see `read_stream`): a range on `version` would scan every stream's entries.
#
# Not guarded: a foreign connection's INSERT OR REPLACE deletes the row it replaces without
# firing delete triggers (unless it enables recursive_triggers). A BEFORE INSERT trigger against
# it costs ~30% of append throughput; `verify` detects the result (hash chain, gaps) instead.

_APPEND_ONLY_TABLES = ("events", "blob_refs", "requests", "answers")

_TRIGGERS = [
    *(
        f"""CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table}
            BEGIN SELECT RAISE(ABORT, 'flowactors: {table} is append-only ({op} forbidden)'); END"""
        for table in _APPEND_ONLY_TABLES for op in ("UPDATE", "DELETE")
    ),
    """CREATE TRIGGER blobs_no_update BEFORE UPDATE ON blobs
       BEGIN SELECT RAISE(ABORT, 'flowactors: blobs are immutable (UPDATE forbidden)'); END""",
    # A blob row goes only once some stream released it and no stream references it any more.
    """CREATE TRIGGER blobs_delete_only_unreferenced BEFORE DELETE ON blobs
       WHEN NOT EXISTS (SELECT 1 FROM blob_refs
                        WHERE digest = OLD.digest AND op = 'release')
         OR EXISTS (SELECT 1 FROM blob_refs AS r
                    WHERE r.digest = OLD.digest AND r.op = 'ref'
                      AND NOT EXISTS (SELECT 1 FROM blob_refs AS l
                                      WHERE l.digest = r.digest AND l.stream = r.stream
                                        AND l.op = 'release' AND l.id > r.id))
       BEGIN SELECT RAISE(ABORT,
         'flowactors: a blob is deleted only once released and referenced by no stream'); END""",
    """CREATE TRIGGER blob_refs_check_op BEFORE INSERT ON blob_refs
       WHEN NEW.op NOT IN ('ref', 'release')
       BEGIN SELECT RAISE(ABORT, 'flowactors: blob_refs.op is ref or release'); END""",
    """CREATE TRIGGER requests_check_command BEFORE INSERT ON requests
       WHEN NEW.command NOT IN ('pause', 'resume', 'cancel')
       BEGIN SELECT RAISE(ABORT, 'flowactors: requests.command is pause, resume or cancel'); END""",
    """CREATE TRIGGER answers_check_outcome BEFORE INSERT ON answers
       WHEN NEW.outcome NOT IN ('applied', 'rejected')
       BEGIN SELECT RAISE(ABORT, 'flowactors: answers.outcome is applied or rejected'); END""",
]

_REQUIRED_TABLES = frozenset({"meta", "events", "blobs", "blob_refs", "requests", "answers"})

# A digest is referenced while some stream's latest ref/release row for it is a 'ref'.
_REFERENCED_SQL = """
    SELECT r.stream FROM blob_refs AS r
    WHERE r.digest = ?1 AND r.op = 'ref'
      AND NOT EXISTS (SELECT 1 FROM blob_refs AS l
                      WHERE l.digest = r.digest AND l.stream = r.stream
                        AND l.op = 'release' AND l.id > r.id)
    LIMIT 1"""

# How the writer inserts a batch: not executemany, which steps SQLite once per row and releases
# and re-takes the GIL around each step (with appenders running, every re-take is a thread
# switch), but ONE statement of up to _INSERT_MAX_ROWS rows, in autocommit: insert, commit and
# fsync in a single call without the GIL. To keep a handful of prepared statements, the row
# slots come in powers of two and unused slots are NULL rows that the WHERE drops.
_INSERT_MAX_ROWS = 2048  # 8 parameters a row: within SQLite's 32766
_INSERT_ROWS = {
    n: "INSERT INTO events (position, stream, version, type, schema_version, recorded_at, "
       "data, hash) SELECT * FROM (VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n)
       + ") WHERE column1 IS NOT NULL"
    for n in (1 << k for k in range(_INSERT_MAX_ROWS.bit_length()))
}
_EVENT_COLUMNS = chain.EVENT_COLUMNS
# A read that does not check the chain reads no type for the current iteration event (most of
# a training log): NULL there, so the row costs no string; without hashes, no hash either.
_ITERATION = (event_tag(IterationCompleted), IterationCompleted.schema_version)
_READ_COLUMNS = _EVENT_COLUMNS.replace(
    "type", f"CASE WHEN type = '{_ITERATION[0]}' AND schema_version = {_ITERATION[1]} "
    "THEN NULL ELSE type END")
_READ_COLUMNS_NO_HASH = _READ_COLUMNS.replace(", hash", ", ''")  # the same shape
_SMALL_TABLES = ("meta", "blobs", "blob_refs", "requests", "answers")
# An open does not look up every event in the events index (integrity_check's way: most of its
# time on a long log). It compares a fingerprint of the index, read from the index alone, with
# the same fingerprint of the table's rows (tallied by the replay as it reads them): the count,
# the exact sums of versions and of positions, and the sum over entries of the job's weight
# times a mix of version and position, p * (a + v) + b * v (so two entries of one job trading
# positions change it too), modulo a prime. The weights and the mix are drawn at random for
# each open: damage to the index changes the fingerprint but for a chance of about 1 in 2^31.
# (The exact sums overflow past about 4 billion events: such a log would be refused.)
_PRIME = 2**31 - 1  # a product of two residues fits SQLite's 64-bit integers
_WEIGHTS_TABLE = "temp.flowactors_job_weights"
_INDEX_FINGERPRINT = f"""
    SELECT count(*), sum(e.version), sum(e.position),
           sum((e.position % {_PRIME} * ((?1 + e.version % {_PRIME}) % {_PRIME}) % {_PRIME}
                + ?2 * (e.version % {_PRIME}) % {_PRIME}) % {_PRIME} * w.k % {_PRIME})
    FROM events AS e INDEXED BY events_version_stream
    CROSS JOIN {_WEIGHTS_TABLE} AS w ON w.stream = e.stream
    WHERE typeof(e.version) = 'integer'"""


class _Fingerprint(dict[str, int]):
    """One open's weights (by job, drawn from its name and a random key) and mix."""

    def __init__(self) -> None:
        super().__init__()
        self._key = os.urandom(16)
        self.mix = tuple(1 + int.from_bytes(os.urandom(8), "little") % (_PRIME - 1)
                         for _ in range(2))

    def __missing__(self, stream: str) -> int:
        if type(stream) is not str:
            raise TypeError(f"a job named by {type(stream).__name__}, not text")
        digest = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=8,
                                 key=self._key).digest()
        weight = self[stream] = 1 + int.from_bytes(digest, "little") % (_PRIME - 1)
        return weight

    def mixed(self, rows: Iterable[Sequence[Any]]) -> int:
        """The weighted sum over rows of (position, stream, version, ...), not yet reduced."""
        a, b = self.mix
        total = 0
        for row in rows:
            position, version = row[0], row[2]
            total += self[row[1]] * (position * (a + version) + b * version)
        return total


_SELECT_HEAD = "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1"
# One stream's events: point lookups in the (version, stream) index, version after version.
_SELECT_STREAM = """
    WITH RECURSIVE wanted(v) AS (SELECT ?1 UNION ALL SELECT v + 1 FROM wanted WHERE v < ?2)
    SELECT e.position, e.stream, e.version, e.type, e.schema_version, e.recorded_at, e.data,
           e.hash
    FROM wanted CROSS JOIN events AS e ON e.version = wanted.v AND e.stream = ?3"""


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create every table, index and trigger in one transaction, on an empty database."""
    db = sqlite_utils.Database(conn)
    now = _now_iso()
    with db.atomic():
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        db.create_table("meta", {"key": str, "value": str}, pk="key", not_null={"value"})
        db.create_table(
            "events",
            {"position": int, "stream": str, "version": int, "type": str,
             "schema_version": int, "recorded_at": str, "data": bytes, "hash": bytes},
            pk="position",
            not_null={"stream", "version", "type", "schema_version", "recorded_at", "data",
                      "hash"},
        )
        db["events"].create_index(["version", "stream"], index_name="events_version_stream",
                                  unique=True)
        db.create_table("blobs", {"digest": str, "size": int, "data": bytes}, pk="digest",
                        not_null={"size", "data"})
        db.create_table(
            "blob_refs",
            {"id": int, "position": int, "stream": str, "digest": str, "op": str},
            pk="id", not_null={"position", "stream", "digest", "op"},
        )
        db["blob_refs"].create_index(["digest", "stream", "op"], index_name="blob_refs_digest")
        db.create_table(
            "requests",
            {"id": int, "job_id": str, "command": str, "requested_at": str},
            pk="id", not_null={"job_id", "command", "requested_at"},
        )
        db.create_table(
            "answers",
            {"request_id": int, "outcome": str, "reason": str, "answered_at": str},
            pk="request_id", not_null={"outcome", "reason", "answered_at"},
            foreign_keys=[("request_id", "requests", "id")],
        )
        for sql in _TRIGGERS:
            db.execute(sql)
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?), (?, ?), (?, ?), (?, ?)",
            ("application", "flowactors", "format_version", str(FORMAT_VERSION),
             "created_at", now,
             "event_hash", "sha256(msgpack([prev_hash, position, stream, version, type, "
                           "schema_version, recorded_at, data])), prev of position 1 = 32 zero "
                           "bytes"),
        )


# --- small helpers --------------------------------------------------------------------------

def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _insert_rows(conn: sqlite3.Connection, params: list[Any]) -> None:
    """Insert up to _INSERT_MAX_ROWS event rows (8 values each, flat) with one statement."""
    n_rows = len(params) >> 3
    slots = 1 << (n_rows - 1).bit_length()
    if slots > n_rows:
        params = params + [None] * ((slots - n_rows) << 3)
    conn.execute(_INSERT_ROWS[slots], params)


def _check_header(path: str) -> bool:
    """Check that the file is a flowactors log of a format this code reads.

    The header is read through SQLite (a read-only connection), never with Python's `open()`:
    closing any descriptor of a file drops every POSIX lock the process holds on it, including
    the locks of SQLite connections still open on it in this process, which would let another
    process checkpoint the WAL under them. SQLite's own file layer defers such closes.

    Returns False when the file is missing or empty (an owner may create it).

    Raises:
        LogCorrupted: anything else (not SQLite, another application's database, newer format).
    """
    try:
        if os.stat(path).st_size == 0:
            return False
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LogCorrupted(f"{path}: cannot read the file: {exc}") from None
    uri = read_only_uri(path)
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            empty = application_id == 0 and not conn.execute(
                "SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            conn.close()
    except (sqlite3.DatabaseError, UnicodeError) as exc:
        raise LogCorrupted(f"{path} is not a flowactors log (not a SQLite database: {exc})"
                           ) from None
    if empty:  # an empty database: a log whose creation was cut off before it committed
        return False
    if application_id != APPLICATION_ID:
        raise LogCorrupted(
            f"{path} is not a flowactors log (a SQLite database with application_id "
            f"{application_id:#x}, a flowactors log has {APPLICATION_ID:#x})")
    _check_format_version(path, version)
    return True


def _head_of(path: str, row: Any) -> tuple[int, bytes]:
    """The (position, hash) of the last event row, or the genesis head of an empty log.

    Raises:
        LogCorrupted: the row is damaged (a page cut short reads as zeros: a NULL hash), so
            an open or `status` fails with one line instead of a TypeError.
    """
    if row is None:
        return 0, GENESIS_HASH
    position, hash_ = row
    if type(hash_) is not bytes or len(hash_) != len(GENESIS_HASH):
        raise LogCorrupted(f"{path}: the last event row, at position {position}, is damaged "
                           f"(its hash is not 32 bytes); run `flowactors verify`")
    return position, hash_


def _check_format_version(path: str, version: int) -> None:
    if version > FORMAT_VERSION:
        raise LogCorrupted(
            f"{path} has log format version {version}, newer than this flowactors reads "
            f"({FORMAT_VERSION}); upgrade flowactors to open it")
    if version < 1:
        raise LogCorrupted(f"{path} is not a flowactors log (log format version {version})")


def _check_schema(path: str, conn: sqlite3.Connection) -> None:
    """Check, through an open connection, that the database is a complete flowactors log."""
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        user_version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = set(sqlite_utils.Database(conn).table_names())
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) \
            if "meta" in tables else {}
    except (sqlite3.DatabaseError, UnicodeError) as exc:
        raise LogCorrupted(f"{path} is not a readable flowactors log: {exc}") from None
    if application_id != APPLICATION_ID or meta.get("application") != "flowactors":
        raise LogCorrupted(f"{path} is not a flowactors log (no flowactors meta table)")
    _check_format_version(path, user_version)
    try:
        _check_format_version(path, int(meta.get("format_version", "0")))
    except ValueError:
        raise LogCorrupted(f"{path}: meta.format_version is not a number") from None
    missing = _REQUIRED_TABLES - tables
    if missing:
        raise LogCorrupted(f"{path} is not a complete flowactors log: missing tables "
                           f"{', '.join(sorted(missing))}")


# The decoder of each event type's current schema version, for the replay loop; anything else
# (an old version to upcast, an unknown type) goes through `codec.decode_event`.
_DECODERS: dict[str, tuple[int, Callable[[bytes], Any]]] = {
    event_tag(cls): (cls.schema_version, msgspec.msgpack.Decoder(cls).decode)
    for cls in EVENT_TYPES
}


def _undecodable(path: str, position: int, type_: str, schema_version: int, data: Any,
                 exc: Exception) -> LogCorrupted:
    """The error for a stored event that does not decode, naming its position."""
    if not isinstance(exc, LogCorrupted):
        try:
            decode_event(type_, schema_version, data)  # codec's own message for the problem
        except LogCorrupted as detailed:
            exc = detailed
        except Exception as other:
            exc = other
    return LogCorrupted(f"{path}, position {position}: {exc}")


def _parse_time(value: str, where: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise LogCorrupted(f"{where}: recorded time {value!r} is not an ISO-8601 time") from None


class _Queued:
    """What the writer settles: an append or a call, each with its caller waiting on `done`."""

    __slots__ = ()
    error: BaseException | None
    settled: bool
    done: threading.Lock

    def refuse(self, error: BaseException) -> None:
        """Settle with `error`, which the waiting caller raises, and wake the caller."""
        self.error = error
        self.settled = True
        self.done.release()


class _Append(_Queued):
    """One queued append: encoded in the caller's thread, stamped by the writer.

    Wake-up chain: the writer wakes only the first caller of a committed batch; each woken
    caller wakes the next (`next`). Waking a hundred threads at once makes them all fight for
    the GIL; one at a time they run (and queue their next append) while the writer is inside
    SQLite. A caller therefore always passes the wake-up on, even when interrupted.
    """

    __slots__ = ("stream", "expected", "events", "encoded", "blobs", "releases", "done",
                 "position", "recorded_at", "hashes", "error", "next", "settled")

    def __init__(self, stream: str, expected: int, events: list[Event],
                 encoded: list[tuple[str, int, bytes]], blobs: list[tuple[str, bytes]],
                 releases: list[str]) -> None:
        self.stream = stream
        self.expected = expected
        self.events = events
        self.encoded = encoded
        self.blobs = blobs
        self.releases = releases
        self.done = threading.Lock()  # held until the writer settled this append
        self.done.acquire()
        self.position = 0
        self.recorded_at: datetime | None = None
        self.hashes: list[str] = []
        self.error: BaseException | None = None
        self.next: _Append | None = None
        self.settled = False  # the writer decided the outcome (writer only)

    def result(self) -> list[RecordedEvent]:
        """Block until the writer settled the append; return its events or raise its error.

        Call it exactly once (the chain's next caller waits for it).
        """
        interrupted = None
        while True:
            try:
                self.done.acquire()
                break
            except BaseException as exc:  # e.g. KeyboardInterrupt: first pass the chain on
                interrupted = exc
        following = self.next
        if following is not None:
            self.next = None
            following.done.release()
        if interrupted is not None:
            raise interrupted
        if self.error is not None:
            raise self.error
        position = self.position
        version = self.expected + 1
        stream = self.stream
        recorded_at = self.recorded_at
        return [
            RecordedEvent(position=position + i, stream=stream, version=version + i, type=enc[0],
                          schema_version=enc[1], recorded_at=recorded_at, event=event,
                          hash=row_hash_)
            for i, (event, enc, row_hash_) in enumerate(zip(self.events, self.encoded,
                                                             self.hashes))
        ]


class _Call(_Queued):
    """A function run on the writer's connection, in the writer thread (inbox writes)."""

    __slots__ = ("fn", "done", "value", "error", "settled")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.done = threading.Lock()
        self.done.acquire()
        self.value: Any = None
        self.error: BaseException | None = None
        self.settled = False

    def result(self) -> Any:
        self.done.acquire()
        self.done.release()
        if self.error is not None:
            raise self.error
        return self.value


_STOP = object()


class _Reader:
    """A thread's read connection. Only the thread-local holds it strongly, so it goes (and
    the connection closes) when the thread ends; the store keeps a weak set to close the rest."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class EventStore:
    """An open flowactors log.

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
        self._ro_uri = read_only_uri(self.path)
        self._closed = False  # close() was called
        self._stopped = False  # no more writes: closed, or the writer failed
        self._gate = threading.Lock()  # orders "stopped?" checks against queue puts
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None  # the owner's or requester's writes
        self._conn_lock = threading.Lock()  # serialises the requester's writes
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_wanted = threading.Event()
        self._rows_since_checkpoint = 0
        self._settled: list[_Append] = []  # committed, callers not woken yet (writer only)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # The owner's head version of each stream appended to, found on its first append
        # (an open of a long log does not scan the log for them).
        self._heads: dict[str, int] = {}
        self._head: tuple[int, bytes] = (0, GENESIS_HASH)
        try:
            if mode == "owner":
                self._open_owner()
            else:
                self._open_other()
        except BaseException:
            self._release_resources()
            raise
        log.info("store_opened", path=self.path, mode=mode, synchronous=synchronous,
                 head_position=self._head[0] if mode == "owner" else None)

    # --- opening and closing ---

    def _open_owner(self) -> None:
        exists = _check_header(self.path)  # before creating anything next to a foreign file
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the lock file {lock_path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLocked(
                f"{self.path} is owned by another runtime (in this or another process): "
                f"{lock_path} is locked") from None
        self._lock_fd = fd
        exists = _check_header(self.path)  # again: it may have changed before we held the lock
        if exists:
            self._validate_read_only()
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   cached_statements=256)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from None
        self._conn = conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            # WAL first: a crash while creating the schema then leaves an empty database, which
            # the next owner initialises, not a hot rollback journal no reader can roll back.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if not exists:
                _create_schema(conn)
                # Into the main file at once: until a checkpoint the whole log, tables included,
                # is in the -wal, and a lost -wal would leave an empty database, not a log.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                log.info("log_created", path=self.path, format_version=FORMAT_VERSION)
            if mode != "wal":
                raise StoreUnavailable(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute("PRAGMA cache_size = -32768")  # 32 MiB: keeps hot index pages
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WRITER_AUTOCHECKPOINT_PAGES}")
            conn.execute("PRAGMA recursive_triggers = ON")
            _check_schema(self.path, conn)
            self._head = _head_of(self.path, conn.execute(_SELECT_HEAD).fetchone())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from None
        name = os.path.basename(self.path)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, daemon=True,
                                              name=f"flowactors-checkpointer:{name}")
        self._checkpointer.start()
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name=f"flowactors-writer:{name}")
        self._writer.start()

    def _open_other(self) -> None:
        if not _check_header(self.path):
            if os.path.exists(self.path):
                if os.path.getsize(self.path) == 0:
                    raise LogCorrupted(f"{self.path} is an empty file, not a flowactors log")
                raise LogCorrupted(
                    f"{self.path} is an empty SQLite database, not a flowactors log (its "
                    f"creation never committed, or the -wal file that held it is lost)")
            raise LogNotFound(f"no flowactors log at {self.path}")
        self._validate_read_only()
        if self.mode == "requester":
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open {self.path}: {exc}") from None
            self._conn = conn

    def _validate_read_only(self) -> None:
        """Check the schema through a read-only connection, which never changes the file."""
        try:
            conn = self._connect_ro()
        except sqlite3.Error as exc:
            raise LogCorrupted(f"{self.path} is not a readable flowactors log: {exc}") from None
        try:
            _check_schema(self.path, conn)
        finally:
            conn.close()

    def close(self) -> None:
        """Finish queued appends, stop the writer, close every connection; idempotent.

        Appends made after close() raise StoreUnavailable.
        """
        with self._gate:
            if self._closed:
                return
            self._closed = self._stopped = True
            if self._writer is not None:
                self._queue.put(_STOP)
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join()
        if self._checkpointer is not None:
            self._checkpoint_wanted.set()
            self._checkpointer.join()
        self._release_resources()
        log.info("store_closed", path=self.path, mode=self.mode)

    def _release_resources(self) -> None:
        if self._checkpointer is not None and self._checkpointer.is_alive():
            self._closed = True  # a failed open: stop the checkpointer too
            self._checkpoint_wanted.set()
            self._checkpointer.join()
        with self._readers_lock:
            readers = list(self._readers)
            self._readers.clear()
        for reader in readers:
            reader.conn.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @property
    def closed(self) -> bool:
        return self._closed

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
        if type(stream) is not str or not stream:
            raise ValueError(f"stream must be a non-empty str, not {stream!r}")
        if type(expected_version) is not int or expected_version < 0:
            raise ValueError(f"expected_version must be an int >= 0, not {expected_version!r}")
        events = list(events)
        if not events:
            raise ValueError(f"append to stream {stream!r} needs at least one event")
        try:
            encoded = [encode_event(event) for event in events]
        except AttributeError:
            bad = next(e for e in events if not isinstance(e, Event))
            raise TypeError(f"append to stream {stream!r}: {bad!r} is not an Event") from None
        blob_rows = [(content_digest(blob), bytes(blob)) for blob in blobs] if blobs else []
        released = list(releases) if releases else []
        if released and not all(type(d) is str for d in released):
            raise TypeError(f"releases of stream {stream!r} must be digests (str)")
        item = _Append(stream, expected_version, events, encoded, blob_rows, released)
        with self._gate:
            if self._stopped or self._writer is None:
                raise self._not_writable("append")
            self._queue.put(item)
        return item

    def _call_in_writer(self, fn: Callable[[sqlite3.Connection], Any]) -> _Call:
        """Queue `fn(connection)` to run in the writer thread, between batches."""
        call = _Call(fn)
        with self._gate:
            if self._stopped or self._writer is None:
                raise self._not_writable("write")
            self._queue.put(call)
        return call

    def _not_writable(self, what: str) -> StoreUnavailable:
        if self._closed:
            return StoreUnavailable(f"{self.path}: the store is closed, cannot {what}")
        if self._stopped:
            return StoreUnavailable(
                f"{self.path}: the store's writer stopped after an error, cannot {what}; "
                f"close and reopen the log")
        return StoreUnavailable(
            f"{self.path} is open in mode {self.mode!r}: only the owner can {what}")

    # --- the writer thread ---

    def _write_loop(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        batch: list[Any] = []
        try:
            while True:
                try:
                    batch = [get_nowait()]
                except queue.Empty:
                    self._wake_settled()  # nothing else to do: acknowledge now
                    batch = [get()]
                try:
                    while True:
                        batch.append(get_nowait())
                except queue.Empty:
                    pass
                appends: list[_Append] = []
                for item in batch:
                    if type(item) is _Append:
                        appends.append(item)
                        continue
                    if appends:  # keep queue order around calls
                        self._commit(appends)
                        appends = []
                    self._wake_settled()
                    if item is _STOP:
                        return
                    self._run_call(item)
                if appends:
                    self._commit(appends)
        except BaseException as exc:  # a bug: fail everyone rather than hang them
            log.exception("store_writer_crashed", path=self.path)
            with self._gate:
                self._stopped = True
            self._wake_settled()
            error = StoreUnavailable(f"{self.path}: the store's writer stopped: {exc!r}")
            leftovers = list(batch)
            while True:
                try:
                    leftovers.append(get_nowait())
                except queue.Empty:
                    break
            for item in leftovers:
                if item is not _STOP and not item.settled:
                    item.refuse(error)

    def _wake_settled(self) -> None:
        """Wake the callers of the last committed batch, as a chain (see `_Append`)."""
        settled = self._settled
        if settled:
            self._settled = []
            for item, following in zip(settled, settled[1:]):
                item.next = following
            settled[0].done.release()

    def _commit(self, appends: list[_Append]) -> None:
        """Write the accepted appends of one batch in one transaction.

        The callers of the previous batch are woken only once this batch's rows are built and
        its transaction begun: they then run (and queue their next appends) while this thread
        is inside SQLite without the GIL, instead of holding up the writer when it needs it.
        An append is acknowledged only after its own commit, always.
        """
        heads = self._heads
        staged: dict[str, int] = {}
        accepted: list[_Append] = []
        for item in appends:
            stream = item.stream
            current = staged.get(stream)
            if current is None:
                current = heads.get(stream)
            if current is None:
                try:
                    current = heads[stream] = self._probe_head(self._conn, stream)
                except sqlite3.Error as exc:
                    item.refuse(StoreUnavailable(
                        f"cannot read the head of stream {stream!r} in {self.path}, nothing "
                        f"was written: {exc}"))
                    continue
            if current != item.expected:
                item.refuse(ConcurrencyConflict(
                    f"stream {stream!r} is at version {current}, the append expected "
                    f"{item.expected} ({self.path}); nothing was written"))
                continue
            staged[stream] = current + len(item.encoded)
            accepted.append(item)
        if not accepted:
            self._wake_settled()
            return
        now = datetime.now(timezone.utc)
        ts = now.isoformat(timespec="microseconds")
        position, prev = self._head
        params: list[Any] = []  # the rows' values, flat
        add = params.extend
        frame = _frame
        sha256 = _sha256
        with_blobs = []
        for item in accepted:
            item.position = position + 1
            stream = item.stream
            version = item.expected
            hashes = item.hashes = []
            for type_, schema_version, data in item.encoded:
                position += 1
                version += 1
                prev = sha256(frame((prev, position, stream, version, type_, schema_version,
                                     ts, data))).digest()
                add((position, stream, version, type_, schema_version, ts, data, prev))
                hashes.append(prev.hex())
            if item.blobs or item.releases:
                with_blobs.append(item)
        conn = self._conn
        assert conn is not None
        n_rows = len(params) >> 3
        try:
            if n_rows <= _INSERT_MAX_ROWS and not with_blobs and not armed("store.commit"):
                self._wake_settled()
                fault_point("store.commit")  # crash tests: a group commit not yet written
                _insert_rows(conn, params)  # one statement: its own transaction
            else:
                conn.execute("BEGIN IMMEDIATE")
                self._wake_settled()
                for start in range(0, len(params), _INSERT_MAX_ROWS << 3):
                    _insert_rows(conn, params[start:start + (_INSERT_MAX_ROWS << 3)])
                for item in with_blobs:
                    self._write_blob_refs(conn, item)
                # crash tests: inside the transaction, before its commit
                fault_point("store.commit_with_blobs" if with_blobs else "store.commit")
                conn.execute("COMMIT")
        except Exception as exc:
            self._wake_settled()
            self._fail_batch(conn, accepted, exc)
            return
        self._head = (position, prev)
        heads.update(staged)
        for item in accepted:
            item.recorded_at = now
            item.settled = True
        self._settled = accepted
        self._rows_since_checkpoint += n_rows
        if self._rows_since_checkpoint >= _CHECKPOINT_ROWS:
            self._rows_since_checkpoint = 0
            self._checkpoint_wanted.set()

    @staticmethod
    def _write_blob_refs(conn: sqlite3.Connection, item: _Append) -> None:
        """Store an append's blobs and record its refs/releases (releases first, so a digest
        both released and stored again by one append stays referenced)."""
        position, stream = item.position, item.stream
        if item.blobs:
            conn.executemany("INSERT OR IGNORE INTO blobs (digest, size, data) VALUES (?, ?, ?)",
                             [(d, len(b), b) for d, b in item.blobs])
        conn.executemany(
            "INSERT INTO blob_refs (position, stream, digest, op) VALUES (?, ?, ?, ?)",
            [(position, stream, d, "release") for d in item.releases]
            + [(position, stream, d, "ref") for d, _ in item.blobs])
        for released in dict.fromkeys(item.releases):
            if conn.execute(_REFERENCED_SQL, (released,)).fetchone() is None:
                conn.execute("DELETE FROM blobs WHERE digest = ?", (released,))

    def _fail_batch(self, conn: sqlite3.Connection, accepted: list[_Append],
                    exc: Exception) -> None:
        """Roll back; fail exactly this batch's appends; keep heads and chain as they were."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        log.error("append_batch_failed", path=self.path, appends=len(accepted),
                  error=f"{type(exc).__name__}: {exc}")
        for item in accepted:
            item.refuse(StoreUnavailable(
                f"append to stream {item.stream!r} in {self.path} failed, nothing was "
                f"written: {exc}"))
        try:  # if SQLite committed despite the error, follow what is on disk
            on_disk = _head_of(self.path, conn.execute(_SELECT_HEAD).fetchone())
            if on_disk != self._head:
                self._head = on_disk
                self._heads.clear()
                log.warning("store_heads_reloaded", path=self.path, head=self._head[0])
        except (sqlite3.Error, LogCorrupted):
            pass

    def _checkpoint_loop(self) -> None:
        """Copy committed WAL pages into the database file, off the writer's thread."""
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            log.warning("checkpointer_unavailable", path=self.path, error=str(exc))
            return
        try:
            while True:
                self._checkpoint_wanted.wait()
                self._checkpoint_wanted.clear()
                if self._closed:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the writer's backstop still checkpoints
                    log.warning("checkpoint_failed", path=self.path, error=str(exc))
        finally:
            conn.close()

    def _run_call(self, call: _Call) -> None:
        try:
            call.value = call.fn(self._conn)
        except BaseException as exc:
            call.error = exc
            conn = self._conn
            if conn is not None and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        call.settled = True
        call.done.release()

    # --- reading (every mode) ---

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (one per thread: SQLite connections are not
        meant to be shared by concurrent threads). It is closed when the thread ends, or by
        close()."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            if self._closed:
                raise StoreUnavailable(f"{self.path}: the store is closed")
            try:
                reader = _Reader(self._connect_ro())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot read {self.path}: {exc}") from None
            with self._readers_lock:
                if self._closed:
                    reader.conn.close()
                    raise StoreUnavailable(f"{self.path}: the store is closed")
                self._readers.add(reader)
            self._local.reader = reader
        return reader.conn

    def _connect_ro(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._ro_uri, uri=True, isolation_level=None,
                               check_same_thread=False, cached_statements=64)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        return conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._execute(sql, params).fetchall()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._reader().execute(sql, params)
        except sqlite3.ProgrammingError as exc:  # closed underneath us
            raise StoreUnavailable(f"cannot read {self.path}: {exc}") from None
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

    def _events(self, batches: Iterable[list[Any]]) -> Iterator[list[RecordedEvent]]:
        """Decode lists of rows of `_EVENT_COLUMNS` (or `_READ_COLUMNS`) into lists of recorded
        events (the replay loop: a list per batch costs less than a generator step per event)."""
        fast = _DECODERS
        iteration = _ITERATION[0]
        decode_iteration = fast[iteration][1]
        last_ts = None
        recorded_at = None
        try:
            for rows in batches:
                events: list[RecordedEvent] = []
                add = events.append
                for position, stream, version, type_, schema_version, ts, data, hash_ in rows:
                    if ts != last_ts:
                        recorded_at = _parse_time(ts, f"{self.path}, position {position}")
                        last_ts = ts
                    try:
                        if type_ is None:  # _READ_COLUMNS: the current iteration
                            type_ = iteration
                            event = decode_iteration(data)
                        else:
                            current, decode = fast[type_]
                            if current == schema_version:
                                event = decode(data)
                            else:  # an old schema version: upcast
                                event = decode_event(type_, schema_version, data)
                    except Exception as exc:  # includes KeyError: an unknown type
                        error = _undecodable(self.path, position, type_, schema_version, data,
                                             exc)
                        yield events  # the rows before it, as a read event by event gave
                        raise error from None
                    add(RecordedEvent(position=position, stream=stream, version=version,
                                      type=type_, schema_version=schema_version,
                                      recorded_at=recorded_at, event=event,
                                      hash=hash_.hex() if isinstance(hash_, bytes) else hash_))
                yield events
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

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
        return itertools.chain.from_iterable(self._events(
            self._read_rows(from_position, to_position, verify_chain, hashes)))

    def _read_rows(self, from_position: int, to_position: int | None, verify_chain: bool,
                   hashes: bool) -> Iterator[list[Any]]:
        """The batches of rows `read_all` decodes."""
        if verify_chain and (from_position > 1 or not hashes):
            raise ValueError("verify_chain needs the whole log (from_position=1), with hashes")
        columns = (_EVENT_COLUMNS if verify_chain  # the chain covers the type as stored
                   else _READ_COLUMNS if hashes else _READ_COLUMNS_NO_HASH)
        batches = self._batches(from_position, to_position, columns)
        return self._chained(batches) if verify_chain else batches

    def _chained(self, batches: Iterable[list[Any]]) -> Iterator[list[Any]]:
        """Pass rows through, checking the hash chain and positions as they go by."""
        try:
            yield from chain.checked(batches)
        except chain.ChainBroken as exc:
            raise LogCorrupted(f"{self.path}: {exc}; run `flowactors verify`") from None

    def check_chain(self, to_position: int | None = None) -> None:
        """Recompute the hash chain (up to `to_position`), without decoding events.

        Raises:
            LogCorrupted: naming the first row that breaks the chain, or a row unreadable.
        """
        try:
            for _ in self._chained(self._batches(1, to_position)):
                pass
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

    def check_meanwhile(self, *, chain_process: bool) -> OpenCheck:
        """Start checking what a replay of the whole log does not check itself, while the
        caller replays `OpenCheck.events()`; see `OpenCheck`.

        Args:
            chain_process: also check the hash chain, in a process of its own (worth it for a
                long log on a machine with a second core). If the process cannot start, or
                not asked, `OpenCheck.checks_chain` is False: replay with `verify_chain`.
        """
        return OpenCheck(self, chain_process)

    def _batches(self, from_position: int, to_position: int | None,
                 columns: str = _EVENT_COLUMNS) -> Iterator[list[Any]]:
        """The rows of `read_all`, a few hundred at a time: fewer live rows than the garbage
        collector's threshold, so a long replay triggers no collection. Each chunk of
        _READ_CHUNK positions is its own query."""
        sql = (f"SELECT {columns} FROM events WHERE position >= ? AND position <= ? "
               "ORDER BY position")
        start = max(from_position, 1)
        end = 0
        while True:
            if to_position is None and start > end:
                rows = self._query("SELECT max(position) FROM events")
                end = rows[0][0] or 0
            elif to_position is not None:
                end = to_position
            if start > end:
                return
            stop = min(start + _READ_CHUNK - 1, end)
            fetchmany = self._execute(sql, (start, stop)).fetchmany
            while rows := fetchmany(_FETCH_ROWS):
                yield rows
            start = stop + 1

    def read_stream(self, stream: str, from_version: int = 1) -> Iterator[RecordedEvent]:
        """Yield one stream's recorded events in version order, from `from_version`.

        Raises:
            LogCorrupted: a row does not decode (the message names its position).
        """
        if type(stream) is not str:
            raise TypeError(f"stream must be a str, not {stream!r}")
        start = max(from_version, 1)
        while True:
            end = start + _STREAM_CHUNK - 1
            rows = self._query(_SELECT_STREAM, (start, end, stream))
            for events in self._events((rows,)):
                yield from events
            if len(rows) < _STREAM_CHUNK:  # versions are contiguous: the first miss is the end
                return
            start = end + 1

    def stream_version(self, stream: str) -> int:
        """The stream's head version: the version of its last event, 0 if it has none."""
        known = self._heads.get(stream) if self.mode == "owner" else None
        if known is not None:
            return known
        try:
            # Several snapshots; a version once present stays, so the answer is the head at
            # some moment of the search.
            return self._probe_head(self._reader(), stream)
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

    @staticmethod
    def _probe_head(conn: sqlite3.Connection, stream: str) -> int:
        """Find the last version by point lookups: versions are contiguous from 1."""
        def exists(version: int) -> bool:
            return conn.execute("SELECT 1 FROM events WHERE version = ? AND stream = ?",
                                (version, stream)).fetchone() is not None

        if not exists(1):
            return 0
        low = 1
        while exists(low * 2):
            low *= 2
        high = low * 2  # exists(low) and not exists(high)
        while high - low > 1:
            middle = (low + high) // 2
            if exists(middle):
                low = middle
            else:
                high = middle
        return low

    def streams_starting_with(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` streams whose name starts with `prefix`, in name order (a range scan
        of the events index over each stream's first event)."""
        found = []
        for (stream,) in self._execute("SELECT stream FROM events WHERE version = 1 AND "
                                       "stream >= ? ORDER BY stream", (prefix,)):
            if not isinstance(stream, str) or not stream.startswith(prefix) \
                    or len(found) == limit:
                break
            found.append(stream)
        return found

    def streams(self) -> dict[str, int]:
        """Every stream with its head version."""
        return dict(self._query("SELECT stream, max(version) FROM events GROUP BY stream"))

    def head(self) -> tuple[int, str]:
        """(position of the last event, its hash as hex); (0, 64 zeros) for an empty log."""
        if self.mode == "owner":
            position, hash_ = self._head
            return position, hash_.hex()
        rows = self._query(_SELECT_HEAD)
        position, hash_ = _head_of(self.path, rows[0] if rows else None)
        return position, hash_.hex()

    def get_blob(self, digest: str) -> bytes:
        """The blob stored under this digest.

        Raises:
            BlobNotFound: no such blob (never stored, or released and deleted).
            LogCorrupted: the stored bytes do not hash to their address.
        """
        rows = self._query("SELECT data FROM blobs WHERE digest = ?", (digest,))
        if not rows:
            raise BlobNotFound(f"no blob {digest} in {self.path}")
        data = bytes(rows[0][0])
        actual = content_digest(data)
        if actual != digest:
            raise LogCorrupted(f"{self.path}: blob {digest} does not match its address "
                               f"(its content hashes to {actual})")
        return data

    def has_blob(self, digest: str) -> bool:
        """Whether a blob is stored under this digest."""
        return bool(self._query("SELECT 1 FROM blobs WHERE digest = ?", (digest,)))

    # --- the inbox ---

    def request(self, job_id: str, command: Command) -> int:
        """Leave a control request for the owner; return its id. Modes "requester" and "owner".

        Raises:
            InvalidRequest: command is not pause, resume or cancel; job_id is not a non-empty
                str the log can store.
            StoreUnavailable: read-only open, closed store, or the write failed.
        """
        if command not in _COMMANDS:
            raise InvalidRequest(
                f"command must be one of {', '.join(_COMMANDS)}, not {command!r}")
        if type(job_id) is not str or not job_id:
            raise InvalidRequest(f"job_id must be a non-empty str, not {job_id!r}")
        try:
            job_id.encode()
        except UnicodeError:
            raise InvalidRequest(f"job_id {job_id!r} is not valid Unicode") from None

        def insert(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.execute(
                    "INSERT INTO requests (job_id, command, requested_at) VALUES (?, ?, ?)",
                    (job_id, command, _now_iso()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return cursor.lastrowid  # type: ignore[return-value]

        return self._inbox_write(insert, "request")

    def answer(self, request_id: int, outcome: Outcome, reason: str = "") -> None:
        """Record the owner's decision on a request (owner only).

        Raises:
            ValueError: outcome is not applied or rejected.
            InvalidTransition: no such request, or it is answered already.
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(_OUTCOMES)}, not {outcome!r}")
        if self.mode != "owner":
            raise self._not_writable("answer requests")

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM requests WHERE id = ?",
                                (request_id,)).fetchone() is None:
                    raise InvalidTransition(f"no request {request_id} in {self.path}")
                if conn.execute("SELECT 1 FROM answers WHERE request_id = ?",
                                (request_id,)).fetchone() is not None:
                    raise InvalidTransition(
                        f"request {request_id} in {self.path} is already answered")
                conn.execute("INSERT INTO answers (request_id, outcome, reason, answered_at) "
                             "VALUES (?, ?, ?, ?)", (request_id, outcome, reason, _now_iso()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        self._inbox_write(insert, "answer requests")

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
        rows = self._query(
            "SELECT id, job_id, command, requested_at FROM requests AS r WHERE id > ? "
            "AND NOT EXISTS (SELECT 1 FROM answers WHERE request_id = r.id) ORDER BY id",
            (after_id,))
        return [Request(id=id_, job_id=job_id, command=command,
                        requested_at=_parse_time(at, f"{self.path}, request {id_}"))
                for id_, job_id, command, at in rows]

    def answer_of(self, request_id: int) -> Answer | None:
        """The answer to a request, or None while it is pending (or unknown)."""
        rows = self._query("SELECT outcome, reason, answered_at FROM answers "
                           "WHERE request_id = ?", (request_id,))
        if not rows:
            return None
        outcome, reason, at = rows[0]
        return Answer(request_id=request_id, outcome=outcome, reason=reason,
                      answered_at=_parse_time(at, f"{self.path}, answer {request_id}"))

    # --- verification ---

    def verify(self, expected_head: str | None = None, *,
               progress: Callable[[int, int], None] | None = None,
               _open: OpenCheck | None = None) -> VerifyReport:
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
        expected = None
        if expected_head is not None:
            try:
                expected = bytes.fromhex(expected_head)
            except ValueError:
                raise ValueError(f"expected_head is not a hex hash: {expected_head!r}") from None
        conn = self._connect_ro()
        if _open is not None:
            _open.conn = conn
        try:
            conn.execute("BEGIN")  # one snapshot, even while the owner appends
            try:
                return _Verifier(self.path, conn, expected, progress, _open).run()
            finally:
                with contextlib.suppress(sqlite3.Error):  # a damaged file fails here too
                    conn.execute("ROLLBACK")
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            return VerifyReport(ok=False, events_checked=0, blobs_checked=0, head_position=0,
                                head_hash="", first_bad_position=None,
                                problem=one_line(f"cannot read {self.path}: {exc}"))
        finally:
            conn.close()


class OpenCheck:
    """The checks of a log besides its replay, running meanwhile (`EventStore.check_meanwhile`).

    On another thread (SQLite and hashlib release the GIL): every blob against its address,
    every page (quick_check), the small tables' indexes entry by entry, and the fingerprint
    of the events index entries, which the rows the replay reads must match (integrity_check
    looks up every event in the index: most of its time; see _INDEX_FINGERPRINT). In a
    process of its own, if asked: the hash chain. With a replay that reads every event and
    checks each job's versions follow one another, an open refuses what `verify` refuses
    (the index but for a chance of about 1 in 2^31), in a fraction of its time.
    """

    def __init__(self, store: EventStore, chain_process: bool) -> None:
        self._store = store
        self.upto, self._head_hash = store.head()
        """The last position checked: replay up to it (a log being written grows meanwhile)."""
        self.conn: sqlite3.Connection | None = None  # the thread's, to interrupt it
        self._report: VerifyReport | None = None
        self.fingerprint = _Fingerprint()
        self.index_sums: tuple[int, ...] | None = None  # the thread's: of entries up to upto
        self._replay_mixed: int | None = None  # the replay's: see _tallied
        self._thread = threading.Thread(target=self._check_storage, daemon=True,
                                        name="flowactors-open-check")
        self._thread.start()
        self._process: chain.CheckProcess | None = None
        if chain_process:
            try:
                self._process = chain.CheckProcess(store.path, self.upto)
            except OSError as exc:
                log.warning("chain_check_process_unavailable", path=store.path, error=str(exc))

    @property
    def checks_chain(self) -> bool:
        """Whether the chain is checked here; if not, the replay must (`verify_chain`)."""
        return self._process is not None

    def _check_storage(self) -> None:
        self._report = self._store.verify(_open=self)

    def events(self) -> Iterator[RecordedEvent]:
        """The events to replay: the whole log up to `upto`, read from the table, tallied for
        the index sums, and chain-checked here if no process does."""
        here = not self.checks_chain
        rows = self._store._read_rows(1, self.upto, here, here)
        return itertools.chain.from_iterable(self._store._events(self._tallied(rows)))

    def _tallied(self, batches: Iterable[list[Any]]) -> Iterator[list[Any]]:
        """Pass rows through, adding up the fingerprint's weighted sum (its other sums follow
        from the positions and from each job's versions being 1, 2, 3...)."""
        mixed = 0
        for rows in batches:
            try:
                mixed += self.fingerprint.mixed(rows)
            except TypeError as exc:
                raise LogCorrupted(
                    f"{self._store.path}: an event at positions {rows[0][0]} to {rows[-1][0]} "
                    f"has a job or version of the wrong type ({exc}); run `flowactors verify`"
                ) from None
            yield rows
        self._replay_mixed = mixed

    def _rows_match_index(self, versions: dict[str, int]) -> bool:
        if self._replay_mixed is None:
            raise RuntimeError("OpenCheck.finish() before its events() were all replayed")
        upto = self.upto
        rows = (upto, sum(last * (last + 1) // 2 for last in versions.values()),
                upto * (upto + 1) // 2, self._replay_mixed % _PRIME)
        return rows == self.index_sums

    def finish(self, versions: dict[str, int]) -> None:
        """Wait for the checks of the log that the caller replayed up to position `upto`
        (all of `events()`), `versions` holding the last version it replayed of each stream.

        Raises:
            LogCorrupted: a check failed, or the log checked was not the one replayed.
            RuntimeError: `events()` was not replayed to its end.
        """
        path = self._store.path
        if self._process is not None:
            verdict = self._process.verdict()
            if verdict is None:
                log.warning("chain_check_process_failed", path=path)
                self._store.check_chain(self.upto)
            elif not verdict["ok"]:
                raise LogCorrupted(f"{path}: {verdict['problem']}; run `flowactors verify`")
            elif verdict["position"] != self.upto or verdict["hash"] != self._head_hash:
                raise LogCorrupted(
                    f"{path}: the chain was checked up to position {verdict['position']}, not "
                    f"the head {self.upto} that was replayed: the log changed while it was "
                    f"opened")
        replayed = sum(versions.values())  # each event is its stream's next version
        if replayed != self.upto:
            raise LogCorrupted(
                f"{path}: the jobs replayed up to position {self.upto} hold {replayed} events: "
                f"the log changed while it was opened")
        self._thread.join()
        report = self._report
        problem = "the check did not finish" if report is None else report.problem
        if problem is None and not self._rows_match_index(versions):
            problem = ("SQLite index events_version_stream does not match the events table "
                       "(the fingerprints of its entries and of the rows differ)")
        if problem is not None:
            raise LogCorrupted(f"{path} fails verification: {problem}; "
                               f"run `flowactors verify --db {path}`")

    def cancel(self) -> None:
        """Stop what still runs: the chain process, and the thread's query (interrupted)."""
        if self._process is not None:
            self._process.kill()
        if self._thread.is_alive():
            with contextlib.suppress(sqlite3.Error, AttributeError):
                self.conn.interrupt()  # type: ignore[union-attr]
            self._thread.join()


class _Verifier:
    """One pass of `EventStore.verify` over a read snapshot."""

    def __init__(self, path: str, conn: sqlite3.Connection, expected: bytes | None,
                 progress: Callable[[int, int], None] | None, open_check: OpenCheck | None
                 ) -> None:
        self.open_check = open_check  # an open's: blobs, pages and indexes only (no events)
        self.path = path
        self.conn = conn
        self.expected = expected
        self.progress = progress
        self.events_checked = 0
        self.blobs_checked = 0
        self.head_position = 0
        self.head_hash = GENESIS_HASH.hex()

    def report(self, problem: str | None = None, position: int | None = None) -> VerifyReport:
        return VerifyReport(ok=problem is None, events_checked=self.events_checked,
                            blobs_checked=self.blobs_checked, head_position=self.head_position,
                            head_hash=self.head_hash, first_bad_position=position,
                            problem=None if problem is None else one_line(problem))

    def run(self) -> VerifyReport:
        try:
            row = self.conn.execute(_SELECT_HEAD).fetchone()
            if row is not None:
                self.head_position = row[0]
                self.head_hash = bytes(row[1]).hex() if isinstance(row[1], bytes) \
                    else str(row[1])
            found = self.check_events() if self.open_check is None else None
            if isinstance(found, VerifyReport):
                return found
            if self.expected is not None and found is None:
                return self.report(
                    f"the expected head hash {self.expected.hex()} is not in the chain: the log "
                    f"(head position {self.head_position}) was cut off or rewritten",
                    self.head_position + 1)
            problem = self.check_blobs()
            if problem is not None:
                return self.report(problem)
            problem = (self.check_sqlite() if self.open_check is None
                       else self.check_sqlite_for_open(self.open_check))
            if problem is not None:
                return self.report(problem)
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            at = self.events_checked + 1  # the event being read, unless all were read already
            return self.report(f"SQLite error reading {self.path}: {exc}",
                               at if at <= self.head_position else None)
        return self.report()

    def check_events(self) -> VerifyReport | int | None:
        """Check every event row; return a failed report, or the position where the expected
        head was found (0: genesis; None: not found or not asked)."""
        expected = self.expected
        found = 0 if expected == GENESIS_HASH else None
        prev = GENESIS_HASH
        next_position = 1
        versions: dict[str, int] = {}
        total = self.head_position
        last_ts = None
        while True:
            rows = self.conn.execute(
                "SELECT position, stream, version, type, schema_version, recorded_at, data, hash "
                f"FROM events WHERE position >= ? ORDER BY position LIMIT {_READ_CHUNK}",
                (next_position,)).fetchall()
            for position, stream, version, type_, schema_version, ts, data, hash_ in rows:
                if position != next_position:
                    return self.report(f"position {next_position} is missing (the next event "
                                       f"is at position {position})", next_position)
                actual = row_hash(prev, position, stream, version, type_, schema_version, ts,
                                  data)
                if actual != hash_:
                    return self.report(
                        f"event at position {position} does not match its hash: the row was "
                        f"edited, reordered or its chain rewritten", position)
                last = versions.get(stream, 0)
                if version != last + 1:
                    return self.report(f"stream {stream!r} goes from version {last} to "
                                       f"{version} at position {position}", position)
                versions[stream] = version
                try:
                    decode_event(type_, schema_version, data)
                    if ts != last_ts:
                        _parse_time(ts, f"position {position}")
                        last_ts = ts
                except (LogCorrupted, TypeError, ValueError) as exc:
                    return self.report(f"event at position {position} does not decode: {exc}",
                                       position)
                prev = hash_
                if hash_ == expected:
                    found = position
                next_position = position + 1
                self.events_checked += 1
            if self.progress is not None:
                self.progress(self.events_checked, max(total, self.events_checked))
            if len(rows) < _READ_CHUNK:
                return found

    def check_sqlite(self) -> str | None:
        """SQLite's integrity_check: every page, and every index entry against its row."""
        return self._pragma_check("integrity_check")

    def check_sqlite_for_open(self, open_check: OpenCheck) -> str | None:
        """What an open checks of SQLite's own structures, in a fraction of integrity_check's
        time on a long log: every page (quick_check), the small tables' indexes entry by
        entry, and the fingerprint of the events index entries (a covering scan) that
        `OpenCheck` compares with the rows replayed, instead of a lookup per event."""
        problem = self._pragma_check("quick_check")
        for table in _SMALL_TABLES:
            problem = problem or self._pragma_check(f"integrity_check({table})")
        if problem is None:
            problem = self.fingerprint_index(open_check)
        return problem

    def fingerprint_index(self, open_check: OpenCheck) -> str | None:
        """Set `open_check.index_sums`: the fingerprint of every entry of the events index,
        less that of the table's rows after `upto` (this snapshot may have more than the
        replay reads). An entry of a job with no version 1 entry, or not of an integer
        version, is left out: the count differs."""
        upto, fingerprint = open_check.upto, open_check.fingerprint
        conn = self.conn
        conn.execute(f"CREATE TABLE {_WEIGHTS_TABLE} (stream TEXT PRIMARY KEY, "
                     "k INTEGER NOT NULL) WITHOUT ROWID")
        first = conn.execute("SELECT stream FROM events INDEXED BY events_version_stream "
                             "WHERE version = 1 AND typeof(stream) = 'text'").fetchall()
        conn.executemany(f"INSERT OR IGNORE INTO {_WEIGHTS_TABLE} VALUES (?, ?)",
                         [(stream, fingerprint[stream]) for stream, in first])
        count, versions, positions, mixed = (total or 0 for total in conn.execute(
            _INDEX_FINGERPRINT, fingerprint.mix).fetchone())
        after = conn.execute("SELECT position, stream, version FROM events WHERE position > ? "
                             "ORDER BY position", (upto,)).fetchall()
        try:
            mixed -= fingerprint.mixed(after)
        except TypeError as exc:
            return (f"an event after position {upto} has a job or version of the wrong type "
                    f"({exc})")
        open_check.index_sums = (count - len(after), versions - sum(row[2] for row in after),
                                 positions - sum(row[0] for row in after), mixed % _PRIME)
        return None

    def _pragma_check(self, pragma: str) -> str | None:
        lines = [row[0] for row in self.conn.execute(f"PRAGMA {pragma}").fetchall()]
        return None if lines == ["ok"] else f"SQLite {pragma}: {'; '.join(lines[:5])}"

    def check_blobs(self) -> str | None:
        last = ""
        while True:
            rows = self.conn.execute(
                "SELECT digest, size, data FROM blobs WHERE digest > ? ORDER BY digest LIMIT 64",
                (last,)).fetchall()
            for digest_, size, data in rows:
                if not isinstance(data, bytes) or content_digest(data) != digest_:
                    return f"blob {digest_} does not match its address (content edited)"
                if size != len(data):
                    return f"blob {digest_} has size {size} recorded but {len(data)} bytes"
                self.blobs_checked += 1
                last = digest_
            if len(rows) < 64:
                break
        missing = self.conn.execute(
            "SELECT r.digest, r.stream FROM blob_refs AS r WHERE r.op = 'ref' "
            "AND NOT EXISTS (SELECT 1 FROM blob_refs AS l WHERE l.digest = r.digest "
            "AND l.stream = r.stream AND l.op = 'release' AND l.id > r.id) "
            "AND NOT EXISTS (SELECT 1 FROM blobs AS b WHERE b.digest = r.digest) LIMIT 1"
        ).fetchone()
        if missing is not None:
            return f"blob {missing[0]} is referenced by stream {missing[1]!r} but missing"
        return None

