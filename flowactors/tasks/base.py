"""The task protocol: what a trajectory is, how it is scored, how the policy learns.

A task is a class. The runtime builds it from a job's spec (`cls(options)`, where `options` is
`task_options` decoded into the class's `Options` Struct) and calls it from several threads:
`rollout` runs in parallel and must not mutate shared state; `init`, `update` and `evaluate` run
on the job's own actor thread. States are msgspec-encodable so they can be checkpointed.

Determinism: a task is deterministic when `rollout` draws randomness only from the `rng` it is
given, and `init`/`update`/`evaluate` only from the spec and the state (keep RNG state *in* the
trainer state). Then a crashed and resumed job ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import threading
from typing import Any, ClassVar, Protocol, runtime_checkable

import msgspec

from ..spec import GRPOConfig, JobSpec, TrainingQuery


class TrainerState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a task needs to continue training exactly: checkpointed as one blob."""

    policy: Any
    optimizer: Any = None
    rng: Any = None


class Trajectory(msgspec.Struct, frozen=True, kw_only=True):
    """One rollout of one query: its reward and cost, and whatever the task's update needs."""

    reward: float
    success: bool = False
    steps: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    failed: bool = False
    error: str | None = None
    data: Any = None


class NoOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Options of a task that takes none."""


@runtime_checkable
class Task(Protocol):
    """A training task. See the README's guide for task authors."""

    Options: ClassVar[type[msgspec.Struct]]
    state_type: ClassVar[type]

    def init(self, spec: JobSpec) -> Any: ...

    def rollout(self, state: Any, query: TrainingQuery, *, rng: random.Random, max_steps: int,
                cancelled: threading.Event) -> Trajectory: ...

    def update(self, state: Any, groups: list[list[Trajectory]],
               config: GRPOConfig) -> tuple[Any, dict[str, float]]: ...

    def evaluate(self, state: Any, queries: list[TrainingQuery]) -> float: ...


def snapshot(task: Task, trainer: Any) -> Any:
    """What a checkpoint stores of `trainer`: `task.snapshot(trainer)` for a task that keeps
    live objects between iterations, the trainer itself for a state-in, state-out task."""
    take = getattr(task, "snapshot", None)
    return trainer if take is None else take(trainer)


def restore(task: Task, state: Any) -> Any:
    """The trainer to continue from a stored state: `task.restore(state)` for a task with live
    objects, the state itself otherwise."""
    rebuild = getattr(task, "restore", None)
    return state if rebuild is None else rebuild(state)


def failed_trajectory(error: str) -> Trajectory:
    """A rollout that raised or timed out: it scores nothing and teaches nothing."""
    return Trajectory(reward=0.0, failed=True, error=error)


def group_advantages(group: list[Trajectory], eps: float = 1e-6) -> list[float]:
    """GRPO advantages of one query's trajectories: (r - mean) / (std + eps).

    Failed trajectories get advantage 0 and do not count in the group's statistics.
    """
    rewards = [t.reward for t in group if not t.failed]
    if not rewards:
        return [0.0] * len(group)
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    return [0.0 if t.failed else (t.reward - mean) / (std + eps) for t in group]
