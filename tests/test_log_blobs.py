"""States kept in the log: which blob rows are live is derived from the jobs' folded states
(no second bookkeeping table); released rows are deleted, a crash's leftovers swept on open,
a missing needed one refused (`flowactors.checkpointing.StateStore`)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import TOOLS, QUERIES, open_runtime, run_twin_jobs, wait_until

import flowactors as fa
from flowactors import lineage, trajectories
from flowactors.checkpointing import open_state_store
from flowactors.cli import main
from flowactors.errors import LogCorrupted
from flowactors.events import CheckpointsPruned, ForkCreated, IterationCompleted
from flowactors.job import initial_state
from flowactors.liveness import live_states, pruned_states
from flowactors.replay import replay
from flowactors.store import EventStore

sys.path.insert(0, str(TOOLS))  # bulky_task: a task with a state of any size
SMALL = 1000  # kept in the log


def small_spec(**config) -> fa.JobSpec:
    defaults = dict(n_iterations=4, batch_size=2, n_trajectories_per_query=2,
                    checkpoint_interval=1, seed=3, record_trajectories=False)
    return fa.JobSpec(agent_id="a", training_data=QUERIES, task="bulky_task:Bulky",
                      task_options={"state_bytes": SMALL},
                      config=fa.GRPOConfig(**{**defaults, **config}))


def digests_in(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {d for d, in conn.execute("SELECT digest FROM blobs")}
    finally:
        conn.close()


def states_of(db: Path) -> dict[str, fa.JobState]:
    with EventStore(db, mode="readonly") as store:
        return replay(store.read_all())


def delete_blob_row(db: Path, digest: str) -> None:
    """Delete a blob row behind the runtime's back, as a foreign connection would."""
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
    conn.commit()
    conn.close()


def test_pruned_states_leave_the_log_and_equal_states_of_another_job_stay(tmp_path):
    """Job B (run first) and job A train identical states, all kept in the log; A keeps one
    checkpoint and prunes the rest: the rows B still needs stay, the others go, and what is
    left is exactly what the folded states name."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        a, b = run_twin_jobs(rt, small_spec)
    states = states_of(db)
    pruned = pruned_states([states[a]])
    needed_by_b = live_states([states[b]])
    assert pruned & needed_by_b, "B must need a state A pruned"
    assert pruned - needed_by_b, "A must have pruned a state only it had"
    in_log = digests_in(db)
    assert in_log == live_states(states.values())
    assert not (pruned - needed_by_b) & in_log
    assert CliRunner().invoke(main, ["verify", "--db", str(db)]).exit_code == 0


def test_a_fork_keeps_the_checkpoint_it_starts_from_when_its_parent_lets_it_go(tmp_path):
    """A child forked from a checkpoint its parent then prunes keeps that state: the
    parent's release leaves the row while the child needs it, and deletes it once nothing
    does; the child trains from it."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        rt.wait(rt.submit(small_spec(n_iterations=4, keep_checkpoints=5), job_id="parent"),
                timeout=60)
    with EventStore(db) as store:
        parent = replay(store.read_all())["parent"]
        ref = next(c.info.state_ref for c in parent.checkpoints if c.info.iteration == 2)
        events = lineage.plan(parent, initial_state("child"), parent.spec, 2)
        store.append("child", events, 0, blobs=[store.get_blob(ref)])
        store.append("parent", [CheckpointsPruned(iterations=[2], released=[ref])],
                     parent.version)
        states = replay(store.read_all())
        assert ref in pruned_states([states["parent"]])
        state_store = open_state_store(store, db, None, lambda: states.values())
        state_store.release([ref], states["parent"])
        store.append("parent", [ForkCreated(child_id="child", at_iteration=2)],
                     states["parent"].version)  # a commit after the release's deletion
        assert store.has_blob(ref), "the child still needs it"
    with open_runtime(db) as rt:  # nor does the open sweep it: the child trains from it
        assert rt.wait("child", timeout=60).status is fa.JobStatus.COMPLETED
        unforked = {j: s for j, s in rt._states.items() if j != "child"}
        rt.state_store.jobs = lambda: unforked.values()  # as if the child were not there
        rt.state_store.release([ref], rt._states["parent"])
    assert ref not in digests_in(db)


