"""Forks: a new job from a checkpoint, lineage in both streams, the checkpoint shared (not
copied), bit-identical with no change, surviving SIGKILL; and the `fork` command."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import msgspec
import pytest
from click.testing import CliRunner
from helpers import open_runtime, sim_spec, wait_until

import flowactors as fa
from flowactors import lineage
from flowactors.control import ForkRequest
from flowactors.cli import main
from flowactors.events import ForkCreated, JobForked
from flowactors.job import initial_state
from flowactors.replay import job_state
from flowactors.store import EventStore


@pytest.fixture
def parent_log(tmp_path):
    """A log with a completed 8-iteration job, checkpoints at 2, 4, 6, 8 (all kept)."""
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec(n_iterations=8, keep_checkpoints=5), job_id="parent")
        rt.wait("parent", timeout=30)
    return path


def blob_rows(path, digest: str) -> tuple[int, set[str]]:
    """(copies of the blob, streams that reference it)."""
    conn = sqlite3.connect(path)
    try:
        copies = conn.execute("SELECT count(*) FROM blobs WHERE digest = ?", (digest,)).fetchone()
        streams = {s for (s,) in conn.execute(
            "SELECT stream FROM blob_refs WHERE digest = ? AND op = 'ref'", (digest,))}
    finally:
        conn.close()
    return copies[0], streams


def test_a_fork_with_no_change_trains_to_the_parents_final_state(parent_log):
    """Forked at checkpoint 4 with the same settings, the child trains iterations 5 to 8 to a
    final state bit-identical to the parent's; lineage is in both views and both streams."""
    with open_runtime(parent_log) as rt:
        child = rt.fork("parent", at_iteration=4)
        view = rt.wait(child, timeout=30)
        parent = rt.status("parent")
        ref = next(c.state_ref for c in rt.checkpoints("parent") if c.iteration == 4)
        assert view.status is fa.JobStatus.COMPLETED
        assert rt._states[child].final_state_digest == rt._states["parent"].final_state_digest
        assert view.forked_from == fa.ForkOrigin(parent_id="parent", at_iteration=4,
                                                 state_ref=ref)
        assert parent.forks == [fa.ForkNote(child_id=child, at_iteration=4)]
        child_events = [r.event for r in rt.history(child)]
        parent_events = [r.event for r in rt.history("parent")]
        iterations = [t.iteration for t in rt.trajectories(child)]
    assert isinstance(child_events[1], JobForked) and child_events[1].state_ref == ref
    assert isinstance(parent_events[-1], ForkCreated) and parent_events[-1].child_id == child
    assert sorted(set(iterations)) == [5, 6, 7, 8]
    assert blob_rows(parent_log, ref) == (1, {"parent", child})  # shared, not copied
    with EventStore(parent_log, mode="readonly") as store:
        assert store.verify().ok


def test_a_fork_with_a_changed_setting_trains_differently_from_the_same_start(parent_log):
    """A changed learning rate is the child's own spec; it starts from the checkpoint's
    iteration and metrics, and ends elsewhere than the parent."""
    with open_runtime(parent_log) as rt:
        config = msgspec.structs.replace(rt._states["parent"].spec.config, learning_rate=0.5)
        child = rt.fork("parent", at_iteration=2, config=config, job_id="child")
        view = rt.wait(child, timeout=30)
        assert rt._states[child].spec.config.learning_rate == 0.5
        assert rt._states[child].final_state_digest != rt._states["parent"].final_state_digest
        events = list(rt.history(child))
        again = rt.fork("parent", at_iteration=2, config=config, job_id="child")  # idempotent
        assert again == "child" and len(list(rt.history(child))) == len(events)
    assert view.progress.current_iteration == 8
    assert [r.type for r in events][:3] == ["job.submitted", "job.forked", "job.started"]


def test_a_bad_fork_raises_and_writes_nothing(parent_log, tmp_path):
    """No such checkpoint, a pruned one, nothing left to train, invalid settings or a taken
    id: a typed error naming it, and the log is unchanged."""
    with open_runtime(parent_log) as rt:
        head = rt.store.head()
        config = rt._states["parent"].spec.config
        with pytest.raises(fa.CheckpointNotFound, match="no checkpoint at iteration 3"):
            rt.fork("parent", at_iteration=3)
        with pytest.raises(fa.SpecError, match="n_iterations"):
            rt.fork("parent", at_iteration=8)
        with pytest.raises(fa.SpecError, match="learning_rate"):
            rt.fork("parent", at_iteration=2, config={**msgspec.to_builtins(config),
                                                      "learning_rate": -1})
        with pytest.raises(fa.SpecError, match="already exists"):
            rt.fork("parent", at_iteration=2, job_id="parent")
        with pytest.raises(fa.JobNotFound):
            rt.fork("nope", at_iteration=2)
        assert rt.store.head() == head
    path = tmp_path / "pruned.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec(n_iterations=8, keep_checkpoints=1), job_id="p")
        rt.wait("p", timeout=30)
        pruned = next(c.iteration for c in rt.checkpoints("p") if c.pruned)
        with pytest.raises(fa.CheckpointNotFound, match="pruned"):
            rt.fork("p", at_iteration=pruned)


