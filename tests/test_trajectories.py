"""Trajectories on record: kept per iteration, read back filtered, superseded runs marked,
large ones as verified blobs, old logs without them still open."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from helpers import open_runtime, sim_spec

import flowactors as fa
from flowactors import testing, trajectories
from flowactors.cli import main
from flowactors.events import IterationCompleted
from flowactors.store import EventStore

HISTORIES = Path(__file__).parent / "histories"


@pytest.fixture
def finished(tmp_path) -> Path:
    """A log with one completed job whose rollouts fail a third of the time."""
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec(n_iterations=4, task_options={"failure_rate": 0.35}), job_id="job")
        rt.wait("job", timeout=30)
    return path


def test_every_trajectory_of_every_iteration_is_on_record_in_batch_order(finished):
    """Each iteration records all its trajectories (query, then index), and they agree with
    the iteration's event: count, failures, success rate and average reward."""
    with open_runtime(finished) as rt:
        found = rt.trajectories("job")
        events = [r.event for r in rt.history("job") if isinstance(r.event, IterationCompleted)]
    assert [e.iteration for e in events] == [1, 2, 3, 4]
    for event in events:
        mine = [t for t in found if t.iteration == event.iteration]
        assert len(mine) == event.n_trajectories == 4
        assert [(t.query_index, t.index) for t in mine] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert sum(t.failed for t in mine) == event.n_failed
        assert sum(t.success for t in mine) / 4 == event.success_rate
        ok = [t.reward for t in mine if not t.failed]
        assert (sum(ok) / len(ok) if ok else 0.0) == pytest.approx(event.avg_reward)
        assert all(t.query.startswith("query ") and not t.superseded for t in mine)
    assert any(t.failed and t.error for t in found), "the flaky task should fail some"


def test_filters_select_by_iteration_success_reward_and_limit(finished):
    """iteration, success, min_reward and limit each narrow the result as documented."""
    with open_runtime(finished) as rt:
        every = rt.trajectories("job")
        assert {t.iteration for t in rt.trajectories("job", iteration=3)} == {3}
        assert rt.trajectories("job", success=False) == [t for t in every if not t.success]
        assert rt.trajectories("job", success=True) == [t for t in every if t.success]
        assert rt.trajectories("job", min_reward=0.5) == [t for t in every if t.reward >= 0.5]
        assert rt.trajectories("job", limit=3) == every[:3]
        assert rt.trajectories("job", iteration=99) == []
        with pytest.raises(fa.JobNotFound):
            rt.trajectories("nope")


def test_one_iterations_read_decodes_only_that_iterations_event(finished, monkeypatch):
    """Reading iteration 3 decodes one whole event (its own), not the rest of the stream, and
    finds the same trajectories as reading them all and keeping iteration 3's."""
    decoded = []
    decode_event = trajectories.codec.decode_event

    def counting(type_, schema_version, data):
        event = decode_event(type_, schema_version, data)
        decoded.append((type_, getattr(event, "iteration", None)))
        return event

    with EventStore(finished, mode="readonly") as store:
        every = trajectories.read(store, "job")
        monkeypatch.setattr(trajectories.codec, "decode_event", counting)
        third = trajectories.read(store, "job", iteration=3)
    assert decoded == [("job.iteration_completed", 3)]
    assert third == [t for t in every if t.iteration == 3] and len(third) == 4


def test_an_iteration_event_that_does_not_decode_names_its_position():
    """A stored iteration row that is not MessagePack is a LogCorrupted naming the file and
    the position, not a decoder's error."""
    rows = [(7, 3, "job.iteration_completed", 2, b"\xc1")]
    with pytest.raises(fa.LogCorrupted, match=r"^flow\.db, position 7: "):
        trajectories.select_stored("flow.db", rows, iteration=1)


def test_recording_off_keeps_none(tmp_path):
    """With record_trajectories=False the iterations name no trajectories."""
    with open_runtime(tmp_path / "flow.db") as rt:
        rt.submit(sim_spec(n_iterations=2, record_trajectories=False), job_id="job")
        rt.wait("job", timeout=30)
        assert rt.trajectories("job") == []
        events = [r.event for r in rt.history("job") if isinstance(r.event, IterationCompleted)]
    assert all(e.trajectories is None and e.trajectories_ref is None for e in events)


def test_large_trajectories_are_blobs_that_verify_checks(tmp_path, monkeypatch):
    """Above the inline size an iteration's trajectories are a blob the event names; they read
    back the same, `verify` passes, and an edited blob is detected."""
    monkeypatch.setattr(trajectories, "INLINE_MAX_BYTES", 0)
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec(n_iterations=2, checkpoint_interval=10), job_id="job")
        rt.wait("job", timeout=30)
        found = rt.trajectories("job", iteration=1)
        refs = [r.event.trajectories_ref for r in rt.history("job")
                if isinstance(r.event, IterationCompleted)]
    assert len(found) == 4 and all(refs)
    with EventStore(path, mode="readonly") as store:
        assert store.verify().ok
    conn = sqlite3.connect(path)
    with conn:  # tamper with the first iteration's blob (drop the append-only trigger first)
        conn.execute("DROP TRIGGER blobs_no_update")
        conn.execute("UPDATE blobs SET data = ? WHERE digest = ?",
                     (msgspec.msgpack.encode([]), refs[0]))
    conn.close()
    with EventStore(path, mode="readonly") as store:
        report = store.verify()
        assert not report.ok and refs[0] in (report.problem or "")
        with pytest.raises(fa.LogCorrupted):
            trajectories.read(store, "job", iteration=1)


def test_a_superseded_iteration_keeps_its_trajectories_marked(tmp_path):
    """In a run a SIGKILL interrupted, the superseded iteration's trajectories stay on record,
    marked, and the re-run's follow them unmarked (a recorded history of such a run)."""
    db = testing.log_from_history(HISTORIES / "crashed_with_trajectories.jsonl",
                                  tmp_path / "flow.db")
    with EventStore(db, mode="readonly") as store:
        third = trajectories.read(store, "job-0", iteration=3)
        assert store.verify().ok
    runs = sorted({(t.position, t.superseded) for t in third})
    assert [superseded for _, superseded in runs] == [True, False]
    first, second = ([(t.reward, t.query) for t in third if t.position == p] for p, _ in runs)
    assert first == second  # a deterministic task re-runs the same trajectories


def test_an_old_log_without_trajectories_opens_and_has_none(tmp_path):
    """A log recorded before trajectories existed opens in a runtime; it simply has none."""
    db = testing.log_from_history(HISTORIES / "completed.jsonl", tmp_path / "flow.db")
    with open_runtime(db) as rt:
        assert rt.status("completed").status is fa.JobStatus.COMPLETED
        assert rt.trajectories("completed") == []


def test_the_command_lists_filters_and_prints_json(finished):
    """`flowactors trajectories` prints a table, filters with --iteration and --failed, and
    --json gives the same records as the API."""
    runner = CliRunner()
    text = runner.invoke(main, ["trajectories", "job", "--iteration", "2", "--db", str(finished)])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["ITERATION", "#", "QUERY"] and len(lines) == 5
    out = runner.invoke(main, ["trajectories", "job", "--failed", "--json", "--db",
                               str(finished)])
    assert out.exit_code == 0, out.output
    with open_runtime(finished) as rt:
        expected = msgspec.to_builtins(rt.trajectories("job", success=False))
    assert json.loads(out.stdout) == expected and expected
    missing = runner.invoke(main, ["trajectories", "nope", "--db", str(finished)])
    assert missing.exit_code == 1 and "nope" in missing.output
