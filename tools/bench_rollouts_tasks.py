"""Tasks of tools/bench_rollouts.py, in a module of their own so Ray workers can import them."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import ClassVar

import msgspec

from flowactors import GRPOConfig, JobSpec, TrainingQuery, Trajectory


class BenchOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cpu_loops: int = 0        # pure-Python work per rollout (holds the GIL), see `burn`
    sleep_s: float = 0.0      # waiting per rollout (a network call)


class BenchState(msgspec.Struct, frozen=True, kw_only=True):
    total: float = 0.0


class CpuTask:
    """Rollouts of pure-Python CPU work (or a wait); the update only sums rewards."""

    Options: ClassVar[type] = BenchOptions
    state_type: ClassVar[type] = BenchState

    def __init__(self, options: BenchOptions) -> None:
        self.options = options

    def init(self, spec: JobSpec) -> BenchState:
        return BenchState()

    def rollout(self, state: BenchState, query: TrainingQuery, *, rng: random.Random,
                max_steps: int, cancelled: threading.Event) -> Trajectory:
        if self.options.sleep_s:
            cancelled.wait(self.options.sleep_s)
        if self.options.cpu_loops:
            burn(self.options.cpu_loops)
        return Trajectory(reward=rng.random())

    def update(self, state: BenchState, groups: list[list[Trajectory]],
               config: GRPOConfig) -> tuple[BenchState, dict[str, float]]:
        total = state.total + sum(t.reward for g in groups for t in g)
        return BenchState(total=total), {"loss": 0.0}

    def evaluate(self, state: BenchState, queries: list[TrainingQuery]) -> float:
        return 0.0


class AsyncSleepTask(CpuTask):
    """Rollouts that wait with `await asyncio.sleep` (an LLM call, a tool, the network)."""

    async def rollout(self, state: BenchState, query: TrainingQuery, *, rng: random.Random,
                      max_steps: int, cancelled: threading.Event) -> Trajectory:
        await asyncio.sleep(self.options.sleep_s)
        return Trajectory(reward=rng.random())


def burn(loops: int) -> int:
    """A fixed amount of pure-Python arithmetic (not a wall-clock time: under the GIL a
    timed loop would count other threads' time as its own)."""
    total = 0
    for _ in range(loops):
        for i in range(200):
            total += i * i
    return total


def loops_for(ms: float) -> int:
    """How many `burn` loops take about `ms` milliseconds on this machine, alone."""
    started = time.perf_counter()
    burn(2000)
    per_loop = (time.perf_counter() - started) / 2000
    return max(1, round(ms / 1000 / per_loop))


def trivial(x: int) -> bytes:
    """The bare Ray task of the overhead baseline: returns a few bytes, as a rollout does."""
    return b"%d" % x
