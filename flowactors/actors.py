"""JobActor: one pykka actor per running job.

The iteration loop runs as messages to itself: an iteration starts its rollouts on the runtime's
rollout backend and returns; the backend's `_RolloutsDone` message finishes it. Between the two the actor is idle, so
cancel and pause requests are handled between steps, never queued behind a whole job. The actor is the only writer of its job's stream while it runs; every decision goes
through `job.decide` and every state change through `job.evolve`.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import pykka

from . import codec, trajectories
from .checkpointing import StateStore, StoredBlob
from .errors import CheckpointUnstorable, FlowError
from .events import Event, IterationCompleted, JobFailed, RecordedEvent
from .faults import fault_point
from .job import (
    Cancel,
    Command,
    Fail,
    JobState,
    Pause,
    RecordCheckpoint,
    RecordIteration,
    SavedState,
    checkpoint_due,
    decide,
    fold,
    needs_saved_state,
)
from .logs import get_logger
from .pieces import Pieces
from .rollouts import RolloutBackend, RolloutHandle, run_inline
from .saving import CheckpointSaves, SaveInFlight, Snapshot, saved_state, take_snapshot
from .tasks import Task, Trajectory, restore, snapshot, state_decoder
from .training import batch_for, split_data

log = get_logger(__name__)


class JobHost(Protocol):
    """What a job actor needs from the runtime that hosts it."""

    store: Any
    state_store: StateStore  # where trainer states go (the log, or checkpoint files)
    rollouts: RolloutBackend  # where the job's rollouts run
    saves: CheckpointSaves | None  # writes large checkpoints in the background (None: inline)
    closing: bool
    ready: threading.Event  # set once the runtime has started every recovered job

    def publish(self, state: JobState, recorded: Sequence[RecordedEvent]) -> None:
        """Called on the actor's thread after each durable append."""

    def actor_stopped(self, job_id: str, state: JobState, error: BaseException | None) -> None:
        """Called once when the actor is done (terminal, paused, cancelled, or stalled)."""


class _RolloutsDone(msgspec.Struct, frozen=True):
    iteration: int
    groups: list[list[Trajectory]]


class _SaveDone(msgspec.Struct, frozen=True):
    """The checkpoint of `iteration` is durable (or failed): record it between steps."""

    iteration: int


class _RunInline(msgspec.Struct, frozen=True):
    """Run iterations on this thread (a task with inline rollouts) until a message waits: sent
    behind that message, so it is handled first."""


_RUN_INLINE = _RunInline()


class CancelRequest(msgspec.Struct, frozen=True):
    reason: str = "requested"


class PauseRequest(msgspec.Struct, frozen=True):
    pass


class RecordLineage(msgspec.Struct, frozen=True):
    """Append events that change nothing of the training (a fork's note) between iterations;
    the answer is True once they are durable."""

    events: list[Event]


