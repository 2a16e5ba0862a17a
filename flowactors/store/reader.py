"""Reading the log: events in position order or by stream, decoded with the one decoder table.

Every mode reads through a thread's own read-only connection (`ReaderPool`). Long reads go in
chunks of positions, each from a fresh snapshot, so a replay does not hold one read transaction
(which would keep the WAL from being checkpointed).
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..codec import DECODERS, decode_event
from ..errors import LogCorrupted, StoreUnavailable
from ..events import IterationCompleted, RecordedEvent, event_tag
from . import chain
from .connections import ReaderPool
from .schema import SELECT_HEAD, head_of, parse_time

READ_CHUNK = 2_000  # positions per query when streaming the log
_FETCH_ROWS = 256  # rows per fetch within such a query
_STREAM_CHUNK = 256  # versions per query when reading one stream
EVENT_COLUMNS = chain.EVENT_COLUMNS
# A read that does not check the chain reads no type for the current iteration event (most of
# a training log): NULL there, so the row costs no string; without hashes, no hash either.
_ITERATION = (event_tag(IterationCompleted), IterationCompleted.schema_version)
_READ_COLUMNS = EVENT_COLUMNS.replace(
    "type", f"CASE WHEN type = '{_ITERATION[0]}' AND schema_version = {_ITERATION[1]} "
    "THEN NULL ELSE type END")
_READ_COLUMNS_NO_HASH = _READ_COLUMNS.replace(", hash", ", ''")  # the same shape
# One stream's events: point lookups in the (version, stream) index, version after version.
_LOOKUPS = """
    WITH RECURSIVE wanted(v) AS (SELECT ?1 UNION ALL SELECT v + 1 FROM wanted WHERE v < ?2)
    SELECT {} FROM wanted CROSS JOIN events AS e ON e.version = wanted.v AND e.stream = ?3"""
_SELECT_STREAM = _LOOKUPS.format(", ".join("e." + c for c in EVENT_COLUMNS.split(", ")))
_EXPORT_COLUMNS = EVENT_COLUMNS.replace(", hash", "")
# The same lookups, the rows as stored and only what telling events apart takes (no time, no
# hash): for a reader that decodes a few of a stream's events.
_SELECT_STREAM_STORED = _LOOKUPS.format(
    "e.position, e.version, e.type, e.schema_version, e.data")


def probe_head(conn: sqlite3.Connection, stream: str) -> int:
    """A stream's last version, found by point lookups: versions are contiguous from 1."""
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


