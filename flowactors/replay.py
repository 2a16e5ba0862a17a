"""Replay, check, verify and export a log, and control its jobs, with no actor running.

Everything here reads an `EventStore` opened read-only — so it works on a log that a live
runtime is writing, and on a copy of one whose writer was killed — and folds events with the
pure core (`job.evolve`). The `flowactors` command is a thin layer over these functions, and
`flowactors.testing` checks recorded histories with the same `check`.

The one exception is `control`: pausing, resuming or cancelling a job from another process,
through the owner's inbox, or — when no runtime owns the log — by owning it for a moment and
deciding with `job.decide` directly.
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, Literal

import msgspec

from . import job as core
from .codec import decode_event, stored_data
from .errors import InvalidTransition, JobNotFound, LogCorrupted, StoreLocked
from .events import (
    BudgetThresholdReached,
    CheckpointSaved,
    CheckpointsPruned,
    Event,
    IterationCompleted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobPaused,
    JobRecovered,
    JobResumed,
    JobStarted,
    JobSubmitted,
    RecordedEvent,
    event_tag,
)
from .store import EventStore, VerifyReport
from .views import JobStatus, JobView

__all__ = [
    "CheckReport",
    "ControlOutcome",
    "DigestMismatch",
    "HistoryLine",
    "check",
    "control",
    "decide_directly",
    "export_lines",
    "history_line",
    "job_state",
    "open_log",
    "read_events",
    "replay",
    "summary",
    "verify",
]

ControlCommand = Literal["pause", "resume", "cancel"]
CONTROL_REASON = "requested from another process"
_READ_CHUNK = 2_000


# --- the export format -------------------------------------------------------------------------


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


# --- opening and reading -----------------------------------------------------------------------


def open_log(path: str | os.PathLike[str]) -> EventStore:
    """Open a log read-only: never creates a missing file, never changes one.

    Raises:
        LogNotFound: no file at `path`. LogCorrupted: not a flowactors log.
    """
    return EventStore(path, mode="readonly")


def _require_job(store: EventStore, job_id: str) -> None:
    if store.stream_version(job_id) == 0:
        raise JobNotFound(f"job {job_id!r} not found in {store.path}")


def read_events(store: EventStore, *, job_id: str | None = None, from_position: int = 1,
                until: int | None = None) -> Iterator[RecordedEvent]:
    """The log's events in position order (one job's, with `job_id`), from `from_position`
    up to `until` (inclusive; None: to the end).

    Raises:
        JobNotFound: `job_id` has no events. LogCorrupted: an event does not decode.
    """
    if job_id is None:  # the whole log from its start: refuse a broken hash chain as we go
        return store.read_all(from_position, until, verify_chain=from_position == 1)
    _require_job(store, job_id)
    return (r for r in _until(store.read_stream(job_id), until) if r.position >= from_position)


def _until(events: Iterable[RecordedEvent], until: int | None) -> Iterator[RecordedEvent]:
    for recorded in events:
        if until is not None and recorded.position > until:
            return
        yield recorded


def replay(events: Iterable[RecordedEvent]) -> dict[str, core.JobState]:
    """Fold events (of any number of jobs, in log order) into each job's state."""
    return core.fold_log(events)


CHAIN_CHECK_PROCESS_EVENTS = 100_000
"""From this many events on, `replay_log` checks the hash chain in another process."""


def replay_log(store: EventStore, progress: Callable[[int, int], None] | None = None
               ) -> dict[str, core.JobState]:
    """Every job's state from the whole log (up to its head when called), refusing a log
    that `verify` would refuse: what a runtime does when it opens a log.

    The replay reads every event; the checks it does not make run meanwhile, on another
    thread and (for a long log) in another process (`EventStore.check_meanwhile`).

    Args:
        progress: called as progress(events_done, events_total) every 10,000 events.

    Raises:
        LogCorrupted: a check failed; the message says which, and where.
    """
    check = store.check_meanwhile(chain_process=store.head()[0] >= CHAIN_CHECK_PROCESS_EVENTS)
    try:
        events = check.events()
        if progress is not None:
            events = _reporting(events, progress, check.upto)
        states = core.fold_log(events, whole_log=store.path)
        check.finish({job_id: state.version for job_id, state in states.items()})
    finally:
        check.cancel()
    return states