class JobActor(pykka.ThreadingActor):
    """Trains one job from its resume point until it is terminal, paused or cancelled."""

    use_daemon_thread = True  # a task stuck in update() must not hang interpreter exit

    @staticmethod
    def _create_actor_inbox() -> Any:
        """A C-implemented queue: a job's loop is a few messages per iteration, every one
        through the inbox, and `queue.Queue`'s Python-level locking was a tenth of its cost."""
        return queue.SimpleQueue()

    def __init__(self, *, host: JobHost, state: JobState, task: Task,
                 start: Command | None) -> None:
        super().__init__()
        assert state.spec is not None
        self.host = host
        self.state = state
        self.spec = state.spec
        self.task = task
        self.start_command = start
        self.train, self.held_out = split_data(self.spec)
        self.trainer: Any = None
        self.inline = host.rollouts.runs_inline(task, self.spec)
        self.never_cancelled = threading.Event()  # inline rollouts run to completion
        self.batch: RolloutHandle | None = None
        self.in_flight: SaveInFlight | None = None  # at most one checkpoint being written
        self.pause_requested = False
        self.stopped_with: BaseException | None = None
        self.stopping = False
        self.log = log.bind(job_id=state.job_id)

    # --- lifecycle hooks (run on the actor's thread) ---

    def on_start(self) -> None:
        # Recovery starts a thousand actors at once: training before all are started would
        # starve the thread starting them.
        self.host.ready.wait()
        try:
            self._begin()
        except Exception:
            self.on_failure(*sys.exc_info())  # pykka calls on_failure only for on_receive
            raise

    def on_stop(self) -> None:
        self.stopping = True
        if self.batch is not None:
            self.batch.cancel()
        self._abandon_save()
        self.host.actor_stopped(self.state.job_id, self.state, self.stopped_with)

    def on_failure(self, exception_type: Any, exception_value: Any, tb: Any) -> None:
        """An unexpected error: the supervisor (the runtime) restarts the job by replay."""
        self.stopping = True
        if self.batch is not None:
            self.batch.cancel()
        self._abandon_save()
        self.log.error("job_actor_crashed", error=repr(exception_value),
                       traceback="".join(traceback.format_tb(tb)))
        self.host.actor_stopped(self.state.job_id, self.state, exception_value)

    def on_receive(self, message: Any) -> Any:
        if self.stopping or self.host.closing:
            return None  # messages queued behind our own stop
        match message:
            case _RolloutsDone(iteration=iteration, groups=groups):
                if self.batch is None or iteration != self.state.iteration + 1:
                    return None  # a late result of an abandoned batch
                self.batch = None
                if self._record_iteration(iteration, groups):
                    self._continue()
            case _RunInline():
                self._run_inline_iterations()
            case _SaveDone(iteration=iteration):
                if self.in_flight is not None and self.in_flight.iteration == iteration:
                    try:
                        self._settle()
                    except _Stopped:
                        pass
            case CancelRequest(reason=reason):
                self._cancel(reason)
            case RecordLineage(events=events):
                try:
                    self._settle()
                    self._append(list(events))
                except _Stopped:
                    return False
                return True
            case PauseRequest():
                self.pause_requested = True
                if self.batch is None:  # between iterations: pause now
                    self._pause()
            case _:
                raise TypeError(f"unexpected message {message!r}")

    # --- steps ---

    def _finish(self) -> None:
        """Stop after this message; anything already queued is ignored."""
        self.stopping = True
        self.stop()

    def _append(self, events: list[Event], blobs: Sequence[bytes] = (),
                releases: Sequence[str] = ()) -> None:
        """Append durably, then fold and publish. A store failure stops the job, unrecorded."""
        if not events:
            return
        if self.host.closing:  # close() writes no job events: the job resumes on reopen
            self._finish()
            raise _Stopped()
        try:
            recorded = self.host.store.append(self.state.job_id, events, self.state.version,
                                              blobs=blobs)
        except FlowError as exc:
            self.log.error("append_failed", error=str(exc))
            self.stopped_with = exc
            self._finish()
            raise _Stopped() from exc
        self.state = fold(recorded, self.state)
        if releases:  # durable now: files no job needs any more can go
            self.host.state_store.release(releases, self.state)
        self.host.publish(self.state, recorded)

    def _decide_and_append(self, command: Command, blobs: Sequence[bytes] = ()) -> None:
        self._append(decide(command, self.state), blobs)

    def _begin(self) -> None:
        try:
            if self.start_command is not None:
                self._decide_and_append(self.start_command)
            fault_point("actor.started")
            self.log.info("job_started", iteration=self.state.iteration,
                          attempt=self.state.attempts)
            try:
                self.trainer = self._load_trainer()
            except Exception as exc:
                self._fail_task(exc)
                return
            self._continue()
        except _Stopped:
            pass

    def _load_trainer(self) -> Any:
        point = self.state.resume_point
        if point is None:
            trainer = self.task.init(self.spec)
            codec.encode(snapshot(self.task, trainer))  # unstorable: fail now, not at a checkpoint
            return trainer
        return restore(self.task, state_decoder(self.task).decode(
            self.host.state_store.get(point.state_ref)))

    def _continue(self) -> None:
        if self.state.status.is_terminal:
            self._finish()
        elif self.pause_requested:
            self._pause()
        elif self.inline:
            self.actor_ref.tell(_RUN_INLINE)
        else:
            self._start_iteration()  # rollouts run elsewhere: requests still get handled

    def _start_iteration(self) -> None:
        if self.batch is not None or self.state.status.is_terminal:
            return
        iteration = self.state.iteration + 1
        queries = batch_for(self.spec, self.train, iteration)
        actor_ref = self.actor_ref

        def on_complete(groups: list[list[Trajectory]]) -> None:
            actor_ref.tell(_RolloutsDone(iteration, groups))

        self.batch = self.host.rollouts.start(
            task=self.task, state=self.trainer, spec=self.spec, iteration=iteration,
            queries=queries, on_complete=on_complete)

    def _run_inline_iterations(self) -> None:
        """Iterations back to back on this thread for as long as no message waits (a message
        is handled after the iteration in progress, as with pool rollouts)."""
        inbox = self.actor_inbox
        while True:
            iteration = self.state.iteration + 1
            queries = batch_for(self.spec, self.train, iteration)
            groups = run_inline(self.task, self.trainer, self.spec, iteration, queries,
                                self.never_cancelled)
            if not self._record_iteration(iteration, groups):
                return
            if self.state.status.is_terminal or not inbox.empty():
                self._continue()
                return

    def _record_iteration(self, iteration: int, groups: list[list[Trajectory]]) -> bool:
        """Update the trainer and record the iteration; False if the job stopped instead."""
        try:
            try:  # the task's own code: its exceptions fail the job, not the runtime
                trainer, metrics = self.task.update(self.trainer, groups, self.spec.config)
            except Exception as exc:
                self._fail_task(exc)
                return False
            result = trajectories.iteration_result(iteration, groups, metrics)
            due = needs_saved_state(self.spec, iteration)
            if due:
                self._settle()  # at most one in flight: the one before is recorded first
            blobs: list[bytes] = []
            saved = stored = deferred = None
            if due:
                try:
                    saved, stored, deferred = self._save_state(iteration, trainer, result, blobs)
                except Exception as exc:  # the task's, or a state that cannot be stored
                    self._fail_task(exc)
                    return False
            if self.spec.config.record_trajectories:
                result = trajectories.attach(
                    result, batch_for(self.spec, self.train, iteration), groups, blobs)
            command = RecordIteration(result=result, saved=saved,
                                      checkpoint_later=deferred is not None)
            events = decide(command, self.state)
            if self.in_flight is not None and len(events) > 1:
                self._settle()  # a threshold or the end: the checkpoint in flight goes first
                events = decide(command, self.state)
            releases = [r for e in events for r in getattr(e, "released", ())]
            fault_point("actor.checkpoint" if stored else "actor.iteration")
            try:
                self._append(events, blobs, releases)
            finally:
                if stored is not None:
                    self.host.state_store.settled(stored)
            self.trainer = trainer
            if deferred is not None:
                self._start_save(iteration, deferred)
            return True
        except _Stopped:
            return False

    def _save_state(self, iteration: int, trainer: Any, result: IterationCompleted,
                    blobs: list[bytes]
                    ) -> tuple[SavedState | None, StoredBlob | None, Snapshot | None]:
        """The iteration's trainer state: stored now (its SavedState and StoredBlob), or, for
        a checkpoint bound for the checkpoint store, a snapshot to write in the background."""
        inline_max = self.host.state_store.inline_max_bytes
        defer = self._may_defer(iteration, result)
        taken = take_snapshot(self.task, trainer, self.held_out, defer=defer,
                              inline_max=inline_max)
        if defer and (taken.blob is None or len(taken.blob) > inline_max):
            return None, None, taken
        assert taken.blob is not None and taken.digests is not None
        stored = self._store(taken.blob, blobs)
        return saved_state(taken.digests, stored, taken.score), stored, None

    def _may_defer(self, iteration: int, result: IterationCompleted) -> bool:
        """A checkpoint may be written in the background unless its iteration ends the job
        (the last one, or the budget spent): its state is then the job's result."""
        if self.host.saves is None or not checkpoint_due(self.spec, iteration) \
                or iteration >= self.spec.config.n_iterations:
            return False
        events = decide(RecordIteration(result=result, checkpoint_later=True), self.state)
        return not any(isinstance(e, JobFailed) for e in events)

    def _start_save(self, iteration: int, taken: Snapshot) -> None:
        assert self.host.saves is not None and self.in_flight is None
        save = self.host.saves.start(iteration, self.state.metrics, taken)
        self.in_flight = save
        actor_ref = self.actor_ref

        def done(_: Any) -> None:
            try:
                actor_ref.tell(_SaveDone(iteration))
            except pykka.ActorDeadError:
                pass  # the actor stopped: _abandon_save settles the file

        save.future.add_done_callback(done)

    def _settle(self) -> None:
        """Wait for the checkpoint in flight, if any, and record it; a save that failed fails
        the job (raising _Stopped, as a refused append does)."""
        save, self.in_flight = self.in_flight, None
        if save is None:
            return
        if not save.future.done():  # the checkpoints come faster than they are written
            self.log.info("checkpoint_awaited", iteration=save.iteration)
        try:
            saved = save.future.result()
        except Exception as exc:
            if self.host.closing:
                self._finish()
                raise _Stopped() from exc
            self._fail_task(exc)
            raise _Stopped() from exc
        stored = StoredBlob(address=saved.state_ref, size=saved.size or 0,
                            location=saved.location)
        try:
            events = decide(RecordCheckpoint(iteration=save.iteration, saved=saved,
                                             metrics=save.metrics), self.state)
            releases = [r for e in events for r in getattr(e, "released", ())]
            fault_point("actor.checkpoint")
            self._append(events, (), releases)
        finally:
            self.host.state_store.settled(stored)

    def _abandon_save(self) -> None:
        """The job stops with a checkpoint in flight: no event will name its file, which the
        next open sweeps; its pending mark goes once it is written."""
        save, self.in_flight = self.in_flight, None
        if save is not None:
            save.settled_by(self.host.state_store)

    def _store(self, blob: bytes | Pieces, blobs: list[bytes]) -> StoredBlob:
        """Make a state durable before its event; one the log keeps goes into `blobs`."""
        stored = self.host.state_store.store(blob)  # CheckpointUnstorable fails the job
        if stored.location is None:
            blobs.append(bytes(blob))
        return stored

    def _fail_task(self, exc: Exception) -> None:
        """The task raised, or its state could not be stored: decided once, recorded."""
        self.log.warning("task_failed", error_type=type(exc).__name__, error=str(exc))
        reason = "checkpoint_unstorable" if isinstance(exc, CheckpointUnstorable) \
            else "task_error"
        self._decide_and_append(Fail(reason=reason, error_type=type(exc).__name__,
                                     message=str(exc)))
        self._finish()

    def _cancel(self, reason: str) -> None:
        if self.batch is not None:
            self.batch.cancel()
            self.batch = None
        try:
            self._settle()  # the checkpoint taken counts: the cancelled job keeps it
            self._decide_and_append(Cancel(reason=reason))
            self.log.info("job_cancelled", iteration=self.state.iteration)
            self._finish()
        except _Stopped:
            pass

    def _pause(self) -> None:
        try:
            self._settle()
            blob = codec.encode(snapshot(self.task, self.trainer))
            blobs: list[bytes] = []
            try:
                stored = self._store(blob, blobs)
            except CheckpointUnstorable as exc:
                self._fail_task(exc)
                return
            try:
                self._decide_and_append(Pause(state_ref=stored.address, state_size=stored.size,
                                              state_location=stored.location), blobs=blobs)
            finally:
                self.host.state_store.settled(stored)
            self.log.info("job_paused", iteration=self.state.iteration)
            self._finish()
        except _Stopped:
            pass


class _Stopped(Exception):
    """Internal: the store refused an append; the actor is already stopping."""
