"""The append-only SQLite event log: events, content-addressed blobs, the control inbox.

A package of named parts, each one role:

    schema        the file format: tables, indexes, triggers; the checks that a file is a log
    chain         the hash chain of the rows (and its check in a process of its own)
    connections   connections to a log, the owner lock, `owner_of`
    writer        the group-commit writer thread (and the WAL checkpointer)
    reader        reading events in order or by stream, decoded
    blobs         content-addressed blobs and the streams that reference them
    inbox         control and fork requests, and answers
    integrity     `verify`, as steps over one snapshot
    open_check    the checks an open runs beside its replay, from the same steps
    history_rows  the rows a recorded history becomes (for `testing.log_from_history`)
    event_store   `EventStore`, the facade over the rest

Every SQL statement of flowactors is in this package.
"""

from ..control import RequestCommand as Command
from ..ports import Answer, Request, VerifyReport
from .chain import GENESIS_HASH, row_hash
from .connections import Owner, owner_of
from .event_store import EventStore, Mode, SqliteCheckpoints, Synchronous
from .history_rows import write_history
from .open_check import OpenCheck
from .schema import APPLICATION_ID, FORMAT_VERSION
from .writer import _Append

__all__ = [
    "APPLICATION_ID",
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "Answer",
    "Command",
    "EventStore",
    "Mode",
    "OpenCheck",
    "Owner",
    "Request",
    "SqliteCheckpoints",
    "Synchronous",
    "VerifyReport",
    "_Append",
    "owner_of",
    "row_hash",
    "write_history",
]
