"""The group-commit writer: one daemon thread that writes every append of the owner.

`append` encodes its events in the caller's thread, queues them and blocks; the writer drains
everything queued, checks each append's expected version against its in-memory head map,
writes all accepted appends in ONE transaction (one fsync) and only then wakes their callers.
An append therefore returns only once it is durable, and one stream's conflict never fails
another stream's append.

How the writer keeps a hundred appending threads from stalling it on the GIL: it inserts a
batch with ONE statement in autocommit (see `INSERT_ROWS`), wakes the callers of the previous
batch only once it is inside SQLite without the GIL, and wakes them one at a time (`_Append`).
A checkpointer thread copies the WAL into the database file meanwhile.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any


from ..errors import ConcurrencyConflict, LogCorrupted, StoreUnavailable
from ..events import Event, RecordedEvent
from ..faults import fault_point
from . import blobs
from .chain import frame_hash
from .connections import connect_checkpointer
from .reader import probe_head
from .schema import SELECT_HEAD, head_of
from ..logs import get_logger

log = get_logger(__name__)

CHECKPOINT_ROWS = 4_096
"""Appended rows between two checkpoints of the WAL by the checkpointer thread."""

# How the writer inserts a batch: not executemany, which steps SQLite once per row and releases
# and re-takes the GIL around each step (with appenders running, every re-take is a thread
# switch), but ONE statement of up to INSERT_MAX_ROWS rows, in autocommit: insert, commit and
# fsync in a single call without the GIL. To keep a handful of prepared statements, the row
# slots come in powers of two and unused slots are NULL rows that the WHERE drops.
INSERT_MAX_ROWS = 2048  # 8 parameters a row: within SQLite's 32766
INSERT_ROWS = {
    n: "INSERT INTO events (position, stream, version, type, schema_version, recorded_at, "
       "data, hash) SELECT * FROM (VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * n)
       + ") WHERE column1 IS NOT NULL"
    for n in (1 << k for k in range(INSERT_MAX_ROWS.bit_length()))
}


def insert_rows(conn: sqlite3.Connection, params: list[Any]) -> None:
    """Insert up to INSERT_MAX_ROWS event rows (8 values each, flat) with one statement."""
    n_rows = len(params) >> 3
    slots = 1 << (n_rows - 1).bit_length()
    if slots > n_rows:
        params = params + [None] * ((slots - n_rows) << 3)
    conn.execute(INSERT_ROWS[slots], params)


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

    __slots__ = ("stream", "expected", "events", "encoded", "blobs", "done",
                 "position", "recorded_at", "hashes", "error", "next", "settled")

    def __init__(self, stream: str, expected: int, events: list[Event],
                 encoded: list[tuple[str, int, bytes]], blobs: list[tuple[str, bytes]]
                 ) -> None:
        self.stream = stream
        self.expected = expected
        self.events = events
        self.encoded = encoded
        self.blobs = blobs
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


class _Delete:
    """Blobs to delete, queued without waiting: they ride the next group commit, ordered
    before the appends queued after them (`blobs.write_batch`)."""

    __slots__ = ("digests",)

    def __init__(self, digests: list[str]) -> None:
        self.digests = digests


_STOP = object()


class Writer:
    """The owner's writer thread and checkpointer thread, over the owner's connection."""

    def __init__(self, path: str, conn: sqlite3.Connection, head: tuple[int, bytes]) -> None:
        self.path = path
        self.conn = conn
        # The head version of each stream appended to, found on its first append (an open of
        # a long log does not scan the log for them).
        self.heads: dict[str, int] = {}
        self.head = head
        self.closed = False  # stop() was called
        self.stopped = False  # no more writes: closed, or the writer failed
        self._gate = threading.Lock()  # orders "stopped?" checks against queue puts
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._settled: list[_Append] = []  # committed, callers not woken yet (writer only)
        self._rows_since_checkpoint = 0
        self._checkpoint_wanted = threading.Event()
        name = path.rsplit("/", 1)[-1]
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, daemon=True,
                                              name=f"flowactors-checkpointer:{name}")
        self._thread = threading.Thread(target=self._write_loop, daemon=True,
                                        name=f"flowactors-writer:{name}")

    def start(self) -> None:
        self._checkpointer.start()
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop both threads; idempotent."""
        with self._gate:
            if self.closed:
                return
            self.closed = self.stopped = True
            if self._thread.is_alive():
                self._queue.put(_STOP)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self._checkpointer.is_alive():
            self._checkpoint_wanted.set()
            self._checkpointer.join()

    def not_writable(self, what: str) -> StoreUnavailable:
        if self.closed:
            return StoreUnavailable(f"{self.path}: the store is closed, cannot {what}")
        return StoreUnavailable(
            f"{self.path}: the store's writer stopped after an error, cannot {what}; "
            f"close and reopen the log")

    def submit(self, item: _Append) -> None:
        with self._gate:
            if self.stopped:
                raise self.not_writable("append")
            self._queue.put(item)

    def delete_blobs(self, digests: list[str]) -> None:
        """Queue the deletion of these blobs; returns at once (see `_Delete`)."""
        with self._gate:
            if self.stopped:
                raise self.not_writable("delete blobs")
            self._queue.put(_Delete(digests))

    def call(self, fn: Callable[[sqlite3.Connection], Any]) -> _Call:
        """Queue `fn(connection)` to run in the writer thread, between batches."""
        call = _Call(fn)
        with self._gate:
            if self.stopped:
                raise self.not_writable("write")
            self._queue.put(call)
        return call

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
                deletes: list[tuple[int, list[str]]] = []  # (appends queued before, digests)
                for item in batch:
                    kind = type(item)
                    if kind is _Append:
                        appends.append(item)
                        continue
                    if kind is _Delete:
                        deletes.append((len(appends), item.digests))
                        continue
                    if appends or deletes:  # keep queue order around calls
                        self._commit(appends, deletes)
                        appends, deletes = [], []
                    self._wake_settled()
                    if item is _STOP:
                        return
                    self._run_call(item)
                if appends or deletes:
                    self._commit(appends, deletes)
        except BaseException as exc:  # a bug: fail everyone rather than hang them
            log.exception("store_writer_crashed", path=self.path)
            with self._gate:
                self.stopped = True
            self._wake_settled()
            error = StoreUnavailable(f"{self.path}: the store's writer stopped: {exc!r}")
            leftovers = list(batch)
            while True:
                try:
                    leftovers.append(get_nowait())
                except queue.Empty:
                    break
            for item in leftovers:
                if item is not _STOP and type(item) is not _Delete and not item.settled:
                    item.refuse(error)

    def _wake_settled(self) -> None:
        """Wake the callers of the last committed batch, as a chain (see `_Append`)."""
        settled = self._settled
        if settled:
            self._settled = []
            for item, following in zip(settled, settled[1:]):
                item.next = following
            settled[0].done.release()

    def _accept(self, appends: list[_Append]) -> tuple[list[_Append], dict[str, int]]:
        """The appends at their expected versions (the others refused), and the streams'
        versions after them."""
        heads = self.heads
        staged: dict[str, int] = {}
        accepted: list[_Append] = []
        for item in appends:
            stream = item.stream
            current = staged.get(stream)
            if current is None:
                current = heads.get(stream)
            if current is None:
                try:
                    current = heads[stream] = probe_head(self.conn, stream)
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
        return accepted, staged

    def _stamp(self, accepted: list[_Append], ts: str) -> tuple[list[Any], tuple[int, bytes]]:
        """The rows of the accepted appends (flat values), positioned and hash-chained."""
        position, prev = self.head
        params: list[Any] = []
        add = params.extend
        row_hash = frame_hash
        for item in accepted:
            item.position = position + 1
            stream = item.stream
            version = item.expected
            hashes = item.hashes = []
            for type_, schema_version, data in item.encoded:
                position += 1
                version += 1
                prev = row_hash((prev, position, stream, version, type_, schema_version, ts,
                                 data))
                add((position, stream, version, type_, schema_version, ts, data, prev))
                hashes.append(prev.hex())
        return params, (position, prev)

    def _commit(self, appends: list[_Append], deletes: list[tuple[int, list[str]]]) -> None:
        """Write the accepted appends of one batch, and its blob deletes, in one transaction.

        The callers of the previous batch are woken only once this batch's rows are built and
        its transaction begun: they then run (and queue their next appends) while this thread
        is inside SQLite without the GIL, instead of holding up the writer when it needs it.
        An append is acknowledged only after its own commit, always.
        """
        accepted, staged = self._accept(appends)
        if not accepted:
            self._wake_settled()
            if deletes:  # the writer was idle, or every append refused: commit them alone
                problem = blobs.delete_alone(self.conn, deletes)
                if problem is not None:  # left for the next open's sweep
                    log.warning("blob_delete_failed", path=self.path, error=problem)
            return
        now = datetime.now(timezone.utc)
        params, head = self._stamp(accepted, now.isoformat(timespec="microseconds"))
        with_blobs = bool(deletes) or any(item.blobs for item in accepted)
        conn = self.conn
        n_rows = len(params) >> 3
        try:
            if n_rows <= INSERT_MAX_ROWS and not with_blobs:  # the path of nearly every batch
                self._wake_settled()
                fault_point("store.commit")  # crash tests: a group commit not yet written
                insert_rows(conn, params)  # one statement: its own transaction
                fault_point("store.committed")  # crash tests: written, not acknowledged
            else:
                conn.execute("BEGIN IMMEDIATE")
                self._wake_settled()
                for start in range(0, len(params), INSERT_MAX_ROWS << 3):
                    insert_rows(conn, params[start:start + (INSERT_MAX_ROWS << 3)])
                blobs.write_batch(conn, appends, deletes)
                # crash tests: inside the transaction, before its commit
                fault_point("store.commit_with_blobs" if with_blobs else "store.commit_large")
                conn.execute("COMMIT")
        except Exception as exc:
            self._wake_settled()
            self._fail_batch(accepted, exc)
            return
        self.head = head
        self.heads.update(staged)
        for item in accepted:
            item.recorded_at = now
            item.settled = True
        self._settled = accepted
        self._rows_since_checkpoint += n_rows
        if self._rows_since_checkpoint >= CHECKPOINT_ROWS:
            self._rows_since_checkpoint = 0
            self._checkpoint_wanted.set()

    def _fail_batch(self, accepted: list[_Append], exc: Exception) -> None:
        """Roll back; fail exactly this batch's appends; keep heads and chain as they were."""
        conn = self.conn
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
            on_disk = head_of(self.path, conn.execute(SELECT_HEAD).fetchone())
            if on_disk != self.head:
                self.head = on_disk
                self.heads.clear()
                log.warning("store_heads_reloaded", path=self.path, head=self.head[0])
        except (sqlite3.Error, LogCorrupted):
            pass

    def _run_call(self, call: _Call) -> None:
        try:
            call.value = call.fn(self.conn)
        except BaseException as exc:
            call.error = exc
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
        call.settled = True
        call.done.release()

    # --- the checkpointer thread ---

    def _checkpoint_loop(self) -> None:
        """Copy committed WAL pages into the database file, off the writer's thread."""
        try:
            conn = connect_checkpointer(self.path)
        except sqlite3.Error as exc:
            log.warning("checkpointer_unavailable", path=self.path, error=str(exc))
            return
        try:
            while True:
                self._checkpoint_wanted.wait()
                self._checkpoint_wanted.clear()
                if self.closed:
                    return
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:  # the writer's backstop still checkpoints
                    log.warning("checkpoint_failed", path=self.path, error=str(exc))
        finally:
            conn.close()