def _reporting(events: Iterator[RecordedEvent], progress: Callable[[int, int], None],
               total: int) -> Iterator[RecordedEvent]:
    for n, recorded in enumerate(events, 1):
        yield recorded
        if not n % 10_000:
            progress(n, total)


def job_state(store: EventStore, job_id: str, until: int | None = None) -> core.JobState:
    """One job's state rebuilt from its events (up to position `until`).

    Raises:
        JobNotFound: the job has no events (at or before `until`).
    """
    states = replay(read_events(store, job_id=job_id, until=until))
    if job_id not in states:
        raise JobNotFound(f"job {job_id!r} has no events at or before position {until} "
                          f"in {store.path}")
    return states[job_id]


# --- the replay check (invariant 4) ------------------------------------------------------------


class DigestMismatch(msgspec.Struct, frozen=True, kw_only=True):
    """An event recorded a state digest that today's `evolve` does not reproduce."""

    position: int
    stream: str
    version: int
    type: str
    recorded: str
    computed: str

    def __str__(self) -> str:
        return (f"position {self.position} (job {self.stream!r}, version {self.version}, "
                f"{self.type}): the event recorded state digest {self.recorded}, replay "
                f"computes {self.computed} — evolve no longer rebuilds the state it was "
                f"written from")


class CheckReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `check` found: every job's state, and the first digest mismatch (if any)."""

    events: int
    digests_checked: int
    states: dict[str, core.JobState]
    mismatch: DigestMismatch | None = None

    @property
    def ok(self) -> bool:
        return self.mismatch is None


def check(events: Iterable[RecordedEvent]) -> CheckReport:
    """Replay events and recompute the state digest each checkpoint and terminal event
    recorded when it was written: the digest of the job's state just before that event.

    Stops at the first difference. This is `flowactors replay --check`, and what
    `flowactors.testing.check_history` runs on recorded histories.
    """
    evolve, initial_state = core.evolve, core.initial_state
    recorded_digest, state_digest = core.recorded_digest, core.state_digest
    states: dict[str, core.JobState] = {}
    n_events = n_digests = 0
    for recorded in events:
        stream = recorded.stream
        state = states.get(stream)
        if state is None:
            state = initial_state(stream)
        expected = recorded_digest(recorded.event)
        if expected is not None:
            n_digests += 1
            actual = state_digest(state)
            if actual != expected:
                states[stream] = state
                return CheckReport(
                    events=n_events, digests_checked=n_digests, states=states,
                    mismatch=DigestMismatch(
                        position=recorded.position, stream=stream, version=recorded.version,
                        type=recorded.type, recorded=expected, computed=actual))
        states[stream] = evolve(state, recorded)
        n_events += 1
    return CheckReport(events=n_events, digests_checked=n_digests, states=states)


# --- verify and export -------------------------------------------------------------------------


def verify(store: EventStore, expected_head: str | None = None, *,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check the hash chain, contiguous positions and versions, that every event decodes,
    blobs against their addresses and SQLite's integrity (see `EventStore.verify`).

    Raises:
        ValueError: `expected_head` is not a hex hash.
    """
    return store.verify(expected_head, progress=progress)


def export_lines(store: EventStore, *, job_id: str | None = None,
                 from_position: int = 1) -> Iterator[bytes]:
    """The log's events as JSON lines (without newline), in log order, exactly as stored:
    the schema version they were written in, their data as written.

    Reads position ranges, each from a fresh read snapshot, so exporting a log a runtime is
    writing neither blocks it nor holds back its WAL; the export ends at the head it finds.

    Raises:
        JobNotFound: `job_id` has no events. LogCorrupted: an event does not decode.
    """
    if job_id is not None:
        _require_job(store, job_id)
    end = store.head()[0]
    conn = _connect_ro(store.path)
    try:
        sql = ("SELECT position, stream, version, type, schema_version, recorded_at, data "
               "FROM events WHERE position >= ? AND position <= ?"
               + (" AND stream = ?" if job_id is not None else "") + " ORDER BY position")
        start = max(1, from_position)
        while start <= end:
            stop = min(start + _READ_CHUNK - 1, end)
            params: tuple[Any, ...] = (start, stop) if job_id is None else (start, stop, job_id)
            try:
                rows = conn.execute(sql, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise LogCorrupted(f"cannot read {store.path}: {exc}") from None
            for position, stream, version, type_, schema_version, at, data in rows:
                yield _export_row(store.path, position, stream, version, type_,
                                  schema_version, at, data)
            start = stop + 1
    finally:
        conn.close()


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


def _connect_ro(path: str) -> sqlite3.Connection:
    """A read-only connection (the store validated the file already)."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 10000")
    except sqlite3.Error as exc:
        raise LogCorrupted(f"cannot read {path}: {exc}") from None
    return conn


