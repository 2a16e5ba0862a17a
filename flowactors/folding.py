"""A whole log's states in one pass: what `evolve` event by event gives, in a fraction of
the time. This is what a runtime does when it opens a log, so its cost is the recovery time
after a crash.

Two kinds of events make up most of a training log, and evolving them one at a time costs
more than their effect:

- runs of one job's consecutive `IterationCompleted` events: evolving through a run only keeps
  its last event's fields and the sums of its tokens and costs. A run is summed as it goes by
  and applied in one step when it ends, with the same additions in the same order.
- a job's `CheckpointSaved` and `CheckpointsPruned` events: each rebuilds the tuple of the
  job's checkpoints, which holds every checkpoint ever saved, so a long job's replay was
  quadratic. The checkpoints are kept in a list while a job's checkpoint events go by and
  become the state's tuple at the job's next other event, or at the end.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Any

from msgspec.structs import replace

from .errors import LogCorrupted
from .events import CheckpointSaved, CheckpointsPruned, IterationCompleted, RecordedEvent
from .job import (CheckpointRecord, JobState, ResumePoint, after_iterations, checkpoint_record,
                  evolve, initial_state, pruned_record)


class _Checkpoints:
    """A job's checkpoints as a list, in iteration order, while fold_log folds its checkpoint
    events; `add` refuses what would break the order (fold_log then evolves as usual)."""

    def __init__(self, records: tuple[CheckpointRecord, ...]) -> None:
        self.records = list(records)
        self.iterations = [record.info.iteration for record in records]

    @classmethod
    def of(cls, records: tuple[CheckpointRecord, ...]) -> _Checkpoints | None:
        shelf = cls(records)
        return shelf if shelf.iterations == sorted(shelf.iterations) else None

    def add(self, state: JobState, event: CheckpointSaved | CheckpointsPruned
            ) -> dict[str, Any] | None:
        """The state's changes other than its checkpoints, or None if `event` does not fit."""
        if type(event) is CheckpointsPruned:
            for iteration in set(event.iterations):
                for index in range(bisect_left(self.iterations, iteration),
                                   bisect_right(self.iterations, iteration)):
                    self.records[index] = pruned_record(self.records[index])
            return {}
        if self.iterations and event.iteration < self.iterations[-1]:
            return None
        self.records.append(checkpoint_record(state, event))
        self.iterations.append(event.iteration)
        return {"resume_point": ResumePoint(iteration=event.iteration, state_ref=event.state_ref)}


def fold_log(events: Iterable[RecordedEvent], *, whole_log: str | None = None
             ) -> dict[str, JobState]:
    """Every job's state from events of any number of jobs in log order (dict in order of
    each job's first event), equal to evolving them one at a time.

    Args:
        whole_log: the name of the log when the events are all of it, from its first
            position: each must then be its job's next version (1, 2, 3...), or LogCorrupted
            names the first that is not.
    """
    whole = whole_log is not None
    states: dict[str, JobState] = {}
    runs: dict[str, list[Any]] = {}  # job -> [last RecordedEvent, tokens, cost_usd] of its run
    shelves: dict[str, _Checkpoints] = {}  # job -> its checkpoints, newer than its state's
    for recorded in events:
        stream = recorded.stream
        event = recorded.event
        kind = type(event)
        if kind is IterationCompleted:
            run = runs.get(stream)
            if run is not None:
                if whole and recorded.version != run[0].version + 1:
                    raise _out_of_order(whole_log, recorded, run[0].version)
                run[0] = recorded
                run[1] += event.tokens
                run[2] += event.cost_usd
                continue
            state = states.get(stream)
            if state is None:
                state = states[stream] = initial_state(stream)
            if whole and recorded.version != state.version + 1:
                raise _out_of_order(whole_log, recorded, state.version)
            runs[stream] = [recorded, state.tokens + event.tokens, state.cost_usd + event.cost_usd]
            continue
        state = states.get(stream)
        if state is None:
            state = initial_state(stream)
        elif stream in runs:
            state = after_iterations(state, *runs.pop(stream))
        if whole and recorded.version != state.version + 1:
            raise _out_of_order(whole_log, recorded, state.version)
        if kind is CheckpointSaved or kind is CheckpointsPruned:
            shelf = shelves.get(stream) or _Checkpoints.of(state.checkpoints)
            changes = shelf.add(state, event) if shelf is not None else None
            if changes is not None:
                shelves[stream] = shelf
                states[stream] = replace(state, version=recorded.version,
                                         position=recorded.position, **changes)
                continue
        if stream in shelves:
            state = replace(state, checkpoints=tuple(shelves.pop(stream).records))
        states[stream] = evolve(state, recorded)
    for stream, run in runs.items():
        states[stream] = after_iterations(states[stream], *run)
    for stream, shelf in shelves.items():
        states[stream] = replace(states[stream], checkpoints=tuple(shelf.records))
    return states


def _out_of_order(log: str | None, recorded: RecordedEvent, previous: int) -> LogCorrupted:
    return LogCorrupted(f"{log}: job {recorded.stream!r} goes from version {previous} to "
                        f"{recorded.version} at position {recorded.position}; run "
                        f"`flowactors verify`")
