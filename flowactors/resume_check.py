"""Prove that a task resumes exactly: one run uninterrupted, one SIGKILLed N times, compared.

Both runs train the same spec in child processes (`python -m flowactors.resume_check DB SPEC`),
each on its own log. The second child is SIGKILLed N times, each time at a
moment drawn at random: one of the runtime's fault points (an iteration computed but not yet
appended, a checkpoint's state encoded but not yet stored, a group commit about to be written or
written but not acknowledged, the recovery of the previous kill) on a random occurrence; the
child freezes there and is killed, then started again. Then it runs to the end. The two final trained states (the
blobs the completion events name) must be the same bytes. When they are not, the report names
the first differing part of the state (`$.optimizer.state.0.exp_avg`, `$.rng`, ...) and the first
iteration whose recorded results (reward, loss, metrics) differ between the runs: where they
parted.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from . import arrays, codec
from .errors import FlowError
from .events import CheckpointSaved, IterationCompleted, JobCompleted
from .job import fold
from .spec import GRPOConfig, JobSpec, TrainingQuery
from .store import EventStore
from .tasks import build_task, state_decoder

__all__ = ["ResumeReport", "check_resume", "default_spec", "first_difference"]

JOB_ID = "resume-check"
_POLL_SECONDS = 0.005
_KILL_POINTS = (
    "actor.iteration",  # an iteration computed, not yet appended
    "actor.checkpoint",  # a checkpoint's state encoded, not yet stored
    "store.commit",  # a group commit about to be written
    "store.committed",  # written, not yet acknowledged
    "store.commit_with_blobs",  # a checkpoint's commit, inside its transaction
    "runtime.recover",  # recovering from the previous kill
)


class ResumeReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `check_resume` found."""

    ok: bool
    """True when the interrupted run ended with the very bytes of the uninterrupted one."""
    kills: int
    """SIGKILLs that landed while the job was still training."""
    final_digest: str
    """Digest of the uninterrupted run's final state."""
    resumed_digest: str
    """Digest of the interrupted run's final state."""
    first_difference: str | None = None
    """The first part of the state that differs (`$.policy.embed`), None when equal."""
    parted_at_iteration: int | None = None
    """The first iteration whose recorded results (reward, loss, metrics) or stored state
    differ between the runs, None if none."""

    def __str__(self) -> str:
        if self.ok:
            return (f"resumes exactly: {self.kills} SIGKILL(s), final state {self.final_digest}"
                    f" in both runs")
        parted = ("the runs recorded the same results for every iteration"
                  if self.parted_at_iteration is None
                  else f"the runs parted at iteration {self.parted_at_iteration}")
        return (f"does NOT resume exactly: after {self.kills} SIGKILL(s) the final state "
                f"differs at `{self.first_difference}`; {parted}")


def default_spec(task: str, task_options: dict[str, Any] | None = None) -> JobSpec:
    """A small spec for a task: 8 queries with no expected outcome, 6 iterations, a checkpoint
    every 2."""
    return JobSpec(agent_id="resume-check", task=task, task_options=task_options or {},
                   training_data=[TrainingQuery(query=f"query {i}") for i in range(8)],
                   config=GRPOConfig(n_iterations=6, batch_size=4, n_trajectories_per_query=4,
                                     checkpoint_interval=2, seed=0))


