"""Forks: a new job that starts from another job's checkpoint, with lineage in both streams.

The child's stream records `JobSubmitted` (its own spec: the parent's with the changed
settings) and `JobForked` (parent, checkpoint, and the checkpoint's record, which becomes the
child's first checkpoint and resume point). The child's append stores the checkpoint's state
under its content address, which the parent already stored: nothing is copied, and the child
holds its own reference, so the state outlives the parent's pruning. The parent's stream then
records `ForkCreated`; the child's record is the authority, and a runtime that opens a log where
a parent lacks the note of a fork (a crash between the two appends) records it then.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pykka

from . import job as core
from .actors import RecordLineage
from .control import ForkRequest
from .errors import CheckpointNotFound, FlowError, SpecError
from .events import Event, ForkCreated, JobForked, JobSubmitted
from .logs import get_logger
from .replay import job_state
from .spec import GRPOConfig, JobSpec, validate_job_id, validate_spec
from .store import EventStore
from .tasks import build_task

log = get_logger(__name__)

NOTE_ATTEMPTS = 3
NOTE_TIMEOUT_SECONDS = 600.0

__all__ = ["child_spec", "fork_directly", "fork_in_runtime", "fork_request", "missing_notes",
           "plan"]


def child_spec(parent: core.JobState, config: GRPOConfig | dict[str, Any] | None,
               task_options: dict[str, Any] | None) -> JobSpec:
    """The parent's spec with the child's `config` (whole; default the parent's) and
    `task_options` (whole; default the parent's), validated like a submitted spec.

    Raises:
        SpecError: the new settings are invalid, or the task does not accept the options.
    """
    assert parent.spec is not None
    raw = msgspec.to_builtins(parent.spec)
    if config is not None:
        raw["config"] = msgspec.to_builtins(config)
    if task_options is not None:
        raw["task_options"] = task_options
    spec = validate_spec(raw)
    build_task(spec)
    return spec


def fork_request(parent: core.JobState, *, at_iteration: int, job_id: str | None,
                 config: GRPOConfig | dict[str, Any] | None,
                 task_options: dict[str, Any] | None) -> ForkRequest:
    """A fork's arguments for the log's owner, checked as the fork will check them (the
    settings, the task's options, the ids) so that a bad one is refused before a request is
    written; the child's id is chosen now (a new uuid by default).

    Raises:
        SpecError: invalid settings, options or ids.
    """
    spec = child_spec(parent, config, task_options)
    job_id = uuid.uuid4().hex if job_id is None else validate_job_id(job_id)
    raw = {"at_iteration": at_iteration, "job_id": job_id,
           "config": msgspec.to_builtins(spec.config),
           "task_options": None if task_options is None else spec.task_options}
    try:
        return msgspec.convert(raw, ForkRequest)
    except msgspec.ValidationError as exc:
        raise SpecError(f"invalid fork of job {parent.job_id!r}: {exc}") from None


def plan(parent: core.JobState, child: core.JobState, spec: JobSpec,
         at_iteration: int) -> list[Event]:
    """The child's events for a fork of `parent` at checkpoint `at_iteration` (pure).

    Returns [] when `child` is this very fork already (forking is idempotent with a caller's
    job id).

    Raises:
        CheckpointNotFound: the parent has no live checkpoint there.
        SpecError: the child would have nothing to train, or its id is taken by another job.
    """
    record = next((c.info for c in parent.checkpoints if c.info.iteration == at_iteration),
                  None)
    if record is None:
        have = ", ".join(str(c.info.iteration) for c in parent.checkpoints
                         if not c.info.pruned) or "none"
        raise CheckpointNotFound(f"job {parent.job_id!r} has no checkpoint at iteration "
                                 f"{at_iteration} (live checkpoints: {have})")
    if record.pruned:
        raise CheckpointNotFound(f"checkpoint {at_iteration} of job {parent.job_id!r} was "
                                 f"pruned: its state is gone")
    if at_iteration >= spec.config.n_iterations:
        raise SpecError(f"a fork at iteration {at_iteration} needs n_iterations above it, "
                        f"not {spec.config.n_iterations} - at `$.config.n_iterations`")
    if child.exists:
        origin = child.forked_from
        if (child.spec == spec and origin is not None and origin.parent_id == parent.job_id
                and origin.at_iteration == at_iteration):
            return []
        raise SpecError(f"job {child.job_id!r} already exists (not this fork)")
    return [JobSubmitted(spec=spec), JobForked(
        parent_id=parent.job_id, at_iteration=at_iteration, state_ref=record.state_ref,
        validation_score=record.validation_score, metrics=record.metrics,
        policy_digest=record.policy_digest, optimizer_digest=record.optimizer_digest,
        rng_digest=record.rng_digest)]


def _shared(log: Any, state_ref: str) -> list[bytes]:
    """The child's reference to its parent's checkpoint state, under the same address (no
    copy): a state kept in the log is named again by the child's append; a checkpoint file
    needs nothing, since the child's folded state keeps it live."""
    return [log.get_blob(state_ref)] if log.has_blob(state_ref) else []


def _forked(events: list[Event]) -> JobForked:
    forked = events[-1]
    assert isinstance(forked, JobForked)
    return forked


def missing_notes(states: dict[str, core.JobState]) -> list[tuple[str, ForkCreated]]:
    """(parent, note) for each fork whose parent's stream does not record it yet."""
    missing = []
    for state in states.values():
        origin = state.forked_from
        parent = states.get(origin.parent_id) if origin is not None else None
        if origin is None or parent is None:
            continue
        if not any(f.child_id == state.job_id for f in parent.forks):
            missing.append((parent.job_id, ForkCreated(child_id=state.job_id,
                                                       at_iteration=origin.at_iteration)))
    return missing


# --- in a runtime ------------------------------------------------------------------------------


def fork_in_runtime(rt: Any, parent_id: str, *, at_iteration: int, job_id: str | None,
                    config: GRPOConfig | dict[str, Any] | None,
                    task_options: dict[str, Any] | None) -> str:
    """`Runtime.fork`: record the child, queue it, then note it in the parent's stream (through
    the parent's actor while it runs: the actor is its stream's only writer)."""
    with rt._lock:
        rt._check_open()
        parent = rt._state(parent_id)
        spec = child_spec(parent, config, task_options)
        job_id = uuid.uuid4().hex if job_id is None else validate_job_id(job_id)
        child = rt._states.get(job_id) or core.initial_state(job_id)
        events = plan(parent, child, spec, at_iteration)
        if not events:
            return job_id
        rt._append_direct(child, events, blobs=_shared(rt.store, _forked(events).state_ref))
        log.info("job_forked", job_id=job_id, parent_id=parent_id, at_iteration=at_iteration)
    note_parent(rt, parent_id, ForkCreated(child_id=job_id, at_iteration=at_iteration))
    with rt._lock:
        rt._enqueue(job_id)
        rt._schedule()
    return job_id


def note_parent(rt: Any, parent_id: str, note: ForkCreated) -> None:
    """Append `note` to the parent's stream: directly when no actor runs it, else by its actor
    (at its next iteration boundary). Gives up (logged) only while the runtime closes or after
    repeated refusals; the next open records it then (`missing_notes`)."""
    for _ in range(NOTE_ATTEMPTS):
        with rt._lock:
            if rt.closing:
                break
            actor = rt._actors.get(parent_id)
            if actor is None:
                rt._append_direct(rt._states[parent_id], [note])
                return
        try:
            if actor.ask(RecordLineage([note]), timeout=NOTE_TIMEOUT_SECONDS):
                return
        except pykka.ActorDeadError:
            pass
        with rt._changed:  # the actor is stopping: append directly once it is gone
            rt._changed.wait_for(lambda: rt._actors.get(parent_id) is not actor,
                                 NOTE_TIMEOUT_SECONDS)
    log.warning("fork_note_deferred", job_id=parent_id, child_id=note.child_id)


def repair_notes(rt: Any) -> None:
    """Record the notes of forks a crash left out of their parents' streams (a failure to is
    logged: the children's records stand, and the next open tries again)."""
    for parent_id, note in missing_notes(dict(rt._states)):
        try:
            note_parent(rt, parent_id, note)
        except FlowError as exc:
            log.warning("fork_note_failed", job_id=parent_id, child_id=note.child_id,
                        error=str(exc))


# --- with no runtime (the command line) --------------------------------------------------------


def fork_directly(store: EventStore, parent_id: str, *, at_iteration: int,
                  job_id: str | None, config: GRPOConfig | dict[str, Any] | None,
                  task_options: dict[str, Any] | None) -> str:
    """Record a fork on a log this process owns (no runtime): the child is queued and runs
    when a runtime opens the log."""
    parent = job_state(store, parent_id)
    spec = child_spec(parent, config, task_options)
    job_id = uuid.uuid4().hex if job_id is None else validate_job_id(job_id)
    child = (job_state(store, job_id) if store.stream_version(job_id)
             else core.initial_state(job_id))
    events = plan(parent, child, spec, at_iteration)
    if not events:
        return job_id
    store.append(job_id, events, child.version,
                 blobs=_shared(store, _forked(events).state_ref))
    store.append(parent_id, [ForkCreated(child_id=job_id, at_iteration=at_iteration)],
                 parent.version)
    return job_id
