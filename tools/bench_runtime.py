"""Benchmark of the runtime's own overhead (not part of the test suite).

    python tools/bench_runtime.py [--quick] [--synchronous full|normal|off]

Prints, in one run:
  1. status() latency p50/p99 from a client thread while 100 jobs run rollouts of 2 ms;
  2. iterations per second across 1, 10, 100 and 1,000 concurrent `simulated` jobs with
     zero-cost rollouts (one durable IterationCompleted per iteration);
  3. time to reopen a log of ~1M events and resume its 1,000 unfinished jobs;
  4. peak RSS of the process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import flowactors as fa
from flowactors.events import (
    CheckpointSaved,
    IterationCompleted,
    JobRecovered,
    JobStarted,
    JobSubmitted,
)
from flowactors import codec
from flowactors.console import stderr_logs
from flowactors.store import EventStore
from flowactors.tasks.simulated import SimulatedOptions, SimulatedTask

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


def build_big_log(path: Path, n_jobs: int, events_per_job: int) -> int:
    """A log of unfinished (running) jobs, written straight through the store."""
    total = 0
    with EventStore(path, mode="owner", synchronous="off") as store:
        for j in range(n_jobs):
            job_spec = spec(j, 10 * events_per_job)
            blob = codec.encode(SimulatedTask(SimulatedOptions()).init(job_spec))
            ref = codec.digest(blob)
            events: list = [JobSubmitted(spec=job_spec), JobStarted()]
            for i in range(1, events_per_job - 2):
                events.append(IterationCompleted(iteration=i, avg_reward=0.5, std_reward=0.1,
                                                 loss=0.25, success_rate=0.5, n_trajectories=1,
                                                 tokens=10, cost_usd=0.0))
            last = events_per_job - 3
            events.append(CheckpointSaved(
                iteration=last, state_ref=ref, validation_score=0.5, metrics={},
                policy_digest=ref, optimizer_digest=ref, rng_digest=ref, state_digest=ref))
            store.append(f"job-{j:04d}", events, 0, blobs=[blob])
            total += len(events)
            if j % 100 == 99:
                print(f"  building the log: {total:,} events", file=sys.stderr)
    return total


def bench_recovery(directory: Path, synchronous: str, n_jobs: int,
                   events_per_job: int) -> dict[str, float]:
    path = directory / "recovery.db"
    total = build_big_log(path, n_jobs, events_per_job)
    started = time.perf_counter()
    rt = fa.Runtime(path, max_concurrent_jobs=n_jobs, synchronous=synchronous,
                    handle_signals=False)
    opened = time.perf_counter() - started
    try:
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
            "recovered_jobs": recovered, "recovery_events": recoveries}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal", "off"])
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
        n_jobs, per_job = (100, 1000) if args.quick else (1000, 1000)
        rec = bench_recovery(directory, sync, n_jobs, per_job)
        print(f"reopen a log of {rec['events']:,} events: replayed and actors started in "
              f"{rec['open_s']:.2f} s; all {rec['recovered_jobs']:,} jobs resumed "
              f"(JobRecovered durable) after {rec['all_resumed_s']:.2f} s (target ≤ 5 s)")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mb:,.0f} MB")
    return 0


if __name__ == "__main__":
    with stderr_logs():  # the runtime's info lines would drown the figures
        sys.exit(main())