def test_forking_a_running_job_notes_it_through_the_job_which_trains_on(tmp_path):
    """A running parent records the fork's note at an iteration boundary and completes; both
    streams reference the shared checkpoint state (so pruning it in one keeps it for the
    other)."""
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec(n_iterations=12, keep_checkpoints=10,
                           task_options={"rollout_seconds": 0.05}), job_id="parent")
        wait_until(lambda: rt.checkpoints("parent"), timeout=30, message="a checkpoint")
        assert rt.status("parent").status is fa.JobStatus.RUNNING
        child = rt.fork("parent", at_iteration=2)
        assert rt.status("parent").forks == [fa.ForkNote(child_id=child, at_iteration=2)]
        parent = rt.wait("parent", timeout=60)
        view = rt.wait(child, timeout=60)
        assert (parent.status, view.status) == (fa.JobStatus.COMPLETED, fa.JobStatus.COMPLETED)
        assert rt._states[child].final_state_digest == rt._states["parent"].final_state_digest
        ref = rt.status(child).forked_from.state_ref
    assert blob_rows(path, ref) == (1, {"parent", child})


def test_a_crash_between_the_two_appends_is_repaired_on_open(parent_log):
    """The child's record is the authority: a parent that lacks the note gets it when a
    runtime opens the log."""
    with EventStore(parent_log, mode="owner") as store:
        parent = job_state(store, "parent")
        events = lineage.plan(parent, initial_state("orphan"), parent.spec, 4)
        store.append("orphan", events, 0, blobs=[store.get_blob(events[1].state_ref)])
    with open_runtime(parent_log) as rt:
        assert rt.status("parent").forks == [fa.ForkNote(child_id="orphan", at_iteration=4)]
        assert rt.wait("orphan", timeout=30).status is fa.JobStatus.COMPLETED


CHILD = textwrap.dedent("""
    import sys, flowactors as fa
    rt = fa.Runtime(sys.argv[1], synchronous="off", handle_signals=False)
    if "--fork" in sys.argv:
        rt.fork("parent", at_iteration=2, job_id="kid", task_options={"rollout_seconds": 0.05})
    print("forked", flush=True)
    rt.wait("kid", timeout=120)
    rt.close()
""")


