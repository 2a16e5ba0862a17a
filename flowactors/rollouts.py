"""Bounded parallel rollout execution.

`RolloutPool` is the runtime's global bound: daemon worker threads, so a rollout that ignores
its cancellation signal keeps its thread until it returns but can never hang interpreter exit.
`RolloutBatch` runs one iteration's rollouts for one job: at most `max_parallel` at once, a
failure or timeout becomes a failed trajectory, cancellation stops waiting at once, and results
come back in a fixed order (query, then index), never in completion order.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .logs import get_logger
from .spec import JobSpec, TrainingQuery
from .tasks import Task, Trajectory, failed_trajectory
from .training import rollout_rng

log = get_logger(__name__)

_STOP = object()
MAX_WAIT_S = 3600.0
"""The longest single wait for a deadline (a far one is waited for in steps)."""


class RolloutPool:
    """A fixed number of daemon threads running rollouts for every job of a runtime."""

    def __init__(self, max_workers: int, name: str = "rollout") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_workers = max_workers
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._name = name
        self._closed = False

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:  # the runtime is closing: nothing waits for this work any more
                return
            if self._idle == 0 and len(self._workers) < self._max_workers:
                worker = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}-{len(self._workers)}")
                self._workers.append(worker)
                worker.start()
            else:
                self._idle -= 1
        self._queue.put(fn)

    def _work(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is _STOP:
                return
            try:
                fn()
            except BaseException:  # a callback bug must not kill the worker
                log.exception("rollout_worker_error")
            with self._lock:
                self._idle += 1

    def close(self, timeout: float = 1.0) -> None:
        """Stop the workers; wait briefly for them (a stuck rollout is left behind, daemon)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(_STOP)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))


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


def run_rollout(task: Task, state: Any, spec: JobSpec, iteration: int, query: TrainingQuery,
                query_index: int, index: int, cancelled: threading.Event) -> Trajectory:
    """One rollout with its own generator; an exception becomes a failed trajectory."""
    rng = rollout_rng(spec.config.seed, iteration, query_index, index)
    try:
        trajectory = task.rollout(state, query, rng=rng,
                                  max_steps=spec.config.max_steps_per_trajectory,
                                  cancelled=cancelled)
        if not isinstance(trajectory, Trajectory):
            raise TypeError(f"rollout returned {type(trajectory).__name__}, not Trajectory")
    except Exception as exc:
        trajectory = failed_trajectory(f"{type(exc).__name__}: {exc}")
    return trajectory


def runs_inline(task: Task, spec: JobSpec) -> bool:
    """Whether a job's rollouts run on its own thread instead of the pool.

    A task whose rollouts are short CPU work says so (`inline_rollouts = True`): under the GIL a
    pool adds no parallelism for them, only two thread handoffs per iteration. A rollout
    timeout needs the pool (a rollout on the job's own thread cannot be abandoned).
    """
    return bool(getattr(task, "inline_rollouts", False)) and spec.config.rollout_timeout_s is None


def run_inline(task: Task, state: Any, spec: JobSpec, iteration: int,
               queries: list[TrainingQuery], never: threading.Event
               ) -> list[list[Trajectory]]:
    """An iteration's rollouts one after another on the calling thread, in the batch's order
    (`never`: the cancellation signal they are given, which nothing sets)."""
    per_query = spec.config.n_trajectories_per_query
    return [[run_rollout(task, state, spec, iteration, query, q, i, never)
             for i in range(per_query)] for q, query in enumerate(queries)]


class RolloutBatch:
    """One iteration's rollouts for one job; calls `on_complete(groups)` once, unless cancelled."""

    def __init__(self, *, pool: RolloutPool, deadlines: Deadlines, task: Task, state: Any,
                 spec: JobSpec, iteration: int, queries: list[TrainingQuery],
                 on_complete: Callable[[list[list[Trajectory]]], None]) -> None:
        config = spec.config
        self._pool = pool
        self._deadlines = deadlines
        self._task = task
        self._state = state
        self._spec = spec
        self._iteration = iteration
        self._queries = queries
        self._per_query = config.n_trajectories_per_query
        self._on_complete = on_complete
        self._timeout = config.rollout_timeout_s
        self._max_parallel = config.max_parallel_rollouts
        self._results: list[Trajectory | None] = [None] * (len(queries) * self._per_query)
        self._remaining = len(self._results)
        self._next = 0
        self._signals: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._cancelled = False

    def start(self) -> None:
        with self._lock:
            starts = [self._take() for _ in range(min(self._max_parallel, len(self._results)))]
        for unit in starts:
            self._launch(unit)

    def cancel(self) -> None:
        """Stop waiting now and signal every in-flight rollout; later results are ignored."""
        with self._lock:
            self._cancelled = True
            signals = list(self._signals.values())
            self._signals.clear()
        for signal in signals:
            signal.set()

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
        self._pool.submit(lambda: self._run(unit, signal))

    def _run(self, unit: int, signal: threading.Event) -> None:
        if signal.is_set():
            return
        query_index, index = divmod(unit, self._per_query)
        self._resolve(unit, run_rollout(self._task, self._state, self._spec, self._iteration,
                                        self._queries[query_index], query_index, index, signal))

    def _resolve(self, unit: int, trajectory: Trajectory) -> None:
        with self._lock:
            if self._cancelled or self._results[unit] is not None:
                return  # cancelled, or already timed out / finished
            signal = self._signals.pop(unit, None)
            self._results[unit] = trajectory
            self._remaining -= 1
            next_unit = self._take() if self._next < len(self._results) else None
            done = self._remaining == 0
        if signal is not None and trajectory.failed:
            signal.set()  # a timed-out rollout is told to stop
        if next_unit is not None:
            self._launch(next_unit)
        if done:
            n = self._per_query
            results = self._results
            self._on_complete([list(results[q * n:(q + 1) * n]) for q in range(len(self._queries))])
