"""Crash recovery for real: a runtime process is SIGKILLed at chosen moments and restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

from flowactors.events import JobCompleted, JobRecovered
from flowactors.store import EventStore

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tools" / "crash_child.py"
JOBS, ITERATIONS, INTERVAL = 3, 11, 4  # 11 is not a multiple of 4


def run_child(db: Path, faults: str | None = None, fault_file: Path | None = None):
    env = dict(os.environ)
    env.pop("FLOWACTORS_FAULTS", None)
    if faults:
        env["FLOWACTORS_FAULTS"] = faults
        env["FLOWACTORS_FAULT_FILE"] = str(fault_file)
    return subprocess.Popen([sys.executable, str(CHILD), str(db), str(JOBS), str(ITERATIONS),
                             str(INTERVAL)], env=env, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def final_digests(db: Path) -> dict[str, str]:
    with EventStore(db, mode="readonly") as store:
        return {r.stream: r.event.final_state_digest for r in store.read_all()
                if isinstance(r.event, JobCompleted)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    """The final state digests of an uninterrupted run."""
    db = tmp_path_factory.mktemp("reference") / "flow.db"
    child = run_child(db)
    assert child.wait(timeout=120) == 0, child.stderr.read().decode()
    digests = final_digests(db)
    assert len(digests) == JOBS
    return digests


@pytest.mark.parametrize("faults", [
    "actor.iteration@2",            # before the first checkpoint
    "actor.iteration@12",           # between checkpoints
    "actor.checkpoint@2",           # just before a checkpoint's append
    "store.commit_with_blobs@3",    # inside the transaction writing a checkpoint's blob
    "store.commit@8",               # inside a group commit
    "actor.started@2",              # during recovery itself (second kill)
])
@pytest.mark.timeout(180)
def test_sigkill_at_any_moment_resumes_to_identical_final_states(tmp_path, reference, faults):
    """Killed with SIGKILL at the fault point (then once more at random), the restarted
    runtime resumes every job; final state digests equal the uninterrupted run's; the log
    verifies, and no (stream, version) was written twice."""
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    plan = [faults]
    if faults == "actor.started@2":
        plan = ["actor.iteration@5", "actor.started@2"]
    for point in plan:
        child = run_child(db, point, fault_file)
        wait_until(lambda: point.split("@")[0] in fault_file.read_text() or child.poll() is not None,
                   timeout=60, message=f"the child to reach {point}")
        assert child.poll() is None, f"child exited early: {child.stderr.read().decode()}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        fault_file.write_text("")
    child = run_child(db)
    assert child.wait(timeout=120) == 0, child.stderr.read().decode()
    assert final_digests(db) == reference
    with EventStore(db, mode="readonly") as store:
        report = store.verify()
        recovered = [r for r in store.read_all() if isinstance(r.event, JobRecovered)]
    assert report.ok, report
    assert recovered, "the restart must have recovered at least one running job"


@pytest.mark.timeout(180)
def test_sigkill_while_creating_the_log_leaves_no_log_and_the_restart_creates_it(
        tmp_path, reference):
    """Killed between writing the schema and renaming it into place, the runtime leaves no
    file at the log's path (never an empty one, which every reader refuses); the restart
    creates the log and runs every job to the uninterrupted run's final states."""
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    child = run_child(db, "store.creating@1", fault_file)
    wait_until(lambda: "store.creating" in fault_file.read_text() or child.poll() is not None,
               timeout=60, message="the child to stage the log's schema")
    assert child.poll() is None, f"child exited early: {child.stderr.read().decode()}"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert not db.exists(), f"a killed creation left {db.stat().st_size} bytes at the log's path"
    child = run_child(db)
    assert child.wait(timeout=120) == 0, child.stderr.read().decode()
    assert final_digests(db) == reference
    assert not Path(f"{db}.creating").exists()
    with EventStore(db, mode="readonly") as store:
        assert store.verify().ok


SIGNAL_CHILD = """
import sys, flowactors as fa
spec = fa.JobSpec(agent_id="a", training_data=[fa.TrainingQuery(query="q")], task="simulated",
                  config=fa.GRPOConfig(n_iterations=100000, checkpoint_interval=5, eval_fraction=0),
                  task_options={"rollout_seconds": 0.002})
with fa.Runtime(sys.argv[1]) as rt:
    rt.submit(spec, job_id="job")
    print("submitted", flush=True)
    rt.wait("job", timeout=600)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_close_cleanly_without_writing_job_events(tmp_path, signum):
    """A signal closes the runtime: the process exits promptly, the running job stays running
    in the log (no job event written by the close), and a reopen resumes it."""
    db = tmp_path / "flow.db"
    child = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, str(db)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    for line in child.stdout:  # log lines may come first
        if line.strip() == b"submitted":
            break

    def iterations() -> int:
        with EventStore(db, mode="readonly") as store:
            return sum(r.type == "job.iteration_completed" for r in store.read_stream("job"))

    wait_until(lambda: iterations() >= 3, timeout=30, message="a few iterations")
    child.send_signal(signum)
    assert child.wait(timeout=10) != 0
    assert b"Traceback" not in child.stderr.read() or signum == signal.SIGINT
    with EventStore(db, mode="readonly") as store:
        last = list(store.read_stream("job"))[-1]
        assert store.verify().ok
    assert last.type in ("job.iteration_completed", "job.checkpoint_saved",
                         "job.checkpoints_pruned")
    import flowactors as fa

    with fa.Runtime(db, synchronous="off", handle_signals=False) as rt:
        assert rt.status("job").status is fa.JobStatus.RUNNING
        wait_until(lambda: rt.status("job").attempts == 1, timeout=10, message="recovery")
        rt.cancel("job")
