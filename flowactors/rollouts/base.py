"""What every rollout backend shares: the backend protocol, one rollout, and one iteration's batch.

A backend decides *where* a rollout runs (a thread, a coroutine on an event loop, a Ray task);
`RolloutBatch` decides everything the job can observe: at most `max_parallel_rollouts` of the
job's rollouts at once, a rollout that raises or outlives `rollout_timeout_s` is a failed
trajectory, cancellation stops waiting at once and reaches every rollout in flight, and the
results come back in a fixed order (query, then index), never in completion order. So the three
backends differ only in a `Launcher`: how to start one rollout, and how to stop it.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ..logs import get_logger
from ..spec import JobSpec, TrainingQuery
from ..tasks import Task, Trajectory, failed_trajectory
from ..training import rollout_rng

log = get_logger(__name__)

MAX_WAIT_S = 3600.0
"""The longest single wait for a deadline (a far one is waited for in steps)."""

OnComplete = Callable[[list[list[Trajectory]]], None]
Resolve = Callable[[Trajectory], None]


class RolloutHandle(Protocol):
    """One iteration's rollouts in flight for one job."""

    def cancel(self) -> None:
        """Stop waiting now, signal every rollout in flight; `on_complete` is never called."""


@runtime_checkable
class RolloutBackend(Protocol):
    """Where a runtime's rollouts run: `Runtime(path, rollouts=backend)`.

    `start` is called on the job's actor thread and must return at once; `on_complete(groups)`
    is called once, from any thread, with the trajectories in the fixed order (query, then
    index), unless the handle was cancelled first.
    """

    def start(self, *, task: Task, state: Any, spec: JobSpec, iteration: int,
              queries: list[TrainingQuery], on_complete: OnComplete) -> RolloutHandle: ...

    def runs_inline(self, task: Task, spec: JobSpec) -> bool:
        """Whether the job runs its rollouts on its own thread instead (see `runs_inline`)."""

    def close(self) -> None:
        """Stop; rollouts still in flight are abandoned (they were cancelled before)."""


def is_async_task(task: Task) -> bool:
    """Whether the task's `rollout` is `async def`: its rollouts are coroutines."""
    return inspect.iscoroutinefunction(getattr(task, "rollout", None))


def runs_inline(task: Task, spec: JobSpec) -> bool:
    """Whether a job's rollouts run on its own thread instead of a pool (threads only).

    A task whose rollouts are short CPU work says so (`inline_rollouts = True`): under the GIL a
    pool adds no parallelism for them, only two thread handoffs per iteration. A rollout
    timeout needs the pool (a rollout on the job's own thread cannot be abandoned).
    """
    return (bool(getattr(task, "inline_rollouts", False)) and not is_async_task(task)
            and spec.config.rollout_timeout_s is None)


def run_rollout(task: Task, state: Any, spec: JobSpec, iteration: int, query: TrainingQuery,
                query_index: int, index: int, cancelled: threading.Event) -> Trajectory:
    """One rollout with its own generator; an exception becomes a failed trajectory."""
    rng = rollout_rng(spec.config.seed, iteration, query_index, index)
    try:
        trajectory = task.rollout(state, query, rng=rng,
                                  max_steps=spec.config.max_steps_per_trajectory,
                                  cancelled=cancelled)
        return checked(trajectory)
    except Exception as exc:
        return failed_trajectory(f"{type(exc).__name__}: {exc}")


def checked(trajectory: Any) -> Trajectory:
    """The rollout's result if it is a `Trajectory` (else TypeError, a failed trajectory)."""
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"rollout returned {type(trajectory).__name__}, not Trajectory")
    return trajectory


def run_inline(task: Task, state: Any, spec: JobSpec, iteration: int,
               queries: list[TrainingQuery], never: threading.Event
               ) -> list[list[Trajectory]]:
    """An iteration's rollouts one after another on the calling thread, in the batch's order
    (`never`: the cancellation signal they are given, which nothing sets)."""
    per_query = spec.config.n_trajectories_per_query
    return [[run_rollout(task, state, spec, iteration, query, q, i, never)
             for i in range(per_query)] for q, query in enumerate(queries)]


