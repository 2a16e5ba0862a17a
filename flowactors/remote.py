"""Control of a log's jobs from another process (`flowactors pause|resume|cancel|fork`).

While a runtime owns the log, a request goes into its inbox and the command waits for the
answer; when no runtime owns it, the command owns the log for a moment and decides with the
pure core (`job.decide`, `lineage.plan`) directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Literal

import msgspec

from . import job as core
from . import lineage
from .control import ControlCommand, ForkRequest, RequestCommand, decision
from .errors import CheckpointNotFound, FlowError, InvalidTransition, SpecError, StoreLocked
from .events import Event, RecordedEvent, event_tag
from .replay import job_state, open_log, require_job
from .store import EventStore
from .views import JobStatus, JobView

__all__ = ["ControlOutcome", "control", "decide_directly", "fork"]


class ControlOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a `control` request ended.

    `outcome` is "applied", "rejected" (with the reason) or "unanswered" (the owner did not
    answer within the timeout; the request stays in the inbox and may still be applied).
    `decided_by` is "owner" (a runtime's answer) or "direct" (no runtime owned the log).
    `view` is the job's view after it (a fork's: the child's, when applied).
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
    if command == "pause" and state.status is JobStatus.RUNNING:
        events = core.decide(core.Recover(attempt=state.attempts + 1, cause="crash"), state)
        events += core.decide(decision(command), _after(state, events))
    else:
        events = core.decide(decision(command), state)
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
    def direct(owner: EventStore) -> JobView:
        return core.view(decide_directly(owner, job_id, command))

    return _through_inbox(os.fspath(path), job_id, command, None, direct, job_id,
                          (InvalidTransition,), timeout, poll)


def fork(path: str | os.PathLike[str], parent_id: str, request: ForkRequest, *,
         timeout: float = 30.0, poll: float = 0.1) -> ControlOutcome:
    """Fork a job from another process: `Runtime.fork` by the owning runtime, through its
    inbox, or directly (`lineage.fork_directly`) when no runtime owns the log; as `control`.
    Applied, the outcome's view is the child's (its id is `request.job_id`).

    Raises:
        LogNotFound, LogCorrupted, JobNotFound (of the parent), StoreUnavailable: as
            `control`; also when the owner is an older flowactors that takes no forks.
    """
    def direct(owner: EventStore) -> JobView:
        lineage.fork_directly(owner, parent_id, at_iteration=request.at_iteration,
                              job_id=request.job_id, config=request.config,
                              task_options=request.task_options)
        return core.view(job_state(owner, request.job_id))

    return _through_inbox(os.fspath(path), parent_id, "fork", request, direct, request.job_id,
                          (CheckpointNotFound, InvalidTransition, SpecError), timeout, poll)


def _through_inbox(path: str, job_id: str, command: RequestCommand, args: ForkRequest | None,
                   direct: Callable[[EventStore], JobView], viewed: str,
                   refusals: tuple[type[FlowError], ...], timeout: float, poll: float
                   ) -> ControlOutcome:
    """Leave a request and wait for the owner's answer, or decide with `direct` on a log no
    runtime owns (a `refusals` error is a rejection). The view is of job `viewed`."""
    with open_log(path) as reader:
        require_job(reader, job_id)
    owner = _own(path)
    if owner is not None:
        with owner:
            return _direct(owner, direct, viewed, refusals, None)
    with EventStore(path, mode="requester") as requester:
        request_id = requester.request(job_id, command, args)
    deadline = time.monotonic() + timeout
    while True:
        with open_log(path) as reader:
            answer = reader.answer_of(request_id)
            if answer is not None:
                return ControlOutcome(outcome=answer.outcome, reason=answer.reason,
                                      request_id=request_id, view=_view_of(reader, viewed))
        owner = _own(path)
        if owner is not None:  # the runtime went away before answering: decide ourselves
            with owner:
                if owner.answer_of(request_id) is None:
                    return _direct(owner, direct, viewed, refusals, request_id)
            continue  # it answered just before it went: read the answer
        if time.monotonic() >= deadline:
            return ControlOutcome(
                outcome="unanswered", request_id=request_id,
                reason=f"the runtime owning {path} did not answer request {request_id} "
                       f"within {timeout:g}s; the request stays in its inbox and may still "
                       f"be applied")
        time.sleep(poll)


def _direct(owner: EventStore, direct: Callable[[EventStore], JobView], viewed: str,
            refusals: tuple[type[FlowError], ...], request_id: int | None) -> ControlOutcome:
    try:
        view = direct(owner)
    except refusals as exc:
        if request_id is not None:
            owner.answer(request_id, "rejected", str(exc))
        return ControlOutcome(outcome="rejected", reason=str(exc), decided_by="direct",
                              request_id=request_id, view=_view_of(owner, viewed))
    if request_id is not None:
        owner.answer(request_id, "applied", "")
    return ControlOutcome(outcome="applied", decided_by="direct", request_id=request_id,
                          view=view)


def _view_of(store: EventStore, job_id: str) -> JobView | None:
    """The job's view; None when it has no events (a fork that was not made)."""
    return core.view(job_state(store, job_id)) if store.stream_version(job_id) else None