@pytest.mark.timeout(120)
def test_a_sigkill_between_the_prune_and_the_delete_leaves_a_row_the_next_open_sweeps(
        tmp_path):
    """Killed once a pruning event is durable but before its rows are deleted, the log keeps
    a row no job needs; the next open deletes it, and the log verifies."""
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    child_args = [sys.executable, str(TOOLS / "crash_child.py"), str(db), "1", "8", "1"]
    env = {**os.environ, "FLOWACTORS_FAULTS": "checkpoint.releasing@1",
           "FLOWACTORS_FAULT_FILE": str(fault_file)}
    child = subprocess.Popen(child_args, env=env, stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    wait_until(lambda: "checkpoint.releasing" in fault_file.read_text()
               or child.poll() is not None, timeout=60, message="the fault point")
    assert child.poll() is None, child.stderr.read().decode()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    states = states_of(db)
    orphans = (pruned_states(states.values()) - live_states(states.values())) & digests_in(db)
    assert orphans, "the pruned checkpoint's row is still in the log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWACTORS_FAULT")}
    child = subprocess.Popen(child_args, env=env, stdin=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    assert child.wait(timeout=60) == 0, child.stderr.read().decode()
    assert not orphans & digests_in(db)
    assert digests_in(db) == live_states(states_of(db).values())
    assert CliRunner().invoke(main, ["verify", "--db", str(db)]).exit_code == 0


def test_a_deleted_live_state_fails_verify_and_open_naming_what_needs_it(tmp_path):
    """A row some job needs, deleted behind the runtime's back: `flowactors verify` fails
    naming the checkpoint and the state, and an open refuses the log."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        job = rt.submit(small_spec(n_iterations=2, keep_checkpoints=5), job_id="j")
        rt.wait(job, timeout=60)
        ref = next(c.info.state_ref for c in rt._states[job].checkpoints
                   if c.info.iteration == 1)
    delete_blob_row(db, ref)
    result = CliRunner().invoke(main, ["verify", "--db", str(db)])
    assert result.exit_code == 1
    assert f"checkpoint at iteration 1 of job 'j': state {ref} is missing" in result.output
    with pytest.raises(LogCorrupted, match=f"state {ref} is missing"):
        open_runtime(db)


def test_a_missing_trajectories_blob_fails_verify_naming_its_iteration(tmp_path,
                                                                      monkeypatch):
    """Recorded trajectories too large for their event are a blob no event releases: it
    stays after pruning, and one deleted behind the runtime's back fails verify."""
    monkeypatch.setattr(trajectories, "INLINE_MAX_BYTES", 0)  # every iteration's: a blob
    db = tmp_path / "flow.db"
    spec = small_spec(n_iterations=3, keep_checkpoints=1, record_trajectories=True)
    with open_runtime(db) as rt:
        rt.wait(rt.submit(spec, job_id="t"), timeout=60)
    with EventStore(db, mode="readonly") as store:
        refs = [(r.event.iteration, r.event.trajectories_ref) for r in store.read_all()
                if isinstance(r.event, IterationCompleted)
                and r.event.trajectories_ref is not None]
    if not refs:
        pytest.fail("the trajectories must be large enough for a blob")
    assert {ref for _, ref in refs} <= digests_in(db)
    iteration, ref = refs[0]
    delete_blob_row(db, ref)
    result = CliRunner().invoke(main, ["verify", "--db", str(db)])
    assert result.exit_code == 1
    assert f"trajectories of iteration {iteration} of job 't': blob {ref}" in result.output


# A format 1 log: what it had beyond the current schema.
V1_STATEMENTS = [
    "CREATE TABLE blob_refs (id INTEGER PRIMARY KEY, position INTEGER NOT NULL, "
    "stream TEXT NOT NULL, digest TEXT NOT NULL, op TEXT NOT NULL)",
    "CREATE INDEX blob_refs_digest ON blob_refs (digest, stream, op)",
    *(f"""CREATE TRIGGER blob_refs_no_{op.lower()} BEFORE {op} ON blob_refs
          BEGIN SELECT RAISE(ABORT, 'flowactors: blob_refs is append-only ({op} forbidden)');
          END""" for op in ("UPDATE", "DELETE")),
    """CREATE TRIGGER blobs_delete_only_unreferenced BEFORE DELETE ON blobs
       WHEN NOT EXISTS (SELECT 1 FROM blob_refs
                        WHERE digest = OLD.digest AND op = 'release')
         OR EXISTS (SELECT 1 FROM blob_refs AS r
                    WHERE r.digest = OLD.digest AND r.op = 'ref'
                      AND NOT EXISTS (SELECT 1 FROM blob_refs AS l
                                      WHERE l.digest = r.digest AND l.stream = r.stream
                                        AND l.op = 'release' AND l.id > r.id))
       BEGIN SELECT RAISE(ABORT,
         'flowactors: a blob is deleted only once released and referenced by no stream'); END""",
    "PRAGMA user_version = 1",
    "UPDATE meta SET value = '1' WHERE key = 'format_version'",
]


def make_format_1(db: Path) -> None:
    """Turn a closed log into the format 1 layout, with a ref for every live state."""
    states = states_of(db)
    conn = sqlite3.connect(db, isolation_level=None)
    for sql in V1_STATEMENTS:
        conn.execute(sql)
    for job_id, state in states.items():
        conn.executemany("INSERT INTO blob_refs (position, stream, digest, op) "
                         "VALUES (0, ?, ?, 'ref')",
                         [(job_id, d) for d in live_states([state])])
    conn.close()


def test_a_format_1_log_opens_replays_verifies_and_prunes(tmp_path):
    """A log of the old format (with `blob_refs`) verifies and replays read-only; an owner's
    open migrates it (the delete trigger goes, the table stays inert), its jobs go on and
    prune, and the log verifies."""
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        rt.submit(small_spec(n_iterations=2, keep_checkpoints=5), job_id="old")
        rt.wait("old", timeout=60)
    make_format_1(db)
    assert CliRunner().invoke(main, ["verify", "--db", str(db)]).exit_code == 0
    assert states_of(db)["old"].status is fa.JobStatus.COMPLETED
    with open_runtime(db) as rt:
        rt.wait(rt.submit(small_spec(n_iterations=5, keep_checkpoints=1, seed=9),
                          job_id="new"), timeout=60)
    conn = sqlite3.connect(db)
    names = {n for n, in conn.execute("SELECT name FROM sqlite_master")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):  # inert, still kept
        conn.execute("DELETE FROM blob_refs")
    conn.close()
    assert version == 2 and "blob_refs" in names
    assert "blobs_delete_only_unreferenced" not in names
    states = states_of(db)
    assert pruned_states([states["new"]]), "the new job must have pruned"
    assert digests_in(db) == live_states(states.values())
    result = CliRunner().invoke(main, ["verify", "--db", str(db)])
    assert result.exit_code == 0, result.output
