"""A task whose code does not load when a log is reopened (another directory, another
virtualenv) is a problem of the environment: the job waits, unfinished, with its reason in its
view, and goes on bit-identically once the code loads again."""

from __future__ import annotations

import sys

import pytest

import flowactors as fa
from flowactors.events import JobCompleted, JobFailed
from helpers import QUERIES, open_runtime, wait_until

MODULE = "relocated_task"


def _spec() -> fa.JobSpec:
    return fa.JobSpec(agent_id="a", training_data=QUERIES, task=f"{MODULE}:Task",
                      task_options={"rollout_seconds": 0.05},
                      config=fa.GRPOConfig(n_iterations=8, batch_size=2, checkpoint_interval=2,
                                           n_trajectories_per_query=2, seed=3))


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """A directory holding the task's module, on sys.path (until the test takes it off)."""
    directory = tmp_path / "code"
    directory.mkdir()
    (directory / f"{MODULE}.py").write_text(
        "from flowactors.tasks.simulated import SimulatedTask as Task\n")
    monkeypatch.syspath_prepend(str(directory))
    yield directory
    sys.modules.pop(MODULE, None)


def _final_digest(rt: fa.Runtime, job_id: str) -> str:
    return next(r.event.final_state_digest for r in rt.history(job_id)
                if isinstance(r.event, JobCompleted))


def _leave_running(path, monkeypatch, task_dir) -> str:
    """Run the job past a checkpoint, close the runtime (the job stays running in the log),
    then take the task's code away."""
    with open_runtime(path) as rt:
        job_id = rt.submit(_spec(), job_id="relocated")
        wait_until(lambda: rt.status(job_id).progress.current_iteration >= 3, timeout=30)
    monkeypatch.syspath_prepend("")  # keep monkeypatch's own undo in place
    sys.path.remove(str(task_dir))
    sys.modules.pop(MODULE, None)
    return job_id


@pytest.mark.timeout(120)
@pytest.mark.parametrize("comes_back", ["on_resume", "on_the_next_open"])
def test_a_job_whose_task_does_not_load_waits_and_then_continues_exactly(
        tmp_path, monkeypatch, task_dir, comes_back):
    """Reopened where its task cannot be imported, the job stays running (no job.failed), its
    view says why; with the code back (`resume`, or the next open) it completes with the
    final state of an uninterrupted run."""
    with open_runtime(tmp_path / "reference.db") as rt:
        reference = _final_digest(rt, rt.wait(rt.submit(_spec(), job_id="relocated"),
                                              timeout=60).job_id)
    path = tmp_path / "flow.db"
    job_id = _leave_running(path, monkeypatch, task_dir)

    with open_runtime(path) as rt:
        view = rt.status(job_id)
        assert view.status is fa.JobStatus.RUNNING
        assert view.waiting and MODULE in view.waiting
        assert not any(isinstance(r.event, JobFailed) for r in rt.history(job_id))
        with pytest.raises(fa.SpecError, match=MODULE):
            rt.resume(job_id)  # still missing: refused, and the job still waits
        assert rt.status(job_id).waiting
        sys.path.insert(0, str(task_dir))
        if comes_back == "on_resume":
            assert rt.resume(job_id).waiting is None
            assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
            assert _final_digest(rt, job_id) == reference
            return
    with open_runtime(path) as rt:
        assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
        assert _final_digest(rt, job_id) == reference
        assert not any(isinstance(r.event, JobFailed) for r in rt.history(job_id))
