"""The job table of a runtime and the host of its job actors: admission and supervision.

`Runtime` is a `Supervisor`: this part keeps every job's folded state and view, admits queued
jobs up to `max_concurrent_jobs` (by priority, then submission order), starts their actors and
hosts them (`actors.JobHost`: each durable append is published here), and restarts an actor
that dies unexpectedly by replay, a bounded number of times. The runtime around it opens the
log, recovers it, and serves users and other processes.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pykka

from .actors import JobActor
from .checkpointing import StateStore
from .errors import FlowError, JobNotFound, SpecError
from .events import RecordedEvent
from .job import Command, Fail, JobState, Recover, Start, decide, fold, view
from .logs import get_logger
from .rollouts import RolloutBackend
from .saving import CheckpointSaves
from .store import EventStore
from .tasks import build_task
from .views import JobStatus, JobView

log = get_logger("flowactors.runtime")  # the Runtime's lines, whichever of its files logs them

__all__ = ["MAX_RESTARTS", "Supervisor"]

MAX_RESTARTS = 3


class Supervisor:
    """Jobs, their queue and their actors; the `JobHost` every job actor reports to.

    The runtime sets `path`, `store`, `state_store`, `saves` and `rollouts` before any job
    starts.
    """

    path: Path
    store: EventStore
    state_store: StateStore
    saves: CheckpointSaves | None
    rollouts: RolloutBackend

    def __init__(self, max_concurrent_jobs: int) -> None:
        self.max_concurrent_jobs = max_concurrent_jobs
        self.closing = False
        self._lock = threading.RLock()  # control decisions and admission
        self._changed = threading.Condition()  # a job's state changed
        self._states: dict[str, JobState] = {}
        self._views: dict[str, JobView] = {}
        self._order: dict[str, int] = {}  # submission position, for the queue's order
        self._queue: list[tuple[int, int, str]] = []
        self._actors: dict[str, pykka.ActorRef] = {}
        self._restarts: dict[str, int] = {}
        self._stalled: dict[str, str] = {}
        self._unloadable: dict[str, str] = {}  # job -> why its task does not load here now
        self._watchers: list[tuple[str | None, Any]] = []
        self.ready = threading.Event()

    # --- scheduling ---

    def _enqueue(self, job_id: str) -> None:
        state = self._states[job_id]
        assert state.spec is not None
        heapq.heappush(self._queue, (-state.spec.priority, self._order[job_id], job_id))

    def _schedule(self) -> None:
        """Admit queued jobs while slots are free (called with the lock held)."""
        while self._queue and len(self._actors) < self.max_concurrent_jobs and not self.closing:
            _, _, job_id = heapq.heappop(self._queue)
            state = self._states[job_id]
            if state.status is JobStatus.QUEUED and job_id not in self._actors:
                self._start_actor(state, Start())

    def _start_actor(self, state: JobState, start: Command | None) -> None:
        """Start a job's actor; it first records `start` (None: already recorded)."""
        assert state.spec is not None
        try:
            task = build_task(state.spec)
        except SpecError as exc:
            # The task's code does not load here (another directory or virtualenv): a problem
            # of the environment, not of the job, which waits, unfinished, for its code.
            reason = str(exc)
            self._unloadable[state.job_id] = reason
            self._views[state.job_id] = msgspec.structs.replace(
                self._views[state.job_id], waiting=reason)
            log.warning("task_unavailable", job_id=state.job_id, task=state.spec.task,
                        error=str(exc))
            return
        if self._views[state.job_id].waiting:
            self._views[state.job_id] = view(state)
        self._actors[state.job_id] = JobActor.start(host=self, state=state, task=task,
                                                    start=start)

    def _retry_task(self, state: JobState) -> JobView:
        """`resume` of a job whose task did not load: try again; it goes on exactly where it
        stopped (a running job from its last checkpoint, a queued one when admitted).

        Raises:
            SpecError: the task still cannot be loaded (the job keeps waiting).
        """
        job_id = state.job_id
        del self._unloadable[job_id]
        if state.status is JobStatus.QUEUED:
            self._views[job_id] = view(state)
            self._enqueue(job_id)
            self._schedule()
        else:
            self._start_actor(state, None)
        if job_id in self._unloadable:
            raise SpecError(f"job {job_id!r} cannot resume: {self._unloadable[job_id]}")
        return self._views[job_id]

    def _append_direct(self, state: JobState, events: list, blobs: Sequence[bytes] = ()) -> None:
        """Append for a job that has no actor (called with the lock held)."""
        if events:
            recorded = self.store.append(state.job_id, events, state.version, blobs=blobs)
            if state.job_id not in self._order:
                self._order[state.job_id] = recorded[0].position
            self.publish(fold(recorded, state), recorded)

    # --- JobHost: called on actor threads ---

    def publish(self, state: JobState, recorded: Sequence[RecordedEvent]) -> None:
        """Serve the new state; wake waiters only when a status changed (they wait for
        one), never on every iteration of every job."""
        job_id = state.job_id
        before = self._views.get(job_id)
        self._states[job_id] = state
        self._unloadable.pop(job_id, None)  # a decision about it was recorded (pause, cancel)
        current = self._views[job_id] = view(state)
        if self._watchers:
            with self._changed:
                for wanted, inbox in self._watchers:
                    if wanted is None or wanted == job_id:
                        for item in recorded:
                            inbox.put(item)
        if before is None or before.status is not current.status:
            with self._changed:
                self._changed.notify_all()

    def actor_stopped(self, job_id: str, state: JobState, error: BaseException | None) -> None:
        with self._lock:
            if self._actors.pop(job_id, None) is None:
                return  # already reported
            if error is not None and not self.closing:
                if isinstance(error, FlowError):
                    self._stalled[job_id] = str(error)
                else:
                    self._supervise(job_id, error)
            self._schedule()
        with self._changed:
            self._changed.notify_all()

    def _supervise(self, job_id: str, error: BaseException) -> None:
        """Restart a crashed actor by replay (bounded); then fail the job."""
        state = self._states[job_id]
        if state.status is not JobStatus.RUNNING:
            return
        restarts = self._restarts.get(job_id, 0) + 1
        self._restarts[job_id] = restarts
        if restarts > MAX_RESTARTS:
            log.error("job_restarts_exhausted", job_id=job_id, error=repr(error))
            self._append_direct(state, decide(Fail(
                reason="restarts_exhausted", error_type=type(error).__name__,
                message=f"{error} (after {MAX_RESTARTS} restarts)"), state))
            return
        log.warning("job_restarted", job_id=job_id, restart=restarts, error=repr(error))
        self._start_actor(state, Recover(attempt=state.attempts + 1, cause="restart"))

    # --- helpers ---

    def _state(self, job_id: str) -> JobState:
        try:
            return self._states[job_id]
        except KeyError:
            raise JobNotFound(f"job {job_id!r} not found in {self.path}") from None
