"""Benchmark of trajectories on record (not part of the test suite).

    python tools/bench_trajectories.py [--quick] [--rounds 2] [--events 1000000]

Prints, in one run:
  1. iterations per second of `bench_runtime`'s 100-job run (zero-cost `simulated` rollouts,
     one durable iteration each step) with `record_trajectories` off and on, alternated for
     `--rounds` rounds so both see the same machine (goal: at most 15% fewer with it on);
  2. how much the log grows per 1,000 recorded trajectories (one job, 8 per iteration), the
     file's size with recording on minus off;
  3. `Runtime.trajectories(job, iteration=N)`'s time on a log of `--events` events that 1,000
     jobs wrote at once and a SIGKILL ended (`crashed_log.build`), from a read-only open
     (goal: at most 50 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

import flowactors as fa
from flowactors import trajectories
from flowactors.console import stderr_logs
from flowactors.store import EventStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_runtime  # noqa: E402
import crashed_log  # noqa: E402


def with_recording(spec: fa.JobSpec, on: bool) -> fa.JobSpec:
    config = msgspec.structs.replace(spec.config, record_trajectories=on)
    return msgspec.structs.replace(spec, config=config)


def throughput(directory: Path, n_jobs: int, n_iterations: int, on: bool) -> float:
    """Iterations per second of n_jobs concurrent zero-cost jobs (bench_runtime's run)."""
    path = directory / f"throughput-{on}-{time.monotonic_ns()}.db"
    with fa.Runtime(path, max_concurrent_jobs=n_jobs, handle_signals=False) as rt:
        started = time.perf_counter()
        ids = [rt.submit(with_recording(bench_runtime.spec(i, n_iterations), on))
               for i in range(n_jobs)]
        views = [rt.wait(j, timeout=900) for j in ids]
        elapsed = time.perf_counter() - started
    assert all(v.status is fa.JobStatus.COMPLETED for v in views)
    path.unlink()
    return n_jobs * n_iterations / elapsed


def growth_per_1000(directory: Path, n_iterations: int) -> tuple[float, int]:
    """(bytes the log grows by per 1,000 recorded trajectories, trajectories recorded)."""
    sizes = {}
    for on in (False, True):
        path = directory / f"growth-{on}.db"
        spec = fa.JobSpec(
            agent_id="growth", training_data=bench_runtime.QUERIES, task="simulated",
            config=fa.GRPOConfig(n_iterations=n_iterations, batch_size=4,
                                 n_trajectories_per_query=2, checkpoint_interval=10, seed=1,
                                 record_trajectories=on))
        with fa.Runtime(path, handle_signals=False) as rt:
            rt.wait(rt.submit(spec, job_id="growth"), timeout=600)
            n = len(rt.trajectories("growth"))
        sizes[on] = os.path.getsize(path)
    return (sizes[True] - sizes[False]) * 1000 / n, n


def read_latency(path: Path, samples: int = 30) -> tuple[float, float, int]:
    """(median ms, max ms, trajectories read) of one iteration's trajectories of one job."""
    with EventStore(path, mode="readonly") as store:
        streams = store.streams()
        job = sorted(streams)[len(streams) // 2]
        iteration = 100
        times = []
        found = 0
        for _ in range(samples):
            started = time.perf_counter()
            found = len(trajectories.read(store, job, iteration=iteration))
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    n_iterations = 10 if args.quick else 50
    events = 100_000 if args.quick else args.events
    print(f"flowactors trajectories benchmark — Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for on in (False, True):
                rates[on].append(throughput(directory, 100, n_iterations, on))
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"100 concurrent jobs x {n_iterations} iterations: {off:,.0f} it/s without "
              f"recording, {on:,.0f} it/s with it: {100 * (1 - on / off):+.1f}% fewer "
              f"(goal ≤ 15%; rounds off {[round(r) for r in rates[False]]}, "
              f"on {[round(r) for r in rates[True]]})")
        per_1000, n = growth_per_1000(directory, 20 if args.quick else 125)
        print(f"log growth: {per_1000 / 1024:,.1f} KiB per 1,000 trajectories "
              f"({n:,} recorded, simulated task)")
        big = directory / "crashed.db"
        held = crashed_log.build(big, 1000, events)
        median_ms, max_ms, found = read_latency(big)
        print(f"trajectories() of one iteration of one job in a log of {held:,} events: "
              f"median {median_ms:.2f} ms, max {max_ms:.2f} ms ({found} trajectory) "
              f"(goal ≤ 50 ms)")
    return 0


if __name__ == "__main__":
    with stderr_logs():
        sys.exit(main())
