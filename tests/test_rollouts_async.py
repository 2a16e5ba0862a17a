"""Async rollouts on the runtime's event loop, and the backend contract on threads and on the
loop: fixed order, failed trajectories kept, timeouts, cancellation, bounds."""

from __future__ import annotations

import pytest
import rollout_contract as contract
from helpers import open_runtime, wait_until
from rollout_tasks import Probe

from flowactors import AsyncRollouts, JobStatus, ThreadRollouts
from flowactors.events import JobCompleted

SYNC, ASYNC = "rollout_tasks:ProbeTask", "rollout_tasks:AsyncProbeTask"
BACKENDS = {"threads": ThreadRollouts, "loop": AsyncRollouts}
CASES = [("threads", SYNC), ("threads", ASYNC), ("loop", ASYNC), ("loop", SYNC)]


@pytest.fixture(params=CASES, ids=[f"{b}-{t.split(':')[1]}" for b, t in CASES])
def backend_and_task(request):
    name, task = request.param
    backend = BACKENDS[name]()
    Probe.reset()
    yield backend, task
    backend.close()


def test_results_come_back_in_the_fixed_order(backend_and_task):
    """Rollouts finishing in a shuffled order reach the job in the order (query, index)."""
    contract.check_fixed_order(*backend_and_task)


def test_a_rollout_that_raises_is_a_failed_trajectory_in_its_place(backend_and_task):
    """The failure is kept with its error; the other trajectories are untouched."""
    contract.check_failures_are_kept(*backend_and_task)


def test_a_rollout_past_its_timeout_is_a_failed_trajectory(backend_and_task):
    """`rollout_timeout_s` holds on every backend; the iteration does not wait for the hang."""
    contract.check_timeout(*backend_and_task)


def test_cancelling_a_batch_of_coroutines_cancels_them():
    """Cancel reaches an async rollout parked in `await`: its coroutine is cancelled."""
    backend = AsyncRollouts()
    Probe.reset()
    try:
        contract.check_cancel(backend, ASYNC, started=lambda: wait_until(
            lambda: Probe.in_flight == 4, message="4 rollouts in flight"))
        wait_until(lambda: len(Probe.cancelled) == 4 and Probe.in_flight == 0,
                   message="the 4 coroutines cancelled")
    finally:
        backend.close()


def test_hundreds_of_async_rollouts_are_in_flight_at_once_within_the_jobs_bound(tmp_path):
    """One iteration of 512 sleeping rollouts runs them all at once on one loop (no thread
    each); a job's `max_parallel_rollouts` still bounds it."""
    Probe.reset()
    spec = contract.probe_spec(ASYNC, seconds=1.0, config={
        "batch_size": 32, "n_trajectories_per_query": 16, "n_iterations": 1,
        "max_parallel_rollouts": 1024})
    with open_runtime(tmp_path / "flow.db") as rt:
        assert rt.wait(rt.submit(spec), timeout=60).status is JobStatus.COMPLETED
    assert Probe.most_in_flight == 512
    Probe.reset()
    bounded = contract.probe_spec(ASYNC, seconds=0.05, config={
        "batch_size": 32, "n_trajectories_per_query": 16, "n_iterations": 1,
        "max_parallel_rollouts": 20})
    with open_runtime(tmp_path / "bounded.db") as rt:
        assert rt.wait(rt.submit(bounded), timeout=60).status is JobStatus.COMPLETED
    assert Probe.most_in_flight == 20


def test_the_event_loop_bounds_all_jobs_together(tmp_path):
    """`AsyncRollouts(max_in_flight=N)` is a global bound across jobs."""
    Probe.reset()
    backend = AsyncRollouts(max_in_flight=24)
    spec = contract.probe_spec(ASYNC, seconds=0.05, config={
        "batch_size": 8, "n_trajectories_per_query": 16, "n_iterations": 2,
        "max_parallel_rollouts": 100})
    try:
        with open_runtime(tmp_path / "flow.db", rollouts=backend) as rt:
            jobs = [rt.submit(spec, job_id=f"job-{i}") for i in range(3)]
            for job_id in jobs:
                assert rt.wait(job_id, timeout=60).status is JobStatus.COMPLETED
    finally:
        backend.close()
    assert Probe.most_in_flight == 24


def _final_digest(rt, job_id: str) -> str:
    return next(r.event.final_state_digest for r in rt.history(job_id)
                if isinstance(r.event, JobCompleted))


def test_an_async_task_trains_bit_identically_to_its_thread_twin(tmp_path):
    """The same draws in the same order: equal final digests, and equal to a run of the
    synchronous task on threads, though rollouts finish in another order on each."""
    digests = set()
    for name, task in [("threads", SYNC), ("threads", ASYNC), ("loop", ASYNC)]:
        backend = BACKENDS[name]()
        try:
            with open_runtime(tmp_path / f"{name}-{task[-9:]}.db", rollouts=backend) as rt:
                job_id = rt.submit(contract.probe_spec(task, seconds=0.05))
                assert rt.wait(job_id, timeout=60).status is JobStatus.COMPLETED
                digests.add(_final_digest(rt, job_id))
        finally:
            backend.close()
    assert len(digests) == 1


def test_cancelling_an_async_job_returns_at_once_and_cancels_its_coroutines(tmp_path):
    """`Runtime.cancel` on a job whose coroutines hang: cancelled, coroutines cancelled."""
    Probe.reset()
    spec = contract.probe_spec(ASYNC, hang_query="*", config={"batch_size": 1})
    with open_runtime(tmp_path / "flow.db") as rt:
        job_id = rt.submit(spec)
        wait_until(lambda: Probe.in_flight == 4, message="4 rollouts in flight")
        assert rt.cancel(job_id).status is JobStatus.CANCELLED
        wait_until(lambda: len(Probe.cancelled) == 4, message="the coroutines cancelled")
