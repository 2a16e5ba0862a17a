"""The pure core of a job: `evolve`, `decide`, `fold`.

A job's state is a function of its recorded events: `fold(evolve, events)`. `decide` turns a
command into the events that record it, or raises `InvalidTransition` and produces none. No I/O,
no clocks, no threads, no hidden randomness here: whatever varies (time, ids, trainer results)
arrives in the command or in the event's envelope.

The state and its digest (`job_state`), the commands (`commands`) and the view users see
(`job_view`) live beside it and are re-exported here: `flowactors.job` is the core's one name.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, assert_never

from msgspec.structs import replace

from .commands import (
    Cancel,
    Command,
    Fail,
    Pause,
    RecordIteration,
    RecordCheckpoint,
    Recover,
    Resume,
    SavedState,
    Start,
    Submit,
    checkpoint_due,
    needs_saved_state,
)
from .errors import InvalidTransition, SpecError
from .events import (
    BudgetThresholdReached,
    CheckpointSaved,
    CheckpointsPruned,
    Event,
    IterationCompleted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    ForkCreated,
    JobFailed,
    JobForked,
    JobPaused,
    JobRecovered,
    JobResumed,
    JobStarted,
    JobSubmitted,
    RecordedEvent,
    event_tag,
)
from .job_state import (
    CheckpointRecord,
    JobState,
    ResumePoint,
    initial_state,
    recorded_digest,
    state_digest,
)
from .job_view import best_checkpoint, checkpoint_infos, view
from .views import CheckpointInfo, ForkNote, ForkOrigin, JobError, JobStatus

__all__ = [
    # the decider
    "BUDGET_THRESHOLDS", "after_iterations", "checkpoint_record", "decide", "evolve", "fold",
    "pruned_record",
    # re-exported from job_state, commands and job_view
    "CheckpointRecord", "JobState", "ResumePoint", "initial_state", "recorded_digest",
    "state_digest",
    "Cancel", "Command", "Fail", "Pause", "RecordCheckpoint", "RecordIteration", "Recover", "Resume", "SavedState",
    "Start", "Submit", "checkpoint_due", "needs_saved_state",
    "best_checkpoint", "checkpoint_infos", "view",
]

BUDGET_THRESHOLDS = (0.75, 0.9)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# --- evolve ------------------------------------------------------------------------------------


def evolve(state: JobState, recorded: RecordedEvent) -> JobState:
    """Apply one recorded event. Never rejects a known event: the log is the truth."""
    event = recorded.event
    if type(event) is IterationCompleted:  # most of a log: one replace, no dict of changes
        return after_iterations(state, recorded, state.tokens + event.tokens,
                                 state.cost_usd + event.cost_usd)
    changes = _changes(state, event, recorded.recorded_at)
    return replace(state, version=recorded.version, position=recorded.position, **changes)


def after_iterations(state: JobState, last: RecordedEvent, tokens: int,
                      cost_usd: float) -> JobState:
    """`state` after one or more iterations: the last one's fields, and the totals of tokens
    and cost (summed by the caller, in log order)."""
    event = last.event
    metrics = {**event.metrics, "loss": event.loss, "avg_reward": event.avg_reward,
               "std_reward": event.std_reward, "success_rate": event.success_rate}
    return replace(state, version=last.version, position=last.position,
                   iteration=event.iteration, metrics=metrics, tokens=tokens, cost_usd=cost_usd)


def _changes(state: JobState, event: JobEvent, at: datetime) -> dict[str, Any]:
    """The fields an event changes."""
    match event:
        case IterationCompleted():  # evolve applies it with after_iterations
            raise AssertionError("an iteration has no dict of changes")
        case JobSubmitted(spec=spec):
            return {"spec": spec, "status": JobStatus.QUEUED, "created_at": at}
        case JobStarted():
            return {"status": JobStatus.RUNNING, "started_at": state.started_at or at}
        case CheckpointSaved():
            return {"checkpoints": (*state.checkpoints, checkpoint_record(state, event)),
                    "resume_point": ResumePoint(iteration=event.iteration,
                                                state_ref=event.state_ref)}
        case CheckpointsPruned(iterations=iterations):
            pruned = set(iterations)
            return {"checkpoints": tuple(pruned_record(c) if c.info.iteration in pruned else c
                                         for c in state.checkpoints)}
        case BudgetThresholdReached(fraction=fraction):
            return {"thresholds": (*state.thresholds, fraction)}
        case JobPaused(iteration=iteration, state_ref=state_ref):
            resume_point = state.resume_point
            if state_ref is not None:
                resume_point = ResumePoint(iteration=iteration, state_ref=state_ref)
            return {"status": JobStatus.PAUSED, "resume_point": resume_point}
        case JobResumed():
            return {"status": JobStatus.QUEUED}
        case JobCancelled():
            return {"status": JobStatus.CANCELLED, "finished_at": at}
        case JobCompleted():
            return {"status": JobStatus.COMPLETED, "finished_at": at,
                    "iteration": event.iteration, "final_state_ref": event.final_state_ref,
                    "final_state_digest": event.final_state_digest,
                    "validation_score": event.validation_score}
        case JobFailed():
            error = JobError(type=event.error_type, message=event.message, reason=event.reason)
            return {"status": JobStatus.FAILED, "finished_at": at, "error": error}
        case JobRecovered(from_checkpoint=from_checkpoint, attempt=attempt):
            return {"attempts": attempt, **_rewind(state, from_checkpoint)}
        case JobForked():
            return _forked(event)
        case ForkCreated(child_id=child_id, at_iteration=at_iteration):
            return {"forks": (*state.forks, ForkNote(child_id=child_id, at_iteration=at_iteration))}
        case _:
            assert_never(event)


def checkpoint_record(state: JobState, event: CheckpointSaved) -> CheckpointRecord:
    """The record a `CheckpointSaved` adds to the state's checkpoints."""
    info = CheckpointInfo(
        iteration=event.iteration,
        validation_score=event.validation_score,
        metrics=event.metrics,
        pruned=False,
        state_ref=event.state_ref,
        policy_digest=event.policy_digest,
        optimizer_digest=event.optimizer_digest,
        rng_digest=event.rng_digest,
    )
    return CheckpointRecord(info=info, thresholds=state.thresholds)


