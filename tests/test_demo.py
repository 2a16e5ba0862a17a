"""`flowactors demo`: real learning, resumable after SIGKILL or Ctrl-C, never prompting."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import wait_until

import flowactors as fa

from flowactors.demo import (
    BASELINE_MAX,
    DEFAULT_ITERATIONS,
    DEFAULT_JOBS,
    LEARNED_MIN,
    Display,
    Row,
    baseline_score,
    demo,
    demo_specs,
    plan_run,
)
from flowactors.errors import FlowError, LogCorrupted
from flowactors.demo_plan import TORCH_TASK
from flowactors.events import (
    CheckpointSaved,
    IterationCompleted,
    JobCompleted,
    JobRecovered,
    JobSubmitted,
)
from flowactors.job import JobState, fold
from flowactors.store import EventStore
from flowactors.tasks.toolchoice import ToolChoiceTask
from flowactors.views import JobStatus

SMALL = ("--jobs", "2", "--iterations", "20", "--policy", "linear")
LINEAR = ("--policy", "linear")


def demo_command(*args: str | Path) -> list[str]:
    """The real command: the `flowactors` console script when installed, else the module."""
    script = shutil.which("flowactors", path=str(Path(sys.executable).parent))
    base = [script, "demo"] if script else [sys.executable, "-m", "flowactors.demo"]
    return [*base, *map(str, args)]


def run_demo(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWACTORS_FAULT")}
    return subprocess.run(demo_command(*args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=env)


def job_states(db: Path) -> dict[str, JobState]:
    """Every job of the log, folded, read-only."""
    with EventStore(db, mode="readonly") as store:
        events = list(store.read_all())
    return {stream: fold([r for r in events if r.stream == stream])
            for stream in dict.fromkeys(r.stream for r in events)}


def final_digests(db: Path) -> dict[str, str]:
    with EventStore(db, mode="readonly") as store:
        return {r.stream: r.event.final_state_digest for r in store.read_all()
                if isinstance(r.event, JobCompleted)}


def head(db: Path) -> tuple[int, str]:
    with EventStore(db, mode="readonly") as store:
        return store.head()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, str]:
    """Final state digests of an uninterrupted small demo run."""
    db = tmp_path_factory.mktemp("reference") / "flow.db"
    result = run_demo("--db", db, *SMALL)
    assert result.returncode == 0, result.stdout + result.stderr
    digests = final_digests(db)
    assert sorted(digests) == ["demo-0", "demo-1"]
    return digests


@pytest.mark.timeout(300)
def test_default_demo_trains_the_pytorch_policy_visibly_past_its_threshold(tmp_path):
    """With default settings (PyTorch installed) the demo trains the PyTorch policy, and
    every job's held-out success is <= 0.5 at its iteration-5 checkpoint and goes from <= 0.4
    (untrained) to >= 0.9 within the demo's iterations; the demo says so, and the log agrees;
    under 2 minutes."""
    pytest.importorskip("torch")
    db = tmp_path / "flow.db"
    started = time.monotonic()
    result = CliRunner().invoke(demo, ["--db", str(db)])
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert f"from <= {BASELINE_MAX} to >= {LEARNED_MIN} within {DEFAULT_ITERATIONS}" \
        in result.output
    assert "PASS" in result.output
    assert f"Reward of a trajectory: {ToolChoiceTask.reward_scale}." in result.output
    states = job_states(db)
    specs = demo_specs(task=TORCH_TASK)
    assert sorted(states) == sorted(specs) and len(specs) == DEFAULT_JOBS
    for job_id, state in states.items():
        assert state.spec == specs[job_id]
        assert state.status is JobStatus.COMPLETED and state.iteration == DEFAULT_ITERATIONS
        assert baseline_score(state.spec) <= BASELINE_MAX
        assert state.validation_score is not None and state.validation_score >= LEARNED_MIN
    with EventStore(db, mode="readonly") as store:
        at_5 = {r.stream: r.event.validation_score for r in store.read_all()
                if isinstance(r.event, CheckpointSaved) and r.event.iteration == 5}
    assert sorted(at_5) == sorted(specs) and all(s <= 0.5 for s in at_5.values()), at_5
    assert len({s.spec.config.learning_rate for s in states.values()}) == 2
    assert elapsed < 120, f"the default demo took {elapsed:.1f}s"


def test_without_pytorch_the_demo_says_so_and_policy_torch_creates_no_log(tmp_path,
                                                                           monkeypatch):
    """Where torch cannot be imported, `--policy torch` is a one-line error that leaves no file
    behind, and the default falls back to the linear policy, saying so on stderr."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    db = tmp_path / "flow.db"
    refused = CliRunner().invoke(demo, ["--db", str(db), "--policy", "torch"])
    assert refused.exit_code == 1 and "--policy torch needs PyTorch" in refused.stderr
    assert list(tmp_path.iterdir()) == []
    fallback = CliRunner().invoke(demo, ["--db", str(db), "--jobs", "1", "--iterations", "1"])
    assert "PyTorch is not installed: a fresh run trains the linear policy" in fallback.stderr
    assert [s.spec.task for s in job_states(db).values()] == ["toolchoice"]


