"""The Runtime end to end: lifecycle, checkpoints, parallel rollouts, control, isolation."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import MEMORY, QUERIES, open_runtime, sim_spec, wait_until
from structlog.testing import capture_logs

import flowactors as fa
from flowactors import codec
from flowactors.events import (
    CheckpointSaved,
    IterationCompleted,
    JobCompleted,
    JobPaused,
    JobRecovered,
)
from flowactors.store import EventStore


def event_types(rt, job_id):
    return [r.type for r in rt.history(job_id)]


def test_a_job_runs_to_completion_with_consistent_progress_metrics_and_cost():
    """create → run → complete: progress 100%, metrics of the last iteration, cost summed."""
    spec = sim_spec(n_iterations=6, task_options={"cost_per_trajectory_usd": 0.5},
                    max_budget_usd=1000.0)
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(spec)
        view = rt.wait(job_id, timeout=30)
        history = list(rt.history(job_id))
    assert view.status is fa.JobStatus.COMPLETED
    assert view.progress.current_iteration == 6 and view.progress.percent_complete == 100.0
    iterations = [r.event for r in history if isinstance(r.event, IterationCompleted)]
    assert [e.iteration for e in iterations] == [1, 2, 3, 4, 5, 6]
    assert view.metrics["avg_reward"] == iterations[-1].avg_reward
    assert view.metrics["loss"] == iterations[-1].loss
    assert view.cost.cost_usd == pytest.approx(6 * 2 * 2 * 0.5)
    assert view.cost.budget_remaining_usd == pytest.approx(1000.0 - 12.0)
    assert view.started_at <= view.finished_at and view.created_at <= view.started_at
    assert [r.version for r in history] == list(range(1, len(history) + 1))


def test_checkpoints_fall_exactly_on_the_interval_and_each_can_resume(tmp_path):
    """n=10, interval=3 → checkpoints 3, 6, 9; a log cut right after any of them resumes from
    it and ends with the same final state as the uninterrupted run."""
    spec = sim_spec(n_iterations=10, checkpoint_interval=3)
    with open_runtime(tmp_path / "flow.db") as rt:
        job_id = rt.submit(spec, job_id="job")
        rt.wait(job_id, timeout=30)
        infos = rt.checkpoints(job_id)
        history = list(rt.history(job_id))
        final = [r.event for r in history if isinstance(r.event, JobCompleted)][0]
        blobs = {r.event.state_ref: rt.store.get_blob(r.event.state_ref)
                 for r in history if isinstance(r.event, CheckpointSaved)}
        assert rt.load_checkpoint(job_id, 6).optimizer.step == 6
    assert sorted(i.iteration for i in infos) == [3, 6, 9]
    for cut in (3, 6, 9):
        path = tmp_path / f"cut{cut}.db"
        end = next(i for i, r in enumerate(history)
                   if isinstance(r.event, CheckpointSaved) and r.event.iteration == cut)
        with EventStore(path, mode="owner", synchronous="off") as store:
            for r in history[:end + 1]:
                blob = [blobs[r.event.state_ref]] if isinstance(r.event, CheckpointSaved) else []
                store.append("job", [r.event], r.version - 1, blobs=blob)
        with open_runtime(path) as rt:
            view = rt.wait("job", timeout=30)
            resumed = list(rt.history("job"))
        recovery = [r.event for r in resumed if isinstance(r.event, JobRecovered)]
        assert recovery == [JobRecovered(from_checkpoint=cut, attempt=1, cause="crash")]
        assert view.status is fa.JobStatus.COMPLETED and view.attempts == 1
        assert resumed[-1].event.final_state_digest == final.final_state_digest


def test_cancel_mid_iteration_takes_effect_at_once():
    """With 30 s rollouts in flight, cancel returns in < 1 s and no iteration follows it."""
    spec = sim_spec(n_iterations=3, task_options={"rollout_seconds": 30.0})
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(spec)
        wait_until(lambda: rt.status(job_id).status is fa.JobStatus.RUNNING)
        started = time.monotonic()
        view = rt.cancel(job_id)
        elapsed = time.monotonic() - started
        assert view.status is fa.JobStatus.CANCELLED
        assert elapsed < 1.0
        types = event_types(rt, job_id)
    assert types[-1] == "job.cancelled"
    assert "job.iteration_completed" not in types


def test_rollouts_of_an_iteration_run_in_parallel():
    """8 trajectories of 0.5 s each finish an iteration in < 2 s (serially it would be 4 s)."""
    spec = sim_spec(n_iterations=1, batch_size=1, n_trajectories_per_query=8,
                    max_parallel_rollouts=8, task_options={"rollout_seconds": 0.5})
    with open_runtime(MEMORY) as rt:
        started = time.monotonic()
        job_id = rt.submit(spec)
        view = rt.wait(job_id, timeout=10)
        elapsed = time.monotonic() - started
    assert view.status is fa.JobStatus.COMPLETED
    assert elapsed < 2.0


def test_per_job_parallelism_is_bounded():
    """max_parallel_rollouts=2 keeps at most two rollouts of a job in flight."""
    spec = sim_spec(n_iterations=1, batch_size=1, n_trajectories_per_query=6,
                    max_parallel_rollouts=2, task_options={"rollout_seconds": 0.05})
    in_flight = peak = 0
    lock = threading.Lock()
    from flowactors.tasks.simulated import SimulatedTask

    original = SimulatedTask.rollout

    def counting(self, *args, **kwargs):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SimulatedTask, "rollout", counting)
        with open_runtime(MEMORY) as rt:
            rt.wait(rt.submit(spec), timeout=10)
    assert peak == 2


def test_fifty_concurrent_jobs_all_complete_and_never_share_an_event():
    """50 jobs run at once; each completes; every event belongs to exactly one stream."""
    with open_runtime(MEMORY, max_concurrent_jobs=50) as rt:
        ids = [rt.submit(sim_spec(f"agent-{i}", seed=i)) for i in range(50)]
        views = [rt.wait(job_id, timeout=60) for job_id in ids]
        positions = {}
        for job_id in ids:
            for r in rt.history(job_id):
                assert r.stream == job_id
                assert r.position not in positions
                positions[r.position] = job_id
        all_events = list(rt.store.read_all())
    assert all(v.status is fa.JobStatus.COMPLETED for v in views)
    assert len(all_events) == len(positions)


def test_scheduler_admits_by_priority_then_submission_order():
    """With one slot, queued jobs start by priority (higher first), then in submission order."""
    blocker = sim_spec("blocker", n_iterations=1, task_options={"rollout_seconds": 0.3})
    with open_runtime(MEMORY, max_concurrent_jobs=1) as rt:
        rt.submit(blocker, job_id="blocker")
        rt.submit(sim_spec("low", n_iterations=1), job_id="low")
        rt.submit(sim_spec("high", n_iterations=1, priority=5), job_id="high")
        rt.submit(sim_spec("low2", n_iterations=1), job_id="low2")
        for job_id in ("blocker", "low", "high", "low2"):
            rt.wait(job_id, timeout=30)
        started = {job_id: rt.status(job_id).started_at for job_id in ("low", "high", "low2")}
    assert started["high"] < started["low"] < started["low2"]


def test_state_persists_across_runtime_instances(tmp_path):
    """A completed job and its checkpoints are there when the log is opened again."""
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        job_id = rt.submit(sim_spec())
        before = rt.wait(job_id, timeout=30)
        checkpoints = rt.checkpoints(job_id)
    with open_runtime(path) as rt:
        assert rt.status(job_id) == before
        assert rt.checkpoints(job_id) == checkpoints
        assert [v.job_id for v in rt.jobs(status="completed")] == [job_id]


def test_a_failing_task_fails_only_its_own_job():
    """An exception in one job's update fails that job with the error; others complete."""
    with open_runtime(MEMORY) as rt:
        bad = rt.submit(sim_spec("bad", task_options={"fail_at_iteration": 2}))
        good = rt.submit(sim_spec("good"))
        bad_view = rt.wait(bad, timeout=30)
        good_view = rt.wait(good, timeout=30)
    assert bad_view.status is fa.JobStatus.FAILED
    assert bad_view.error.type == "RuntimeError"
    assert "iteration 2" in bad_view.error.message and bad_view.error.reason == "task_error"
    assert good_view.status is fa.JobStatus.COMPLETED


