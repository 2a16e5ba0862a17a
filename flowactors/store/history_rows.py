"""A new log written from rows of a recorded history (`flowactors.testing.log_from_history`).

The rows keep what the history recorded — stream, version, type, schema version (old ones
stay old), time and data — with positions numbered from 1 in order and the hash chain computed
anew, as the writer would have. A history carries no states: the log says so in its `meta`
(`states_recorded` = `no`), so that the states its jobs name are not asked for.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

from .blobs import NO_STATES
from .chain import GENESIS_HASH, row_hash
from .event_store import EventStore

Row = tuple[str, int, str, int, str, bytes]
"""(stream, version, type, schema_version, recorded_at as ISO text, data as MessagePack)."""


def write_history(path: str | os.PathLike[str], rows: Iterable[Row]) -> int:
    """Create the log at `path` holding `rows` as its events; return how many.

    Raises:
        FileExistsError: the log exists already.
    """
    if os.path.exists(path):
        raise FileExistsError(f"{os.fspath(path)} exists already")
    prev = GENESIS_HASH
    values = []
    for position, (stream, version, type_, schema_version, at, data) in enumerate(rows, 1):
        prev = row_hash(prev, position, stream, version, type_, schema_version, at, data)
        values.append((position, stream, version, type_, schema_version, at, data, prev))

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO events (position, stream, version, type, "
                             "schema_version, recorded_at, data, hash) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)
            conn.execute(NO_STATES)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    with EventStore(path, mode="owner") as store:
        store._call_in_writer(insert).result()
    return len(values)
