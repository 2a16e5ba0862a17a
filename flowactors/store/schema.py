"""The log's file format: its tables, indexes and triggers, and the checks that a file is one.

Key layout of `events`. `position` is the rowid, so appends land on the right edge of the
table b-tree. Uniqueness of (stream, version) is enforced by the unique index
events_version_stream on (version, stream): the same constraint, ordered by version first.
Running jobs append at similar versions, so a group commit of 100 streams touches a few index
leaves near the right edge, where (stream, version) order dirties one leaf per stream and
commit. Measured (SQLite 3.40, synchronous=FULL, 100 interleaved streams, 4 events per stream
and commit, rows/s):
                                             (stream, version)   (version, stream)
  fresh log, 400-row commits                       130k                187k
  fresh log, 100-row commits                       105k                154k
  2000 finished 60-event jobs, 400-row commits      62k                136k
  5000 finished 200-event jobs, 400-row commits     90k                 60k
Only a log dominated by much longer finished jobs favours (stream, version). Per-stream reads
use the same index with point lookups (version = ? AND stream = ?) over consecutive versions
(see `reader.SELECT_STREAM`): a range on `version` would scan every stream's entries.

The inbox's `requests.args` column and the `fork` command came later, without a new format
version: a log without them is still format 1 and opens everywhere. Its owner adds both when
it opens it (`migrate`, one transaction, recorded in `meta`); readers never write, so until an
owner of this version opened it a log's inbox takes the three control commands only. An older
owner of a migrated log reads the requests it knows and rejects a fork as an unknown command.

Not guarded: a foreign connection's INSERT OR REPLACE deletes the row it replaces without
firing delete triggers (unless it enables recursive_triggers). A BEFORE INSERT trigger against
it costs ~30% of append throughput; `verify` detects the result (hash chain, gaps) instead.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime, timezone
from typing import Any

import sqlite_utils

from .chain import GENESIS_HASH, read_only_uri
from ..control import REQUEST_COMMANDS
from ..faults import fault_point
from ..errors import LogCorrupted

FORMAT_VERSION = 1
"""The layout of the file; stored in `meta` and in `PRAGMA user_version`."""
APPLICATION_ID = 0x466C4163  # b"FlAc": PRAGMA application_id, bytes 68..71 of the file header
OUTCOMES = ("applied", "rejected")

_APPEND_ONLY_TABLES = ("events", "blob_refs", "requests", "answers")
SMALL_TABLES = ("meta", "blobs", "blob_refs", "requests", "answers")
_REQUIRED_TABLES = frozenset({"meta", "events", "blobs", "blob_refs", "requests", "answers"})


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_REQUESTS_CHECK_COMMAND = f"""CREATE TRIGGER requests_check_command BEFORE INSERT ON requests
       WHEN NEW.command NOT IN ({_one_of(REQUEST_COMMANDS)})
         OR (NEW.command = 'fork') <> (NEW.args IS NOT NULL)
       BEGIN SELECT RAISE(ABORT,
         'flowactors: requests.command is pause, resume, cancel or fork (only fork has args)');
       END"""
_MIGRATED_INBOX = "inbox_fork_added_at"
"""The `meta` key `migrate` records, with the time it added forks to an old log's inbox."""

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
    _REQUESTS_CHECK_COMMAND,
    f"""CREATE TRIGGER answers_check_outcome BEFORE INSERT ON answers
       WHEN NEW.outcome NOT IN ({_one_of(OUTCOMES)})
       BEGIN SELECT RAISE(ABORT, 'flowactors: answers.outcome is applied or rejected'); END""",
]

SELECT_HEAD = "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1"


def create_schema(conn: sqlite3.Connection) -> None:
    """Create every table, index and trigger in one transaction, on an empty database."""
    db = sqlite_utils.Database(conn)
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
            {"id": int, "job_id": str, "command": str, "requested_at": str, "args": bytes},
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
             "created_at", now_iso(),
             "event_hash", "sha256(msgpack([prev_hash, position, stream, version, type, "
                           "schema_version, recorded_at, data])), prev of position 1 = 32 zero "
                           "bytes"),
        )


def takes_forks(conn: sqlite3.Connection) -> bool:
    """Whether the log's inbox takes fork requests (its `requests` has `args`, and its trigger
    lets `fork` in)."""
    has_args = conn.execute(
        "SELECT 1 FROM pragma_table_info('requests') WHERE name = 'args'").fetchone()
    trigger = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' "
                           "AND name = 'requests_check_command'").fetchone()
    return has_args is not None and trigger is not None and "'fork'" in trigger[0]


def migrate(conn: sqlite3.Connection) -> bool:
    """Let an older log's inbox take forks: add `requests.args` and replace the command
    trigger, in one transaction (the owner's, on open). Returns whether anything changed."""
    if takes_forks(conn):
        return False
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'args'"
                        ).fetchone() is None:
            conn.execute("ALTER TABLE requests ADD COLUMN args BLOB")
        conn.execute("DROP TRIGGER IF EXISTS requests_check_command")
        conn.execute(_REQUESTS_CHECK_COMMAND)
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                     (_MIGRATED_INBOX, now_iso()))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def create_log_file(path: str) -> None:
    """Create a new, empty log at `path` atomically: the schema is written to a sibling file,
    made durable, and renamed over `path`.

    A process killed while creating a log then leaves either no log or a whole one at `path`
    (an empty file there would be refused by `verify` and every reader), and at most a sibling
    `.creating` file, which the next creation replaces. The caller holds the owner lock.
    """
    staging = f"{path}.creating"
    for leftover in (staging, f"{staging}-journal"):
        if os.path.exists(leftover):
            os.remove(leftover)
    conn = sqlite3.connect(staging, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = FULL")
        create_schema(conn)
    finally:
        conn.close()
    fault_point("store.creating")  # crash tests: the schema staged, not yet renamed into place
    with open(staging, "rb") as staged:
        os.fsync(staged.fileno())
    for stale in (f"{path}-wal", f"{path}-shm"):  # of the empty file replaced, if any
        if os.path.exists(stale):
            os.remove(stale)
    os.replace(staging, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def parse_time(value: str, where: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise LogCorrupted(f"{where}: recorded time {value!r} is not an ISO-8601 time") from None


def check_header(path: str) -> bool:
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


def head_of(path: str, row: Any) -> tuple[int, bytes]:
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


def check_schema(path: str, conn: sqlite3.Connection) -> None:
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
