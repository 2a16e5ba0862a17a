"""Replay a log and check it (`flowactors replay [--check]`), with no actor running.

Everything here reads an `EventStore` opened read-only — so it works on a log that a live
runtime is writing, and on a copy of one whose writer was killed — and folds events with the
pure core (`job.evolve`). A runtime opening a log replays it with `replay_log`;
`flowactors.testing` checks recorded histories with the same `check`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import msgspec

from . import job as core
from .errors import JobNotFound
from .folding import fold_log
from .events import RecordedEvent
from .ports import VerifyReport
from .store import EventStore

__all__ = [
    "CheckReport",
    "DigestMismatch",
    "check",
    "job_state",
    "open_log",
    "read_events",
    "replay",
    "replay_log",
    "require_job",
    "verify",
]


# --- opening and reading -----------------------------------------------------------------------


def open_log(path: str | os.PathLike[str]) -> EventStore:
    """Open a log read-only: never creates a missing file, never changes one.

    Raises:
        LogNotFound: no file at `path`. LogCorrupted: not a flowactors log.
    """
    return EventStore(path, mode="readonly")


def require_job(store: EventStore, job_id: str) -> None:
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
    require_job(store, job_id)
    return (r for r in _until(store.read_stream(job_id), until) if r.position >= from_position)


def _until(events: Iterable[RecordedEvent], until: int | None) -> Iterator[RecordedEvent]:
    for recorded in events:
        if until is not None and recorded.position > until:
            return
        yield recorded


def replay(events: Iterable[RecordedEvent]) -> dict[str, core.JobState]:
    """Fold events (of any number of jobs, in log order) into each job's state."""
    return fold_log(events)


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
        states = fold_log(events, whole_log=store.path)
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


# --- verify -----------------------------------------------------------------------------------


def verify(store: EventStore, expected_head: str | None = None, *,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check the hash chain, contiguous positions and versions, that every event decodes,
    blobs against their addresses and SQLite's integrity (see `EventStore.verify`).

    Raises:
        ValueError: `expected_head` is not a hex hash.
    """
    return store.verify(expected_head, progress=progress)
