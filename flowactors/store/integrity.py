"""Verification of a log, as steps over one read snapshot: the head, the events (hash chain,
positions, versions, decoding), the blobs, and SQLite's own structures.

`verify` runs them all, with integrity_check. An open (`open_check.OpenCheck`) runs the steps
its replay does not cover: the blobs, quick_check, the small tables' indexes, and a
fingerprint of the events index (`index_fingerprint`) instead of integrity_check's lookup of
every event in the index.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..codec import decode_event
from ..errors import LogCorrupted, one_line
from ..ports import VerifyReport
from . import blobs
from .chain import EVENT_COLUMNS, GENESIS_HASH, row_hash
from .reader import READ_CHUNK
from .schema import SELECT_HEAD, parse_time, small_tables

Progress = Callable[[int, int], None]


class Pass:
    """One pass of checks over a read snapshot, counting what it checked."""

    def __init__(self, path: str, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self.events_checked = 0
        self.blobs_checked = 0
        self.head_position = 0
        self.head_hash = GENESIS_HASH.hex()

    def report(self, problem: str | None = None, position: int | None = None) -> VerifyReport:
        return VerifyReport(ok=problem is None, events_checked=self.events_checked,
                            blobs_checked=self.blobs_checked, head_position=self.head_position,
                            head_hash=self.head_hash, first_bad_position=position,
                            problem=None if problem is None else one_line(problem))

    def read_head(self) -> None:
        row = self.conn.execute(SELECT_HEAD).fetchone()
        if row is not None:
            self.head_position = row[0]
            self.head_hash = bytes(row[1]).hex() if isinstance(row[1], bytes) else str(row[1])

    def check_events(self, expected: bytes | None, progress: Progress | None
                     ) -> VerifyReport | int | None:
        """Check every event row; return a failed report, or the position where the expected
        head was found (0: genesis; None: not found or not asked)."""
        found = 0 if expected == GENESIS_HASH else None
        prev = GENESIS_HASH
        next_position = 1
        versions: dict[str, int] = {}
        total = self.head_position
        last_ts = None
        while True:
            rows = self.conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE position >= ? ORDER BY position "
                f"LIMIT {READ_CHUNK}", (next_position,)).fetchall()
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
                        parse_time(ts, f"position {position}")
                        last_ts = ts
                except (LogCorrupted, TypeError, ValueError) as exc:
                    return self.report(f"event at position {position} does not decode: {exc}",
                                       position)
                prev = hash_
                if hash_ == expected:
                    found = position
                next_position = position + 1
                self.events_checked += 1
            if progress is not None:
                progress(self.events_checked, max(total, self.events_checked))
            if len(rows) < READ_CHUNK:
                return found

    def check_blobs(self) -> str | None:
        self.blobs_checked, problem = blobs.check_all(self.conn)
        return problem

    def pragma(self, pragma: str) -> str | None:
        lines = [row[0] for row in self.conn.execute(f"PRAGMA {pragma}").fetchall()]
        return None if lines == ["ok"] else f"SQLite {pragma}: {'; '.join(lines[:5])}"

    def quick_checks(self) -> str | None:
        """Every page (quick_check) and the small tables' indexes entry by entry."""
        problem = self.pragma("quick_check")
        for table in small_tables(self.conn):
            problem = problem or self.pragma(f"integrity_check({table})")
        return problem


def in_snapshot(path: str, conn: sqlite3.Connection, steps: Callable[[Pass], VerifyReport]
                ) -> VerifyReport:
    """Run `steps` in one read transaction of `conn` (one snapshot, even while the owner
    appends); an unreadable file is a failed report, never an exception."""
    check = Pass(path, conn)
    try:
        conn.execute("BEGIN")
        try:
            return steps(check)
        except (sqlite3.DatabaseError, UnicodeError) as exc:
            at = check.events_checked + 1  # the event being read, unless all were read
            return check.report(f"SQLite error reading {path}: {exc}",
                                at if at <= check.head_position else None)
        finally:
            with contextlib.suppress(sqlite3.Error):  # a damaged file fails here too
                conn.execute("ROLLBACK")
    except (sqlite3.DatabaseError, UnicodeError) as exc:
        return VerifyReport(ok=False, events_checked=0, blobs_checked=0, head_position=0,
                            head_hash="", first_bad_position=None,
                            problem=one_line(f"cannot read {path}: {exc}"))


