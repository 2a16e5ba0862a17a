"""Tasks for the rollout backend tests, importable by Ray workers (they run in other processes:
the tests put this directory on the workers' PYTHONPATH through Ray's `runtime_env`).

Every rollout's result is its own generator's first draw (`data`), so a test can recompute the
fixed order (query, then index) from `training.rollout_rng` and compare. Rollouts sleep a
random time from their generator, so they finish in an order unlike the fixed one.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from typing import ClassVar

import msgspec

from flowactors import GRPOConfig, JobSpec, TrainingQuery, Trajectory
from flowactors.tasks import group_advantages


class ProbeOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    seconds: float = 0.0             # a rollout sleeps between half this and this (random)
    spin_ms: float = 0.0             # then burns this much CPU in pure Python
    fail_query: str | None = None    # every rollout of this query raises
    hang_query: str | None = None    # every rollout of this query ("*": any) waits until cancelled
    hang_after: int = 0              # ... in the iterations after this many only
    marker_dir: str | None = None    # each rollout that starts leaves a file here


class ProbeState(msgspec.Struct, frozen=True, kw_only=True):
    weight: float = 0.0
    orders: list[list[int]] = []     # the draws of each iteration's trajectories, in order
    errors: list[str] = []           # the errors of failed trajectories, in order


class Probe:
    """What this process's rollouts did: how many ran at once, which were cancelled."""

    lock = threading.Lock()
    in_flight = 0
    most_in_flight = 0
    cancelled: list[int] = []

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.in_flight = cls.most_in_flight = 0
            cls.cancelled = []

    @classmethod
    def enter(cls) -> None:
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)

    @classmethod
    def leave(cls) -> None:
        with cls.lock:
            cls.in_flight -= 1


def _draw(rng: random.Random) -> tuple[int, float]:
    return rng.getrandbits(32), rng.random()


def _mark(options: ProbeOptions, draw: int) -> None:
    if options.marker_dir:
        path = os.path.join(options.marker_dir, f"{os.getpid()}-{draw}-{time.monotonic_ns()}")
        open(path, "w").close()


def spin(ms: float) -> int:
    """Pure-Python CPU work for about `ms` milliseconds (holds the GIL)."""
    total, end = 0, time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        for i in range(200):
            total += i * i
    return total


def _trajectory(state: ProbeState, draw: int, u: float) -> Trajectory:
    return Trajectory(reward=u + state.weight, success=u > 0.5, tokens=1, cost_usd=0.0,
                      data=draw)


class ProbeTask:
    """A deterministic task whose update keeps the order it saw (in `ProbeState.orders`)."""

    Options: ClassVar[type] = ProbeOptions
    state_type: ClassVar[type] = ProbeState

    def __init__(self, options: ProbeOptions) -> None:
        self.options = options

    def init(self, spec: JobSpec) -> ProbeState:
        return ProbeState(weight=spec.config.seed * 1e-3)

    def rollout(self, state: ProbeState, query: TrainingQuery, *, rng: random.Random,
                max_steps: int, cancelled: threading.Event) -> Trajectory:
        options = self.options
        draw, u = _draw(rng)
        _mark(options, draw)
        if options.hang_query in (query.query, "*") and len(state.orders) >= options.hang_after:
            cancelled.wait(120)
            raise InterruptedError("cancelled")
        if query.query == options.fail_query:
            raise RuntimeError(f"rollout of {query.query!r} failed on purpose")
        if options.seconds:
            cancelled.wait(options.seconds * (1 + u) / 2)
        if options.spin_ms:
            spin(options.spin_ms)
        return _trajectory(state, draw, u)

    def update(self, state: ProbeState, groups: list[list[Trajectory]],
               config: GRPOConfig) -> tuple[ProbeState, dict[str, float]]:
        weight = state.weight
        for group in groups:  # sequential in floating point: the order matters
            for trajectory, advantage in zip(group, group_advantages(group)):
                weight = weight * 0.999 + advantage * config.learning_rate * 0.01
        order = [t.data if not t.failed else -1 for group in groups for t in group]
        errors = [t.error or "" for group in groups for t in group if t.failed]
        return (ProbeState(weight=weight, orders=[*state.orders, order],
                           errors=[*state.errors, *errors]),
                {"loss": -weight})

    def evaluate(self, state: ProbeState, queries: list[TrainingQuery]) -> float:
        return state.weight


class AsyncProbeTask(ProbeTask):
    """The same rollouts as coroutines: the same draws, so the same training."""

    async def rollout(self, state: ProbeState, query: TrainingQuery, *, rng: random.Random,
                      max_steps: int, cancelled: threading.Event) -> Trajectory:
        options = self.options
        draw, u = _draw(rng)
        _mark(options, draw)
        Probe.enter()
        try:
            if options.hang_query in (query.query, "*"):
                await asyncio.sleep(120)
            if query.query == options.fail_query:
                raise RuntimeError(f"rollout of {query.query!r} failed on purpose")
            if options.seconds:
                await asyncio.sleep(options.seconds * (1 + u) / 2)
        except asyncio.CancelledError:
            with Probe.lock:
                Probe.cancelled.append(draw)
            raise
        finally:
            Probe.leave()
        if options.spin_ms:
            spin(options.spin_ms)
        return _trajectory(state, draw, u)


def expected_order(seed: int, iteration: int, n_queries: int, per_query: int) -> list[int]:
    """The draws of an iteration's trajectories in the fixed order (query, then index)."""
    from flowactors.training import rollout_rng

    return [rollout_rng(seed, iteration, q, i).getrandbits(32)
            for q in range(n_queries) for i in range(per_query)]
