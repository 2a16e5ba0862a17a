"""The log's hash chain: how a row's hash is computed, and a check of a whole log.

Standalone on purpose (sqlite3, hashlib, msgspec; nothing else of the package): a runtime
opening a long log runs this file as a process of its own (`python chain.py LOG UPTO`) while it
replays the log itself, so on a machine with a second core the check adds no time to the open.
The process prints one JSON line: the verified head, or the first row that breaks the chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

GENESIS_HASH = bytes(32)
"""The "previous hash" of the first event."""
EVENT_COLUMNS = "position, stream, version, type, schema_version, recorded_at, data, hash"

_frame = msgspec.msgpack.Encoder().encode
_sha256 = hashlib.sha256


def row_hash(prev: bytes, position: int, stream: str, version: int, type_: str,
             schema_version: int, recorded_at: str, data: bytes) -> bytes:
    """The chained hash of one event row.

    SHA-256 over the MessagePack array ``[prev, position, stream, version, type,
    schema_version, recorded_at, data]``: MessagePack frames every value with its type and length,
    so no two different rows share an encoding. The first row's `prev` is `GENESIS_HASH`.
    """
    return frame_hash((prev, position, stream, version, type_, schema_version, recorded_at,
                       data))


def frame_hash(row: tuple[Any, ...]) -> bytes:
    """`row_hash` of a row given as one tuple (the writer's and `checked`'s hot loops)."""
    return _sha256(_frame(row)).digest()


class ChainBroken(Exception):
    """A row breaks the chain: `position` is the first bad one, `problem` says how."""

    def __init__(self, position: int, problem: str) -> None:
        super().__init__(f"the event at position {position} fails verification ({problem})")
        self.position = position
        self.problem = problem


def checked(batches: Iterable[list[Any]]) -> Iterator[list[Any]]:
    """Pass lists of rows (`EVENT_COLUMNS`, from position 1) through, checking positions and
    the hash chain as they go by.

    Raises:
        ChainBroken: a position is missing, or a row's hash does not match its content and
            the previous row's hash.
    """
    prev, expected_position = GENESIS_HASH, 1
    sha256, frame = _sha256, _frame  # inlined `frame_hash`: the open's hottest loop
    for rows in batches:
        for position, stream, version, type_, schema_version, ts, data, hash_ in rows:
            prev = sha256(frame((prev, position, stream, version, type_, schema_version,
                                 ts, data))).digest()
            if position != expected_position or prev != hash_:
                raise ChainBroken(position, f"position {expected_position} is missing"
                                  if position != expected_position else
                                  "its hash does not match its content and the chain")
            expected_position += 1
        yield rows


def read_only_uri(path: str) -> str:
    """The SQLite URI that opens `path` read-only (any character in the path is safe)."""
    return "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"


def _rows(conn: sqlite3.Connection, upto: int, chunk: int = 256) -> Iterator[list[Any]]:
    cursor = conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM events WHERE position <= ? ORDER BY position", (upto,))
    while rows := cursor.fetchmany(chunk):
        yield rows


def check_file(path: str, upto: int) -> dict[str, Any]:
    """Check the chain of the log at `path` up to position `upto`; a JSON-able verdict."""
    conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("BEGIN")  # one snapshot: the head reported is the head checked
        position, head = 0, GENESIS_HASH
        for rows in checked(_rows(conn, upto)):
            position, head = rows[-1][0], rows[-1][7]
        return {"ok": True, "position": position, "hash": head.hex()}
    except ChainBroken as exc:
        return {"ok": False, "position": exc.position, "problem": str(exc)}
    except (sqlite3.Error, UnicodeError, ValueError, TypeError) as exc:
        return {"ok": False, "position": None, "problem": f"cannot read the log: {exc}"}
    finally:
        conn.close()


class CheckProcess:
    """`check_file` in a process of its own (the same interpreter), running meanwhile."""

    def __init__(self, path: str, upto: int) -> None:
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), os.path.abspath(path), str(upto)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def verdict(self) -> dict[str, Any] | None:
        """Wait for the verdict; None if the process could not give one (then check here)."""
        out, _ = self._process.communicate()
        try:
            verdict = json.loads(out.decode())
        except ValueError:
            return None
        return verdict if isinstance(verdict, dict) and "ok" in verdict else None

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.communicate()


if __name__ == "__main__":
    print(json.dumps(check_file(sys.argv[1], int(sys.argv[2]))), flush=True)
