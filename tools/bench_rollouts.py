"""Benchmark of the rollout backends (not part of the test suite); each figure against its
baseline measured in the same run.

    python tools/bench_rollouts.py [--quick] [--only cpu|overhead|io|rss]...

Prints:
  1. CPU-bound rollouts (~20 ms of pure Python each), 8 jobs x 16 rollouts per iteration:
     iterations per second on Ray (a local cluster, one worker per core) vs on threads, in
     turn twice, the best of each;
  2. overhead: trivial rollouts through RayRollouts (8 jobs x 16 per iteration; and the
     backend alone, without jobs) vs the same number of bare Ray tasks submitted and gathered
     by hand in waves of 128; short rollouts sharing Ray tasks (the default) and a task
     per rollout; all in turn, three times, the best of each;
  3. I/O-bound rollouts (`await asyncio.sleep(0.1)`), 1,000 per iteration: one iteration on
     the runtime's event loop vs on threads (8 per job, the default `max_parallel_rollouts`);
  4. RSS growth of this process with 1,000 rollouts in flight: coroutines vs 1,000 threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import flowactors as fa
from flowactors.console import stderr_logs

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
SECTIONS = ("io", "rss", "cpu", "overhead")
TASKS_ENV = {"env_vars": {"PYTHONPATH": str(TOOLS)}}
QUERIES = [fa.TrainingQuery(query=f"bench query {i}") for i in range(200)]


def spec(task: str, seed: int, *, n_iterations: int, batch_size: int, per_query: int,
         parallel: int = 8, **options) -> fa.JobSpec:
    return fa.JobSpec(
        agent_id=f"bench-{seed}", training_data=QUERIES, task=f"bench_rollouts_tasks:{task}",
        task_options=options, config=fa.GRPOConfig(
            n_iterations=n_iterations, batch_size=batch_size, n_trajectories_per_query=per_query,
            checkpoint_interval=n_iterations, seed=seed, max_parallel_rollouts=parallel,
            eval_fraction=0.0))


def run_jobs(path: Path, specs: list[fa.JobSpec], rollouts=None, **runtime) -> float:
    """Seconds from the first submission until every job completed."""
    with fa.Runtime(path, synchronous="off", handle_signals=False, rollouts=rollouts,
                    max_concurrent_jobs=len(specs), **runtime) as rt:
        started = time.perf_counter()
        ids = [rt.submit(s) for s in specs]
        for job_id in ids:
            view = rt.wait(job_id, timeout=900)
            assert view.status is fa.JobStatus.COMPLETED, view.error
        return time.perf_counter() - started


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_cpu(directory: Path, ray_rollouts, iterations: int, repeats: int = 2) -> None:
    from bench_rollouts_tasks import loops_for

    loops = max(loops_for(20.0) for _ in range(5))  # the least disturbed measurement

    def specs(seed0: int) -> list[fa.JobSpec]:
        return [spec("CpuTask", seed0 + i, n_iterations=iterations, batch_size=2, per_query=8,
                     cpu_loops=loops) for i in range(8)]

    total = 8 * iterations
    run_jobs(directory / "warm.db", specs(900)[:2], ray_rollouts)  # workers started, code imported
    threads, on_ray = [], []
    for repeat in range(repeats):  # in turn; the best of each (the least disturbed)
        threads.append(run_jobs(directory / f"cpu-threads-{repeat}.db", specs(0)))
        on_ray.append(run_jobs(directory / f"cpu-ray-{repeat}.db", specs(100), ray_rollouts))
    threads, on_ray = min(threads), min(on_ray)
    print(f"1. CPU-bound 20 ms rollouts, 8 jobs x 16 per iteration, {iterations} iterations each, "
          f"best of {repeats}:")
    print(f"   threads: {total / threads:6.2f} iterations/s ({threads:.2f} s)")
    print(f"   Ray:     {total / on_ray:6.2f} iterations/s ({on_ray:.2f} s)  "
          f"= {threads / on_ray:.2f}x threads (goal >= 1.6x)")


def bench_overhead(directory: Path, ray_rollouts, iterations: int, repeats: int = 3) -> None:
    """The figures measured in turn, `repeats` times; the best of each (the least disturbed by
    other work on the machine, as the same run's baseline is). Each figure twice: with short
    rollouts sharing Ray tasks (the default), and with a task per rollout, as the bare baseline
    has (`max_rollouts_per_task=1`, a second backend on the same cluster). The bare tasks are
    submitted from this process, connected to the cluster `main` started; the backends submit
    from their driver processes."""
    import ray
    from bench_rollouts_tasks import trivial

    remote = ray.remote(trivial).options(num_cpus=1, max_retries=0)
    one_each = fa.RayRollouts(max_rollouts_per_task=1, runtime_env=TASKS_ENV)
    n = 8 * 16 * iterations
    ray.get([remote.remote(i) for i in range(256)], timeout=120)  # warm
    specs = [spec("CpuTask", 200 + i, n_iterations=iterations, batch_size=2, per_query=8,
                  parallel=16) for i in range(8)]
    seconds: dict[str, list[float]] = {}
    for repeat in range(repeats):
        started = time.perf_counter()
        for wave in range(iterations):
            ray.get([remote.remote(wave * 128 + i) for i in range(128)], timeout=120)
        seconds.setdefault("bare", []).append(time.perf_counter() - started)
        for name, backend in [("shared", ray_rollouts), ("one", one_each)]:
            seconds.setdefault(f"alone {name}", []).append(
                backend_waves(backend, specs, iterations))
            seconds.setdefault(f"jobs {name}", []).append(
                run_jobs(directory / f"overhead-{name}-{repeat}.db", specs, backend))
    one_each.close()
    bare = min(seconds["bare"])
    print(f"2. trivial rollouts, {n} in all (8 jobs x 16 per iteration, {iterations} iterations), "
          f"best of {repeats}:")
    print(f"   bare Ray tasks by hand, waves of 128:  {n / bare:7.0f} tasks/s")
    for label, key, goal in [("RayRollouts alone, waves of 8 x 16:   ", "alone", ""),
                             ("RayRollouts under whole jobs:         ", "jobs",
                              " (goal >= 80%)")]:
        shared, one = min(seconds[f"{key} shared"]), min(seconds[f"{key} one"])
        print(f"   {label}{n / shared:7.0f} rollouts/s = {bare / shared * 100:.0f}% of bare"
              f"{goal}; a task per rollout: {n / one:.0f}/s = {bare / one * 100:.0f}%")


def backend_waves(ray_rollouts, specs: list[fa.JobSpec], iterations: int) -> float:
    """Seconds for the backend alone (no job, no log): each wave starts 8 batches of 16 at
    once and waits for all, as the bare baseline does with 128 tasks."""
    import queue

    from flowactors.tasks import build_task

    tasks = [build_task(s) for s in specs]
    done: queue.SimpleQueue = queue.SimpleQueue()
    started = time.perf_counter()
    for iteration in range(1, iterations + 1):
        for s, task in zip(specs, tasks):
            ray_rollouts.start(task=task, state=task.init(s), spec=s, iteration=iteration,
                               queries=QUERIES[:2], on_complete=done.put)
        for _ in specs:
            done.get(timeout=120)
    return time.perf_counter() - started


def bench_io(directory: Path, quick: bool) -> None:
    one = dict(n_iterations=1, batch_size=125, per_query=8, sleep_s=0.1)
    loop_s = run_jobs(directory / "io-async.db",
                      [spec("AsyncSleepTask", 1, parallel=1000, **one)])
    loop_2 = run_jobs(directory / "io-async2.db",
                      [spec("AsyncSleepTask", 2, parallel=1000, **{**one, "n_iterations": 2})])
    print("3. 1,000 rollouts of await asyncio.sleep(0.1) per iteration:")
    print(f"   event loop: {loop_s:.3f} s for 1 iteration, {loop_2 / 2:.3f} s per iteration "
          f"over 2 (goal <= 0.3 s)")
    if quick:
        print("   threads, 8 per job: skipped (--quick; 1,000 / 8 x 0.1 s = 12.5 s at best)")
    else:
        threads = run_jobs(directory / "io-threads.db", [spec("CpuTask", 3, parallel=8, **one)])
        print(f"   threads, 8 per job (the default): {threads:.2f} s for 1 iteration "
              f"= {threads / loop_s:.0f}x the event loop")


def bench_rss(directory: Path) -> None:
    """RSS growth while one job has 1,000 rollouts of 2 s in flight."""
    def peak_growth(task: str, db: str, **runtime) -> tuple[float, float]:
        base = rss_mb()
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            seconds = run_jobs(directory / db, [spec(task, 7, n_iterations=1, batch_size=125,
                                                     per_query=8, parallel=1000, sleep_s=2.0)],
                               **runtime)
        finally:
            stop.set()
            sampler.join()
        return peak[0] - base, seconds

    loop_mb, loop_s = peak_growth("AsyncSleepTask", "rss-async.db")
    threads_mb, threads_s = peak_growth("CpuTask", "rss-threads.db", max_rollout_workers=1000)
    print("4. RSS growth of the runtime with 1,000 rollouts (2 s waits) in flight:")
    print(f"   coroutines on the event loop: {loop_mb:6.1f} MB ({loop_s:.2f} s)")
    print(f"   1,000 threads:                {threads_mb:6.1f} MB ({threads_s:.2f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--only", action="append", choices=SECTIONS,
                        help="run only this section (repeatable; default: all)")
    args = parser.parse_args()
    sections = set(args.only or SECTIONS)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}")
    with stderr_logs(), tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if "io" in sections:
            bench_io(directory, args.quick)
        if "rss" in sections:
            bench_rss(directory)
        if not sections & {"cpu", "overhead"}:
            return 0
        # One local cluster, one worker per core, started by this process (whose bare Ray tasks
        # are the baseline); the workers import the bench tasks. Each driver (this process,
        # and each backend's driver process) is a Ray job with workers of its own; Ray keeps
        # as many idle workers as cores, so measuring them in turn would start each one's
        # workers anew every time: keep enough for all three.
        import ray

        ray.init(num_cpus=os.cpu_count(), runtime_env=TASKS_ENV, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False,
                 _system_config={"num_workers_soft_limit": 3 * (os.cpu_count() or 1)})
        with fa.RayRollouts(runtime_env=TASKS_ENV) as ray_rollouts:
            if "cpu" in sections:
                bench_cpu(directory, ray_rollouts, 2 if args.quick else 5)
            if "overhead" in sections:
                bench_overhead(directory, ray_rollouts, 2 if args.quick else 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