def pruned_record(record: CheckpointRecord) -> CheckpointRecord:
    return replace(record, info=replace(record.info, pruned=True))


def _forked(event: JobForked) -> dict[str, Any]:
    """A fork starts after its parent's checkpoint, which is its own first checkpoint."""
    info = CheckpointInfo(
        iteration=event.at_iteration, validation_score=event.validation_score,
        metrics=event.metrics, pruned=False, state_ref=event.state_ref,
        policy_digest=event.policy_digest, optimizer_digest=event.optimizer_digest,
        rng_digest=event.rng_digest)
    return {"iteration": event.at_iteration, "metrics": event.metrics,
            "checkpoints": (CheckpointRecord(info=info, thresholds=()),),
            "resume_point": ResumePoint(iteration=event.at_iteration, state_ref=event.state_ref),
            "forked_from": ForkOrigin(parent_id=event.parent_id, at_iteration=event.at_iteration,
                                      state_ref=event.state_ref)}


def _rewind(state: JobState, iteration: int | None) -> dict[str, Any]:
    """Forget what iterations after `iteration` derived; cost stays counted."""
    kept = tuple(c for c in state.checkpoints if iteration is not None
                 and c.info.iteration <= iteration)
    if iteration is None or not kept or kept[-1].info.iteration != iteration:
        return {"iteration": 0, "metrics": {}, "thresholds": (), "checkpoints": (),
                "resume_point": None}
    target = kept[-1]
    return {"iteration": iteration, "metrics": target.info.metrics,
            "thresholds": target.thresholds, "checkpoints": kept,
            "resume_point": ResumePoint(iteration=iteration, state_ref=target.info.state_ref)}


