"""The default backend: rollouts on a pool of daemon threads in the runtime's process.

`RolloutPool` is the runtime's global bound: daemon worker threads, so a rollout that ignores
its cancellation signal keeps its thread until it returns but can never hang interpreter exit.
A task whose `rollout` is `async def` is handed to an event loop (`AsyncRollouts`) that this
backend starts on first use.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


from ..logs import get_logger
from ..spec import JobSpec, TrainingQuery
from ..tasks import Task
from .base import (
    Deadlines,
    OnComplete,
    Resolve,
    RolloutBatch,
    RolloutHandle,
    is_async_task,
    run_rollout,
    runs_inline,
)
from .eventloop import AsyncRollouts

log = get_logger(__name__)

_STOP = object()


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


class ThreadRollouts:
    """Rollouts as threads of this process (the default backend).

    Args:
        max_workers: rollout threads across all jobs (the runtime's `max_rollout_workers`).
        max_async_in_flight: coroutines in flight at once across all jobs, for tasks whose
            `rollout` is `async def` (they run on one event loop, not on the threads).
    """

    def __init__(self, max_workers: int = 64, *, max_async_in_flight: int = 4096) -> None:
        if max_workers < 1 or max_async_in_flight < 1:
            raise ValueError("max_workers and max_async_in_flight must be >= 1")
        self.pool = RolloutPool(max_workers)
        self.deadlines = Deadlines()
        self._max_async = max_async_in_flight
        self._loop: AsyncRollouts | None = None
        self._lock = threading.Lock()

    def start(self, *, task: Task, state: Any, spec: JobSpec, iteration: int,
              queries: list[TrainingQuery], on_complete: OnComplete) -> RolloutHandle:
        if is_async_task(task):
            return self._event_loop().start(task=task, state=state, spec=spec,
                                            iteration=iteration, queries=queries,
                                            on_complete=on_complete)
        launcher = _ThreadLauncher(self.pool, task, state, spec, iteration, queries)
        return RolloutBatch(launcher=launcher, deadlines=self.deadlines, spec=spec,
                            n_queries=len(queries), on_complete=on_complete).start()

    def runs_inline(self, task: Task, spec: JobSpec) -> bool:
        return runs_inline(task, spec)

    def close(self) -> None:
        self.pool.close()
        self.deadlines.close()
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    def _event_loop(self) -> AsyncRollouts:
        with self._lock:
            if self._loop is None:
                self._loop = AsyncRollouts(max_in_flight=self._max_async)
            return self._loop


class _ThreadLauncher:
    """Starts a batch's rollouts on the pool; a thread cannot be stopped, only signalled."""

    def __init__(self, pool: RolloutPool, task: Task, state: Any, spec: JobSpec,
                 iteration: int, queries: list[TrainingQuery]) -> None:
        self._pool, self._task, self._state = pool, task, state
        self._spec, self._iteration, self._queries = spec, iteration, queries

    def launch(self, unit: int, query_index: int, index: int, signal: threading.Event,
               resolve: Resolve) -> None:
        def run() -> None:
            if not signal.is_set():
                resolve(run_rollout(self._task, self._state, self._spec, self._iteration,
                                    self._queries[query_index], query_index, index, signal))

        self._pool.submit(run)
