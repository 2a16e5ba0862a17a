"""Async rollouts: coroutines on one event loop that the runtime owns.

A task whose `rollout` is `async def` (an agent waiting on an LLM server, a tool, the network)
needs no thread per rollout: a thousand rollouts in flight are a thousand coroutines on one
loop, on one daemon thread. The batch logic (order, per-job bound, timeouts, cancellation) is
`RolloutBatch`'s, as for threads; this module only says how a rollout starts and stops: it is an
`asyncio.Task`, stopped by `Task.cancel()` (so a rollout parked in `await` ends at once, with
`CancelledError` raised at that `await`).

The `cancelled` argument is still a `threading.Event`, set on cancel and timeout; an async
rollout that computes between awaits should check `cancelled.is_set()` there.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


from ..logs import get_logger
from ..spec import JobSpec, TrainingQuery
from ..tasks import Task, Trajectory, failed_trajectory
from ..training import rollout_rng
from .base import (
    Deadlines,
    OnComplete,
    Resolve,
    RolloutBatch,
    RolloutHandle,
    checked,
    is_async_task,
    run_rollout,
)

log = get_logger(__name__)


class AsyncRollouts:
    """Rollouts as coroutines on one event loop (a daemon thread of this process).

    `ThreadRollouts`, the default backend, hands async tasks to one of these; pass one as
    `Runtime(path, rollouts=AsyncRollouts(...))` to choose the global bound yourself. A task
    whose `rollout` is a plain function runs in the loop's default thread pool
    (`asyncio.to_thread`).

    Args:
        max_in_flight: coroutines running at once across all jobs (each job is also bounded
            by its own `max_parallel_rollouts`); the rest wait on a semaphore, holding nothing
            but their coroutine.
    """

    def __init__(self, max_in_flight: int = 4096) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.deadlines = Deadlines()
        self._loop = asyncio.new_event_loop()
        self._slots = asyncio.Semaphore(max_in_flight)  # bound to the loop on first use
        self._closed = False
        self._thread = threading.Thread(target=self._run_loop, daemon=True,
                                        name="rollout-loop")
        self._thread.start()

    def start(self, *, task: Task, state: Any, spec: JobSpec, iteration: int,
              queries: list[TrainingQuery], on_complete: OnComplete) -> RolloutHandle:
        launcher = _CoroutineLauncher(self, task, state, spec, iteration, queries)
        return RolloutBatch(launcher=launcher, deadlines=self.deadlines, spec=spec,
                            n_queries=len(queries), on_complete=on_complete).start()

    def runs_inline(self, task: Task, spec: JobSpec) -> bool:
        return False

    def close(self, timeout: float = 1.0) -> None:
        """Cancel every coroutine still running, stop the loop, and wait for it (bounded)."""
        if self._closed:
            return
        self._closed = True
        self.deadlines.close()
        try:
            self._loop.call_soon_threadsafe(self._loop.create_task, self._shutdown(timeout))
        except RuntimeError:  # the loop is already closed
            return
        self._thread.join(timeout + 1.0)

    # --- on the loop's thread ---

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _shutdown(self, timeout: float) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._loop.stop()

    def _spawn(self, holder: _Holder, run: Any) -> None:
        if holder.stopped or self._closed:
            run.close()  # never started: no "coroutine was never awaited" warning
            return
        holder.task = self._loop.create_task(run)

    async def _rollout(self, task: Task, state: Any, spec: JobSpec, iteration: int,
                       query: TrainingQuery, query_index: int, index: int,
                       signal: threading.Event, resolve: Resolve) -> None:
        async with self._slots:
            if signal.is_set():
                return
            try:
                trajectory = await _one(task, state, spec, iteration, query, query_index,
                                        index, signal)
            except asyncio.CancelledError:
                return  # cancelled or timed out: the batch has moved on without it
        resolve(trajectory)

    def _launch(self, holder: _Holder, run: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._spawn, holder, run)
        except RuntimeError:  # the loop is closed: the runtime is closing
            run.close()

    def _stop(self, holder: _Holder) -> None:
        holder.stopped = True

        def cancel() -> None:
            if holder.task is not None:
                holder.task.cancel()

        try:
            self._loop.call_soon_threadsafe(cancel)
        except RuntimeError:
            pass


async def _one(task: Task, state: Any, spec: JobSpec, iteration: int, query: TrainingQuery,
               query_index: int, index: int, signal: threading.Event) -> Trajectory:
    """One rollout, as `run_rollout` does it on a thread (the same generator, the same errors)."""
    if not is_async_task(task):
        return await asyncio.to_thread(run_rollout, task, state, spec, iteration, query,
                                       query_index, index, signal)
    rng = rollout_rng(spec.config.seed, iteration, query_index, index)
    try:
        return checked(await task.rollout(state, query, rng=rng,
                                          max_steps=spec.config.max_steps_per_trajectory,
                                          cancelled=signal))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return failed_trajectory(f"{type(exc).__name__}: {exc}")


class _Holder:
    """The asyncio.Task of one rollout, once the loop has created it."""

    __slots__ = ("task", "stopped")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.stopped = False


class _CoroutineLauncher:
    def __init__(self, backend: AsyncRollouts, task: Task, state: Any, spec: JobSpec,
                 iteration: int, queries: list[TrainingQuery]) -> None:
        self._backend, self._task, self._state = backend, task, state
        self._spec, self._iteration, self._queries = spec, iteration, queries

    def launch(self, unit: int, query_index: int, index: int, signal: threading.Event,
               resolve: Resolve) -> Any:
        holder = _Holder()
        run = self._backend._rollout(self._task, self._state, self._spec, self._iteration,
                                     self._queries[query_index], query_index, index, signal,
                                     resolve)
        self._backend._launch(holder, run)
        return lambda: self._backend._stop(holder)