def test_flaky_rollouts_are_failed_trajectories_not_failed_jobs():
    """With failure_rate=0.5 the job completes and records its failed trajectories."""
    spec = sim_spec(n_iterations=4, task_options={"failure_rate": 0.5})
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(spec)
        assert rt.wait(job_id, timeout=30).status is fa.JobStatus.COMPLETED
        failed = sum(r.event.n_failed for r in rt.history(job_id)
                     if isinstance(r.event, IterationCompleted))
    assert failed > 0


def test_rollout_timeout_is_a_failed_trajectory():
    """A rollout slower than rollout_timeout_s is recorded failed and the iteration goes on."""
    spec = sim_spec(n_iterations=1, batch_size=1, n_trajectories_per_query=2,
                    rollout_timeout_s=0.1, task_options={"rollout_seconds": 30.0})
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(spec)
        assert rt.wait(job_id, timeout=10).status is fa.JobStatus.COMPLETED
        (iteration,) = [r.event for r in rt.history(job_id)
                        if isinstance(r.event, IterationCompleted)]
    assert iteration.n_failed == 2


def test_pause_and_resume_lose_and_repeat_no_iteration(tmp_path):
    """Paused mid-run and resumed (across a reopen), the job records each iteration once and
    ends with the same final state as an uninterrupted run."""
    spec = sim_spec(n_iterations=8, checkpoint_interval=3,
                    task_options={"rollout_seconds": 0.02})
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        job_id = rt.submit(spec)
        wait_until(lambda: rt.status(job_id).progress.current_iteration >= 2)
        paused = rt.pause(job_id)
        assert paused.status is fa.JobStatus.PAUSED
    with open_runtime(path) as rt:
        assert rt.status(job_id) == paused  # nothing ran after the pause, nor on reopen
        assert rt.resume(job_id).status in (fa.JobStatus.QUEUED, fa.JobStatus.RUNNING)
        view = rt.wait(job_id, timeout=30)
        history = list(rt.history(job_id))
        reference = rt.submit(spec)
        rt.wait(reference, timeout=30)
        reference_final = list(rt.history(reference))[-1].event
    iterations = [r.event.iteration for r in history if isinstance(r.event, IterationCompleted)]
    assert iterations == list(range(1, 9))
    assert any(isinstance(r.event, JobPaused) for r in history)
    assert view.status is fa.JobStatus.COMPLETED
    assert history[-1].event.final_state_digest == reference_final.final_state_digest