def fold(events: Iterable[RecordedEvent], state: JobState | None = None) -> JobState:
    """The one fold used everywhere: actors on start, replay, the CLI and the tests."""
    for recorded in events:
        if state is None:
            state = initial_state(recorded.stream)
        state = evolve(state, recorded)
    if state is None:
        raise ValueError("fold of no events needs an initial state")
    return state


# --- decide ------------------------------------------------------------------------------------


def decide(command: Command, state: JobState) -> list[Event]:
    """Return the events that record `command`, or raise InvalidTransition (and record nothing)."""
    match command:
        case Submit(spec=spec):
            if state.exists:
                if state.spec != spec:
                    raise SpecError(
                        f"job {state.job_id!r} already exists with a different spec")
                return []
            return [JobSubmitted(spec=spec)]
        case Start():
            _require(state, command, JobStatus.QUEUED)
            return [JobStarted()]
        case Pause(state_ref=state_ref):
            _require(state, command, JobStatus.QUEUED, JobStatus.RUNNING)
            if state.status is JobStatus.QUEUED:
                return [JobPaused(iteration=state.iteration)]
            return [JobPaused(iteration=state.iteration, state_ref=state_ref,
                              state_size=command.state_size,
                              state_location=command.state_location)]
        case Resume():
            _require(state, command, JobStatus.PAUSED)
            return [JobResumed()]
        case Cancel(reason=reason):
            _require(state, command, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)
            return _terminal(state, [], lambda d: JobCancelled(
                iteration=state.iteration, reason=reason, state_digest=d))
        case RecordIteration():
            _require(state, command, JobStatus.RUNNING)
            return _record_iteration(command, state)
        case RecordCheckpoint():
            _require(state, command, JobStatus.RUNNING)
            return _record_late_checkpoint(command, state)
        case Fail(reason=reason, error_type=error_type, message=message):
            _require(state, command, JobStatus.QUEUED, JobStatus.RUNNING)
            return _terminal(state, [], lambda d: JobFailed(
                iteration=state.iteration, reason=reason, error_type=error_type,
                message=message, state_digest=d))
        case Recover(attempt=attempt, cause=cause):
            _require(state, command, JobStatus.RUNNING)
            last = state.last_checkpoint
            return [JobRecovered(
                from_checkpoint=last.info.iteration if last else None, attempt=attempt,
                cause=cause)]
        case _:
            assert_never(command)


def _require(state: JobState, command: Command, *allowed: JobStatus) -> None:
    if not state.exists:
        raise InvalidTransition(f"job {state.job_id!r} does not exist")
    if state.status not in allowed:
        name = type(command).__name__.lower()
        raise InvalidTransition(
            f"cannot {name} job {state.job_id!r}: it is {state.status.value}")


def _apply_pending(state: JobState, events: list[Event]) -> JobState:
    """Fold not-yet-recorded events (envelope fields are placeholders: digests ignore them,
    except the version, which is the one each event will be recorded with)."""
    start = state.version
    for offset, event in enumerate(events, start=1):
        state = evolve(state, RecordedEvent(
            position=0, stream=state.job_id, version=start + offset,
            type=event_tag(type(event)), schema_version=type(event).schema_version,
            recorded_at=_EPOCH, event=event))  # type: ignore[arg-type]
    return state


def _terminal(state: JobState, events: list[Event], make) -> list[Event]:
    """Append a terminal event carrying the digest of the state the events before it lead to."""
    before = _apply_pending(state, events)
    return [*events, make(state_digest(before))]


