"""Runtime: the public facade. Opening one recovers every unfinished job from the log.

The runtime owns the log (one owner at a time), admits queued jobs up to `max_concurrent_jobs`
(by priority, then submission order), supervises job actors (an actor that dies unexpectedly is
restarted by replay, a bounded number of times), serves `status()` from an in-memory view
updated after each commit, and answers the requests (control, forks) other processes leave
in the inbox. Admission and supervision are its `Supervisor` part (`flowactors.supervisor`).
"""

from __future__ import annotations

import queue
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pykka

from . import lineage
from .actors import CancelRequest, PauseRequest
from .checkpointing import StateStore, open_state_store
from .saving import CheckpointSaves
from .errors import (
    CheckpointNotFound,
    FlowError,
    InvalidTransition,
    JobNotFound,
    LogCorrupted,
    StoreUnavailable,
)
from .events import RecordedEvent
from .faults import fault_point
from .control import CONTROL_COMMANDS, CONTROL_REASON, ControlCommand, decision, decode_fork
from .job import Recover, Submit, checkpoint_infos, decide, fold, initial_state, view
from .logs import get_logger
from .memory import MemoryEventLog
from .replay import replay, replay_log
from .rollouts import RolloutBackend, ThreadRollouts
from .spec import JobSpec, validate_job_id, validate_spec
from .store import EventStore
from .tasks import build_task, state_decoder
from .trajectories import RecordedTrajectory, read as read_trajectories
from .supervisor import MAX_RESTARTS, Supervisor
from .views import CheckpointInfo, JobStatus, JobView

log = get_logger(__name__)

__all__ = ["CONTROL_TIMEOUT_SECONDS", "INBOX_POLL_SECONDS", "MAX_RESTARTS", "MEMORY", "Runtime"]

MEMORY = ":memory:"
"""The path of a log that lives in the runtime's process only (as SQLite spells it)."""

INBOX_POLL_SECONDS = 0.1
CONTROL_TIMEOUT_SECONDS = 600.0
_WATCH_END = object()