# --- one line per event ------------------------------------------------------------------------


def summary(event: JobEvent) -> str:
    """A one-line, human summary of an event (for `flowactors history`)."""
    match event:
        case IterationCompleted():
            failed = f", {event.n_failed}/{event.n_trajectories} failed" if event.n_failed else ""
            return (f"iteration {event.iteration}: avg reward {event.avg_reward:.4f}, "
                    f"loss {event.loss:.4f}, cost ${event.cost_usd:.4f}{failed}")
        case JobSubmitted(spec=spec):
            config = spec.config
            budget = "" if config.max_budget_usd is None else \
                f", budget ${config.max_budget_usd:g}"
            return (f"agent {spec.agent_id}, task {spec.task}, {config.n_iterations} "
                    f"iterations, seed {config.seed}{budget}")
        case JobStarted():
            return "admitted: running"
        case CheckpointSaved():
            return (f"checkpoint {event.iteration}: validation score "
                    f"{event.validation_score:.4f}")
        case CheckpointsPruned(iterations=iterations):
            return f"pruned checkpoints {', '.join(map(str, iterations))}"
        case BudgetThresholdReached():
            return (f"{event.fraction:.0%} of the budget: ${event.cost_usd:.4f} of "
                    f"${event.budget_usd:.4f}")
        case JobPaused(iteration=iteration, state_ref=state_ref):
            where = "with its trainer state" if state_ref else "to resume from its last checkpoint"
            return f"paused after iteration {iteration}, {where}"
        case JobResumed():
            return "resumed: queued again"
        case JobCancelled():
            return f"cancelled after iteration {event.iteration}: {event.reason}"
        case JobCompleted():
            return (f"completed {event.iteration} iterations, validation score "
                    f"{event.validation_score:.4f}")
        case JobFailed():
            return (f"failed ({event.reason}) after iteration {event.iteration}: "
                    f"{event.error_type}: {event.message}")
        case JobRecovered(from_checkpoint=checkpoint, attempt=attempt, cause=cause):
            start = "the start" if checkpoint is None else f"checkpoint {checkpoint}"
            return f"recovered after a {cause}: attempt {attempt}, from {start}"
        case _:
            return ""


# --- control from another process --------------------------------------------------------------


class ControlOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a `control` request ended.

    `outcome` is "applied", "rejected" (with the reason) or "unanswered" (the owner did not
    answer within the timeout; the request stays in the inbox and may still be applied).
    `decided_by` is "owner" (a runtime's answer) or "direct" (no runtime owned the log).
    """

    outcome: Literal["applied", "rejected", "unanswered"]
    reason: str = ""
    decided_by: Literal["owner", "direct"] = "owner"
    request_id: int | None = None
    view: JobView | None = None


def decide_directly(store: EventStore, job_id: str, command: ControlCommand) -> core.JobState:
    """Decide and record a control command on a log this process owns, with no runtime.

    A job can be `running` in a log nobody owns (its runtime crashed or was closed). Pausing it
    records the recovery a runtime would record on opening (`JobRecovered`: back to its last
    checkpoint) and then `JobPaused`, so resuming it later repeats the iterations after that
    checkpoint exactly as a crash recovery would. Cancelling it just records `JobCancelled`.

    Raises:
        JobNotFound, InvalidTransition (nothing is written then).
    """
    state = job_state(store, job_id)
    events: list[Event]
    match command:
        case "pause" if state.status is JobStatus.RUNNING:
            events = core.decide(core.Recover(attempt=state.attempts + 1, cause="crash"), state)
            events += core.decide(core.Pause(), _after(state, events))
        case "pause":
            events = core.decide(core.Pause(), state)
        case "resume":
            events = core.decide(core.Resume(), state)
        case "cancel":
            events = core.decide(core.Cancel(reason=CONTROL_REASON), state)
        case _:
            raise ValueError(f"command must be pause, resume or cancel, not {command!r}")
    return core.fold(store.append(job_id, events, state.version), state)


def _after(state: core.JobState, events: list[Event]) -> core.JobState:
    """The state after events not recorded yet (their envelope is a placeholder)."""
    at = datetime.now(timezone.utc)
    return core.fold((RecordedEvent(
        position=state.position, stream=state.job_id, version=state.version + i,
        type=event_tag(type(e)), schema_version=type(e).schema_version, recorded_at=at,
        event=e) for i, e in enumerate(events, start=1)), state)  # type: ignore[arg-type]


def _own(path: str) -> EventStore | None:
    """Own the log if no runtime does; None when one does."""
    try:
        return EventStore(path, mode="owner")
    except StoreLocked:
        return None


def control(path: str | os.PathLike[str], job_id: str, command: ControlCommand, *,
            timeout: float = 30.0, poll: float = 0.1) -> ControlOutcome:
    """Pause, resume or cancel a job from another process (see DESIGN.md, Ownership).

    While a runtime owns the log, leave a request in its inbox and wait up to `timeout`
    seconds for its answer. With no runtime (or once the owner went away while we waited),
    own the log for a moment and decide directly (`decide_directly`), answering our own
    request if we left one.

    Raises:
        LogNotFound, LogCorrupted: no log, or not a flowactors log (nothing is created).
        JobNotFound: no such job (no request is left).
        StoreUnavailable: the request or the decision could not be written.
    """
    path = os.fspath(path)
    with open_log(path) as reader:
        _require_job(reader, job_id)
    owner = _own(path)
    if owner is not None:
        with owner:
            return _direct(owner, job_id, command, None)
    with EventStore(path, mode="requester") as requester:
        request_id = requester.request(job_id, command)
    deadline = time.monotonic() + timeout
    while True:
        with open_log(path) as reader:
            answer = reader.answer_of(request_id)
            if answer is not None:
                return ControlOutcome(outcome=answer.outcome, reason=answer.reason,
                                      request_id=request_id,
                                      view=core.view(job_state(reader, job_id)))
        owner = _own(path)
        if owner is not None:  # the runtime went away before answering: decide ourselves
            with owner:
                if owner.answer_of(request_id) is None:
                    return _direct(owner, job_id, command, request_id)
            continue  # it answered just before it went: read the answer
        if time.monotonic() >= deadline:
            return ControlOutcome(
                outcome="unanswered", request_id=request_id,
                reason=f"the runtime owning {path} did not answer request {request_id} "
                       f"within {timeout:g}s; the request stays in its inbox and may still "
                       f"be applied")
        time.sleep(poll)


def _direct(owner: EventStore, job_id: str, command: ControlCommand,
            request_id: int | None) -> ControlOutcome:
    try:
        state = decide_directly(owner, job_id, command)
    except InvalidTransition as exc:
        if request_id is not None:
            owner.answer(request_id, "rejected", str(exc))
        return ControlOutcome(outcome="rejected", reason=str(exc), decided_by="direct",
                              request_id=request_id, view=core.view(job_state(owner, job_id)))
    if request_id is not None:
        owner.answer(request_id, "applied", "")
    return ControlOutcome(outcome="applied", decided_by="direct", request_id=request_id,
                          view=core.view(state))
