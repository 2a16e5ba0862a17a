"""Content-addressed blobs (checkpoint states) in the log file, and which streams hold them.

A blob's key is the hex SHA-256 of its bytes. The `blob_refs` table records, per stream, the
blobs an append stored (`ref`) and let go (`release`); a blob row is deleted once no stream
references it (a trigger enforces it). All the SQL about blobs is here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from ..codec import digest as content_digest
from ..errors import BlobNotFound, LogCorrupted

# A digest is referenced while some stream's latest ref/release row for it is a 'ref'.
_LIVE_REF = """
    SELECT r.digest, r.stream FROM blob_refs AS r
    WHERE r.op = 'ref' {where}
      AND NOT EXISTS (SELECT 1 FROM blob_refs AS l
                      WHERE l.digest = r.digest AND l.stream = r.stream
                        AND l.op = 'release' AND l.id > r.id)"""
_REFERENCED = _LIVE_REF.format(where="AND r.digest = ?1") + " LIMIT 1"
_MISSING = _LIVE_REF.format(
    where="AND NOT EXISTS (SELECT 1 FROM blobs AS b WHERE b.digest = r.digest)") + " LIMIT 1"
SELECT_DATA = "SELECT data FROM blobs WHERE digest = ?"
SELECT_EXISTS = "SELECT 1 FROM blobs WHERE digest = ?"
_CHECK_CHUNK = 64


def write_refs(conn: sqlite3.Connection, position: int, stream: str,
               blobs: Sequence[tuple[str, bytes]], releases: Sequence[str]) -> None:
    """Store an append's blobs and record its refs/releases (releases first, so a digest
    both released and stored again by one append stays referenced); delete what no stream
    references any more. Inside the append's transaction."""
    if blobs:
        conn.executemany("INSERT OR IGNORE INTO blobs (digest, size, data) VALUES (?, ?, ?)",
                         [(d, len(b), b) for d, b in blobs])
    conn.executemany(
        "INSERT INTO blob_refs (position, stream, digest, op) VALUES (?, ?, ?, ?)",
        [(position, stream, d, "release") for d in releases]
        + [(position, stream, d, "ref") for d, _ in blobs])
    for released in dict.fromkeys(releases):
        if conn.execute(_REFERENCED, (released,)).fetchone() is None:
            conn.execute("DELETE FROM blobs WHERE digest = ?", (released,))


def put(conn: sqlite3.Connection, data: bytes) -> str:
    """Store bytes under their content address (idempotent); return the address."""
    address = content_digest(data)
    conn.execute("INSERT OR IGNORE INTO blobs (digest, size, data) VALUES (?, ?, ?)",
                 (address, len(data), data))
    return address


def delete_unreferenced(conn: sqlite3.Connection, digest: str) -> bool:
    """Delete a blob that no stream references (records a release of the empty stream, which
    never holds one, so the delete trigger allows it); return whether it is gone."""
    if conn.execute(_REFERENCED, (digest,)).fetchone() is not None:
        return False
    if conn.execute(SELECT_EXISTS, (digest,)).fetchone() is not None:
        conn.execute("INSERT INTO blob_refs (position, stream, digest, op) "
                     "VALUES (0, '', ?, 'release')", (digest,))
        conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
    return True


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
    """Check every blob against its address and size, and that every referenced blob
    exists: (blobs checked, the first problem or None)."""
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
    missing = conn.execute(_MISSING).fetchone()
    if missing is not None:
        return checked_, f"blob {missing[0]} is referenced by stream {missing[1]!r} but missing"
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
        return self._store._call_in_writer(
            lambda conn: delete_unreferenced(conn, address)).result()
