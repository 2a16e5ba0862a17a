"""Tasks for the resume checks: one that resumes exactly, one that draws from the global RNG."""

from __future__ import annotations

import random
from typing import Any, ClassVar

import msgspec

from flowactors.tasks import NoOptions, Trajectory


class Weights(msgspec.Struct, frozen=True, kw_only=True):
    policy: list[float]
    optimizer: Any = None
    rng: Any = None


class GlobalRNGTask:
    """Seeds the process-wide `random` in `init` and draws its update noise from it: an
    uninterrupted run is reproducible, a resumed one is not (the classic bug)."""

    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    state_type: ClassVar[type] = Weights
    inline_rollouts: ClassVar[bool] = True

    def __init__(self, options: NoOptions) -> None:
        pass

    def init(self, spec: Any) -> Weights:
        random.seed(spec.config.seed)
        return Weights(policy=[0.0, 0.0])

    def rollout(self, state: Weights, query: Any, *, rng: random.Random, max_steps: int,
                cancelled: Any) -> Trajectory:
        return Trajectory(reward=rng.random() + state.policy[0])

    def update(self, state: Weights, groups: list[list[Trajectory]],
               config: Any) -> tuple[Weights, dict[str, float]]:
        noise = random.gauss(0.0, 1.0)  # the global RNG: not in the state
        return Weights(policy=[state.policy[0] + 0.01 * noise, state.policy[1] + 1.0]), {}

    def evaluate(self, state: Weights, queries: list[Any]) -> float:
        return 0.0