@pytest.mark.timeout(120)
def test_a_fork_survives_sigkill_and_still_ends_bit_identical(parent_log):
    """A process that forked and was SIGKILLed mid-training: reopened, the child resumes from
    its own last checkpoint (or the fork point) and ends at the parent's final state."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(parent_log), "--fork"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "forked"

        def kid_iterated() -> bool:
            with EventStore(parent_log, mode="readonly") as store:
                return any(r.type == "job.iteration_completed" and r.event.iteration >= 5
                           for r in store.read_stream("kid"))
        wait_until(kid_iterated, timeout=60, message="the fork to train past checkpoint 4")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    again = subprocess.run([sys.executable, "-c", CHILD, str(parent_log)], timeout=120,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    with open_runtime(parent_log) as rt:
        assert rt.status("kid").status is fa.JobStatus.COMPLETED
        assert rt.status("kid").attempts == 1
        assert rt._states["kid"].final_state_digest == rt._states["parent"].final_state_digest
    with EventStore(parent_log, mode="readonly") as store:
        assert store.verify().ok


def test_the_fork_command_queues_a_child_with_changed_settings(parent_log):
    """`flowactors fork JOB --at N --set FIELD=VALUE` records a queued child (printing its
    id) that a runtime then trains; a bad field is a one-line error; on a log a runtime owns,
    that runtime forks (the request goes through its inbox)."""
    runner = CliRunner()
    bad = runner.invoke(main, ["fork", "parent", "--at", "2", "--set", "bogus=1",
                               "--db", str(parent_log)])
    assert bad.exit_code == 1 and "bogus" in bad.output
    made = runner.invoke(main, ["fork", "parent", "--at", "2", "--set", "learning_rate=0.3",
                                "--id", "kid", "--db", str(parent_log)])
    assert made.exit_code == 0, made.output
    assert made.stdout.strip() == "kid"
    shown = runner.invoke(main, ["status", "kid", "--db", str(parent_log)])
    assert "forked from job parent at checkpoint 2" in shown.stdout
    with open_runtime(parent_log) as rt:
        assert rt._states["kid"].spec.config.learning_rate == 0.3
        assert rt.wait("kid", timeout=30).status is fa.JobStatus.COMPLETED
        owned = runner.invoke(main, ["fork", "parent", "--at", "4", "--db", str(parent_log)])
        assert owned.exit_code == 0, owned.output
        other = owned.stdout.splitlines()[-1]  # (the runtime's own log lines may come first)
        assert rt.status(other).forked_from.at_iteration == 4
    history = runner.invoke(main, ["history", "parent", "--db", str(parent_log)])
    assert "job kid forked from checkpoint 2" in history.stdout


def test_a_fork_recovers_to_its_fork_point_before_its_own_first_checkpoint():
    """Given a fork that ran one iteration past its fork point, a recovery rewinds to the
    fork's checkpoint (not to the start): the resume point is the parent's shared state."""
    from flowactors import testing
    from flowactors.events import IterationCompleted, JobStarted, JobSubmitted
    from flowactors.job import Recover
    forked = JobForked(parent_id="p", at_iteration=4, state_ref="ab" * 32, validation_score=0.5,
                       metrics={"avg_reward": 0.25}, policy_digest="0" * 64,
                       optimizer_digest="0" * 64, rng_digest="0" * 64)
    state = testing.given(JobSubmitted(spec=sim_spec(n_iterations=8)), forked, JobStarted(),
                          IterationCompleted(iteration=5, avg_reward=0.9, std_reward=0.0,
                                             loss=0.0), job_id="kid")
    assert state.iteration == 5
    (recovered,) = testing.when(state, Recover(attempt=1))
    after = testing.then(state, [recovered])
    assert recovered.from_checkpoint == 4
    assert (after.iteration, after.metrics) == (4, {"avg_reward": 0.25})
    assert after.resume_point.state_ref == "ab" * 32
    assert after.forked_from.parent_id == "p"


OWNER = textwrap.dedent("""
    import sys, msgspec, flowactors as fa
    rt = fa.Runtime(sys.argv[1], synchronous="off", handle_signals=False)
    rt.submit(msgspec.json.decode(sys.argv[2], type=fa.JobSpec), job_id="parent")
    print("submitted", flush=True)
    sys.stdin.readline()  # the test says when to stop
    rt.close()
