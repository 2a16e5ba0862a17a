"""Where rollouts run: a backend chosen by the runtime (`Runtime(path, rollouts=...)`).

- `ThreadRollouts` (the default): daemon threads of the runtime's process; a task whose
  `rollout` is `async def` runs as coroutines on an event loop it owns (`AsyncRollouts`).
- `AsyncRollouts`: coroutines on one event loop, hundreds in flight on one thread.
- `RayRollouts`: each rollout a Ray task on a cluster (the optional extra `flowactors[ray]`;
  Ray is imported only by the driver process each one starts, never by the runtime's).

Every backend goes through `RolloutBatch`, so the job sees the same thing on each: bounded by
`max_parallel_rollouts`, failures and timeouts as failed trajectories, results in the fixed
order (query, then index), cancellation that reaches the rollouts in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import (
    Deadlines,
    RolloutBackend,
    RolloutBatch,
    RolloutHandle,
    is_async_task,
    run_inline,
    run_rollout,
    runs_inline,
)
from .eventloop import AsyncRollouts
from .threads import RolloutPool, ThreadRollouts

if TYPE_CHECKING:
    from .raycluster import RayRollouts

__all__ = ["AsyncRollouts", "Deadlines", "RayRollouts", "RolloutBackend", "RolloutBatch",
           "RolloutHandle", "RolloutPool", "ThreadRollouts", "is_async_task", "run_inline",
           "run_rollout", "runs_inline"]


def __getattr__(name: str) -> Any:
    if name == "RayRollouts":  # imports nothing of Ray until used
        from .raycluster import RayRollouts
        return RayRollouts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