class Runtime(Supervisor):
    """An embedded runtime on one log file. Use as a context manager.

    Args:
        path: the SQLite log (created if missing); or `":memory:"` for a log that lives in
            this process only (the in-memory ports of `flowactors.memory`: nothing survives
            the runtime, no other process can reach it; for tests and experiments).
        max_concurrent_jobs: jobs running at once; the others wait, queued, holding no thread.
        max_rollout_workers: rollouts running at once across all jobs (the thread backend).
        rollouts: where rollouts run: None is a pool of `max_rollout_workers` threads in this
            process (`ThreadRollouts`, which the runtime closes); or a backend you made and
            close yourself, e.g. `RayRollouts("auto")` or `AsyncRollouts()`.
        synchronous: SQLite durability: "full" (default, survives power loss), "normal", "off".
        handle_signals: close cleanly on SIGINT/SIGTERM when created on the main thread and the
            default handlers are in place.
        checkpoint_store: where states too large for the log go: None is a directory beside
            the log (`<path>.checkpoints`); or a path, an fsspec URL (`"s3://bucket/ckpt"`),
            or a `FileCheckpoints` you made.

    Raises:
        StoreLocked: another runtime owns this log. LogCorrupted: not a flowactors log.
    """

    def __init__(self, path: str | Path = "flow.db", *, max_concurrent_jobs: int = 100,
                 max_rollout_workers: int = 64, synchronous: str = "full",
                 handle_signals: bool = True, rollouts: RolloutBackend | None = None,
                 checkpoint_store: Any = None) -> None:
        if max_concurrent_jobs < 1 or max_rollout_workers < 1:
            raise ValueError("max_concurrent_jobs and max_rollout_workers must be >= 1")
        super().__init__(max_concurrent_jobs)
        self.path = Path(path)
        self.in_memory = str(path) == MEMORY
        self._memory_files: str | None = None
        if self.in_memory:
            self.store: EventStore | MemoryEventLog = MemoryEventLog()
            if checkpoint_store is None:  # this runtime's own, removed when it closes
                checkpoint_store = self._memory_files = f"memory://flowactors-{uuid.uuid4().hex}"
        else:
            self.store = EventStore(self.path, mode="owner", synchronous=synchronous)
        self.state_store: StateStore = open_state_store(
            self.store, self.path, checkpoint_store, lambda: list(self._states.values()))
        self.saves: CheckpointSaves | None = CheckpointSaves(self.state_store)
        self._owns_rollouts = rollouts is None
        self.rollouts = ThreadRollouts(max_rollout_workers) if rollouts is None else rollouts
        self._previous_handlers: dict[int, Any] = {}
        try:
            self._recover()
        except BaseException:
            self._shutdown()
            raise
        finally:
            self.ready.set()
        lineage.repair_notes(self)
        self._inbox_stop = threading.Event()
        self._inbox_thread: threading.Thread | None = None
        if not self.in_memory:  # another process can leave requests only in a file's inbox
            self._inbox_thread = threading.Thread(target=self._tail_inbox, daemon=True,
                                                  name="flowactors-inbox")
            self._inbox_thread.start()
        if handle_signals:
            self._install_signal_handlers()

    # --- context manager ---

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submitting and controlling jobs ---

    def submit(self, spec: JobSpec | dict[str, Any], *, job_id: str | None = None) -> str:
        """Queue a job; returns its id. Idempotent with a caller's `job_id` and the same spec.

        Raises:
            SpecError: invalid spec, unknown task, bad task options, or `job_id` reused with
                another spec. Nothing is written then.
        """
        spec = validate_spec(spec)
        build_task(spec)  # an unknown task or bad options fails now, not in the actor
        job_id = uuid.uuid4().hex if job_id is None else validate_job_id(job_id)
        with self._lock:
            self._check_open()
            state = self._states.get(job_id) or initial_state(job_id)
            events = decide(Submit(spec=spec), state)
            if events:
                self._append_direct(state, events)
                log.info("job_submitted", job_id=job_id, agent_id=spec.agent_id)
                self._enqueue(job_id)
                self._schedule()
        return job_id

    def pause(self, job_id: str) -> JobView:
        """Pause a job (a running one at its next iteration boundary); returns the new view."""
        return self._control(job_id, "pause")

    def resume(self, job_id: str) -> JobView:
        """Queue a paused job again; it continues exactly where it paused."""
        return self._control(job_id, "resume")

    def cancel(self, job_id: str, reason: str = "requested") -> JobView:
        """Cancel a job, mid-iteration if it runs; does not wait for abandoned rollouts."""
        return self._control(job_id, "cancel", reason)

    def _control(self, job_id: str, command: ControlCommand, reason: str = "requested"
                 ) -> JobView:
        with self._lock:
            self._check_open()
            state = self._state(job_id)
            if command == "resume" and job_id in self._unloadable:
                return self._retry_task(state)
            actor = self._actors.get(job_id)
            if actor is None:
                self._append_direct(state, decide(decision(command, reason), state))
                if command == "resume":
                    self._enqueue(job_id)
                    self._schedule()
                return self._views[job_id]
            if command == "resume":
                decide(decision(command), state)  # raises InvalidTransition: it is running or queued
            try:
                actor.tell(PauseRequest() if command == "pause" else CancelRequest(reason))
            except pykka.ActorDeadError:
                pass
        with self._changed:
            if not self._changed.wait_for(lambda: job_id not in self._actors,
                                          CONTROL_TIMEOUT_SECONDS):
                raise TimeoutError(f"job {job_id!r} did not reach an iteration boundary in time")
        if job_id in self._stalled:
            raise StoreUnavailable(f"job {job_id!r}: {self._stalled[job_id]}")
        final = self._views[job_id]
        wanted = JobStatus.PAUSED if command == "pause" else JobStatus.CANCELLED
        if final.status is not wanted:
            if final.status is JobStatus.QUEUED:  # admitted actor stopped by close or restart
                return self._control(job_id, command, reason)
            raise InvalidTransition(
                f"cannot {command} job {job_id!r}: it is {final.status.value}")
        return final

    # --- reading ---

    def status(self, job_id: str) -> JobView:
        """The job's current view, from memory: never waits behind a busy actor."""
        try:
            return self._views[job_id]
        except KeyError:
            raise JobNotFound(f"job {job_id!r} not found in {self.path}") from None

    def jobs(self, status: JobStatus | str | None = None) -> list[JobView]:
        """Every job's view (optionally of one status), in submission order."""
        views = sorted(self._views.values(), key=lambda v: self._order.get(v.job_id, 0))
        if status is None:
            return views
        wanted = JobStatus(status)
        return [v for v in views if v.status is wanted]

    def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        """Block until the job is terminal; returns its view.

        Raises:
            TimeoutError: not terminal within `timeout` seconds.
            StoreUnavailable: the job stopped because its events could not be written.
        """
        self._state(job_id)
        with self._changed:
            done = self._changed.wait_for(
                lambda: self._views[job_id].status.is_terminal or job_id in self._stalled
                or self.closing, timeout)
        if job_id in self._stalled:
            raise StoreUnavailable(f"job {job_id!r}: {self._stalled[job_id]}")
        if not done or not self._views[job_id].status.is_terminal:
            waiting = self._views[job_id].waiting
            raise TimeoutError(f"job {job_id!r} is still {self._views[job_id].status.value} "
                               f"after {timeout}s" + (f" (waiting: {waiting})" if waiting else ""))
        return self._views[job_id]

    def history(self, job_id: str) -> Iterator[RecordedEvent]:
        """The job's recorded events, in order."""
        self._state(job_id)
        return self.store.read_stream(job_id)

    def watch(self, job_id: str | None = None) -> Iterator[RecordedEvent]:
        """Yield events as they are committed (a live tail); ends when the job is terminal
        (for one job) or when the runtime closes."""
        if job_id is not None:
            self._state(job_id)
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        entry = (job_id, inbox)
        with self._changed:
            self._watchers.append(entry)
        return self._drain_watch(entry, job_id)

    def _drain_watch(self, entry: tuple[str | None, Any], job_id: str | None
                     ) -> Iterator[RecordedEvent]:
        inbox = entry[1]
        try:
            if job_id is not None and self._views[job_id].status.is_terminal:
                return
            while True:
                item = inbox.get()
                if item is _WATCH_END:
                    return
                yield item
                if job_id is not None and self._views[job_id].status.is_terminal \
                        and self._views[job_id].version <= item.version:
                    return
        finally:
            with self._changed:
                if entry in self._watchers:
                    self._watchers.remove(entry)

    def checkpoints(self, job_id: str) -> list[CheckpointInfo]:
        """The job's checkpoints, best first (pruned ones last)."""
        return checkpoint_infos(self._state(job_id))

    def load_checkpoint(self, job_id: str, iteration: int) -> Any:
        """The full trainer state saved at `iteration` (decoded with the task's state type)."""
        state = self._state(job_id)
        for info in checkpoint_infos(state):
            if info.iteration == iteration:
                if info.pruned:
                    raise CheckpointNotFound(
                        f"checkpoint {iteration} of job {job_id!r} was pruned")
                assert state.spec is not None
                task = build_task(state.spec)
                return state_decoder(task).decode(self.state_store.get(info.state_ref))
        raise CheckpointNotFound(f"job {job_id!r} has no checkpoint at iteration {iteration}")

    def trajectories(self, job_id: str, *, iteration: int | None = None,
                     success: bool | None = None, min_reward: float | None = None,
                     limit: int | None = None) -> list[RecordedTrajectory]:
        """The job's recorded trajectories (superseded runs included, marked), filtered; see
        `flowactors.trajectories.read`."""
        self._state(job_id)
        return read_trajectories(self.store, job_id, iteration=iteration, success=success,
                                 min_reward=min_reward, limit=limit)

    def fork(self, parent_id: str, *, at_iteration: int, job_id: str | None = None,
             config: Any = None, task_options: dict[str, Any] | None = None) -> str:
        """A new job from `parent_id`'s checkpoint `at_iteration`, with the parent's spec but
        `config` (a whole GRPOConfig) and `task_options` when given; returns its id. Lineage
        is recorded in both streams; see `flowactors.lineage`.

        Raises:
            JobNotFound, CheckpointNotFound (none there, or pruned), SpecError.
        """
        return lineage.fork_in_runtime(self, parent_id, at_iteration=at_iteration,
                                       job_id=job_id, config=config, task_options=task_options)

    # --- closing ---

    def close(self) -> None:
        """Stop cleanly without writing job events: running jobs resume on the next open."""
        if self.closing:
            return
        self.closing = True
        self._restore_signal_handlers()
        self._inbox_stop.set()
        if self._inbox_thread not in (None, threading.current_thread()):
            self._inbox_thread.join(timeout=10)  # it reads the store we are about to close
        with self._lock:
            actors = list(self._actors.values())
        for actor in actors:
            try:
                actor.stop(block=False)
            except pykka.ActorDeadError:
                pass
        with self._changed:
            self._changed.wait_for(lambda: not self._actors, timeout=5.0)
            for _, inbox in self._watchers:
                inbox.put(_WATCH_END)
            self._changed.notify_all()
        self._shutdown()
        log.info("runtime_closed", path=str(self.path))

    def _shutdown(self) -> None:
        self.closing = True
        if self._owns_rollouts:
            self.rollouts.close()
        if self.saves is not None:
            self.saves.close()  # the writes under way finish; their files are swept on open
        self.store.close()
        if self._memory_files is not None:
            files = self.state_store.files
            if files.fs.exists(files.root):
                files.fs.rm(files.root, recursive=True)

    # --- recovery ---

    def _recover(self) -> None:
        """Replay the log; queue queued jobs; resume running ones from their last checkpoint."""
        states = self._states
        states.update(replay_log(self.store) if isinstance(self.store, EventStore)
                      else replay(self.store.read_all()))
        problems = self.state_store.open_check(states)
        if problems:
            raise LogCorrupted(f"{self.path}: {problems[0]}; run `flowactors verify`")
        for rank, (job_id, state) in enumerate(states.items()):
            self._views[job_id] = view(state)
            self._order[job_id] = rank  # in order of submission, below any position to come
        fault_point("runtime.recover")
        running = [s for s in states.values() if s.status is JobStatus.RUNNING]
        recoveries = [(s.job_id, decide(Recover(attempt=s.attempts + 1, cause="crash"), s),
                       s.version) for s in running]
        with self._lock:
            # One group commit records every recovery before any actor starts.
            for state, result in zip(running, self.store.append_many(recoveries)):
                if isinstance(result, FlowError):
                    raise result
                recovered = fold(result, state)
                self.publish(recovered, result)
                self._start_actor(recovered, None)
            for job_id, state in states.items():
                if state.status is JobStatus.QUEUED:
                    self._enqueue(job_id)
            self._schedule()
        log.info("runtime_opened", path=str(self.path), jobs=len(states),
                 recovered=len(running))

    # --- the inbox: requests from other processes ---

    def _tail_inbox(self) -> None:
        last_id = 0
        while not self._inbox_stop.is_set():
            try:
                for request in self.store.pending_requests(after_id=last_id):
                    last_id = max(last_id, request.id)
                    self._answer(request)
            except FlowError as exc:
                if self.closing:
                    return
                log.error("inbox_failed", error=str(exc))
            self._inbox_stop.wait(INBOX_POLL_SECONDS)

    def _answer(self, request: Any) -> None:
        """Decide one request and answer it. A fork's answer names no child: the request
        chose its id (`ForkRequest.job_id`)."""
        try:
            if request.command == "fork":
                fork = decode_fork(request.args)
                self.fork(request.job_id, at_iteration=fork.at_iteration, job_id=fork.job_id,
                          config=fork.config, task_options=fork.task_options)
            elif request.command in CONTROL_COMMANDS:
                self._control(request.job_id, request.command, CONTROL_REASON)
            else:
                raise InvalidTransition(f"unknown command {request.command!r}")
        except (FlowError, TimeoutError) as exc:
            if self.closing:
                return
            self.store.answer(request.id, "rejected", str(exc))
            log.info("request_rejected", job_id=request.job_id, command=request.command,
                     reason=str(exc))
        else:
            self.store.answer(request.id, "applied", "")
            log.info("request_applied", job_id=request.job_id, command=request.command)

    # --- helpers ---

    def _check_open(self) -> None:
        if self.closing:
            raise StoreUnavailable(f"the runtime on {self.path} is closed")

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(signum)
            if current in (signal.default_int_handler, signal.SIG_DFL):
                self._previous_handlers[signum] = current
                signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("runtime_signalled", signal=signal.Signals(signum).name)
        self.close()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
