"""What every rollout backend must do, as checks the backend test modules run on theirs: the
fixed order, failed trajectories kept, timeouts, cancellation. They drive a backend directly
(`backend.start`), the way a job's actor does."""

from __future__ import annotations

import queue
import threading

from rollout_tasks import ProbeOptions, expected_order
from flowactors import GRPOConfig, JobSpec, TrainingQuery
from flowactors.tasks import build_task
from flowactors.training import rollout_rng

QUERIES = [TrainingQuery(query=f"q{i}") for i in range(6)]


def probe_spec(task: str = "rollout_tasks:ProbeTask", *, seed: int = 3, **options) -> JobSpec:
    config = options.pop("config", {})
    return JobSpec(agent_id="probe", training_data=QUERIES, task=task, task_options=options,
                   config=GRPOConfig(**{"n_iterations": 3, "batch_size": 3,
                                        "n_trajectories_per_query": 4, "checkpoint_interval": 1,
                                        "eval_fraction": 0.0, "seed": seed, **config}))


def run_batch(backend, spec: JobSpec, iteration: int = 1, timeout: float = 30.0):
    """Start one iteration's rollouts; returns the groups (fails the test if none come)."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    task = build_task(spec)
    queries = QUERIES[:spec.config.batch_size]
    backend.start(task=task, state=task.init(spec), spec=spec, iteration=iteration,
                  queries=queries, on_complete=done.put)
    return done.get(timeout=timeout)


def check_fixed_order(backend, task: str) -> None:
    """Rollouts that finish in a shuffled order come back in the fixed order."""
    spec = probe_spec(task, seconds=0.3)
    n, per = spec.config.batch_size, spec.config.n_trajectories_per_query
    finish = [rollout_rng(spec.config.seed, 1, q, i).getrandbits(32) and
              _u(spec.config.seed, 1, q, i) for q in range(n) for i in range(per)]
    assert finish != sorted(finish), "the rollouts must finish out of the fixed order"
    groups = run_batch(backend, spec)
    assert [len(g) for g in groups] == [per] * n
    assert [t.data for g in groups for t in g] == expected_order(spec.config.seed, 1, n, per)


def _u(seed: int, iteration: int, q: int, i: int) -> float:
    rng = rollout_rng(seed, iteration, q, i)
    rng.getrandbits(32)
    return rng.random()


def check_failures_are_kept(backend, task: str) -> None:
    """A rollout that raises is a failed trajectory in its place, with the error; the others
    are not touched."""
    spec = probe_spec(task, fail_query="q1")
    groups = run_batch(backend, spec)
    assert all(t.failed and "failed on purpose" in t.error for t in groups[1])
    assert not any(t.failed for t in groups[0] + groups[2])


def check_timeout(backend, task: str) -> None:
    """A rollout past `rollout_timeout_s` is a failed trajectory and the batch completes."""
    spec = probe_spec(task, hang_query="q2", config={"rollout_timeout_s": 0.5})
    groups = run_batch(backend, spec, timeout=20)
    assert all(t.failed and "timed out" in t.error for t in groups[2])
    assert not any(t.failed for t in groups[0] + groups[1])


def check_cancel(backend, task: str, started) -> None:
    """Cancel stops waiting at once: `on_complete` is never called for a cancelled batch.
    `started()` says when the hanging rollouts are running."""
    spec = probe_spec(task, hang_query="q0", config={"batch_size": 1})
    task_obj = build_task(spec)
    called = threading.Event()
    handle = backend.start(task=task_obj, state=task_obj.init(spec), spec=spec, iteration=1,
                           queries=QUERIES[:1], on_complete=lambda groups: called.set())
    started()
    handle.cancel()
    assert not called.wait(0.5)