def verify(path: str, conn: sqlite3.Connection, expected_head: str | None,
           progress: Progress | None) -> VerifyReport:
    """The whole check (`EventStore.verify`) over `conn`, which it closes."""
    expected = None
    if expected_head is not None:
        try:
            expected = bytes.fromhex(expected_head)
        except ValueError:
            conn.close()
            raise ValueError(f"expected_head is not a hex hash: {expected_head!r}") from None

    def steps(check: Pass) -> VerifyReport:
        check.read_head()
        found = check.check_events(expected, progress)
        if isinstance(found, VerifyReport):
            return found
        if expected is not None and found is None:
            return check.report(
                f"the expected head hash {expected.hex()} is not in the chain: the log "
                f"(head position {check.head_position}) was cut off or rewritten",
                check.head_position + 1)
        return check.report(check.check_blobs() or check.pragma("integrity_check"))

    try:
        return in_snapshot(path, conn, steps)
    finally:
        conn.close()


# --- the open's fingerprint of the events index -----------------------------------------------
#
# An open does not look up every event in the events index (integrity_check's way: most of its
# time on a long log). It compares a fingerprint of the index, read from the index alone, with
# the same fingerprint of the table's rows (tallied by the replay as it reads them): the count,
# the exact sums of versions and of positions, and the sum over entries of the job's weight
# times a mix of version and position, p * (a + v) + b * v (so two entries of one job trading
# positions change it too), modulo a prime. The weights and the mix are drawn at random for
# each open: damage to the index changes the fingerprint but for a chance of about 1 in 2^31.
# (The exact sums overflow past about 4 billion events: such a log would be refused.)
PRIME = 2**31 - 1  # a product of two residues fits SQLite's 64-bit integers
_WEIGHTS_TABLE = "temp.flowactors_job_weights"
_INDEX_FINGERPRINT = f"""
    SELECT count(*), sum(e.version), sum(e.position),
           sum((e.position % {PRIME} * ((?1 + e.version % {PRIME}) % {PRIME}) % {PRIME}
                + ?2 * (e.version % {PRIME}) % {PRIME}) % {PRIME} * w.k % {PRIME})
    FROM events AS e INDEXED BY events_version_stream
    CROSS JOIN {_WEIGHTS_TABLE} AS w ON w.stream = e.stream
    WHERE typeof(e.version) = 'integer'"""


def index_fingerprint(conn: sqlite3.Connection, upto: int, weight: Callable[[str], int],
                      mix: Sequence[int], mixed: Callable[[Iterable[Sequence[Any]]], int]
                      ) -> tuple[int, int, int, int] | str:
    """The fingerprint of every entry of the events index (count, sum of versions, sum of
    positions, weighted mix modulo PRIME), less that of the table's rows after `upto` (this
    snapshot may have more than the replay reads); or a problem. An entry of a job with no
    version 1 entry, or not of an integer version, is left out: the count differs."""
    conn.execute(f"CREATE TABLE {_WEIGHTS_TABLE} (stream TEXT PRIMARY KEY, "
                 "k INTEGER NOT NULL) WITHOUT ROWID")
    first = conn.execute("SELECT stream FROM events INDEXED BY events_version_stream "
                         "WHERE version = 1 AND typeof(stream) = 'text'").fetchall()
    conn.executemany(f"INSERT OR IGNORE INTO {_WEIGHTS_TABLE} VALUES (?, ?)",
                     [(stream, weight(stream)) for stream, in first])
    count, versions, positions, total = (value or 0 for value in conn.execute(
        _INDEX_FINGERPRINT, tuple(mix)).fetchone())
    after = conn.execute("SELECT position, stream, version FROM events WHERE position > ? "
                         "ORDER BY position", (upto,)).fetchall()
    try:
        total -= mixed(after)
    except TypeError as exc:
        return f"an event after position {upto} has a job or version of the wrong type ({exc})"
    return (count - len(after), versions - sum(row[2] for row in after),
            positions - sum(row[0] for row in after), total % PRIME)
