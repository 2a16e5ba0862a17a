"""Which stored states are still needed, derived from the log alone.

There is no second bookkeeping of references: a state is live while some job's folded state
names it (a kept checkpoint, the point it resumes from, its final state). Every stream counts —
a job may name a state another job stored, e.g. a fork starting from its parent's checkpoint.
The events that stored a state in a checkpoint store say where and how big it is; a check on
open compares those with the files, and anything no folded state names is garbage. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from .events import CheckpointSaved, Digest, JobCompleted, JobPaused, RecordedEvent, event_tag
from .job import JobState

__all__ = ["STORING_EVENTS", "StoredState", "live_states", "needed_by", "pruned_states",
           "referenced", "stored_states"]

STORING_EVENTS = tuple(event_tag(t) for t in (CheckpointSaved, JobPaused, JobCompleted))
"""The tags of the events that can name a state kept in a checkpoint store."""


class StoredState(msgspec.Struct, frozen=True, kw_only=True):
    """A state an event says is in a checkpoint store: what it is, how big, and who named it."""

    address: Digest
    size: int
    location: str
    stream: str
    iteration: int
    kind: str  # "checkpoint", "paused state" or "final state"

    def describe(self) -> str:
        return f"{self.kind} at iteration {self.iteration} of job {self.stream!r}"


def referenced(state: JobState) -> set[Digest]:
    """The states one job still needs."""
    refs = {c.info.state_ref for c in state.checkpoints if not c.info.pruned}
    if state.resume_point is not None:
        refs.add(state.resume_point.state_ref)
    if state.final_state_ref is not None:
        refs.add(state.final_state_ref)
    return refs


def live_states(states: Iterable[JobState]) -> set[Digest]:
    """The states any job still needs."""
    live: set[Digest] = set()
    for state in states:
        live |= referenced(state)
    return live


def pruned_states(states: Iterable[JobState]) -> set[Digest]:
    """The states of pruned checkpoints (a folded state keeps them with their address): what
    a crash between a pruning event and its deletion can leave behind."""
    return {c.info.state_ref for state in states for c in state.checkpoints if c.info.pruned}


def needed_by(states: Iterable[JobState]) -> dict[Digest, str]:
    """Each live state with what needs it (the first found), for a problem to name it."""
    found: dict[Digest, str] = {}
    for state in states:
        job = f"job {state.job_id!r}"
        if state.final_state_ref is not None:
            found.setdefault(state.final_state_ref,
                             f"final state at iteration {state.iteration} of {job}")
        for c in state.checkpoints:
            if not c.info.pruned:
                found.setdefault(c.info.state_ref,
                                 f"checkpoint at iteration {c.info.iteration} of {job}")
        if state.resume_point is not None:
            found.setdefault(state.resume_point.state_ref, f"resume point at iteration "
                             f"{state.resume_point.iteration} of {job}")
    return found


def stored_states(events: Iterable[RecordedEvent]) -> dict[Digest, StoredState]:
    """The states these events put in a checkpoint store, by address (the first naming wins;
    a state named again — a later final state equal to a checkpoint — is the same bytes)."""
    found: dict[Digest, StoredState] = {}
    for recorded in events:
        event = recorded.event
        match event:
            case CheckpointSaved(state_location=str() as location, state_size=int() as size):
                ref, iteration, kind = event.state_ref, event.iteration, "checkpoint"
            case JobPaused(state_location=str() as location, state_size=int() as size,
                           state_ref=str() as ref):
                iteration, kind = event.iteration, "paused state"
            case JobCompleted(final_state_location=str() as location,
                              final_state_size=int() as size):
                ref, iteration, kind = event.final_state_ref, event.iteration, "final state"
            case _:
                continue
        found.setdefault(ref, StoredState(address=ref, size=size, location=location,
                                          stream=recorded.stream, iteration=iteration,
                                          kind=kind))
    return found
