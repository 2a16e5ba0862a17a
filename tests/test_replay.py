"""flowactors.replay: replay, check, export and direct control on a log, with no actor."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import msgspec
import pytest
from helpers import open_runtime, sim_spec

import flowactors as fa
from flowactors import job as core
from flowactors import console
from flowactors import history
from flowactors import remote
from flowactors import replay as rp
from flowactors import testing
from flowactors.events import (
    EVENT_TYPES,
    IterationCompleted,
    JobPaused,
    JobRecovered,
    JobStarted,
    JobSubmitted,
    event_tag,
)
from flowactors.job import RecordIteration, SavedState
from flowactors.store import EventStore, row_hash

HISTORIES = Path(__file__).parent / "histories"


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    """A real log with a completed, a failed and a budget-stopped job, interleaved."""
    path = tmp_path_factory.mktemp("replay") / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec("a", n_iterations=4, keep_checkpoints=1), job_id="done")
        rt.submit(sim_spec("b", task_options={"fail_at_iteration": 3}), job_id="failed")
        rt.submit(sim_spec("c", n_iterations=10, max_budget_usd=3.5,
                           task_options={"cost_per_trajectory_usd": 0.25}), job_id="budget")
        for job_id in ("done", "failed", "budget"):
            rt.wait(job_id, timeout=30)
    return path


def unhashed(events):
    return [msgspec.structs.replace(r, hash="") for r in events]


def test_check_reproduces_every_recorded_digest_of_a_real_log(log):
    """check folds each stream with evolve and finds every recorded digest equal; its states
    are the states fold gives stream by stream."""
    with rp.open_log(log) as store:
        report = rp.check(store.read_all())
        for job_id in ("done", "failed", "budget"):
            assert report.states[job_id] == core.fold(store.read_stream(job_id))
        n_events = store.head()[0]
    assert report.ok and report.events == n_events
    assert report.digests_checked >= 6


def test_decided_digests_match_the_replay_when_several_events_precede_them():
    """A checkpoint after a budget threshold, and a completion on a checkpoint iteration, are
    decided after several pending events: their digests must still be those the replay
    computes (each pending event is folded at the version it will be recorded with)."""
    spec = sim_spec(n_iterations=4, checkpoint_interval=2, max_budget_usd=3.5)
    state = testing.given(JobSubmitted(spec=spec), JobStarted())
    decided = []
    for i in range(1, 5):
        saved = SavedState(state_ref=f"{i:064x}", validation_score=0.1 * i,
                           policy_digest="p", optimizer_digest="o", rng_digest="r")
        result = IterationCompleted(iteration=i, avg_reward=0.5, std_reward=0.1, loss=0.2,
                                    cost_usd=1.0)
        events = testing.when(state, RecordIteration(
            result=result, saved=saved if core.needs_saved_state(spec, i) else None))
        decided += events
        state = testing.then(state, events)
    types = [event_tag(type(e)) for e in decided]
    assert types[-4:] == ["job.budget_threshold_reached", "job.checkpoint_saved",
                          "job.checkpoints_pruned", "job.completed"] or \
        types[-3:] == ["job.budget_threshold_reached", "job.checkpoint_saved", "job.completed"]
    history = list(testing.recorded([JobSubmitted(spec=spec), JobStarted(), *decided]))
    report = rp.check(history)
    assert report.ok, report.mismatch
    assert report.digests_checked == 3


def test_read_events_stops_at_until_and_selects_one_job(log):
    """until is inclusive; job_id keeps only that stream; an unknown job is JobNotFound."""
    with rp.open_log(log) as store:
        everything = list(store.read_all())
        upto = list(rp.read_events(store, until=10))
        done = list(rp.read_events(store, job_id="done", until=10))
        # Where the budget job starts depends on how the jobs interleaved: stop at its third.
        until = [r.position for r in everything if r.stream == "budget"][2]
        state = rp.job_state(store, "budget", until=until)
        with pytest.raises(fa.JobNotFound, match="'nope'"):
            list(rp.read_events(store, job_id="nope"))
    assert [r.position for r in upto] == list(range(1, 11))
    assert done == [r for r in everything[:10] if r.stream == "done"]
    assert state.version == 3
    assert state == core.fold([r for r in everything[:until] if r.stream == "budget"])


def test_export_lines_read_back_as_the_recorded_events(log, tmp_path):
    """Every exported line parses (HistoryLine) back into the event the log holds."""
    with rp.open_log(log) as store:
        lines = list(history.export_lines(store))
        events = list(store.read_all())
        some = list(history.export_lines(store, job_id="failed", from_position=5))
    parsed = [testing.parse_history_line(line) for line in lines]
    assert unhashed(events) == parsed
    assert [testing.parse_history_line(line) for line in some] == \
        [e for e in parsed if e.stream == "failed" and e.position >= 5]


def test_export_keeps_the_schema_version_a_row_was_written_in(tmp_path):
    """A log written by an older flowactors (schema 1 iteration events) exports them as
    schema 1, unchanged; reading them gives today's events (upcast)."""
    db = testing.log_from_history(HISTORIES / "completed_v1.jsonl", tmp_path / "v1.db")
    with rp.open_log(db) as store:
        lines = [msgspec.json.decode(line) for line in history.export_lines(store)]
        decoded = list(store.read_all())
    originals = [msgspec.json.decode(line) for line in
                 (HISTORIES / "completed_v1.jsonl").read_bytes().splitlines()]
    assert [(ln["schema_version"], ln["data"]) for ln in lines] == \
        [(ln["schema_version"], ln["data"]) for ln in originals]
    iteration = next(r for r in decoded if r.type == "job.iteration_completed")
    assert iteration.schema_version == 1 and isinstance(iteration.event, IterationCompleted)
    again = testing.parse_history_line(history.history_line(iteration))
    assert again.schema_version == 2 and again.event == iteration.event