def _record_iteration(command: RecordIteration, state: JobState) -> list[Event]:
    spec = state.spec
    assert spec is not None
    result = command.result
    if result.iteration != state.iteration + 1:
        raise InvalidTransition(
            f"job {state.job_id!r} expected iteration {state.iteration + 1}, "
            f"got {result.iteration}")
    saved = command.saved
    last = result.iteration >= spec.config.n_iterations
    if command.checkpoint_later and (last or saved is not None
                                     or not checkpoint_due(spec, result.iteration)):
        raise ValueError(f"iteration {result.iteration} cannot record its checkpoint later")
    if needs_saved_state(spec, result.iteration) and saved is None \
            and not command.checkpoint_later:
        raise ValueError(f"iteration {result.iteration} needs a saved trainer state")
    events: list[Event] = [result]
    config = spec.config
    cost = state.cost_usd + result.cost_usd
    budget = config.max_budget_usd
    if budget is not None:
        for fraction in BUDGET_THRESHOLDS:
            if fraction not in state.thresholds and cost >= fraction * budget:
                events.append(BudgetThresholdReached(
                    fraction=fraction, cost_usd=cost, budget_usd=budget))
    if saved is not None and checkpoint_due(spec, result.iteration):
        events.extend(_checkpoint(state, events, result.iteration, saved,
                                  _apply_pending(state, events).metrics))
    if last:
        assert saved is not None
        return _terminal(state, events, lambda d: JobCompleted(
            iteration=result.iteration, final_state_ref=saved.state_ref,
            final_state_digest=saved.state_ref, validation_score=saved.validation_score,
            state_digest=d, final_state_size=saved.size, final_state_location=saved.location))
    if budget is not None and cost >= budget:
        return _terminal(state, events, lambda d: JobFailed(
            iteration=result.iteration, reason="budget_exhausted", error_type="BudgetExhausted",
            message=f"recorded cost ${cost:.4f} reached the budget ${budget:.4f}",
            state_digest=d))
    return events


def _record_late_checkpoint(command: RecordCheckpoint, state: JobState) -> list[Event]:
    spec = state.spec
    assert spec is not None
    iteration = command.iteration
    last = state.last_checkpoint
    if not checkpoint_due(spec, iteration) or iteration > state.iteration \
            or (last is not None and last.info.iteration >= iteration):
        raise InvalidTransition(
            f"job {state.job_id!r} cannot record a checkpoint of iteration {iteration} at "
            f"iteration {state.iteration}")
    return _checkpoint(state, [], iteration, command.saved, command.metrics)


def _checkpoint(state: JobState, events: list[Event], iteration: int, saved: SavedState,
                metrics: dict[str, float]) -> list[Event]:
    """A checkpoint's events after `events` (not yet recorded): saved, then perhaps a prune."""
    saved_event = CheckpointSaved(
        iteration=iteration, state_ref=saved.state_ref,
        validation_score=saved.validation_score, metrics=metrics,
        policy_digest=saved.policy_digest, optimizer_digest=saved.optimizer_digest,
        rng_digest=saved.rng_digest, state_size=saved.size, state_location=saved.location,
        state_digest=state_digest(_apply_pending(state, events)))
    pruned = _prune(_apply_pending(state, [*events, saved_event]),
                    state.spec.config.keep_checkpoints, saved)  # type: ignore[union-attr]
    return [saved_event] if pruned is None else [saved_event, pruned]


def _prune(state: JobState, keep: int, latest: SavedState) -> CheckpointsPruned | None:
    """Keep the best `keep` live checkpoints by validation score, plus always the latest."""
    live = [c.info for c in state.checkpoints if not c.info.pruned]
    if len(live) <= keep:
        return None
    by_score = sorted(live, key=lambda c: (-c.validation_score, -c.iteration))
    kept = {c.iteration for c in by_score[:keep]} | {live[-1].iteration}
    dropped = [c for c in live if c.iteration not in kept]
    if not dropped:
        return None
    still_referenced = {c.state_ref for c in live if c.iteration in kept}
    if state.resume_point is not None:
        still_referenced.add(state.resume_point.state_ref)
    still_referenced.add(latest.state_ref)
    released = sorted({c.state_ref for c in dropped} - still_referenced)
    return CheckpointsPruned(iterations=[c.iteration for c in dropped], released=released)