class Deadlines:
    """One daemon thread that calls callbacks at monotonic deadlines (rollout timeouts)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def call_at(self, deadline: float, callback: Callable[[], None]) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="deadlines")
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._counter), callback))
            self._cond.notify()

    def _run(self) -> None:
        """Serve every job's deadlines: whatever one job's deadline or callback brings is
        logged, and the thread goes on serving the others."""
        while True:
            try:
                with self._cond:
                    while not self._closed and (
                            not self._heap or self._heap[0][0] > time.monotonic()):
                        timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                        self._cond.wait(None if timeout is None else min(timeout, MAX_WAIT_S))
                    if self._closed:
                        return
                    _, _, callback = heapq.heappop(self._heap)
                callback()
            except BaseException:
                log.exception("deadline_callback_error")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()


class Launcher(Protocol):
    """How a backend starts one rollout of a batch."""

    def launch(self, unit: int, query_index: int, index: int, signal: threading.Event,
               resolve: Resolve) -> Callable[[], None] | None:
        """Start rollout `unit`; it must call `resolve(trajectory)` once when done (a failure
        is a failed trajectory). Returns how to stop it early (None: setting `signal` is all
        there is)."""


class RolloutBatch:
    """One iteration's rollouts for one job; calls `on_complete(groups)` once, unless cancelled.

    Units are numbered in the fixed order (unit = query_index * per_query + index); results
    land in their unit's slot whatever order they finish in.
    """

    def __init__(self, *, launcher: Launcher, deadlines: Deadlines, spec: JobSpec,
                 n_queries: int, on_complete: OnComplete) -> None:
        config = spec.config
        self._launcher = launcher
        self._deadlines = deadlines
        self._n_queries = n_queries
        self._per_query = config.n_trajectories_per_query
        self._on_complete = on_complete
        self._timeout = config.rollout_timeout_s
        self._max_parallel = config.max_parallel_rollouts
        self._results: list[Trajectory | None] = [None] * (n_queries * self._per_query)
        self._remaining = len(self._results)
        self._next = 0
        self._signals: dict[int, threading.Event] = {}
        self._stops: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._cancelled = False

    def start(self) -> RolloutBatch:
        with self._lock:
            starts = [self._take() for _ in range(min(self._max_parallel, len(self._results)))]
        for unit in starts:
            self._launch(unit)
        return self

    def cancel(self) -> None:
        """Stop waiting now and signal every in-flight rollout; later results are ignored."""
        with self._lock:
            self._cancelled = True
            signals = list(self._signals.values())
            stops = list(self._stops.values())
            self._signals.clear()
            self._stops.clear()
        for signal in signals:
            signal.set()
        for stop in stops:
            _call_quietly(stop)

    def _take(self) -> int:
        unit = self._next
        self._next += 1
        self._signals[unit] = threading.Event()
        return unit

    def _launch(self, unit: int) -> None:
        signal = self._signals.get(unit)
        if signal is None:  # cancelled before it started
            return
        if self._timeout is not None:
            self._deadlines.call_at(time.monotonic() + self._timeout,
                                    lambda: self._resolve(unit, failed_trajectory(
                                        f"timed out after {self._timeout}s")))
        query_index, index = divmod(unit, self._per_query)
        try:
            stop = self._launcher.launch(unit, query_index, index, signal,
                                         lambda trajectory: self._resolve(unit, trajectory))
        except Exception as exc:  # the backend could not start it: a failed trajectory
            self._resolve(unit, failed_trajectory(f"{type(exc).__name__}: {exc}"))
            return
        if stop is not None:
            with self._lock:
                if unit in self._signals:  # still in flight: cancel and timeouts can stop it
                    self._stops[unit] = stop
                    return
                result = self._results[unit]
                abandoned = self._cancelled or (result is not None and result.failed)
            if abandoned:  # cancelled or timed out while it was starting
                _call_quietly(stop)

    def _resolve(self, unit: int, trajectory: Trajectory) -> None:
        with self._lock:
            if self._cancelled or self._results[unit] is not None:
                return  # cancelled, or already timed out / finished
            signal = self._signals.pop(unit, None)
            stop = self._stops.pop(unit, None)
            self._results[unit] = trajectory
            self._remaining -= 1
            next_unit = self._take() if self._next < len(self._results) else None
            done = self._remaining == 0
        if signal is not None and trajectory.failed:
            signal.set()  # a timed-out rollout is told to stop
            if stop is not None:
                _call_quietly(stop)
        if next_unit is not None:
            self._launch(next_unit)
        if done:
            n = self._per_query
            results = self._results
            self._on_complete([list(results[q * n:(q + 1) * n]) for q in range(self._n_queries)])


def _call_quietly(stop: Callable[[], None]) -> None:
    try:
        stop()
    except Exception:  # stopping is best effort: nothing waits for the rollout any more
        log.exception("rollout_stop_failed")
