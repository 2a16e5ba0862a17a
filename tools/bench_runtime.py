"""Benchmark of the runtime's own overhead (not part of the test suite).

    python tools/bench_runtime.py [--quick] [--synchronous full|normal|off]

Prints, in one run:
  1. status() latency p50/p99 from a client thread while 100 jobs run rollouts of 2 ms;
  2. iterations per second across 1, 10, 100 and 1,000 concurrent `simulated` jobs with
     zero-cost rollouts (one durable IterationCompleted per iteration);
  3. time to reopen a log of ~1M events left by SIGKILL (1,000 real jobs interleaved, built
     by tools/crashed_log.py, or --crashed-log PATH) and resume its unfinished jobs, against
     a raw SELECT + decode of the same log;
  4. peak RSS of the process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

import flowactors as fa
import crashed_log
from flowactors.events import JobEvent, JobRecovered
from flowactors.console import stderr_logs
from flowactors.store import EventStore

QUERIES = [fa.TrainingQuery(query=f"bench query {i}") for i in range(8)]


def spec(seed: int, n_iterations: int, rollout_seconds: float = 0.0) -> fa.JobSpec:
    return fa.JobSpec(
        agent_id=f"bench-{seed}", training_data=QUERIES, task="simulated",
        config=fa.GRPOConfig(n_iterations=n_iterations, batch_size=1,
                             n_trajectories_per_query=1, checkpoint_interval=n_iterations,
                             seed=seed),
        task_options={"rollout_seconds": rollout_seconds} if rollout_seconds else {})


def bench_status(directory: Path, synchronous: str, seconds: float) -> dict[str, float]:
    with fa.Runtime(directory / "status.db", max_concurrent_jobs=100,
                    synchronous=synchronous, handle_signals=False) as rt:
        ids = [rt.submit(spec(i, 1_000_000, rollout_seconds=0.002)) for i in range(100)]
        while sum(rt.status(j).progress.current_iteration > 0 for j in ids) < 100:
            time.sleep(0.01)
        samples: list[int] = []
        stop = time.monotonic() + seconds

        def client() -> None:
            status, clock, target = rt.status, time.perf_counter_ns, ids[42]
            while time.monotonic() < stop:
                for _ in range(100):
                    started = clock()
                    status(target)
                    samples.append(clock() - started)

        thread = threading.Thread(target=client)
        thread.start()
        thread.join()
        iterations = sum(rt.status(j).progress.current_iteration for j in ids)
    samples.sort()
    return {"p50_us": samples[len(samples) // 2] / 1000,
            "p99_us": samples[int(len(samples) * 0.99)] / 1000,
            "calls": len(samples), "iterations_meanwhile": iterations}


def bench_throughput(directory: Path, synchronous: str, n_jobs: int,
                     n_iterations: int) -> dict[str, float]:
    with fa.Runtime(directory / f"throughput-{n_jobs}.db", max_concurrent_jobs=n_jobs,
                    synchronous=synchronous, handle_signals=False) as rt:
        started = time.perf_counter()
        ids = [rt.submit(spec(i, n_iterations)) for i in range(n_jobs)]
        views = [rt.wait(j, timeout=900) for j in ids]
        elapsed = time.perf_counter() - started
    assert all(v.status is fa.JobStatus.COMPLETED for v in views)
    total = n_jobs * n_iterations
    return {"jobs": n_jobs, "iterations": total, "seconds": elapsed,
            "iterations_per_s": total / elapsed}


def read_floor(path: Path) -> float:
    """Seconds to SELECT every event of the log at `path` and msgspec-decode it, read-only:
    what any replay of that log costs before it folds anything (the baseline of 3.)."""
    decode = msgspec.msgpack.Decoder(JobEvent).decode
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        started = time.perf_counter()
        for (data,) in conn.execute("SELECT data FROM events ORDER BY position"):
            decode(data)
        return time.perf_counter() - started
    finally:
        conn.close()


def bench_recovery(directory: Path, synchronous: str, crashed: Path) -> dict[str, float]:
    """Reopen a copy of the crashed log `crashed` and wait until every unfinished job has
    resumed (its JobRecovered durable)."""
    path = directory / "recovery.db"
    for side in ("", "-wal"):
        if Path(f"{crashed}{side}").exists():
            shutil.copy(f"{crashed}{side}", f"{path}{side}")
    os.sync()  # the copy's writeback is not part of the reopen
    floor = read_floor(path)
    started = time.perf_counter()
    rt = fa.Runtime(path, max_concurrent_jobs=1000, synchronous=synchronous,
                    handle_signals=False)
    opened = time.perf_counter() - started
    try:
        total = rt.store.head()[0]
        n_jobs = sum(not v.status.is_terminal for v in rt.jobs())
        deadline = time.monotonic() + 300

        def resumed_jobs() -> int:  # recovered, and running again (not failed)
            return sum(v.attempts >= 1 and v.status is fa.JobStatus.RUNNING for v in rt.jobs())

        while resumed_jobs() < n_jobs and time.monotonic() < deadline:
            time.sleep(0.005)
        resumed = time.perf_counter() - started
        recovered = resumed_jobs()
    finally:
        rt.close()
    with EventStore(path, mode="readonly") as store:
        recoveries = sum(isinstance(r.event, JobRecovered) for r in store.read_all(total))
    return {"events": total, "jobs": n_jobs, "open_s": opened, "all_resumed_s": resumed,
            "recovered_jobs": recovered, "recovery_events": recoveries, "floor_s": floor}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal", "off"])
    parser.add_argument("--crashed-log", type=Path, metavar="PATH",
                        help="reuse a log built by tools/crashed_log.py (building one of 1M "
                             "events takes minutes)")
    args = parser.parse_args()
    sync = args.synchronous
    print(f"flowactors runtime benchmark — Python {sys.version.split()[0]}, "
          f"synchronous={sync.upper()}, journal_mode=WAL")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        status = bench_status(directory, sync, 1.0 if args.quick else 3.0)
        print(f"status() while 100 jobs run 2 ms rollouts: p50 {status['p50_us']:.2f} µs, "
              f"p99 {status['p99_us']:.2f} µs over {status['calls']:,} calls "
              f"(target p99 ≤ 50 µs)")
        for n_jobs in (1, 10, 100, 1000):
            n_iterations = {1: 2000, 10: 300, 100: 50, 1000: 10}[n_jobs]
            if args.quick:
                n_iterations = max(5, n_iterations // 10)
            result = bench_throughput(directory, sync, n_jobs, n_iterations)
            print(f"{n_jobs:>5} concurrent jobs: {result['iterations']:>6,} iterations in "
                  f"{result['seconds']:6.2f} s = {result['iterations_per_s']:8,.0f} it/s")
        crashed = args.crashed_log
        if crashed is None:
            n_jobs, n_events = (100, 100_000) if args.quick else (1000, 1_000_000)
            crashed = directory / "crashed.db"
            crashed_log.build(crashed, n_jobs, n_events)
        rec = bench_recovery(directory, sync, crashed)
        print(f"reopen a log of {rec['events']:,} events left by SIGKILL (jobs interleaved): "
              f"replayed and actors started in {rec['open_s']:.2f} s (target ≤ 5 s); all "
              f"{rec['recovered_jobs']:,} of {rec['jobs']:,} jobs resumed (JobRecovered "
              f"durable) after {rec['all_resumed_s']:.2f} s")
        print(f"  baseline: SELECT + msgspec decode of every event of that log: "
              f"{rec['floor_s']:.2f} s (the reopen takes {rec['open_s'] / rec['floor_s']:.1f}x)")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mb:,.0f} MB")
    return 0


if __name__ == "__main__":
    with stderr_logs():  # the runtime's info lines would drown the figures
        sys.exit(main())