def test_illegal_controls_raise_and_write_nothing():
    """Resume a running job, cancel a completed one, act on an unknown job: typed errors."""
    with open_runtime(MEMORY) as rt:
        done = rt.submit(sim_spec(n_iterations=1))
        rt.wait(done, timeout=10)
        versions = rt.status(done).version
        with pytest.raises(fa.InvalidTransition, match="completed"):
            rt.cancel(done)
        with pytest.raises(fa.InvalidTransition, match="completed"):
            rt.resume(done)
        assert rt.status(done).version == versions
        with pytest.raises(fa.JobNotFound, match="nope"):
            rt.status("nope")
        slow = rt.submit(sim_spec(task_options={"rollout_seconds": 5.0}))
        wait_until(lambda: rt.status(slow).status is fa.JobStatus.RUNNING)
        with pytest.raises(fa.InvalidTransition, match="running"):
            rt.resume(slow)
        rt.cancel(slow)


def test_submit_is_idempotent_with_a_job_id_and_rejects_bad_specs():
    """Same id + spec → same job, one submission; other spec, bad spec or task → SpecError,
    nothing written."""
    with open_runtime(MEMORY) as rt:
        spec = sim_spec(n_iterations=1)
        assert rt.submit(spec, job_id="mine") == "mine"
        assert rt.submit(spec, job_id="mine") == "mine"
        with pytest.raises(fa.SpecError, match="different spec"):
            rt.submit(sim_spec(n_iterations=2), job_id="mine")
        with pytest.raises(fa.SpecError, match=r"\$\.config\.batch_size"):
            rt.submit({"agent_id": "a", "training_data": [{"query": "q"}],
                       "config": {"batch_size": 0}})
        with pytest.raises(fa.SpecError, match="unknown task 'nope'"):
            rt.submit(sim_spec().__class__(agent_id="a", training_data=QUERIES, task="nope"))
        with pytest.raises(fa.SpecError, match=r"\$\.task_options\.failure_rate"):
            rt.submit(sim_spec(task_options={"failure_rate": 2}))
        assert set(rt.store.streams()) == {"mine"}  # the rejected specs wrote nothing
        submitted = [r for r in rt.history("mine") if r.type == "job.submitted"]
    assert len(submitted) == 1


