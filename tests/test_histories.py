"""Recorded histories: every committed file replays to its golden state; broken ones fail.

The histories in tests/histories/ were recorded from real runs by tools/record_histories.py
(see its docstring); `<name>.expected.json` beside each holds the final view and state digest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from helpers import sim_spec

import flowactors as fa
from flowactors import job as core
from flowactors import testing
from flowactors.cli import main
from flowactors.errors import LogCorrupted
from flowactors.events import IterationCompleted, JobCancelled, JobFailed, JobRecovered
from flowactors.job import Cancel, Fail

HISTORIES = Path(__file__).parent / "histories"
GOOD = sorted(HISTORIES.glob("*.jsonl"))
REQUIRED = ["completed", "cancelled", "failed", "paused_resumed", "budget_stopped",
            "crashed_resumed", "completed_v1"]


def expected(history: Path) -> dict:
    return json.loads(history.with_suffix(".expected.json").read_text())


def view_fields(view: fa.JobView) -> dict:
    data = msgspec.to_builtins(view)
    for key in ("created_at", "started_at", "finished_at"):
        data.pop(key)
    return data


def test_the_required_histories_are_committed_with_their_expectations():
    """Each scenario the replay contract depends on has a history and a golden file."""
    names = {p.stem for p in GOOD}
    assert set(REQUIRED) <= names
    for history in GOOD:
        assert history.with_suffix(".expected.json").exists(), history


@pytest.mark.parametrize("history", GOOD, ids=[p.stem for p in GOOD])
def test_every_history_replays_to_its_golden_state(history):
    """load_history + replay give the stored final view and state digest; the replay check
    reproduces every digest the history recorded."""
    events = testing.load_history(history)
    state = testing.replay(events)
    golden = expected(history)
    assert view_fields(core.view(state)) == golden["view"]
    assert core.state_digest(state) == golden["state_digest"]
    report = testing.check_history(events)
    assert report.ok, report.mismatch
    assert (report.events, report.digests_checked) == (golden["events"],
                                                       golden["digests_checked"])
    assert report.digests_checked >= 1


@pytest.mark.parametrize("history", GOOD, ids=[p.stem for p in GOOD])
def test_replay_check_passes_on_every_history_through_the_command(tmp_path, history):
    """`flowactors replay --check` and `verify` pass on a log written from each history."""
    db = testing.log_from_history(history, tmp_path / "flow.db")
    runner = CliRunner()
    checked = runner.invoke(main, ["replay", "--check", "--db", str(db)])
    assert checked.exit_code == 0, checked.output
    assert f"{expected(history)['digests_checked']} recorded state digests match" \
        in checked.stdout
    verified = runner.invoke(main, ["verify", "--db", str(db)])
    assert verified.exit_code == 0, verified.output


def test_the_histories_show_what_their_names_say():
    """Each scenario really contains the events it is named after."""
    def load(name):
        return testing.load_history(HISTORIES / f"{name}.jsonl")

    def final(name):
        return testing.replay(load(name))

    assert final("completed").status is fa.JobStatus.COMPLETED
    assert final("cancelled").status is fa.JobStatus.CANCELLED
    failed = final("failed")
    assert failed.status is fa.JobStatus.FAILED and failed.error.reason == "task_error"
    budget = final("budget_stopped")
    assert budget.error.reason == "budget_exhausted" and budget.thresholds == (0.75, 0.9)
    assert [r.type for r in load("paused_resumed")].count("job.paused") == 1
    assert final("paused_resumed").status is fa.JobStatus.COMPLETED
    crashed = load("crashed_resumed")
    recovery = [i for i, r in enumerate(crashed) if isinstance(r.event, JobRecovered)]
    assert len(recovery) == 1 and final("crashed_resumed").attempts == 1
    before = [r.event.iteration for r in crashed[:recovery[0]]
              if isinstance(r.event, IterationCompleted)]
    after = [r.event.iteration for r in crashed[recovery[0]:]
             if isinstance(r.event, IterationCompleted)]
    assert max(before) > crashed[recovery[0]].event.from_checkpoint  # superseded iterations
    assert after[0] == crashed[recovery[0]].event.from_checkpoint + 1


def test_the_v1_history_is_upcast_to_the_same_state_as_the_one_it_was_derived_from():
    """completed_v1 stores job.iteration_completed in schema 1 (std_reward and success_rate
    inside metrics); read today, it is upcast and replays to the state of `completed`."""
    raw = [json.loads(line) for line in (HISTORIES / "completed_v1.jsonl").read_text()
           .splitlines()]
    iterations = [line for line in raw if line["type"] == "job.iteration_completed"]
    assert iterations and all(line["schema_version"] == 1 for line in iterations)
    assert all("std_reward" not in line["data"] and "std_reward" in line["data"]["metrics"]
               for line in iterations)
    old = testing.load_history(HISTORIES / "completed_v1.jsonl")
    new = testing.load_history(HISTORIES / "completed.jsonl")
    assert all(isinstance(r.event, IterationCompleted) for r in old
               if r.type == "job.iteration_completed")
    assert [r.event.std_reward for r in old if r.type == "job.iteration_completed"] == \
        [r.event.std_reward for r in new if r.type == "job.iteration_completed"]
    assert core.state_digest(testing.replay(old)) == core.state_digest(testing.replay(new))


@pytest.mark.parametrize("name, line, words", [
    ("unknown_type", 4, "unknown event type 'job.teleported'"),
    ("bad_field", 3, "$.iteration"),
    ("malformed_line", 5, "truncated"),
])
def test_a_broken_history_fails_with_an_error_naming_file_and_line(name, line, words):
    """A history that does not decode raises LogCorrupted naming `file:line` and the cause."""
    path = HISTORIES / "broken" / f"{name}.jsonl"
    with pytest.raises(LogCorrupted) as error:
        testing.load_history(path)
    assert f"{path}:{line}: " in str(error.value)
    assert words in str(error.value)


def test_a_history_whose_recorded_digest_differs_fails_the_replay_check():
    """broken/digest_mismatch loads, but its terminal event's digest is not what replay
    computes: the check names that position."""
    events = testing.load_history(HISTORIES / "broken" / "digest_mismatch.jsonl")
    report = testing.check_history(events)
    assert not report.ok
    assert report.mismatch.position == 6 and report.mismatch.type == "job.failed"
    assert "position 6" in str(report.mismatch)


def test_a_drifted_evolve_fails_the_check_of_an_old_history(monkeypatch):
    """Changing evolve (here: it counts every iteration's tokens twice) makes the recorded
    digests of an old history unreproducible: check_history reports the first one."""
    events = testing.load_history(HISTORIES / "budget_stopped.jsonl")
    original = core.evolve

    def drifted(state, recorded):
        state = original(state, recorded)
        if isinstance(recorded.event, IterationCompleted):
            state = msgspec.structs.replace(state, tokens=state.tokens + recorded.event.tokens)
        return state

    monkeypatch.setattr(core, "evolve", drifted)
    report = testing.check_history(events)
    first_digest = next(r for r in events if core.recorded_digest(r.event) is not None)
    assert not report.ok and report.mismatch.position == first_digest.position


@pytest.mark.parametrize("name", ["cancelled", "failed"])
def test_given_a_recorded_history_when_its_last_command_then_its_recorded_event(name):
    """given/when/then on real data: deciding the recorded terminal command on the state
    before it gives exactly the recorded terminal event."""
    events = testing.load_history(HISTORIES / f"{name}.jsonl")
    state = testing.replay(events[:-1])
    last = events[-1].event
    command = Cancel(reason=last.reason) if isinstance(last, JobCancelled) else Fail(
        reason=last.reason, error_type=last.error_type, message=last.message)
    assert isinstance(last, (JobCancelled, JobFailed))
    assert testing.when(state, command) == [last]
    assert testing.then(state, [last]).status == testing.replay(events).status


def test_flow_runtime_fixture_gives_a_ready_runtime_and_record_history_captures_it(
        flow_runtime, tmp_path):
    """The plugin's fixture runs jobs on a temporary log; record_history writes that log as a
    history that replays to the runtime's own final view."""
    job_id = flow_runtime.submit(sim_spec(n_iterations=4), job_id="mine")
    view = flow_runtime.wait(job_id, timeout=30)
    out = tmp_path / "mine.jsonl"
    count = testing.record_history(flow_runtime.path, out, job_id)
    events = testing.load_history(out)
    assert count == len(events) == view.version
    assert core.view(testing.replay(events)) == view
    assert testing.check_history(events).ok


PLUGIN_TEST = '''
from flowactors import GRPOConfig, JobSpec, TrainingQuery

def test_a_job(flow_runtime):
    spec = JobSpec(agent_id="a", training_data=[TrainingQuery(query="q")],
                   config=GRPOConfig(n_iterations=3, checkpoint_interval=2, eval_fraction=0))
    job_id = flow_runtime.submit(spec, job_id="recorded")
    assert flow_runtime.wait(job_id, timeout=30).status == "completed"
'''


def test_the_record_option_writes_each_flow_runtime_test_as_a_history(tmp_path):
    """`pytest --flowactors-record=DIR` (the plugin, loaded by its entry point) writes the log
    of a test that used flow_runtime to DIR/<test name>.jsonl."""
    (tmp_path / "test_user.py").write_text(PLUGIN_TEST)
    record = tmp_path / "recorded"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--flowactors-record={record}", "test_user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    events = testing.load_history(record / "test_a_job.jsonl")
    assert testing.replay(events).status is fa.JobStatus.COMPLETED
    assert testing.check_history(events).ok