@pytest.mark.timeout(300)
def test_sigkill_mid_run_then_rerun_resumes_from_checkpoints_to_identical_policies(
        tmp_path, reference):
    """The real command is SIGKILLed while its jobs run; run again, it says it resumes, every
    interrupted job continues from its last checkpoint (not from the start), the threshold is
    reached, and the final policies are bit-identical to an uninterrupted run's.

    The kill comes while the store's writer is frozen inside the third group commit that
    carries checkpoints, so the whole runtime stops at one moment: two such commits are
    durable (some job has a checkpoint) and no job can have completed (that takes four)."""
    db, fault_file = tmp_path / "flow.db", tmp_path / "faults"
    fault_file.touch()
    env = {**os.environ, "FLOWACTORS_FAULTS": "store.commit_with_blobs@3",
           "FLOWACTORS_FAULT_FILE": str(fault_file)}
    with open(tmp_path / "killed.out", "w") as out:
        child = subprocess.Popen(demo_command("--db", db, *SMALL), stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def interrupted() -> dict[str, JobState]:
            if child.poll() is not None or "store.commit" not in fault_file.read_text():
                return {}
            try:
                states = job_states(db)
            except FlowError:
                return {}
            return {j: s for j, s in states.items()
                    if not s.status.is_terminal and s.last_checkpoint is not None}

        wait_until(interrupted, timeout=60, message="a job with a checkpoint, mid-run")
        assert child.poll() is None, (tmp_path / "killed.out").read_text()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    at_kill = job_states(db)
    assert sorted(at_kill) == ["demo-0", "demo-1"]
    assert not any(s.status.is_terminal for s in at_kill.values())

    result = run_demo("--db", db, *SMALL)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Resuming {len(at_kill)} unfinished job" in " ".join(result.stdout.split())
    assert "PASS" in result.stdout and "Traceback" not in result.stderr
    with EventStore(db, mode="readonly") as store:
        assert store.verify().ok
        events = list(store.read_all())
    for job_id, state in at_kill.items():
        stream = [r.event for r in events if r.stream == job_id and r.position > state.position]
        recoveries = [e for e in stream if isinstance(e, JobRecovered)]
        expected = state.last_checkpoint.info.iteration if state.last_checkpoint else None
        assert [r.from_checkpoint for r in recoveries] == [expected], job_id
        first = next(e for e in stream if isinstance(e, IterationCompleted))
        assert first.iteration == (expected or 0) + 1, f"{job_id} re-ran from the start"
    assert any(s.last_checkpoint is not None for s in at_kill.values())
    assert final_digests(db) == reference
    for state in job_states(db).values():
        assert state.validation_score >= LEARNED_MIN


@pytest.mark.timeout(300)
def test_ctrl_c_stops_cleanly_with_code_130_and_the_next_run_resumes(tmp_path, reference):
    """SIGINT (Ctrl-C) mid-run: a clear message, exit code 130, no traceback, no job event
    written by the stop; the next run resumes the jobs and ends as an uninterrupted run."""
    db = tmp_path / "flow.db"
    child = subprocess.Popen(demo_command("--db", db, "--jobs", "2", "--iterations", "40", *LINEAR),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if "checkpoint saved" in line:
            child.send_signal(signal.SIGINT)
            break
    out, err = child.communicate(timeout=30)
    assert child.returncode == 130, out + err
    assert "Traceback" not in err
    assert "Interrupted" in out and "run the demo again" in out.lower()
    running = {j for j, s in job_states(db).items() if s.status is JobStatus.RUNNING}
    assert running, "the interrupt must have come while jobs ran"

    result = run_demo("--db", db, "--jobs", "2", "--iterations", "40", *LINEAR)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming" in result.stdout and "PASS" in result.stdout
    resumed = {j for j, s in job_states(db).items() if s.attempts == 1}
    assert resumed == running
    uninterrupted = tmp_path / "uninterrupted.db"
    assert run_demo("--db", uninterrupted, "--jobs", "2", "--iterations", "40",
                    *LINEAR).returncode == 0
    assert final_digests(db) == final_digests(uninterrupted)


@pytest.mark.timeout(120)
def test_sigterm_stops_the_demo_cleanly_with_code_143(tmp_path):
    """SIGTERM mid-run (what `kill` and service managers send): the runtime closes cleanly,
    the demo says so and exits 143 (128 + 15, the README's claim), with no traceback and the
    jobs left running in the log, to resume."""
    db = tmp_path / "flow.db"
    child = subprocess.Popen(demo_command("--db", db, "--jobs", "1", "--iterations", "40", *LINEAR),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for line in child.stdout:
        if "checkpoint saved" in line:
            child.send_signal(signal.SIGTERM)
            break
    out, err = child.communicate(timeout=30)
    assert child.returncode == 143 == 128 + signal.SIGTERM, out + err
    assert "Traceback" not in err and "Stopped" in out
    assert [s.status for s in job_states(db).values()] == [JobStatus.RUNNING]


def test_a_rerun_after_completion_starts_fresh_in_a_new_file_and_keeps_the_old_one(tmp_path):
    """Run twice to completion: the second run goes to flow-2.db (and says so), flow.db is
    untouched; a third goes to flow-3.db. No input is ever read."""
    db = tmp_path / "flow.db"
    args = ["--db", str(db), "--jobs", "1", "--iterations", "5", *LINEAR]
    first = CliRunner().invoke(demo, args, input=None)
    assert first.exit_code in (0, 1), first.output  # 5 iterations may fall short: not the point
    before = head(db)
    second = CliRunner().invoke(demo, args, input=None)
    said = " ".join(second.output.split())
    assert "starting a fresh run in " + str(tmp_path / "flow-2.db") in said
    assert head(db) == before
    assert final_digests(tmp_path / "flow-2.db") == final_digests(db)
    third = CliRunner().invoke(demo, args)
    assert str(tmp_path / "flow-3.db") in " ".join(third.output.split())
    assert (tmp_path / "flow-3.db").exists()


def submit_only(db: Path, job_ids: list[str], n_jobs: int = 2) -> None:
    """A log as a run killed right after submitting `job_ids` leaves it (all queued)."""
    specs = demo_specs(n_jobs, 20)
    with EventStore(db, mode="owner", synchronous="off") as store:
        for job_id in job_ids:
            store.append(job_id, [JobSubmitted(spec=specs[job_id])], 0)


def test_plan_resumes_an_unfinished_run_and_completes_its_submissions(tmp_path):
    """A run killed between its two submissions is resumed with both jobs, from the recorded
    spec (its 20 iterations, not the options of the rerun)."""
    db = tmp_path / "flow.db"
    submit_only(db, ["demo-0"])
    plan = plan_run(db, n_jobs=4, n_iterations=60)
    assert plan.resume and plan.path == db
    assert plan.specs == demo_specs(2, 20)
    assert "resuming 1 unfinished job" in plan.reason


def test_plan_fresh_flag_and_foreign_jobs_go_to_a_new_file(tmp_path):
    """--fresh never touches an unfinished log; a log of other jobs is left alone too."""
    db = tmp_path / "flow.db"
    assert plan_run(db).path == db  # nothing there yet
    submit_only(db, ["demo-0", "demo-1"])
    fresh = plan_run(db, fresh=True)
    assert not fresh.resume and fresh.path == tmp_path / "flow-2.db"
    other = tmp_path / "mine.db"
    with EventStore(other, mode="owner", synchronous="off") as store:
        store.append("my-job", [JobSubmitted(spec=demo_specs(1, 5)["demo-0"])], 0)
    assert plan_run(other).path == tmp_path / "mine-2.db"


def test_a_foreign_file_is_a_one_line_error_and_stays_untouched(tmp_path):
    """A file that is not a flowactors log: one line naming it, exit 1, the file unchanged."""
    db = tmp_path / "flow.db"
    db.write_bytes(b"not a database at all" * 10)
    with pytest.raises(LogCorrupted):
        plan_run(db)
    result = CliRunner().invoke(demo, ["--db", str(db)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "error:" in result.output
    assert str(db) in result.output
    assert db.read_bytes() == b"not a database at all" * 10


def test_live_display_redraws_in_place_and_plain_display_prints_checkpoints():
    """On a terminal the lines are redrawn with cursor-up; elsewhere one line per event."""
    row = Row(job_id="demo-0", seed=0, lr=0.05, status=JobStatus.RUNNING, iteration=7,
              total=20, reward=0.5, success=0.4, held_out=0.9, held_out_at=5, best=5,
              resumed_from=5)
    live = io.StringIO()
    display = Display(live, live=True)
    display.start([row], {})
    display.update([row], {})
    display.update([row], {})
    display.finish()
    text = live.getvalue()
    assert text.count("\x1b[1F") == 1 and text.count("\x1b[2K") == 2
    assert "7/20" in text and "0.90 @5" in text and "resumed from 5" in text
    plain = io.StringIO()
    display = Display(plain, live=False)
    display.start([row], {"demo-0": 5})
    display.update([row], {})
    assert plain.getvalue() == "demo-0  running: resumed from checkpoint 5\n"
    assert "\x1b" not in plain.getvalue()


README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of one README section."""
    text = README.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_readme_task_example_registers_learns_and_is_deterministic(tmp_path, monkeypatch):
    """The guide's minimal task, registered as "module:attr", runs to completion as the README
    says, and two runs of its spec end with the same final state."""
    task_code, usage = python_blocks("Writing a task")[:2]  # then the PyTorch example
    (tmp_path / "coin.py").write_text(task_code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    digests = []
    for run in ("first", "second"):
        db = tmp_path / f"{run}.db"
        code = usage.replace('"coin.db"', repr(str(db)))
        with redirect_stdout(io.StringIO()) as printed:
            exec(compile(code, "README.md", "exec"), {"fa": fa})
        assert "JobStatus.COMPLETED 1.0" in printed.getvalue().splitlines()  # as documented
        digests.append(final_digests(db)["coin"])
    assert digests[0] == digests[1]
