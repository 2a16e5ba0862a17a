"""Crash injection, measured: SIGKILL a runtime inside its dangerous windows, restart, check.

    python tools/crashtest.py --trials 25 --kills-per-trial 9 [--seed S] [--workers 2]

Each trial runs a child process (this file with `--child`) that owns a fresh log and runs a
fixed set of deterministic jobs. The child reports every event it was acknowledged — after
`append` returned, through `Runtime.watch()` — to an ack file: "stream version position hash".
The parent kills the child with SIGKILL, restarts it, and repeats `--kills-per-trial` times,
choosing for each kill a window:

    commit      frozen in a group commit on the path nearly every batch takes (one INSERT
                statement in autocommit), just before it (fault point `store.commit@N`)
    committed   the same path, just after that statement committed and before any of the
                batch's callers was told (`store.committed@N`)
    checkpoint  frozen inside the transaction writing a checkpoint's blob
                (`store.commit_with_blobs@N`)
    iteration   between iterations, before an iteration's or checkpoint's append
                (`actor.iteration@N`, `actor.checkpoint@N`)
    recovery    while a restarted runtime recovers its jobs (`runtime.recover`,
                `actor.started@N`)
    random      a random moment: a random 0-1 s after the child started

with N drawn at random (scaled to the work left, so that the point is reached). After each kill
the parent checks that every acknowledged event is in the log, unchanged, and that `verify` is
clean; after the last kill the child runs uninterrupted to the end, and the parent checks that
every job completed with the final-state digest of an uninterrupted reference run.

A fault point freezes the child (see `flowactors.faults`): the kill lands exactly there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
WINDOWS = ("commit", "committed", "checkpoint", "iteration", "recovery", "random")
PRODUCTION_COMMIT = ("commit", "committed")
"""The windows on the writer's production commit path (the single-statement group commit)."""
DEFAULT_WEIGHTS = {"commit": 15, "committed": 15, "checkpoint": 20, "iteration": 15,
                   "recovery": 15, "random": 20}
CHILD_TIMEOUT = 300.0  # an uninterrupted child run; far above what it needs
POINT_TIMEOUT = 60.0  # waiting for the child to reach its fault point


# --- the child ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobsConfig:
    """The deterministic jobs every child of a run trains (n_iterations never a multiple of
    the checkpoint interval, so the completion's final state is not a checkpoint's)."""

    n_jobs: int = 4
    rollout_seconds: float = 0.04
    iterations: tuple[int, ...] = (23, 19, 29, 17)
    intervals: tuple[int, ...] = (3, 2, 3, 2)
    toolchoice: bool = True  # one more job: the real learning task (Adam, hashed features)

    def to_json(self) -> str:
        return json.dumps({"n_jobs": self.n_jobs, "rollout_seconds": self.rollout_seconds,
                           "iterations": list(self.iterations),
                           "intervals": list(self.intervals), "toolchoice": self.toolchoice})

    @classmethod
    def from_json(cls, text: str) -> JobsConfig:
        raw = json.loads(text)
        return cls(n_jobs=raw["n_jobs"], rollout_seconds=raw["rollout_seconds"],
                   iterations=tuple(raw["iterations"]), intervals=tuple(raw["intervals"]),
                   toolchoice=raw["toolchoice"])

    def specs(self) -> dict[str, object]:
        import flowactors as fa
        from flowactors.tasks.toolchoice import make_training_data

        queries = [fa.TrainingQuery(query=f"crash query {i}") for i in range(12)]
        specs: dict[str, object] = {}
        for i in range(self.n_jobs):
            n = self.iterations[i % len(self.iterations)]
            interval = self.intervals[i % len(self.intervals)]
            specs[f"job-{i}"] = fa.JobSpec(
                agent_id=f"agent-{i}", training_data=queries, task="simulated",
                config=fa.GRPOConfig(n_iterations=n, checkpoint_interval=interval,
                                     batch_size=2, n_trajectories_per_query=3, seed=100 + i,
                                     keep_checkpoints=2),
                task_options={"rollout_seconds": self.rollout_seconds})
        if self.toolchoice:
            specs["job-tool"] = fa.JobSpec(
                agent_id="agent-tool", training_data=make_training_data(24, seed=7, distinct=True),
                task="toolchoice",
                config=fa.GRPOConfig(n_iterations=10, checkpoint_interval=3, batch_size=4,
                                     n_trajectories_per_query=4, seed=7, keep_checkpoints=2),
                task_options={"feature_buckets": 64})
        return specs

    def checkpoint_intervals(self) -> dict[str, int]:
        return {job_id: spec.config.checkpoint_interval  # type: ignore[attr-defined]
                for job_id, spec in self.specs().items()}