def test_a_second_runtime_on_an_owned_log_is_refused(tmp_path):
    """StoreLocked names the file, in the same process."""
    path = tmp_path / "flow.db"
    with open_runtime(path):
        with pytest.raises(fa.StoreLocked, match="flow.db"):
            open_runtime(path)


def test_budget_stops_the_job():
    """Reaching max_budget_usd fails the job with reason budget_exhausted, after thresholds."""
    spec = sim_spec(n_iterations=50, max_budget_usd=1.0,
                    task_options={"cost_per_trajectory_usd": 0.1})
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(spec)
        view = rt.wait(job_id, timeout=30)
        types = event_types(rt, job_id)
    assert view.status is fa.JobStatus.FAILED and view.error.reason == "budget_exhausted"
    assert types.count("job.budget_threshold_reached") == 2
    assert view.cost.cost_usd >= 1.0 and view.progress.current_iteration < 50


def test_an_unexpected_actor_error_is_restarted_by_replay(monkeypatch):
    """A bug in the actor (not the task) restarts the job from its last checkpoint; it still
    completes, with the restart counted in attempts."""
    import flowactors.trajectories as trajectories

    original = trajectories.iteration_result
    calls = {"n": 0}

    def flaky(iteration, groups, metrics):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ZeroDivisionError("injected")
        return original(iteration, groups, metrics)

    monkeypatch.setattr(trajectories, "iteration_result", flaky)
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(sim_spec(n_iterations=5, checkpoint_interval=2))
        view = rt.wait(job_id, timeout=30)
        recoveries = [r.event for r in rt.history(job_id) if isinstance(r.event, JobRecovered)]
    assert view.status is fa.JobStatus.COMPLETED and view.attempts == 1
    assert recoveries == [JobRecovered(from_checkpoint=2, attempt=1, cause="restart")]


def test_restarts_are_bounded_then_the_job_fails(monkeypatch):
    """An actor that keeps crashing fails its job with reason restarts_exhausted."""
    import flowactors.trajectories as trajectories

    def broken(iteration, groups, metrics):
        raise ZeroDivisionError("always")

    monkeypatch.setattr(trajectories, "iteration_result", broken)
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(sim_spec())
        view = rt.wait(job_id, timeout=30)
    assert view.status is fa.JobStatus.FAILED
    assert view.error.reason == "restarts_exhausted" and view.attempts == 3


def test_watch_tails_events_as_they_commit():
    """watch(job) yields the job's events in order and ends with its terminal event."""
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(sim_spec(task_options={"rollout_seconds": 0.01}), job_id="w")
        seen = list(rt.watch(job_id))
        history = list(rt.history(job_id))
    assert seen and seen[-1].type == "job.completed"
    assert seen == history[len(history) - len(seen):]


def test_close_writes_no_job_events_and_reopen_resumes(tmp_path):
    """close() with a job mid-run leaves it running in the log; reopening finishes it."""
    path = tmp_path / "flow.db"
    spec = sim_spec(n_iterations=6, task_options={"rollout_seconds": 0.05})
    with open_runtime(path) as rt:
        job_id = rt.submit(spec)
        wait_until(lambda: rt.status(job_id).progress.current_iteration >= 1)
    with EventStore(path, mode="readonly") as store:
        last = list(store.read_stream(job_id))[-1]
    assert last.type in ("job.iteration_completed", "job.checkpoint_saved",
                         "job.checkpoints_pruned")
    with open_runtime(path) as rt:
        assert rt.wait(job_id, timeout=30).status is fa.JobStatus.COMPLETED
        assert any(isinstance(r.event, JobRecovered) for r in rt.history(job_id))


def test_every_job_log_line_carries_its_job_id():
    """structlog lines emitted for a job are bound to its job_id."""
    with capture_logs() as logs:
        with open_runtime(MEMORY) as rt:
            job_id = rt.submit(sim_spec(n_iterations=1))
            rt.wait(job_id, timeout=10)
    started = [e for e in logs if e["event"] == "job_started"]
    assert started and all(e["job_id"] == job_id for e in started)