def test_a_replay_without_hashes_upcasts_old_events_as_a_full_read_does(tmp_path):
    """Without hashes the store reads no type for today's iteration events (a shortcut for
    the replay's most common row): rows of schema 1 must still be read as schema 1 and
    upcast, and every other row as with a full read."""
    db = testing.log_from_history(HISTORIES / "completed_v1.jsonl", tmp_path / "v1.db")
    with rp.open_log(db) as store:
        full = list(store.read_all())
        without = list(store.read_all(hashes=False))
    assert {r.schema_version for r in full if r.type == "job.iteration_completed"} == {1}
    assert [msgspec.structs.replace(r, hash="") for r in full] == without


def append_raw(db: Path, type_: str, data: bytes, stream: str = "completed") -> int:
    """Append a row as a foreign writer would (chained correctly); return its position."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        position, prev = conn.execute(
            "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1").fetchone()
        version = conn.execute("SELECT max(version) FROM events WHERE stream = ?",
                               (stream,)).fetchone()[0]
        at = "2026-01-01T00:00:00+00:00"
        hash_ = row_hash(prev, position + 1, stream, version + 1, type_, 1, at, data)
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (position + 1, stream, version + 1, type_, 1, at, data, hash_))
    finally:
        conn.close()
    return position + 1


def test_an_undecodable_row_is_named_by_position(tmp_path):
    """export and replay refuse a row of an unknown event type, naming its position."""
    db = testing.log_from_history(HISTORIES / "completed.jsonl", tmp_path / "flow.db")
    position = append_raw(db, "job.teleported", msgspec.msgpack.encode({"to": "mars"}))
    with rp.open_log(db) as store:
        read = []
        with pytest.raises(fa.LogCorrupted, match=f"position {position}: unknown event type"):
            read.extend(store.read_all())
        assert [r.position for r in read] == list(range(1, position))  # the rows before it
        with pytest.raises(fa.LogCorrupted, match=f"position {position}: unknown event type"):
            list(history.export_lines(store))
        with pytest.raises(fa.LogCorrupted, match=f"position {position}"):
            rp.check(store.read_all())
        report = rp.verify(store)
    assert not report.ok and report.first_bad_position == position


def test_every_event_type_has_a_summary_and_appears_in_the_histories():
    """The committed histories cover every event type; each has a one-line summary."""
    events = [r for path in HISTORIES.glob("*.jsonl") for r in testing.load_history(path)]
    assert {r.type for r in events} == {event_tag(cls) for cls in EVENT_TYPES}
    for recorded in events:
        text = console.summary(recorded.event)
        assert text and "\n" not in text


@pytest.fixture
def stopped_mid_run(tmp_path) -> Path:
    """A log whose runtime stopped while its job ran past its last checkpoint (close() writes
    no job events: the job stays running in the log, exactly as after a crash)."""
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec(n_iterations=50, checkpoint_interval=4,
                           task_options={"rollout_seconds": 0.01}), job_id="job")
        for recorded in rt.watch("job"):
            if recorded.type == "job.iteration_completed" and recorded.event.iteration == 6:
                break
    return path


def test_pausing_a_running_job_with_no_runtime_records_its_recovery_first(stopped_mid_run):
    """decide_directly pauses a running, ownerless job by recording the recovery a runtime
    would (back to the last checkpoint) and then the pause."""
    with EventStore(stopped_mid_run, mode="owner", synchronous="off") as store:
        before = rp.job_state(store, "job")
        state = remote.decide_directly(store, "job", "pause")
        added = list(store.read_stream("job", before.version + 1))
    assert before.status is fa.JobStatus.RUNNING and before.iteration > 4
    last = before.last_checkpoint.info.iteration
    assert [r.event for r in added] == [
        JobRecovered(from_checkpoint=last, attempt=1, cause="crash"),
        JobPaused(iteration=last, state_ref=None)]
    assert state.status is fa.JobStatus.PAUSED and state.iteration == last
    assert state.resume_point.iteration == last


def test_direct_decisions_follow_the_lifecycle_and_write_nothing_when_illegal(
        stopped_mid_run):
    """Resuming a running job is an InvalidTransition and adds no event; cancelling works."""
    with EventStore(stopped_mid_run, mode="owner", synchronous="off") as store:
        version = store.stream_version("job")
        with pytest.raises(fa.InvalidTransition, match="running"):
            remote.decide_directly(store, "job", "resume")
        assert store.stream_version("job") == version
        state = remote.decide_directly(store, "job", "cancel")
        assert state.status is fa.JobStatus.CANCELLED
        with pytest.raises(fa.JobNotFound):
            remote.decide_directly(store, "nope", "cancel")


def test_control_with_no_owner_decides_directly(stopped_mid_run, tmp_path):
    """control() on an ownerless log decides itself and reports it; the job must exist, and
    a missing log is not created."""
    outcome = remote.control(stopped_mid_run, "job", "pause")
    assert outcome.outcome == "applied" and outcome.decided_by == "direct"
    assert outcome.view.status is fa.JobStatus.PAUSED
    with pytest.raises(fa.JobNotFound):
        remote.control(stopped_mid_run, "nope", "pause")
    missing = tmp_path / "missing.db"
    with pytest.raises(fa.LogNotFound):
        remote.control(missing, "job", "pause")
    assert not missing.exists()


def test_replay_works_on_a_copy_of_a_log_left_with_its_wal(stopped_mid_run, tmp_path):
    """A copy of the log with its -wal (as left by a writer) replays like the original."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{stopped_mid_run}{suffix}")
        if source.exists():
            shutil.copy(source, copy / f"flow.db{suffix}")
    with rp.open_log(stopped_mid_run) as original, rp.open_log(copy / "flow.db") as copied:
        assert rp.replay(original.read_all()) == rp.replay(copied.read_all())
        assert rp.check(copied.read_all()).ok