def child_main(log_path: str, ack_path: str, config: JobsConfig) -> int:
    """Run every job to completion (submission is idempotent: a restart resumes them)."""
    import faulthandler

    import flowactors as fa

    faulthandler.enable()  # a crash of our own (not our SIGKILL) leaves its stacks in stderr

    specs = config.specs()
    with fa.Runtime(log_path, max_concurrent_jobs=len(specs), handle_signals=False) as rt:
        acks = open(ack_path, "a", buffering=1)
        tail = rt.watch()  # subscribed before the first submission

        def acknowledge() -> None:
            for recorded in tail:  # published only after the append returned
                acks.write(f"{recorded.stream} {recorded.version} {recorded.position} "
                           f"{recorded.hash or '-'}\n")

        threading.Thread(target=acknowledge, daemon=True).start()
        for job_id, spec in specs.items():
            rt.submit(spec, job_id=job_id)  # type: ignore[arg-type]
        for job_id in specs:
            rt.wait(job_id, timeout=CHILD_TIMEOUT)
    return 0


def spawn_child(log: Path, acks: Path, config: JobsConfig, faults: str | None = None,
                fault_file: Path | None = None, stderr_path: Path | None = None
                ) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("FLOWACTORS_FAULTS", None)
    env.pop("FLOWACTORS_FAULT_FILE", None)
    if faults:
        env["FLOWACTORS_FAULTS"] = faults
        env["FLOWACTORS_FAULT_FILE"] = str(fault_file)
    stderr = open(stderr_path, "ab") if stderr_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [sys.executable, str(HERE), "--child", str(log), str(acks), config.to_json()],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
        if stderr_path:
            stderr.close()  # type: ignore[union-attr]


# --- reading what the child left ------------------------------------------------------------------


def read_acks(path: Path) -> tuple[dict[tuple[str, int], tuple[int, str]], int]:
    """The acknowledged events: (stream, version) -> (position, hash); and the number of
    (stream, version) pairs acknowledged twice with different content (must be 0)."""
    acks: dict[tuple[str, int], tuple[int, str]] = {}
    conflicts = 0
    if not path.exists():
        return acks, 0
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            continue  # the child died while writing this line: it was never reported
        parts = line.split()
        if len(parts) != 4:
            continue
        key = (parts[0], int(parts[1]))
        value = (int(parts[2]), parts[3])
        previous = acks.setdefault(key, value)
        if previous != value:
            conflicts += 1
    return acks, conflicts


@dataclass
class LogState:
    """What a read-only open of the log shows."""

    rows: dict[tuple[str, int], tuple[int, str]]
    verify_ok: bool
    verify_problem: str | None
    duplicates: int  # (stream, version) seen twice (the UNIQUE index forbids it)
    gaps: int  # streams whose versions are not 1..n
    statuses: dict[str, str]
    remaining: dict[str, int]  # job -> iterations left to run from its resume point
    final_digests: dict[str, str | None]


