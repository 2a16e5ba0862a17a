"""Shared test helpers: spec factories, a test runtime, and condition waits (no sleeping and
hoping)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

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


MEMORY = ":memory:"
"""The path of an in-memory log: for a test where a file adds nothing."""


def open_runtime(path, **kwargs) -> Runtime:
    """A runtime for tests: no fsync (the tests do not cut the power), no signal handlers."""
    kwargs.setdefault("synchronous", "off")
    kwargs.setdefault("handle_signals", False)
    return Runtime(path, **kwargs)


def run_twin_jobs(rt: Runtime, spec: Callable[..., JobSpec]) -> tuple[str, str]:
    """Job B, then job A, training identical states: B keeps its checkpoints, A keeps one and
    prunes the rest (some of them states B still needs). Returns (A, B) once both are done."""
    b = rt.submit(spec(n_iterations=2, keep_checkpoints=5))
    rt.wait(b, timeout=60)
    a = rt.submit(spec(n_iterations=6, keep_checkpoints=1))
    rt.wait(a, timeout=60)
    return a, b


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


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def ray_child_reference(directory: Path) -> tuple[str, Callable[[], JobSpec], str]:
    """The job `tools/ray_child.py` runs, trained once on the thread backend: its id, its spec
    factory and its final state digest (what a run on Ray must end with)."""
    sys.path.insert(0, str(TOOLS))
    try:
        from ray_child import JOB_ID, job_spec
    finally:
        sys.path.remove(str(TOOLS))
    with open_runtime(directory / "threads.db") as rt:
        rt.submit(job_spec(), job_id=JOB_ID)
        assert rt.wait(JOB_ID, timeout=60).status.value == "completed"
        digest = next(r.event.final_state_digest for r in rt.history(JOB_ID)
                      if r.type == "job.completed")
    return JOB_ID, job_spec, digest
