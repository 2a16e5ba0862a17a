"""A log as a crash leaves it: many jobs writing at once, then SIGKILL (for the benchmarks).

    python tools/crashed_log.py PATH [--jobs 1000] [--events 1000000]

A child process runs a real `Runtime` with `--jobs` concurrent `simulated` jobs (a checkpoint
every 5 iterations, so blobs and pruning events too) and is killed with SIGKILL once the log
holds `--events` events. The log then has what no bulk-built log has: every job's events
interleaved with the others' as running jobs append them, and a `-wal` that nobody
checkpointed. `build()` is what `bench_runtime.py` and `bench_peers.py` call.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

QUERIES = 8


def job_spec(seed: int):
    import flowactors as fa
    return fa.JobSpec(
        agent_id=f"crash-{seed}", task="simulated",
        training_data=[fa.TrainingQuery(query=f"bench query {i}") for i in range(QUERIES)],
        config=fa.GRPOConfig(n_iterations=1_000_000, batch_size=1, n_trajectories_per_query=1,
                             checkpoint_interval=5, seed=seed))


def _child(path: Path, n_jobs: int) -> None:
    """Run the jobs until killed."""
    import flowactors as fa
    rt = fa.Runtime(path, max_concurrent_jobs=n_jobs, synchronous="off", handle_signals=False)
    for seed in range(n_jobs):
        rt.submit(job_spec(seed), job_id=f"job-{seed:04d}")
    print("submitted", flush=True)
    while True:
        time.sleep(3600)


def build(path: Path, n_jobs: int, n_events: int, *, progress: bool = True) -> int:
    """Run `n_jobs` jobs in a child until the log at `path` holds `n_events` events, then
    SIGKILL it; returns the number of events the log holds."""
    from flowactors.store import EventStore
    child = subprocess.Popen([sys.executable, __file__, str(path), "--jobs", str(n_jobs),
                              "--child"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "submitted"
        while True:
            time.sleep(0.5)
            with EventStore(path, mode="readonly") as store:
                head = store.head()[0]
            if progress:
                print(f"\r  building the log: {head:,} of {n_events:,} events",
                      end="", file=sys.stderr, flush=True)
            if head >= n_events:
                break
            if child.poll() is not None:
                raise RuntimeError(f"the writing process ended with {child.returncode}")
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    if progress:
        print(file=sys.stderr)
    with EventStore(path, mode="readonly") as store:
        return store.head()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.path, args.jobs)
        return 0
    started = time.perf_counter()
    total = build(args.path, args.jobs, args.events)
    wal = Path(f"{args.path}-wal")
    print(f"{args.path}: {total:,} events by {args.jobs} jobs in "
          f"{time.perf_counter() - started:.1f} s; -wal left: "
          f"{wal.stat().st_size / 1e6 if wal.exists() else 0:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
