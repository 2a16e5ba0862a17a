"""Test helpers and a pytest plugin: recorded histories, replay, given/when/then, a runtime.

Registered as a pytest plugin (entry point `flowactors`), so its fixtures are available in any
project that installs flowactors:

    def test_my_task(flow_runtime):
        job_id = flow_runtime.submit(spec)
        assert flow_runtime.wait(job_id, timeout=30).status == "completed"
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from .codec import event_from_builtins
from .errors import LogCorrupted
from .events import Event, RecordedEvent, event_tag
from .job import Command, JobState, decide, fold, initial_state

_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


class HistoryLine(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One line of an exported history (JSONL): a recorded event as the log stored it."""

    position: int
    stream: str
    version: int
    type: str
    schema_version: int
    recorded_at: datetime
    data: dict[str, Any]


_line_decoder = msgspec.json.Decoder(HistoryLine)


def parse_history_line(line: str | bytes, where: str = "<history>") -> RecordedEvent:
    """Decode one exported line into a RecordedEvent (old schema versions upcast).

    Raises:
        LogCorrupted: naming `where` (file and line) and what does not fit.
    """
    try:
        parsed = _line_decoder.decode(line)
        event = event_from_builtins(parsed.type, parsed.schema_version, parsed.data)
    except (msgspec.DecodeError, msgspec.ValidationError, LogCorrupted) as exc:
        raise LogCorrupted(f"{where}: {exc}") from None
    return RecordedEvent(position=parsed.position, stream=parsed.stream, version=parsed.version,
                         type=parsed.type, schema_version=parsed.schema_version,
                         recorded_at=parsed.recorded_at, event=event)


def load_history(path: str | Path) -> list[RecordedEvent]:
    """Read a JSONL history written by `flowactors export`."""
    path = Path(path)
    events = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                events.append(parse_history_line(line, f"{path}:{number}"))
    return events


def replay(events: Iterable[RecordedEvent], job_id: str | None = None) -> JobState:
    """Fold a history (one job's events, or `job_id`'s events of a mixed one) into its state."""
    selected = [e for e in events if job_id is None or e.stream == job_id]
    streams = {e.stream for e in selected}
    if len(streams) != 1:
        raise ValueError(f"replay needs the events of one job, got streams {sorted(streams)}")
    return fold(selected)


def recorded(events: Iterable[Event], job_id: str = "job",
             after: JobState | None = None) -> Iterator[RecordedEvent]:
    """Wrap events in envelopes as if the log had just recorded them (after `after`)."""
    start = after.version if after is not None else 0
    for offset, event in enumerate(events, start=1):
        version = start + offset
        yield RecordedEvent(position=version, stream=job_id, version=version,
                            type=event_tag(type(event)), schema_version=type(event).schema_version,
                            recorded_at=_AT, event=event)  # type: ignore[arg-type]


def given(*events: Event, job_id: str = "job") -> JobState:
    """The state after these events."""
    return fold(recorded(events, job_id), initial_state(job_id))


def when(state: JobState, command: Command) -> list[Event]:
    """The events `command` decides on `state` (raises what `decide` raises)."""
    return decide(command, state)


def then(state: JobState, events: Iterable[Event]) -> JobState:
    """Fold decided events onto `state`, for the next step of a scenario."""
    return fold(recorded(events, state.job_id, after=state), state)


@pytest.fixture
def flow_runtime(tmp_path: Path) -> Iterator[Any]:
    """A ready Runtime on a temporary log, tuned for fast tests (synchronous=off)."""
    from .runtime import Runtime

    runtime = Runtime(tmp_path / "flow.db", synchronous="off", handle_signals=False)
    try:
        yield runtime
    finally:
        runtime.close()
