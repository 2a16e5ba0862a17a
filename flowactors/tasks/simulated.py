"""`simulated`: synthetic trajectories, no real work — the runtime's own test bed.

Deterministic from the seed; its update applies each trajectory in turn (query order, then
index), so a bug that combines rollouts in completion order changes the policy's bits.
Options make it slow (`rollout_seconds`, honouring cancellation at once), flaky
(`failure_rate`) or fail hard (`fail_at_iteration`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import random
import threading
from typing import Annotated, ClassVar

import msgspec

from ..spec import GRPOConfig, JobSpec, TrainingQuery
from .base import Trajectory, group_advantages

DIMENSIONS = 8
_NUMBERS = tuple(range(1, DIMENSIONS + 1))  # dimension i + 1 moves (i + 1) times as fast


class SimulatedOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rollout_seconds: Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)] = 0.0
    failure_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    fail_at_iteration: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    cost_per_trajectory_usd: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] = 0.0
    tokens_per_step: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 10


class SimulatedPolicy(msgspec.Struct, frozen=True):
    weights: list[float]


class SimulatedOptimizer(msgspec.Struct, frozen=True):
    step: int
    velocity: list[float]


class SimulatedState(msgspec.Struct, frozen=True, kw_only=True):
    policy: SimulatedPolicy
    optimizer: SimulatedOptimizer
    rng: None = None


@functools.lru_cache(maxsize=4096)
def query_features(query: str) -> tuple[float, ...]:
    """A fixed pseudo-random feature vector per query text (cached: every rollout asks)."""
    raw = hashlib.sha256(query.encode()).digest()
    return tuple((b - 127.5) / 127.5 for b in raw[:DIMENSIONS])


class SimulatedTask:
    """Reward = sigmoid(w·x) + noise; the update is sequential momentum SGD."""

    Options: ClassVar[type[msgspec.Struct]] = SimulatedOptions
    state_type: ClassVar[type] = SimulatedState
    reward_scale: ClassVar[str] = "1 for a success, 0 otherwise, plus Gaussian noise (sd 0.05)"

    def __init__(self, options: SimulatedOptions) -> None:
        self.options = options
        self.inline_rollouts = options.rollout_seconds == 0  # free rollouts: no pool needed

    def init(self, spec: JobSpec) -> SimulatedState:
        rng = random.Random(spec.config.seed)
        weights = [rng.uniform(-0.1, 0.1) for _ in range(DIMENSIONS)]
        return SimulatedState(policy=SimulatedPolicy(weights),
                              optimizer=SimulatedOptimizer(0, [0.0] * DIMENSIONS))

    def rollout(self, state: SimulatedState, query: TrainingQuery, *, rng: random.Random,
                max_steps: int, cancelled: threading.Event) -> Trajectory:
        options = self.options
        if options.rollout_seconds and cancelled.wait(options.rollout_seconds):
            raise InterruptedError("rollout cancelled")
        if options.failure_rate and rng.random() < options.failure_rate:
            raise RuntimeError("simulated rollout failure")
        score = sum(map(operator.mul, state.policy.weights, query_features(query.query)))
        probability = 1.0 / (1.0 + math.exp(-score))
        success = rng.random() < probability
        steps = 1 + rng.randrange(max_steps)
        reward = (1.0 if success else 0.0) + rng.gauss(0.0, 0.05)
        return Trajectory(
            reward=reward, success=success, steps=steps,
            tokens=steps * options.tokens_per_step, cost_usd=options.cost_per_trajectory_usd,
            data=1.0 if success else -1.0)

    def update(self, state: SimulatedState, groups: list[list[Trajectory]],
               config: GRPOConfig) -> tuple[SimulatedState, dict[str, float]]:
        step = state.optimizer.step + 1
        if self.options.fail_at_iteration == step:
            raise RuntimeError(f"simulated failure at iteration {step}")
        weights = state.policy.weights
        velocity = state.optimizer.velocity
        learning_rate = config.learning_rate
        tanh = math.tanh
        loss = 0.0
        # Sequential and non-commutative in floating point: the order of trajectories matters.
        for group in groups:
            for trajectory, advantage in zip(group, group_advantages(group)):
                if trajectory.failed:
                    continue
                push = advantage * trajectory.data * 0.01  # times the dimension's number
                velocity = [0.9 * v + push * k for v, k in zip(velocity, _NUMBERS)]
                weights = [tanh(w + learning_rate * v) for w, v in zip(weights, velocity)]
                loss -= advantage * trajectory.reward
        n = max(1, sum(len(g) for g in groups))
        new_state = SimulatedState(policy=SimulatedPolicy(weights),
                                   optimizer=SimulatedOptimizer(step, velocity))
        return new_state, {"loss": loss / n}

    def evaluate(self, state: SimulatedState, queries: list[TrainingQuery]) -> float:
        if not queries:
            return 0.0
        total = 0.0
        for query in queries:
            score = sum(map(operator.mul, state.policy.weights, query_features(query.query)))
            total += 1.0 / (1.0 + math.exp(-score))
        return total / len(queries)