""")


def requests_in(path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_the_fork_command_forks_through_the_inbox_of_a_runtime_in_another_process(tmp_path):
    """While a runtime in another process owns the log and trains the parent, `flowactors
    fork` leaves a request that runtime decides: the child (its id printed) is recorded with
    lineage in both streams and, with no change, trains to the parent's final state. A bad
    --set is a one-line error that writes no request; a fork at an iteration with no
    checkpoint is rejected by the owner, a one-line error with exit 1."""
    path = tmp_path / "flow.db"
    spec = sim_spec(n_iterations=8, keep_checkpoints=5, task_options={"rollout_seconds": 0.2})
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(path),
                              msgspec.json.encode(spec).decode()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "submitted"

        def checkpoint_2() -> bool:
            with EventStore(path, mode="readonly") as store:
                return any(c.info.iteration == 2 for c in job_state(store, "parent").checkpoints)
        wait_until(checkpoint_2, timeout=60, message="the parent's checkpoint 2")
        runner = CliRunner()
        bad = runner.invoke(main, ["fork", "parent", "--at", "2", "--set",
                                   "learning_rate=-1", "--db", str(path)])
        assert bad.exit_code == 1 and len(bad.stderr.splitlines()) == 1, bad.output
        assert bad.stderr.startswith("error: ") and "learning_rate" in bad.stderr
        assert requests_in(path) == 0
        made = runner.invoke(main, ["fork", "parent", "--at", "2", "--db", str(path)])
        assert made.exit_code == 0, made.output
        child = made.stdout.strip()
        assert len(child) == 32 and requests_in(path) == 1
        rejected = runner.invoke(main, ["fork", "parent", "--at", "3", "--db", str(path)])
        assert rejected.exit_code == 1 and rejected.stdout == ""
        assert rejected.stderr.splitlines() == [
            "error: fork rejected: job 'parent' has no checkpoint at iteration 3 (live "
            "checkpoints: " + rejected.stderr.split("live checkpoints: ")[1].strip()]

        def both_completed() -> bool:
            with EventStore(path, mode="readonly") as store:
                return all(job_state(store, j).status is fa.JobStatus.COMPLETED
                           for j in ("parent", child))
        wait_until(both_completed, timeout=90, message="the parent and the fork to complete")
        owner.stdin.write("stop\n")
        owner.stdin.flush()
        assert owner.wait(timeout=30) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=10)
    with EventStore(path, mode="readonly") as store:
        parent, kid = job_state(store, "parent"), job_state(store, child)
        answers = [store.answer_of(i) for i in (1, 2)]
        assert store.verify().ok
    assert kid.forked_from.parent_id == "parent" and kid.forked_from.at_iteration == 2
    assert [(f.child_id, f.at_iteration) for f in parent.forks] == [(child, 2)]
    assert kid.final_state_digest == parent.final_state_digest is not None
    assert [(a.outcome, a.reason[:30]) for a in answers] == [
        ("applied", ""), ("rejected", "job 'parent' has no checkpoint")]


OLD_TRIGGER = """CREATE TRIGGER requests_check_command BEFORE INSERT ON requests
       WHEN NEW.command NOT IN ('pause', 'resume', 'cancel')
       BEGIN SELECT RAISE(ABORT, 'flowactors: requests.command is pause, resume or cancel'); END"""


def with_the_old_inbox(path) -> None:
    """Turn the log's inbox back into what logs made before forks went through it have."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER requests_check_command")
        conn.execute(OLD_TRIGGER)
        conn.execute("ALTER TABLE requests DROP COLUMN args")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def inbox_schema(path) -> tuple[list[str], str, list[str]]:
    """(the requests table's columns, its command trigger, the meta keys)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
        (trigger,) = conn.execute("SELECT sql FROM sqlite_master WHERE "
                                  "name = 'requests_check_command'").fetchone()
        keys = [k for (k,) in conn.execute("SELECT key FROM meta ORDER BY key")]
    finally:
        conn.close()
    return columns, trigger, keys


def test_an_old_logs_owner_migrates_its_inbox_to_take_forks(parent_log):
    """A log whose inbox predates forks still opens: readers leave it as it is, a fork request
    to it is refused before anything is written; the first runtime to own it adds the column
    and the trigger (recorded in meta), answers the pause request left before, and forks."""
    with_the_old_inbox(parent_log)
    with EventStore(parent_log, mode="requester") as requester:
        paused = requester.request("parent", "pause")
        with pytest.raises(fa.StoreUnavailable, match="does not take fork requests"):
            requester.request("parent", "fork", ForkRequest(at_iteration=2, job_id="kid"))
    old = inbox_schema(parent_log)
    assert "args" not in old[0] and "'fork'" not in old[1]
    assert CliRunner().invoke(main, ["status", "--db", str(parent_log)]).exit_code == 0
    assert inbox_schema(parent_log) == old and requests_in(parent_log) == 1
    with open_runtime(parent_log) as rt:
        columns, trigger, keys = inbox_schema(parent_log)
        assert "args" in columns and "'fork'" in trigger and "inbox_fork_added_at" in keys
        wait_until(lambda: rt.store.answer_of(paused), timeout=30, message="the old request")
        made = CliRunner().invoke(main, ["fork", "parent", "--at", "2", "--id", "kid",
                                         "--db", str(parent_log)])
        assert made.exit_code == 0, made.output
        assert rt.wait("kid", timeout=30).forked_from.at_iteration == 2
    assert inbox_schema(parent_log) == (columns, trigger, keys)  # once


def test_the_owner_rejects_a_fork_request_it_cannot_read_with_the_reason(parent_log):
    """A fork request whose stored arguments are not a ForkRequest (a foreign writer's), or
    that names no job, is answered `rejected` with the reason; nothing is written."""
    with open_runtime(parent_log) as rt:
        head = rt.store.head()
        conn = sqlite3.connect(parent_log, isolation_level=None)
        try:
            garbage = conn.execute(
                "INSERT INTO requests (job_id, command, requested_at, args) VALUES "
                "('parent', 'fork', '2026-01-01T00:00:00+00:00', ?)",
                (msgspec.msgpack.encode({"at_iteration": 0, "job_id": "kid"}),)).lastrowid
        finally:
            conn.close()
        with EventStore(parent_log, mode="requester") as requester:
            nobody = requester.request("nobody", "fork",
                                       ForkRequest(at_iteration=2, job_id="kid"))
        answers = [wait_until(lambda i=i: rt.store.answer_of(i), timeout=30,
                              message=f"an answer to request {i}") for i in (garbage, nobody)]
        assert rt.store.head() == head
    assert [a.outcome for a in answers] == ["rejected", "rejected"]
    assert "invalid fork request" in answers[0].reason and "at_iteration" in answers[0].reason
    assert "'nobody' not found" in answers[1].reason
