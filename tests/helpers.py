"""Shared test helpers: spec factories, a test runtime, and condition waits (no sleeping and
hoping)."""

from __future__ import annotations

import time
from collections.abc import Callable

from flowactors import GRPOConfig, JobSpec, Runtime, TrainingQuery

QUERIES = [TrainingQuery(query=f"query {i}", expected_outcome={"answer": str(i)})
           for i in range(10)]


def sim_spec(agent_id: str = "agent", *, task_options: dict | None = None,
             priority: int = 0, **config) -> JobSpec:
    """A small `simulated` job: fast, deterministic."""
    defaults = dict(n_iterations=5, batch_size=2, n_trajectories_per_query=2,
                    checkpoint_interval=2, seed=1)
    return JobSpec(agent_id=agent_id, training_data=QUERIES,
                   config=GRPOConfig(**{**defaults, **config}), task="simulated",
                   task_options=task_options or {}, priority=priority)


def open_runtime(path, **kwargs) -> Runtime:
    """A runtime for tests: no fsync (the tests do not cut the power), no signal handlers."""
    kwargs.setdefault("synchronous", "off")
    kwargs.setdefault("handle_signals", False)
    return Runtime(path, **kwargs)


def wait_until(condition: Callable[[], object], timeout: float = 10.0,
               message: str = "condition") -> object:
    """Poll `condition` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.01)