def undecodable(path: str, position: int, type_: str, schema_version: int, data: Any,
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


class Reader:
    """The reads of one log, through a pool of read-only connections."""

    def __init__(self, path: str, pool: ReaderPool) -> None:
        self.path = path
        self.pool = pool

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.pool.get().execute(sql, params)
        except sqlite3.ProgrammingError as exc:  # closed underneath us
            raise StoreUnavailable(f"cannot read {self.path}: {exc}") from None
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

    def events(self, batches: Iterable[list[Any]]) -> Iterator[list[RecordedEvent]]:
        """Decode lists of rows of `EVENT_COLUMNS` (or `_READ_COLUMNS`) into lists of recorded
        events (the replay loop: a list per batch costs less than a generator step per event)."""
        fast = DECODERS
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
                        recorded_at = parse_time(ts, f"{self.path}, position {position}")
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
                        error = undecodable(self.path, position, type_, schema_version, data,
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

    def read_all(self, from_position: int, to_position: int | None, verify_chain: bool,
                 hashes: bool) -> Iterator[RecordedEvent]:
        """See `EventStore.read_all`."""
        return itertools.chain.from_iterable(self.events(
            self.rows(from_position, to_position, verify_chain, hashes)))

    def rows(self, from_position: int, to_position: int | None, verify_chain: bool,
             hashes: bool) -> Iterator[list[Any]]:
        """The batches of rows `read_all` decodes."""
        if verify_chain and (from_position > 1 or not hashes):
            raise ValueError("verify_chain needs the whole log (from_position=1), with hashes")
        columns = (EVENT_COLUMNS if verify_chain  # the chain covers the type as stored
                   else _READ_COLUMNS if hashes else _READ_COLUMNS_NO_HASH)
        batches = self.batches(from_position, to_position, columns)
        return self.chained(batches) if verify_chain else batches

    def chained(self, batches: Iterable[list[Any]]) -> Iterator[list[Any]]:
        """Pass rows through, checking the hash chain and positions as they go by."""
        try:
            yield from chain.checked(batches)
        except chain.ChainBroken as exc:
            raise LogCorrupted(f"{self.path}: {exc}; run `flowactors verify`") from None

    def check_chain(self, to_position: int | None = None) -> None:
        """See `EventStore.check_chain`."""
        try:
            for _ in self.chained(self.batches(1, to_position)):
                pass
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

    def batches(self, from_position: int, to_position: int | None,
                columns: str = EVENT_COLUMNS, stream: str | None = None) -> Iterator[list[Any]]:
        """The rows of `read_all`, a few hundred at a time: fewer live rows than the garbage
        collector's threshold, so a long replay triggers no collection. Each chunk of
        READ_CHUNK positions is its own query."""
        sql = (f"SELECT {columns} FROM events WHERE position >= ? AND position <= ?"
               + (" AND stream = ?" if stream is not None else "") + " ORDER BY position")
        start = max(from_position, 1)
        end = 0
        while True:
            if to_position is None and start > end:
                rows = self.query("SELECT max(position) FROM events")
                end = rows[0][0] or 0
            elif to_position is not None:
                end = to_position
            if start > end:
                return
            stop = min(start + READ_CHUNK - 1, end)
            params: tuple[Any, ...] = (start, stop) if stream is None else (start, stop, stream)
            fetchmany = self.execute(sql, params).fetchmany
            while rows := fetchmany(_FETCH_ROWS):
                yield rows
            start = stop + 1

    def stored_rows(self, from_position: int, to_position: int, stream: str | None
                    ) -> Iterator[tuple[int, str, int, str, int, str, bytes]]:
        """Rows as stored (position, stream, version, type, schema_version, recorded_at,
        data), not decoded (for export)."""
        try:
            for rows in self.batches(from_position, to_position, _EXPORT_COLUMNS, stream):
                yield from rows
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

    def read_stream(self, stream: str, from_version: int = 1) -> Iterator[RecordedEvent]:
        """See `EventStore.read_stream`."""
        for rows in self.stream_chunks(_SELECT_STREAM, stream, from_version):
            for events in self.events((rows,)):
                yield from events

    def stored_stream(self, stream: str, from_version: int = 1
                      ) -> Iterator[tuple[int, int, str, int, bytes]]:
        """See `EventStore.stored_stream`."""
        for rows in self.stream_chunks(_SELECT_STREAM_STORED, stream, from_version):
            yield from rows

    def stream_chunks(self, sql: str, stream: str, from_version: int) -> Iterator[list[Any]]:
        """The rows of `sql` (a stream's point lookups) for one stream, a chunk of versions
        at a time, until its last version."""
        if type(stream) is not str:
            raise TypeError(f"stream must be a str, not {stream!r}")
        start = max(from_version, 1)
        while True:
            end = start + _STREAM_CHUNK - 1
            rows = self.query(sql, (start, end, stream))
            yield rows
            if len(rows) < _STREAM_CHUNK:  # versions are contiguous: the first miss is the end
                return
            start = end + 1

    def read_types(self, types: Sequence[str]) -> Iterator[RecordedEvent]:
        """See `EventStore.read_types`."""
        marks = ", ".join("?" * len(types))
        cursor = self.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE type IN ({marks}) "
                              "ORDER BY position", tuple(types))
        batches = iter(lambda: cursor.fetchmany(_FETCH_ROWS), [])
        return itertools.chain.from_iterable(self.events(batches))

    def stream_version(self, stream: str) -> int:
        try:
            # Several snapshots; a version once present stays, so the answer is the head at
            # some moment of the search.
            return probe_head(self.pool.get(), stream)
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            raise LogCorrupted(f"cannot read {self.path}: {exc}") from None

    def streams_starting_with(self, prefix: str, limit: int) -> list[str]:
        """See `EventStore.streams_starting_with`."""
        found = []
        for (stream,) in self.execute("SELECT stream FROM events WHERE version = 1 AND "
                                      "stream >= ? ORDER BY stream", (prefix,)):
            if not isinstance(stream, str) or not stream.startswith(prefix) \
                    or len(found) == limit:
                break
            found.append(stream)
        return found

    def streams(self) -> dict[str, int]:
        return dict(self.query("SELECT stream, max(version) FROM events GROUP BY stream"))

    def head(self) -> tuple[int, bytes]:
        rows = self.query(SELECT_HEAD)
        return head_of(self.path, rows[0] if rows else None)
