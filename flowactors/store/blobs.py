"""Content-addressed blobs (small checkpoint states, large recorded trajectories) in the log.

A blob's key is the hex SHA-256 of its bytes; it is inserted in the transaction of the append
whose event names it. Which blobs are still needed is not recorded here: it is derived from
the jobs' folded states (`flowactors.checkpointing.StateStore`), which deletes the rest. All
the SQL about blobs is here.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from ..codec import digest as content_digest
from ..errors import BlobNotFound, LogCorrupted

SELECT_DATA = "SELECT data FROM blobs WHERE digest = ?"
SELECT_EXISTS = "SELECT 1 FROM blobs WHERE digest = ?"
SELECT_DIGESTS = "SELECT digest FROM blobs"
# A log written from a recorded history has its events and none of the states they name.
NO_STATES = "INSERT OR REPLACE INTO meta (key, value) VALUES ('states_recorded', 'no')"
SELECT_NO_STATES = "SELECT 1 FROM meta WHERE key = 'states_recorded' AND value = 'no'"
_CHECK_CHUNK = 64


def insert(conn: sqlite3.Connection, blobs: Sequence[tuple[str, bytes]]) -> None:
    """Store an append's blobs (idempotent: equal bytes are one row). Inside the append's
    transaction."""
    conn.executemany("INSERT OR IGNORE INTO blobs (digest, size, data) VALUES (?, ?, ?)",
                     [(d, len(b), b) for d, b in blobs])


def delete(conn: sqlite3.Connection, digests: Iterable[str]) -> None:
    """Delete these blobs (absent ones are no-ops): the caller decided no job needs them."""
    conn.executemany("DELETE FROM blobs WHERE digest = ?", [(d,) for d in digests])


def write_batch(conn: sqlite3.Connection, appends: Sequence[Any],
                deletes: Sequence[tuple[int, list[str]]]) -> None:
    """A group commit's blobs: insert the accepted appends' and run the deletes (each with
    the number of appends queued before it), in queue order, so a deletion queued before an
    append storing the same bytes again runs first and the bytes stay."""
    done = 0
    for before, digests in [*deletes, (len(appends), [])]:
        for item in appends[done:before]:
            if item.blobs and not item.settled:  # a refused append is settled already
                insert(conn, item.blobs)
        if digests:
            delete(conn, digests)
        done = before


def delete_alone(conn: sqlite3.Connection, deletes: Sequence[tuple[int, list[str]]]
                 ) -> str | None:
    """Run queued deletions in a transaction of their own; the error, if it failed."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        for _, digests in deletes:
            delete(conn, digests)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return str(exc)
    return None


def put(conn: sqlite3.Connection, data: bytes) -> str:
    """Store bytes under their content address (idempotent); return the address."""
    address = content_digest(data)
    conn.execute("INSERT OR IGNORE INTO blobs (digest, size, data) VALUES (?, ?, ?)",
                 (address, len(data), data))
    return address


def checked(path: str, digest: str, rows: list[tuple[bytes]]) -> bytes:
    """The bytes of a blob read as `rows` of SELECT_DATA, checked against their address.

    Raises:
        BlobNotFound: no such blob. LogCorrupted: the bytes do not hash to their address.
    """
    if not rows:
        raise BlobNotFound(f"no blob {digest} in {path}")
    data = bytes(rows[0][0])
    actual = content_digest(data)
    if actual != digest:
        raise LogCorrupted(f"{path}: blob {digest} does not match its address "
                           f"(its content hashes to {actual})")
    return data


def check_all(conn: sqlite3.Connection) -> tuple[int, str | None]:
    """Check every blob against its address and size: (blobs checked, the first problem or
    None). Whether every needed blob exists is the folded states' question
    (`flowactors.checkpointing.StateStore.verify`)."""
    checked_ = 0
    last = ""
    while True:
        rows = conn.execute(
            "SELECT digest, size, data FROM blobs WHERE digest > ? ORDER BY digest LIMIT "
            f"{_CHECK_CHUNK}", (last,)).fetchall()
        for digest_, size, data in rows:
            if not isinstance(data, bytes) or content_digest(data) != digest_:
                return checked_, f"blob {digest_} does not match its address (content edited)"
            if size != len(data):
                return checked_, (f"blob {digest_} has size {size} recorded but {len(data)} "
                                  f"bytes")
            checked_ += 1
            last = digest_
        if len(rows) < _CHECK_CHUNK:
            break
    return checked_, None


class SqliteCheckpoints:
    """The `CheckpointStore` of a log's blobs table, over an open `EventStore` (its writes go
    through the owner's writer)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def put(self, data: bytes) -> str:
        data = bytes(data)
        return self._store._call_in_writer(lambda conn: put(conn, data)).result()

    def get(self, address: str) -> bytes:
        return self._store.get_blob(address)

    def has(self, address: str) -> bool:
        return self._store.has_blob(address)

    def delete(self, address: str) -> bool:
        """Delete at once (the caller decided nothing needs the bytes); always True."""
        self._store._call_in_writer(lambda conn: delete(conn, [address])).result()
        return True
