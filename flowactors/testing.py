"""Test helpers and a pytest plugin: recorded histories, replay, given/when/then, a runtime.

Registered as a pytest plugin (entry point `flowactors`), so its fixtures are available in any
project that installs flowactors:

    def test_my_task(flow_runtime):
        job_id = flow_runtime.submit(spec)
        assert flow_runtime.wait(job_id, timeout=30).status == "completed"

Recorded histories (JSONL written by `flowactors export`, or by `record_history`) pin behaviour:

    events = load_history("tests/histories/completed.jsonl")
    assert replay(events).status is JobStatus.COMPLETED
    assert check_history(events).ok     # every recorded state digest is reproduced

`pytest --flowactors-record=DIR` writes the log of every test that used `flow_runtime` to
`DIR/<test name>.jsonl`: a real run, recorded as a history.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest

from .codec import event_from_builtins
from .errors import LogCorrupted, one_line
from .events import Event, RecordedEvent, event_tag
from .job import Command, JobState, decide, fold, initial_state
from .history import HistoryLine, export_lines
from .replay import CheckReport, check, open_log
from .resume_check import ResumeReport, check_resume
from .store import write_history

__all__ = [
    "HistoryLine",
    "ResumeReport",
    "check_resume",
    "check_history",
    "flow_runtime",
    "given",
    "load_history",
    "log_from_history",
    "parse_history_line",
    "record_history",
    "recorded",
    "replay",
    "then",
    "when",
]

_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)
_RECORD_OPTION = "--flowactors-record"

_line_decoder = msgspec.json.Decoder(HistoryLine)


def parse_history_line(line: str | bytes, where: str = "<history>") -> RecordedEvent:
    """Decode one exported line into a RecordedEvent (old schema versions upcast).

    Raises:
        LogCorrupted: naming `where` (file and line) and what does not fit.
    """
    try:
        parsed = _line_decoder.decode(line)
        event = event_from_builtins(parsed.type, parsed.schema_version, parsed.data)
    except (msgspec.DecodeError, msgspec.ValidationError, LogCorrupted, UnicodeError) as exc:
        raise LogCorrupted(f"{where}: {one_line(str(exc))}") from None
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


def check_history(events: Iterable[RecordedEvent]) -> CheckReport:
    """Replay a history and recompute every state digest its checkpoint and terminal events
    recorded (what `flowactors replay --check` does on a log).

    Returns a report: `report.ok`, `report.mismatch` (the first difference, naming its
    position), `report.states` (every job's final state).
    """
    return check(events)


def record_history(db_path: str | Path, out_path: str | Path, job_id: str | None = None) -> int:
    """Write a log's events (or one job's) to a JSONL history, as `flowactors export` does.

    Returns the number of events written. Works on a log a runtime is still writing.
    """
    count = 0
    with open_log(db_path) as store, Path(out_path).open("wb") as out:
        for line in export_lines(store, job_id=job_id):
            out.write(line + b"\n")
            count += 1
    return count


def log_from_history(history: str | Path, db_path: str | Path) -> Path:
    """Write a recorded history into a new log file, so `flowactors` commands (or a Runtime)
    can open it.

    Rows are written as the history recorded them — type, schema version (old ones stay old),
    data and time — with positions renumbered from 1 in file order and the hash chain computed
    anew. A history carries no checkpoint states: the log has no blobs, and says so (so that
    `verify` and an open do not ask for the states its jobs name).

    Raises:
        LogCorrupted: a line does not decode (naming file and line). FileExistsError: the log
            exists already.
    """
    db_path, history = Path(db_path), Path(history)
    if db_path.exists():
        raise FileExistsError(f"{db_path} exists already")
    load_history(history)  # every line decodes, or a clear error before anything is written
    lines = (_line_decoder.decode(raw) for raw in history.read_bytes().splitlines()
             if raw.strip())
    write_history(db_path, ((line.stream, line.version, line.type, line.schema_version,
                             line.recorded_at.isoformat(),
                             msgspec.msgpack.encode({"type": line.type, **_binary(line)}))
                            for line in lines))
    return db_path


def _binary(line: HistoryLine) -> dict[str, Any]:
    """A line's data with the bytes JSON carried as base64 (an iteration's trajectories)
    bytes again, as the log stored them."""
    data = line.data
    if line.type == "job.iteration_completed" and isinstance(data.get("trajectories"), str):
        return {**data, "trajectories": base64.b64decode(data["trajectories"])}
    return data


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        _RECORD_OPTION, metavar="DIR", default=None,
        help="flowactors: write the log of each test using the flow_runtime fixture to "
             "DIR/<test name>.jsonl (a recorded history)")


@pytest.fixture
def flow_runtime(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A ready Runtime on a temporary log, tuned for fast tests (synchronous=off).

    With `pytest --flowactors-record=DIR`, its log is written to `DIR/<test name>.jsonl` when
    the test ends.
    """
    from .runtime import Runtime

    path = tmp_path / "flow.db"
    runtime = Runtime(path, synchronous="off", handle_signals=False)
    try:
        yield runtime
    finally:
        runtime.close()
    record_dir = request.config.getoption(_RECORD_OPTION, None)
    if record_dir:
        target = Path(record_dir)
        target.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)
        record_history(path, target / f"{name}.jsonl")
