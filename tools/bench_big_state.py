"""A very large trainer state, end to end: saved, resumed after SIGKILL, verified.

    python tools/bench_big_state.py [--gib 2] [--dir DIR]

One job whose state is a single numpy array of GIB GiB (float32) trains 3 iterations with a
checkpoint after each, in a child process. Once checkpoint 2 is durable the child is SIGKILLed;
a runtime here reopens the log, resumes the job from checkpoint 2 and completes it; then
`flowactors verify` checks the log and every checkpoint file. An uninterrupted run of the same
spec gives the reference final digest. Baseline, in the same run: plain `write` + `fsync` of as
many bytes on the same disk. Figures: time and peak RSS of each step.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flowactors as fa  # noqa: E402
from flowactors.events import CheckpointSaved, JobCompleted  # noqa: E402
from flowactors.store import EventStore  # noqa: E402

GIB = 1 << 30


class BigOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gib: float = 2.0


class BigState(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    weights: np.ndarray


class BigArrayTask:
    """A state of one array; each update adds the iteration's mean reward to one element (a
    new array: the old state stays unchanged, as the state-in, state-out protocol wants)."""

    Options: ClassVar[type[msgspec.Struct]] = BigOptions
    state_type: ClassVar[type] = BigState
    inline_rollouts = True

    def __init__(self, options: BigOptions) -> None:
        self.options = options

    def init(self, spec: fa.JobSpec) -> BigState:
        n = int(self.options.gib * GIB) // 4
        return BigState(step=0, weights=np.zeros(n, dtype=np.float32))

    def rollout(self, state, query, *, rng, max_steps, cancelled) -> fa.Trajectory:
        reward = rng.random()
        return fa.Trajectory(reward=reward, success=reward > 0.5, steps=1)

    def update(self, state: BigState, groups, config):
        rewards = [t.reward for g in groups for t in g]
        weights = state.weights.copy()
        weights[state.step] += np.float32(sum(rewards) / len(rewards))
        return BigState(step=state.step + 1, weights=weights), {"loss": 0.0}

    def evaluate(self, state: BigState, queries) -> float:
        return 0.5


def spec(gib: float) -> fa.JobSpec:
    return fa.JobSpec(
        agent_id="big", task="bench_big_state:BigArrayTask", task_options={"gib": gib},
        training_data=[fa.TrainingQuery(query=f"q{i}") for i in range(4)],
        config=fa.GRPOConfig(n_iterations=3, checkpoint_interval=1, batch_size=2,
                             n_trajectories_per_query=2, keep_checkpoints=1, seed=1,
                             eval_fraction=0.0))


def child(db: str, gib: float) -> None:
    """Train in this process until killed (or done)."""
    with fa.Runtime(db, handle_signals=False) as rt:
        rt.submit(spec(gib), job_id="big")
        rt.wait("big", timeout=3600)


def checkpoints(db: Path) -> list[int]:
    try:
        with EventStore(db, mode="readonly") as store:
            return [r.event.iteration for r in store.read_all()
                    if isinstance(r.event, CheckpointSaved)]
    except fa.FlowError:
        return []


def final_digest(db: Path) -> str:
    with EventStore(db, mode="readonly") as store:
        return next(r.event.final_state_digest for r in store.read_all()
                    if isinstance(r.event, JobCompleted))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="the state's size in GiB")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a disk)")
    args = parser.parse_args()
    if args.gib <= 0:
        parser.error("--gib must be positive")
    root = Path(tempfile.mkdtemp(prefix="big-state-", dir=args.dir))
    try:
        return run(root, args.gib)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, gib: float) -> int:
    size = int(gib * GIB)
    print(f"a state of one float32 array, {gib:g} GiB; files in {root}")

    data = np.ones(size, dtype=np.uint8)
    started = time.perf_counter()
    fd = os.open(root / "plain.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view, done = memoryview(data), 0
    while done < size:
        done += os.write(fd, view[done:done + (64 << 20)])
    os.fsync(fd)
    os.close(fd)
    plain = time.perf_counter() - started
    os.unlink(root / "plain.bin")
    del data, view
    print(f"baseline: plain write + fsync {plain:6.2f} s ({size / plain / (1 << 20):,.0f} MB/s)")

    killed_db = root / "killed.db"
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(killed_db), str(gib)],
                            env=env, stdin=subprocess.DEVNULL)
    while 2 not in checkpoints(killed_db):
        if proc.poll() is not None:
            print(f"the child ended with {proc.returncode} before checkpoint 2")
            return 1
        time.sleep(0.2)
    to_two = time.perf_counter() - started
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"child: start, 2 iterations, 2 checkpoints durable: {to_two:6.2f} s; SIGKILL")

    started = time.perf_counter()
    with fa.Runtime(killed_db, handle_signals=False) as rt:
        reopened = time.perf_counter() - started
        view = rt.wait("big", timeout=3600)
    resumed = time.perf_counter() - started
    print(f"reopen (checks the files' presence and size): {reopened:6.2f} s; "
          f"resume from checkpoint 2 to completed: {resumed:6.2f} s ({view.status.value})")

    started = time.perf_counter()
    verify = subprocess.run([str(Path(sys.executable).with_name("flowactors")), "verify",
                             "--db", str(killed_db)], capture_output=True, text=True)
    print(f"verify (every checkpoint file's content): {time.perf_counter() - started:6.2f} s: "
          f"{verify.stdout.splitlines()[0] if verify.stdout else verify.stderr.strip()}")

    reference_db = root / "reference.db"
    started = time.perf_counter()
    child(str(reference_db), gib)
    print(f"reference, uninterrupted in this process: {time.perf_counter() - started:6.2f} s; "
          f"peak RSS of this process {peak_rss_gib():.1f} GiB")
    same = final_digest(killed_db) == final_digest(reference_db)
    print(f"final state after SIGKILL and resume == uninterrupted: {same}")
    return 0 if same and verify.returncode == 0 and view.status is fa.JobStatus.COMPLETED else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], float(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
