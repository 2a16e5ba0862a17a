"""A task whose trainer state is one large byte string (`state_bytes` of it), for the checkpoint
benchmark and tests: what a neural policy's weights look like to the checkpoint store.

Each update rotates the bytes by an amount drawn from the iteration's rewards and stamps the
step into them, so every state differs, depends on the rollouts in their fixed order, and costs
one copy to make (`update_seconds` adds training time; `in_place` keeps the bytes and changes
only the step, as a model trained in place costs no copy per update).
"""

from __future__ import annotations

import random
import threading
import time
from typing import ClassVar

import msgspec

from flowactors import GRPOConfig, JobSpec, TrainingQuery, Trajectory


class BulkyOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    state_bytes: int = 1 << 20
    update_seconds: float = 0.0
    in_place: bool = False  # keep the weights, change the step: a model trained in place


class BulkyState(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    weights: bytes


class Bulky:
    Options: ClassVar[type[msgspec.Struct]] = BulkyOptions
    state_type: ClassVar[type] = BulkyState
    inline_rollouts = True

    def __init__(self, options: BulkyOptions) -> None:
        self.options = options

    def init(self, spec: JobSpec) -> BulkyState:
        rng, size, chunk = random.Random(spec.config.seed), self.options.state_bytes, 1 << 26
        # in chunks: randbytes takes at most 2**31 bits at once
        return BulkyState(step=0, weights=b"".join(
            rng.randbytes(min(chunk, size - at)) for at in range(0, size, chunk)))

    def rollout(self, state: BulkyState, query: TrainingQuery, *, rng: random.Random,
                max_steps: int, cancelled: threading.Event) -> Trajectory:
        reward = rng.random()
        return Trajectory(reward=reward, success=reward > 0.5, steps=1, tokens=1)

    def update(self, state: BulkyState, groups: list[list[Trajectory]],
               config: GRPOConfig) -> tuple[BulkyState, dict[str, float]]:
        if self.options.update_seconds:
            time.sleep(self.options.update_seconds)
        total = sum(t.reward for group in groups for t in group)
        if self.options.in_place:  # no copy per update; each state still encodes differently
            return BulkyState(step=state.step + 1, weights=state.weights), {"loss": -total}
        weights = state.weights
        shift = 1 + int(total * 1_000_003) % max(1, len(weights))
        step = state.step + 1
        rotated = weights[shift:] + weights[:shift]
        stamped = step.to_bytes(8, "little") + rotated[8:] if len(rotated) >= 8 else rotated
        return BulkyState(step=step, weights=stamped), {"loss": -total}

    def evaluate(self, state: BulkyState, queries: list[TrainingQuery]) -> float:
        return (state.weights[-1] if state.weights else 0) / 255