def read_log(path: Path) -> LogState:
    from flowactors import replay as rp
    from flowactors.errors import FlowError
    from flowactors.events import JobCompleted
    from flowactors.store import EventStore

    rows: dict[tuple[str, int], tuple[int, str]] = {}
    duplicates = 0
    versions: dict[str, list[int]] = {}
    finals: dict[str, str | None] = {}
    if not path.exists():  # killed before it created the log
        return LogState(rows={}, verify_ok=True, verify_problem=None, duplicates=0, gaps=0,
                        statuses={}, remaining={}, final_digests={})
    try:
        with EventStore(path, mode="readonly") as store:
            report = store.verify()
            events = list(store.read_all())
    except FlowError as exc:
        return LogState(rows={}, verify_ok=False, verify_problem=f"cannot read: {exc}",
                        duplicates=0, gaps=0, statuses={}, remaining={}, final_digests={})
    for r in events:
        key = (r.stream, r.version)
        if key in rows:
            duplicates += 1
        rows[key] = (r.position, r.hash)
        versions.setdefault(r.stream, []).append(r.version)
        if isinstance(r.event, JobCompleted):
            finals[r.stream] = r.event.final_state_digest
    gaps = sum(v != list(range(1, len(v) + 1)) for v in versions.values())
    states = rp.replay(events)
    statuses = {job: s.status.value for job, s in states.items()}
    remaining = {}
    for job, s in states.items():
        if s.status.is_terminal or s.spec is None:
            continue
        done = s.resume_point.iteration if s.resume_point is not None else 0
        if s.status.value in ("queued", "paused"):
            done = s.iteration
        remaining[job] = s.spec.config.n_iterations - done
    return LogState(rows=rows, verify_ok=report.ok, verify_problem=report.problem,
                    duplicates=duplicates, gaps=gaps, statuses=statuses, remaining=remaining,
                    final_digests=finals)


# --- the parent -----------------------------------------------------------------------------------