def test_same_spec_and_seed_train_identical_policies_side_by_side():
    """Determinism comes from the seed, never the job id."""
    with open_runtime(MEMORY) as rt:
        a, b = rt.submit(sim_spec()), rt.submit(sim_spec())
        finals = [[r.event for r in rt.history(j)][-1] for j in (rt.wait(a, 30).job_id,
                                                                  rt.wait(b, 30).job_id)]
    assert finals[0].final_state_digest == finals[1].final_state_digest
    assert isinstance(finals[0], JobCompleted)


def test_control_requests_from_another_process_are_answered(tmp_path):
    """A request left in the inbox is applied by the owner and answered."""
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        job_id = rt.submit(sim_spec(task_options={"rollout_seconds": 5.0}))
        with EventStore(path, mode="requester") as requester:
            request_id = requester.request(job_id, "cancel")
            answer = wait_until(lambda: requester.answer_of(request_id), 10, "an answer")
            assert answer.outcome == "applied"
            done = rt.submit(sim_spec(n_iterations=1))
            rt.wait(done, timeout=10)
            rejected = requester.request(done, "pause")
            answer = wait_until(lambda: requester.answer_of(rejected), 10, "an answer")
        assert rt.status(job_id).status is fa.JobStatus.CANCELLED
    assert answer.outcome == "rejected" and "completed" in answer.reason


def test_final_state_blob_matches_its_digest():
    """The completion references a blob whose content hashes to the recorded digest."""
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(sim_spec(n_iterations=3, checkpoint_interval=2))
        rt.wait(job_id, timeout=10)
        final = [r.event for r in rt.history(job_id)][-1]
        blob = rt.store.get_blob(final.final_state_ref)
    assert codec.digest(blob) == final.final_state_digest


@pytest.fixture
def rollout_threads(monkeypatch) -> list[str]:
    """The names of the threads the `simulated` task's rollouts and updates ran on."""
    from flowactors.tasks.simulated import SimulatedTask
    seen: list[str] = []
    rollout, update = SimulatedTask.rollout, SimulatedTask.update

    def recording_rollout(self, *args, **kwargs):
        seen.append(f"rollout@{threading.current_thread().name}")
        return rollout(self, *args, **kwargs)

    def recording_update(self, *args, **kwargs):
        seen.append(f"update@{threading.current_thread().name}")
        return update(self, *args, **kwargs)

    monkeypatch.setattr(SimulatedTask, "rollout", recording_rollout)
    monkeypatch.setattr(SimulatedTask, "update", recording_update)
    return seen


@pytest.mark.parametrize("config, inline", [
    ({}, True),  # free rollouts: the task asks for inline rollouts
    ({"task_options": {"rollout_seconds": 0.001}}, False),  # slow ones use the pool
    ({"rollout_timeout_s": 5.0}, False),  # a timeout needs the pool
])
def test_inline_rollouts_run_on_the_jobs_own_thread(rollout_threads, config, inline):
    with open_runtime(MEMORY) as rt:
        view = rt.wait(rt.submit(sim_spec(n_iterations=3, **config)), timeout=30)
    assert view.status is fa.JobStatus.COMPLETED
    updates = {name.split("@")[1] for name in rollout_threads if name.startswith("update@")}
    rollouts = {name.split("@")[1] for name in rollout_threads if name.startswith("rollout@")}
    assert len(updates) == 1 and rollouts
    assert (rollouts == updates) is inline, (rollouts, updates)


@pytest.mark.parametrize("command", ["cancel", "pause"])
def test_a_job_with_inline_rollouts_obeys_a_request_between_iterations(command):
    """Iterations run back to back on the job's thread, yet a request waiting in its inbox
    is handled after the iteration in progress: the job stops long before its end."""
    spec = sim_spec(n_iterations=1_000_000, checkpoint_interval=1_000_000)
    with open_runtime(MEMORY) as rt:
        job_id = rt.submit(spec)
        wait_until(lambda: rt.status(job_id).progress.current_iteration >= 3)
        view = getattr(rt, command)(job_id)
        iterations = [r.event.iteration for r in rt.history(job_id)
                      if isinstance(r.event, IterationCompleted)]
    expected = fa.JobStatus.CANCELLED if command == "cancel" else fa.JobStatus.PAUSED
    assert view.status is expected
    assert iterations == list(range(1, len(iterations) + 1))
    assert view.progress.current_iteration == len(iterations) < 1_000_000