def check_resume(spec: JobSpec, kills: int = 3, *, seed: int = 0,
                 workdir: str | Path | None = None, timeout: float = 600.0) -> ResumeReport:
    """Train `spec` once uninterrupted and once with `kills` SIGKILLs, and compare.

    Args:
        spec: the job to train (the children import its task from this process's `sys.path`).
        kills: how many times to SIGKILL the second run.
        seed: seeds the moments of the kills.
        workdir: where the two logs go (a temporary directory by default, then removed).
        timeout: bound of each child process, in seconds.

    Raises:
        SpecError: the spec's task cannot be built.
        RuntimeError: a run did not complete (its child's stderr is in the message).
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="flowactors-resume-") as tmp:
            return check_resume(spec, kills, seed=seed, workdir=tmp, timeout=timeout)
    build_task(spec)  # an unknown task or bad options: a SpecError now, not in a child
    work = Path(workdir)
    spec_file = work / "spec.json"
    spec_file.write_bytes(msgspec.json.encode(spec))
    straight, resumed = work / "uninterrupted.db", work / "killed.db"
    _run_child(straight, spec_file, timeout)
    n, interval = spec.config.n_iterations, spec.config.checkpoint_interval
    rng = random.Random(seed)
    landed = attempts = 0
    while landed < kills and attempts < 4 * kills + 4 and (done := _progress(resumed)) < n:
        attempts += 1
        point, most = rng.choice(_kill_points(done, n, interval, resumed.exists()))
        nth = rng.randint(1, most)
        if _run_child(resumed, spec_file, timeout, kill=f"{point}@{nth}") is None \
                and _progress(resumed) < n:
            landed += 1  # a kill after the job completed (while closing) proves nothing
    _run_child(resumed, spec_file, timeout)
    return compare(spec, straight, resumed, landed)


def _run_child(db: Path, spec_file: Path, timeout: float, *,
               kill: str | None = None) -> bool | None:
    """Run the child on `db`; with `kill` ("point@nth", a fault point of the runtime), SIGKILL
    it once it stands there. Returns None when it was killed, True when it trained to the end.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with tempfile.TemporaryDirectory(prefix="flowactors-kill-") as tmp:
        if kill is not None:
            announce = Path(tmp) / "faults"
            announce.touch()
            env.update(FLOWACTORS_FAULTS=kill, FLOWACTORS_FAULT_FILE=str(announce))
        child = subprocess.Popen([sys.executable, "-m", "flowactors.resume_check", str(db),
                                  str(spec_file)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + timeout
            while kill is not None and child.poll() is None and time.monotonic() < deadline:
                if announce.stat().st_size:  # frozen at the point: kill it there
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                    return None
                time.sleep(_POLL_SECONDS)
            _, err = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if child.returncode != 0:
        raise RuntimeError(f"the run on {db} failed (exit {child.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")
    return True


def _kill_points(done: int, n: int, interval: int, recovering: bool) -> list[tuple[str, int]]:
    """The points a run from iteration `done` will reach, each with how often it will."""
    saves = sum(1 for i in range(done + 1, n + 1) if i % interval == 0 or i == n)
    reached = {"actor.iteration": n - done - saves, "actor.checkpoint": saves,
               "store.commit": n - done - saves, "store.committed": n - done - saves,
               "store.commit_with_blobs": saves,
               "runtime.recover": int(recovering and done > 0)}
    return [(point, reached[point]) for point in _KILL_POINTS if reached[point] > 0]


def _progress(db: Path) -> int:
    """The job's completed iterations as its log says now (0 before it exists)."""
    try:
        with EventStore(db, mode="readonly") as store:
            events = list(store.read_stream(JOB_ID))
    except FlowError:  # not there yet, or its first transaction is still being written
        return 0
    return fold(events).iteration if events else 0


def _final(db: Path) -> tuple[bytes, dict[int, bytes]]:
    """The final state's bytes, and what each iteration recorded last (its results, and the
    digest of the state it stored, if it stored one)."""
    results: dict[int, bytes] = {}
    final: bytes | None = None
    with EventStore(db, mode="readonly") as store:
        for recorded in store.read_stream(JOB_ID):
            event = recorded.event
            if isinstance(event, IterationCompleted):  # a re-run after a recovery replaces it
                results[event.iteration] = codec.encode((
                    event.avg_reward, event.loss, event.std_reward, event.metrics))
            elif isinstance(event, CheckpointSaved):
                results[event.iteration] += event.state_ref.encode()
            elif isinstance(event, JobCompleted) and event.final_state_ref is not None:
                results[event.iteration] += event.final_state_ref.encode()
                final = store.get_blob(event.final_state_ref)
    if final is None:
        raise RuntimeError(f"the job in {db} did not complete")
    return final, results


def compare(spec: JobSpec, straight: Path, resumed: Path, kills: int) -> ResumeReport:
    """Compare the final states and iteration results of two logs of `spec`."""
    a, results_a = _final(straight)
    b, results_b = _final(resumed)
    report = ResumeReport(ok=a == b, kills=kills, final_digest=codec.digest(a),
                          resumed_digest=codec.digest(b))
    if a == b:
        return report
    decoder = state_decoder(build_task(spec))
    parted = next((i for i in sorted(results_a) if results_a[i] != results_b.get(i)), None)
    return msgspec.structs.replace(
        report, first_difference=first_difference(decoder.decode(a), decoder.decode(b)) or "$",
        parted_at_iteration=parted)


def first_difference(a: Any, b: Any, path: str = "$") -> str | None:
    """The first place where two states differ (arrays bit for bit), or None."""
    if arrays.array_kind(a) is not None or arrays.array_kind(b) is not None:
        return None if codec.encode([a]) == codec.encode([b]) else path
    if type(a) is not type(b):
        return path
    parts_a, parts_b = dict(arrays.children(a)), dict(arrays.children(b))
    if not parts_a and not parts_b:
        return None if codec.encode([a]) == codec.encode([b]) else path
    if list(parts_a) != list(parts_b):
        return path
    for key, child in parts_a.items():
        step = f"[{key}]" if isinstance(a, (list, tuple)) else f".{key}"
        found = first_difference(child, parts_b[key], path + step)
        if found is not None:
            return found
    return None


def _child(db: str, spec_file: str) -> None:
    """Train the spec's job on `db` to the end (resuming whatever the log holds)."""
    from .runtime import Runtime

    spec = msgspec.json.decode(Path(spec_file).read_bytes(), type=JobSpec)
    with Runtime(db, handle_signals=False) as rt:
        rt.submit(spec, job_id=JOB_ID)  # idempotent: a resumed log has it already
        view = rt.wait(JOB_ID, timeout=None)
    if view.status != "completed":
        raise SystemExit(f"job ended {view.status}: {view.error}")


if __name__ == "__main__":
    _child(*sys.argv[1:])