@dataclass
class Figures:
    """What a run measured; `failures` lists every violated check, with where it happened."""

    trials: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    missed: Counter[str] = field(default_factory=Counter)
    acked_checked: int = 0
    lost: int = 0
    corrupted: int = 0
    mismatched_final_states: int = 0
    verify_failures: int = 0
    gaps_or_duplicates: int = 0
    incomplete_jobs: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())

    @property
    def ok(self) -> bool:
        return not self.failures

    def merge(self, other: Figures) -> None:
        self.trials += other.trials
        self.kills.update(other.kills)
        self.missed.update(other.missed)
        for name in ("acked_checked", "lost", "corrupted", "mismatched_final_states",
                     "verify_failures", "gaps_or_duplicates", "incomplete_jobs"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.extend(other.failures)

    def lines(self) -> list[str]:
        windows = ", ".join(f"{w} {self.kills[w]}" for w in WINDOWS)
        missed = sum(self.missed.values())
        return [
            f"trials: {self.trials}",
            f"kills: {self.total_kills} ({windows})",
            f"kills on the production commit path (single-statement group commit): "
            f"{sum(self.kills[w] for w in PRODUCTION_COMMIT)}",
            f"missed kill points (child finished first, not counted): {missed}",
            f"acknowledged events checked: {self.acked_checked}",
            f"lost: {self.lost}",
            f"corrupted: {self.corrupted}",
            f"mismatched final states: {self.mismatched_final_states}",
            f"verify failures: {self.verify_failures}",
            f"gaps or duplicates: {self.gaps_or_duplicates}",
            f"jobs not completed: {self.incomplete_jobs}",
            f"time: {self.seconds:.0f} s",
        ]


def reference_digests(config: JobsConfig, workdir: Path) -> dict[str, str | None]:
    """The final-state digests of an uninterrupted run."""
    ref = workdir / "reference"
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir(parents=True)
    log = ref / "flow.db"
    child = spawn_child(log, ref / "acks", config, stderr_path=ref / "stderr")
    if child.wait(timeout=CHILD_TIMEOUT) != 0:
        raise RuntimeError(f"the reference run failed: {(ref / 'stderr').read_text()[-2000:]}")
    digests = read_log(log).final_digests
    if len(digests) != len(config.specs()):
        raise RuntimeError(f"the reference run completed only {sorted(digests)}")
    return digests


def choose_fault(rng: random.Random, window: str, state: LogState | None,
                 intervals: dict[str, int]) -> str | None:
    """The fault point and occurrence for a kill in `window` (None: a random-time kill)."""
    remaining = state.remaining if state is not None else {j: 10 for j in intervals}
    left = sum(remaining.values())
    checkpoints = sum(n // intervals.get(j, 1) + 1 for j, n in remaining.items())
    if window in PRODUCTION_COMMIT:  # a group commit often carries several jobs' appends
        return f"store.{window}@{rng.randint(1, max(1, left // 3))}"
    if window == "checkpoint":
        return f"store.commit_with_blobs@{rng.randint(1, max(1, checkpoints // 2))}"
    if window == "iteration":
        if rng.random() < 0.5:
            return f"actor.iteration@{rng.randint(1, max(1, left // 2))}"
        return f"actor.checkpoint@{rng.randint(1, max(1, checkpoints // 2))}"
    if window == "recovery":
        running = sum(s == "running" for s in state.statuses.values()) if state else 0
        if running and rng.random() < 0.6:
            return f"actor.started@{rng.randint(1, running)}"
        return "runtime.recover@1"
    return None


def run_trial(index: int, config: JobsConfig, kills: int, reference: dict[str, str | None],
              workdir: Path, seed: int, weights: dict[str, int],
              say: Callable[[str], None] = print,
              plan: Sequence[str] | None = None) -> Figures:
    """One log, `kills` kills and restarts, then an uninterrupted run and the checks.

    `plan`: the windows of the kills in turn (cycled); default: drawn by `weights`.
    """
    rng = random.Random(seed)
    figures = Figures(trials=1)
    tdir = workdir / f"trial-{index:03d}"
    if tdir.exists():
        shutil.rmtree(tdir)
    tdir.mkdir(parents=True)
    log, acks_path, fault_file = tdir / "flow.db", tdir / "acks", tdir / "faults"
    stderr = tdir / "stderr"
    intervals = config.checkpoint_intervals()
    state: LogState | None = None
    lost: set[tuple[str, int]] = set()
    corrupted: set[tuple[str, int]] = set()
    acks: dict[tuple[str, int], tuple[int, str]] = {}
    conflicting = [0]

    def fail(message: str) -> None:
        figures.failures.append(f"trial {index} (seed {seed}): {message}")

    def check(after: str) -> None:
        nonlocal state, acks
        acks, conflicts = read_acks(acks_path)
        if conflicts > conflicting[0]:
            fail(f"{conflicts} (stream, version) acknowledged twice with different content "
                 f"({after})")
            figures.corrupted += conflicts - conflicting[0]
            conflicting[0] = conflicts
        state = read_log(log)
        for key, (position, hash_) in acks.items():
            row = state.rows.get(key)
            if row is None:
                if key not in lost:
                    lost.add(key)
                    fail(f"acknowledged event {key} at position {position} is not in the log "
                         f"({after})")
            elif row[0] != position or (hash_ != "-" and row[1] != hash_):
                if key not in corrupted:
                    corrupted.add(key)
                    fail(f"acknowledged event {key} changed: acked {(position, hash_)}, "
                         f"log has {row} ({after})")
        if not state.verify_ok:
            figures.verify_failures += 1
            fail(f"verify failed ({after}): {state.verify_problem}")
        if state.duplicates or state.gaps:
            figures.gaps_or_duplicates += state.duplicates + state.gaps
            fail(f"{state.duplicates} duplicate and {state.gaps} gapped streams ({after})")

    done_early = False
    for k in range(kills):
        recoverable = state is not None and any(
            s == "running" for s in state.statuses.values())
        choices = [w for w in WINDOWS if w != "recovery" or recoverable]
        window = rng.choices(choices, [weights[w] for w in choices])[0]
        if plan:
            window = plan[k % len(plan)]
            if window == "recovery" and not recoverable:
                window = "commit"  # nothing to recover yet
        fault = choose_fault(rng, window, state, intervals)
        fault_file.write_text("")
        child = spawn_child(log, acks_path, config, fault, fault_file, stderr)
        try:
            if fault is None:
                delay = rng.uniform(0.0, 1.0)
                exited = _wait_exit(child, delay)
            else:
                name = fault.split("@")[0]
                exited = _wait_point(child, fault_file, name)
            if exited is None:
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=30)
                figures.kills[window] += 1
            else:
                figures.missed[window] += 1
                if exited != 0:
                    fail(f"child exited with {exited} before kill {k} at {fault or 'random'}: "
                         f"{_tail(stderr)}")
        except TimeoutError:
            child.kill()
            child.wait(timeout=30)
            fail(f"child never reached {fault} nor exited within {POINT_TIMEOUT}s "
                 f"(a hang): {_tail(stderr)}")
        check(f"after kill {k} at {fault or 'a random time'}")
        say(f"  trial {index} kill {k}: {window:<10} {fault or 'random'}"
            f"{'' if exited is None else ' (missed: child finished)'}")
        if state is not None and not state.remaining and len(state.statuses) == len(intervals):
            done_early = True
            break
    child = spawn_child(log, acks_path, config, stderr_path=stderr)
    try:
        code = child.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        code = "timeout"
    if code != 0:
        fail(f"the final uninterrupted run ended with {code}: {_tail(stderr)}")
    check("after the final run")
    assert state is not None
    figures.acked_checked = len(acks)
    figures.lost = len(lost)
    figures.corrupted += len(corrupted)
    for job_id, digest in reference.items():
        status = state.statuses.get(job_id)
        if status != "completed":
            figures.incomplete_jobs += 1
            fail(f"job {job_id} is {status}, not completed")
        elif state.final_digests.get(job_id) != digest:
            figures.mismatched_final_states += 1
            fail(f"job {job_id} ended with final state {state.final_digests.get(job_id)}, "
                 f"the uninterrupted run with {digest}")
    if done_early:
        say(f"  trial {index}: every job completed before its last planned kill")
    return figures


def _wait_exit(child: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _wait_point(child: subprocess.Popen[bytes], fault_file: Path, name: str) -> int | None:
    """Wait until the child announced `name` (None) or exited (its code)."""
    deadline = time.monotonic() + POINT_TIMEOUT
    while True:
        if name in fault_file.read_text():
            return None
        code = child.poll()
        if code is not None:
            return None if name in fault_file.read_text() else code
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.005)


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _rotated(plan: Sequence[str] | None, by: int) -> list[str] | None:
    if not plan:
        return None
    by %= len(plan)
    return list(plan[by:]) + list(plan[:by])


def run(trials: int, kills_per_trial: int, *, seed: int = 0, workers: int = 1,
        config: JobsConfig = JobsConfig(), workdir: Path | None = None,
        weights: dict[str, int] | None = None, plan: Sequence[str] | None = None,
        say: Callable[[str], None] = print) -> Figures:
    """Run the trials; return the figures (`figures.failures` lists every violation)."""
    weights = weights or DEFAULT_WEIGHTS
    started = time.monotonic()
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="crashtest-")) if own else Path(workdir)
    try:
        reference = reference_digests(config, root)
        say(f"reference run: {len(reference)} jobs completed")
        figures = Figures()
        lock = threading.Lock()

        def one(i: int) -> None:
            result = run_trial(i, config, kills_per_trial, reference, root,
                               seed * 100_003 + i, weights, say,
                               _rotated(plan, i))
            with lock:
                figures.merge(result)
                say(f"trial {i}: {result.total_kills} kills, {result.acked_checked} acked "
                    f"events checked, {len(result.failures)} failures")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(one, i) for i in range(trials)]:
                future.result()
        figures.seconds = time.monotonic() - started
        return figures
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def quiet_logs() -> None:
    """Keep the parent's own store opens out of the output (warnings still show)."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1], argv[2], JobsConfig.from_json(argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--kills-per-trial", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1,
                        help="trials run in parallel (each is its own child process)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep every trial's log here (default: a temporary directory)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the figures")
    args = parser.parse_args(argv)
    quiet_logs()
    say = (lambda _: None) if args.quiet else (lambda line: print(line, flush=True))
    figures = run(args.trials, args.kills_per_trial, seed=args.seed, workers=args.workers,
                  workdir=args.workdir, say=say)
    print("\n".join(figures.lines()))
    for failure in figures.failures:
        print(f"FAILED: {failure}")
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
