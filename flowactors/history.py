"""The history line format: one recorded event as one JSON line (JSONL), the format of
`flowactors export`, `flowactors history --json` and the recorded histories of the tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec

from .codec import decode_event, stored_data
from .errors import JobNotFound, LogCorrupted
from .events import RecordedEvent
from .store import EventStore

__all__ = ["HistoryLine", "export_lines", "history_line"]


class HistoryLine(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One line of an exported history (JSONL): a recorded event as the log stored it.

    `data` holds the event's fields in the shape of its `schema_version` (an old version is
    upcast when the line is read back), without the `type` tag, which is its own field.
    """

    position: int
    stream: str
    version: int
    type: str
    schema_version: int
    recorded_at: datetime
    data: dict[str, Any]


_line_encoder = msgspec.json.Encoder()


def history_line(recorded: RecordedEvent) -> bytes:
    """A decoded event as one JSON line (no newline), in its current schema version.

    This is what `flowactors history --json` prints: `load_history` reads it back as is. An
    event that was stored in an old schema version is written upcast, with the version it has
    now, so the line stays self-consistent.
    """
    event = recorded.event
    data = msgspec.to_builtins(event)
    data.pop("type", None)
    return _line_encoder.encode(HistoryLine(
        position=recorded.position, stream=recorded.stream, version=recorded.version,
        type=recorded.type, schema_version=type(event).schema_version,
        recorded_at=recorded.recorded_at, data=data))


def export_lines(store: EventStore, *, job_id: str | None = None,
                 from_position: int = 1) -> Iterator[bytes]:
    """The log's events as JSON lines (without newline), in log order, exactly as stored:
    the schema version they were written in, their data as written.

    Reads position ranges, each from a fresh read snapshot, so exporting a log a runtime is
    writing neither blocks it nor holds back its WAL; the export ends at the head it finds.

    Raises:
        JobNotFound: `job_id` has no events. LogCorrupted: an event does not decode.
    """
    if job_id is not None and store.stream_version(job_id) == 0:
        raise JobNotFound(f"job {job_id!r} not found in {store.path}")
    rows = store.stored_rows(max(1, from_position), stream=job_id)
    return (_export_row(store.path, *row) for row in rows)


def _export_row(path: str, position: int, stream: str, version: int, type_: str,
                schema_version: int, at: str, data: bytes) -> bytes:
    try:
        decode_event(type_, schema_version, data)  # what export writes, load_history reads
        fields = stored_data(data)
        recorded_at = datetime.fromisoformat(at)
    except (LogCorrupted, msgspec.DecodeError, TypeError, ValueError) as exc:
        raise LogCorrupted(f"{path}, position {position}: {exc}") from None
    fields.pop("type", None)
    return _line_encoder.encode(HistoryLine(
        position=position, stream=stream, version=version, type=type_,
        schema_version=schema_version, recorded_at=recorded_at, data=fields))
