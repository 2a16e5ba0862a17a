"""One measurement of tools/bench_peers.py, run in a fresh process of the peers' environment.

    python bench_peers_worker.py WORKLOAD SYSTEM --dir DIR [options]

Prints one JSON object as its last line of standard output. The orchestrator
(tools/bench_peers.py) runs this script in its own virtual environment (which has DBOS and
eventsourcing installed, never the project's), a fresh process and a fresh directory for each
(workload, system, repetition), so no state or warm cache of a library leaks between runs.

Workloads (SYSTEM in brackets):
  steps      [flowactors dbos eventsourcing]  N jobs x M iterations of zero-cost work, each
             iteration durably recorded before the next starts, all jobs at once.
  build      [flowactors-crashed flowactors-running dbos eventsourcing]  write a history of
             N jobs x M events for `recover` (done once per run, copied for each repetition).
  recover    [same as build]  rebuild the state of those jobs in a new process.
  status     [flowactors dbos eventsourcing]  p50/p99 of reading one job's state while N jobs
             run iterations of 2 ms of work each.
  limit      [raw]  raw sqlite3 writes and raw read + msgspec decode on the same machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
STATUS_WORK_SECONDS = 0.002
READ_PACE_SECONDS = 0.0005
MIN_READS = 100
MAX_READ_FACTOR = 5

def iteration_data(i: int) -> dict[str, Any]:
    """The data of one iteration, the same for every system: what an RL job records."""
    return {"iteration": i, "avg_reward": 0.5 + i * 1e-6, "std_reward": 0.125,
            "loss": 0.25 - i * 1e-6, "success_rate": 0.5, "n_trajectories": 1, "tokens": 10,
            "cost_usd": 0.0}


def settings_text(journal_mode: str, synchronous: int) -> str:
    return f"journal_mode={str(journal_mode).upper()}, " \
           f"synchronous={SYNCHRONOUS_NAMES.get(int(synchronous), synchronous)}"


def percentile(sorted_samples: list[int], fraction: float) -> float:
    index = min(len(sorted_samples) - 1, int(len(sorted_samples) * fraction))
    return sorted_samples[index] / 1000.0  # ns -> us


def measure_reads(read: Any, seconds: float) -> dict[str, Any]:
    """Call read() from this thread about every READ_PACE_SECONDS for `seconds` (longer, up to
    MAX_READ_FACTOR times, to get MIN_READS samples); latency percentiles in us.

    Paced, not a busy loop: a busy loop of in-memory reads would hold the GIL and starve the
    very jobs it is meant to run beside."""
    samples: list[int] = []
    clock = time.perf_counter_ns
    pause = time.sleep
    now = time.monotonic
    stop, limit = now() + seconds, now() + MAX_READ_FACTOR * seconds
    while now() < stop or (len(samples) < MIN_READS and now() < limit):
        started = clock()
        read()
        samples.append(clock() - started)
        pause(READ_PACE_SECONDS)
    samples.sort()
    return {"p50_us": percentile(samples, 0.50), "p99_us": percentile(samples, 0.99),
            "calls": len(samples)}


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    import structlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# --- flowactors -------------------------------------------------------------------------------

def fa_spec(seed: int, n_iterations: int, rollout_seconds: float = 0.0) -> Any:
    import flowactors as fa
    return fa.JobSpec(
        agent_id=f"bench-{seed}", training_data=[fa.TrainingQuery(query=f"q{i}")
                                                 for i in range(8)],
        task="simulated",
        config=fa.GRPOConfig(n_iterations=n_iterations, batch_size=1,
                             n_trajectories_per_query=1, checkpoint_interval=n_iterations,
                             seed=seed),
        task_options={"rollout_seconds": rollout_seconds} if rollout_seconds else {})


def fa_settings(rt_or_store: Any) -> str:
    store = getattr(rt_or_store, "store", rt_or_store)

    def query(conn: sqlite3.Connection) -> str:
        return settings_text(conn.execute("PRAGMA journal_mode").fetchone()[0],
                             conn.execute("PRAGMA synchronous").fetchone()[0])
    return store._call_in_writer(query).result()


def fa_steps(directory: Path, n_jobs: int, n_iterations: int, synchronous: str) -> dict:
    import flowactors as fa
    rt = fa.Runtime(directory / "steps.db", max_concurrent_jobs=n_jobs,
                    synchronous=synchronous, handle_signals=False)
    try:
        specs = [fa_spec(i, n_iterations) for i in range(n_jobs)]
        started = time.perf_counter()
        ids = [rt.submit(s) for s in specs]
        views = [rt.wait(j, timeout=3600) for j in ids]
        elapsed = time.perf_counter() - started
        settings = fa_settings(rt)
        iterations = sum(v.progress.current_iteration for v in views)
    finally:
        rt.close()
    assert all(v.status is fa.JobStatus.COMPLETED for v in views), views[0]
    return {"seconds": elapsed, "iterations": iterations, "per_s": iterations / elapsed,
            "settings": settings}


def fa_build(path: Path, n_jobs: int, events_per_job: int, crashed: bool) -> dict:
    """The history flowactors recovers from.

    crashed: what a crash leaves: `n_jobs` real `simulated` jobs run by a runtime (a checkpoint
    every 5 iterations) until the log holds N x M events, every job's events interleaved with
    the others' as running jobs write them, then SIGKILL (tools/crashed_log.py).
    running: Submitted, Started, iterations, a checkpoint per job, written straight through
    the store: reopening resumes every job from its checkpoint (a JobRecovered event each,
    then they run on)."""
    if crashed:
        import crashed_log
        return {"events": crashed_log.build(path, n_jobs, n_jobs * events_per_job,
                                            progress=False)}
    import msgspec

    from flowactors import codec
    from flowactors.events import CheckpointSaved, IterationCompleted, JobStarted, JobSubmitted
    from flowactors.store import EventStore
    from flowactors.tasks import build_task
    n_iter = events_per_job - 3
    total = 0
    with EventStore(path, mode="owner", synchronous="off") as store:
        for j in range(n_jobs):
            spec = fa_spec(j, 10 * events_per_job)
            blob = msgspec.msgpack.encode(build_task(spec).init(spec))  # a real task state
            ref = codec.digest(blob)
            events: list = [JobSubmitted(spec=spec), JobStarted()]
            events += [IterationCompleted(**iteration_data(i)) for i in range(1, n_iter + 1)]
            events.append(CheckpointSaved(
                iteration=n_iter, state_ref=ref, validation_score=0.5, metrics={},
                policy_digest=ref, optimizer_digest=ref, rng_digest=ref, state_digest=ref))
            store.append(f"job-{j:04d}", events, 0, blobs=[blob])
            total += len(events)
    return {"events": total}


def fa_recover(path: Path, n_jobs: int, synchronous: str, crashed: bool) -> dict:
    """crashed: the time to open the runtime on the crashed log, which replays the whole log
    into every job's state and view and starts their actors. running: until every job has
    resumed (its JobRecovered event durable)."""
    import flowactors as fa
    started = time.perf_counter()
    rt = fa.Runtime(path, max_concurrent_jobs=n_jobs, synchronous=synchronous,
                    handle_signals=False)
    try:
        opened = time.perf_counter() - started
        if crashed:
            ready = opened
            views = rt.jobs()
            assert len(views) == n_jobs and all(not v.status.is_terminal for v in views)
        else:
            deadline = time.monotonic() + 600
            while sum(v.attempts >= 1 for v in rt.jobs()) < n_jobs:
                if time.monotonic() > deadline:
                    raise TimeoutError("jobs did not resume")
                time.sleep(0.002)
            ready = time.perf_counter() - started
        settings = fa_settings(rt)
        events = rt.store.head()[0]
    finally:
        rt.close()
    return {"seconds": ready, "open_s": opened, "events": events, "settings": settings}


def fa_status(directory: Path, n_jobs: int, seconds: float, synchronous: str) -> dict:
    import flowactors as fa
    rt = fa.Runtime(directory / "status.db", max_concurrent_jobs=n_jobs,
                    synchronous=synchronous, handle_signals=False)
    try:
        ids = [rt.submit(fa_spec(i, 1_000_000, STATUS_WORK_SECONDS)) for i in range(n_jobs)]
        while sum(rt.status(j).progress.current_iteration > 0 for j in ids) < n_jobs:
            time.sleep(0.01)
        target = ids[n_jobs // 2]
        before = sum(rt.status(j).progress.current_iteration for j in ids)
        started = time.perf_counter()
        result = measure_reads(lambda: rt.status(target), seconds)
        elapsed = time.perf_counter() - started
        after = sum(rt.status(j).progress.current_iteration for j in ids)
        result["settings"] = fa_settings(rt)
    finally:
        rt.close()
    result["iterations_per_s_meanwhile"] = (after - before) / elapsed
    return result


# --- DBOS ---------------------------------------------------------------------------------

_dbos_mode = {"build": False, "recovered": 0, "steps": 0}
_dbos_lock = threading.Lock()
_dbos_blocked = threading.Event()
_dbos_sleep = 0.0
_dbos_running: set[str] = set()  # workflows that ran a step (status workload)


def dbos_setup(path: Path) -> Any:
    """DBOS with a SQLite system database at `path` (its defaults otherwise: a pool of 20
    connections; a larger one was slower here) and this script's workflow registered."""
    from dbos import DBOS
    logging.getLogger("dbos").setLevel(logging.WARNING)
    DBOS(config={"name": "flowactors-bench", "system_database_url": f"sqlite:///{path}",
                 "log_level": "WARNING", "application_version": "bench-1"})

    @DBOS.step()
    def bench_iteration(i: int) -> dict:
        if _dbos_sleep:  # the status workload: counted in memory, not by querying the file
            time.sleep(_dbos_sleep)
            with _dbos_lock:
                _dbos_mode["steps"] += 1
                _dbos_running.add(DBOS.workflow_id or "")
        return iteration_data(i)

    @DBOS.workflow()
    def bench_job(n_iterations: int) -> int:
        for i in range(1, n_iterations + 1):
            bench_iteration(i)
        if _dbos_mode["build"]:  # the build run stops here, its workflows left pending
            _dbos_blocked.set()
            threading.Event().wait()
        with _dbos_lock:
            _dbos_mode["recovered"] += 1
        return n_iterations

    DBOS.launch()
    return bench_job


def dbos_settings() -> str:
    from dbos._dbos import _get_dbos_instance
    engine = _get_dbos_instance()._sys_db.engine
    with engine.connect() as conn:
        return settings_text(conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
                             conn.exec_driver_sql("PRAGMA synchronous").scalar())


def dbos_steps(directory: Path, n_jobs: int, n_iterations: int) -> dict:
    from dbos import DBOS
    workflow = dbos_setup(directory / "dbos.sqlite")
    started = time.perf_counter()
    handles = [DBOS.start_workflow(workflow, n_iterations) for _ in range(n_jobs)]
    iterations = sum(h.get_result() for h in handles)
    elapsed = time.perf_counter() - started
    settings = dbos_settings()
    DBOS.destroy()
    return {"seconds": elapsed, "iterations": iterations, "per_s": iterations / elapsed,
            "settings": settings}


def dbos_build(path: Path, n_jobs: int, events_per_job: int) -> dict:
    """One real DBOS workflow runs `events_per_job` steps and is left pending (this process
    exits without finishing it); its rows are then copied to N-1 more workflow ids, so the file
    holds N pending workflows with M recorded steps each, exactly as DBOS wrote them."""
    from dbos import DBOS
    _dbos_mode["build"] = True
    workflow = dbos_setup(path)
    handle = DBOS.start_workflow(workflow, events_per_job)
    if not _dbos_blocked.wait(3600):
        raise TimeoutError("the DBOS build workflow did not finish its steps")
    source = handle.workflow_id
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("CREATE TEMP TABLE ids (id TEXT)")
    conn.executemany("INSERT INTO ids VALUES (?)",
                     [(str(uuid.uuid4()),) for _ in range(n_jobs - 1)])
    for table in ("workflow_status", "workflow_input", "operation_outputs"):
        columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        quoted = ", ".join(f'"{c}"' for c in columns)
        selected = ", ".join("ids.id" if c == "workflow_uuid" else f't."{c}"' for c in columns)
        conn.execute(f"INSERT INTO {table} ({quoted}) SELECT {selected} FROM {table} t, ids "
                     f"WHERE t.workflow_uuid = ?", (source,))
    conn.execute("COMMIT")
    pending = conn.execute("SELECT count(*) FROM workflow_status WHERE status = 'PENDING'"
                           ).fetchone()[0]
    steps = conn.execute("SELECT count(*) FROM operation_outputs").fetchone()[0]
    conn.close()
    print(json.dumps({"events": steps, "pending": pending}), flush=True)
    os._exit(0)  # a crash: the workflows stay pending


def dbos_recover(path: Path, n_jobs: int) -> dict:
    from dbos import DBOS
    started = time.perf_counter()
    dbos_setup(path)  # launch() finds the pending workflows and recovers them
    opened = time.perf_counter() - started
    deadline = time.monotonic() + 3600
    while _dbos_mode["recovered"] < n_jobs:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {_dbos_mode['recovered']} workflows recovered")
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    settings = dbos_settings()
    DBOS.destroy()
    return {"seconds": elapsed, "open_s": opened, "settings": settings}


def dbos_status(directory: Path, n_jobs: int, seconds: float) -> dict:
    global _dbos_sleep
    from dbos import DBOS
    _dbos_sleep = STATUS_WORK_SECONDS
    workflow = dbos_setup(directory / "dbos.sqlite")
    handles = [DBOS.start_workflow(workflow, 10_000_000) for _ in range(n_jobs)]
    while len(_dbos_running) < n_jobs:
        time.sleep(0.01)
    target = handles[n_jobs // 2].workflow_id
    before = _dbos_mode["steps"]
    started = time.perf_counter()
    result = measure_reads(lambda: DBOS.get_workflow_status(target), seconds)
    elapsed = time.perf_counter() - started
    result["iterations_per_s_meanwhile"] = (_dbos_mode["steps"] - before) / elapsed
    result["settings"] = dbos_settings()
    return result


# --- eventsourcing ------------------------------------------------------------------------

try:  # eventsourcing's aggregates are defined at module level so their topics resolve
    from eventsourcing.application import Application as _ESApplication
    from eventsourcing.domain import Aggregate as _ESAggregate
    from eventsourcing.domain import event as _es_event
except ImportError:  # only the eventsourcing measurements need it
    _ESApplication = _ESAggregate = None  # type: ignore[assignment,misc]

if _ESAggregate is not None:
    class TrainingJob(_ESAggregate):  # type: ignore[misc,valid-type]
        """A training job as an eventsourcing aggregate: one event per iteration."""

        def __init__(self, agent_id: str) -> None:
            self.agent_id = agent_id
            self.iteration = 0
            self.metrics: dict[str, float] = {}
            self.tokens = 0
            self.cost_usd = 0.0

        @_es_event("IterationCompleted")
        def complete_iteration(self, iteration: int, avg_reward: float, std_reward: float,
                               loss: float, success_rate: float, n_trajectories: int,
                               tokens: int, cost_usd: float) -> None:
            self.iteration = iteration
            self.metrics = {"avg_reward": avg_reward, "std_reward": std_reward, "loss": loss,
                            "success_rate": success_rate}
            self.tokens += tokens
            self.cost_usd += cost_usd


def es_app(path: Path) -> Any:
    """An eventsourcing application persisted in SQLite at `path` (its default settings)."""
    return _ESApplication(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite",
                               "SQLITE_DBNAME": str(path)})


def es_settings(app: Any) -> str:
    with app.factory.datastore.get_connection(commit=False) as conn:
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode")
        journal = cursor.fetchone()[0]
        cursor.execute("PRAGMA synchronous")
        synchronous = cursor.fetchone()[0]
    return settings_text(journal, synchronous)


def es_run_threads(target: Any, n: int) -> float:
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        barrier.wait()
        try:
            target(k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def es_steps(directory: Path, n_jobs: int, n_iterations: int) -> dict:
    app = es_app(directory / "es.sqlite")

    def job(k: int) -> None:
        aggregate = TrainingJob(agent_id=f"bench-{k}")
        app.save(aggregate)
        for i in range(1, n_iterations + 1):
            aggregate.complete_iteration(**iteration_data(i))
            app.save(aggregate)

    elapsed = es_run_threads(job, n_jobs)
    iterations = n_jobs * n_iterations
    settings = es_settings(app)
    app.close()
    return {"seconds": elapsed, "iterations": iterations, "per_s": iterations / elapsed,
            "settings": settings}


def es_build(path: Path, n_jobs: int, events_per_job: int) -> dict:
    app = es_app(path)
    ids = []
    for k in range(n_jobs):
        aggregate = TrainingJob(agent_id=f"bench-{k}")
        for i in range(1, events_per_job):
            aggregate.complete_iteration(**iteration_data(i))
        app.save(aggregate)  # one transaction of M events per aggregate
        ids.append(aggregate.id.hex)
    app.close()
    (path.parent / (path.name + ".ids")).write_text("\n".join(ids))
    return {"events": n_jobs * events_per_job}


def es_recover(path: Path, n_jobs: int) -> dict:
    ids = [uuid.UUID(line) for line in
           (path.parent / (path.name + ".ids")).read_text().split()]
    started = time.perf_counter()
    app = es_app(path)
    get = app.repository.get
    states = {aggregate_id: get(aggregate_id) for aggregate_id in ids}
    elapsed = time.perf_counter() - started
    assert len(states) == n_jobs and all(s.iteration > 0 for s in states.values())
    settings = es_settings(app)
    app.close()
    return {"seconds": elapsed, "settings": settings}


def es_status(directory: Path, n_jobs: int, seconds: float) -> dict:
    app = es_app(directory / "es.sqlite")
    stop = threading.Event()
    aggregates = [TrainingJob(agent_id=f"bench-{k}") for k in range(n_jobs)]
    app.save(*aggregates)
    done = [0] * n_jobs

    def job(k: int) -> None:
        aggregate = aggregates[k]
        i = 0
        while not stop.is_set():
            i += 1
            time.sleep(STATUS_WORK_SECONDS)  # the iteration's work
            aggregate.complete_iteration(**iteration_data(i))
            app.save(aggregate)
            done[k] = i

    threads = [threading.Thread(target=job, args=(k,), daemon=True) for k in range(n_jobs)]
    for t in threads:
        t.start()
    while min(done) == 0:
        time.sleep(0.01)
    target = aggregates[n_jobs // 2].id
    before = sum(done)
    started = time.perf_counter()
    result = measure_reads(lambda: app.repository.get(target), seconds)
    elapsed = time.perf_counter() - started
    result["iterations_per_s_meanwhile"] = (sum(done) - before) / elapsed
    stop.set()
    for t in threads:
        t.join()
    result["settings"] = es_settings(app)
    app.close()
    return result


# --- the limit: raw SQLite ------------------------------------------------------------------

def raw_rows(n_jobs: int, n_iterations: int) -> list[tuple]:
    """Event rows as flowactors stores them (encoded IterationCompleted, chained hashes),
    jobs interleaved one event at a time, as concurrent jobs append them."""
    from flowactors import codec
    from flowactors.events import IterationCompleted
    from flowactors.store import GENESIS_HASH, row_hash
    streams = [uuid.uuid4().hex for _ in range(n_jobs)]
    rows: list[tuple] = []
    prev = GENESIS_HASH
    ts = "2026-01-01T00:00:00.000000+00:00"
    for i in range(1, n_iterations + 1):
        type_, schema_version, data = codec.encode_event(IterationCompleted(**iteration_data(i)))
        for stream in streams:
            position = len(rows) + 1
            prev = row_hash(prev, position, stream, i, type_, schema_version, ts, data)
            rows.append((position, stream, i, type_, schema_version, ts, data, prev))
    return rows


INSERT = ("INSERT INTO events (position, stream, version, type, schema_version, recorded_at, "
          "data, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def raw_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    from flowactors.store import EventStore
    EventStore(path).close()  # the store's schema (with its triggers and indexes)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    return conn


def raw_limit(directory: Path, n_jobs: int, n_iterations: int, synchronous: str,
              read_log: Path | None) -> dict:
    rows = raw_rows(n_jobs, n_iterations)
    result: dict[str, Any] = {}
    # 1. every iteration of every job in ONE transaction: the ceiling of any durable log.
    conn = raw_connection(directory / "raw-one.db", synchronous)
    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    result["one_txn_per_s"] = len(rows) / (time.perf_counter() - started)
    result["settings"] = settings_text(conn.execute("PRAGMA journal_mode").fetchone()[0],
                                       conn.execute("PRAGMA synchronous").fetchone()[0])
    conn.close()
    # 2. one commit per row from one thread: the bound of a log without group commit.
    conn = raw_connection(directory / "raw-each.db", synchronous)
    subset = rows[:min(len(rows), 2_000)]
    started = time.perf_counter()
    for row in subset:
        conn.execute("BEGIN")
        conn.execute(INSERT, row)
        conn.execute("COMMIT")
    result["commit_each_per_s"] = len(subset) / (time.perf_counter() - started)
    conn.close()
    # 3. raw read + decode of the recovery log: the ceiling of any replay.
    if read_log is not None:
        import msgspec

        from flowactors.events import JobEvent
        decode = msgspec.msgpack.Decoder(JobEvent).decode
        conn = sqlite3.connect(f"file:{read_log}?mode=ro", uri=True)
        started = time.perf_counter()
        n = 0
        for (data,) in conn.execute("SELECT data FROM events ORDER BY position"):
            decode(data)
            n += 1
        elapsed = time.perf_counter() - started
        conn.close()
        result["read_decode_s"] = elapsed
        result["read_decode_events"] = n
        result["read_decode_per_s"] = n / elapsed
    return result


# --- main -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["steps", "build", "recover", "status", "limit"])
    parser.add_argument("system")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--path", type=Path, help="the history file (build, recover, limit)")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=100,
                        help="iterations per job (steps, limit) or events per job (build)")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal", "off"])
    args = parser.parse_args(argv)
    quiet_logging()
    w, s, d = args.workload, args.system, args.dir
    d.mkdir(parents=True, exist_ok=True)
    sync = args.synchronous
    runs = {
        ("steps", "flowactors"): lambda: fa_steps(d, args.jobs, args.iterations, sync),
        ("steps", "dbos"): lambda: dbos_steps(d, args.jobs, args.iterations),
        ("steps", "eventsourcing"): lambda: es_steps(d, args.jobs, args.iterations),
        ("build", "flowactors-crashed"):
            lambda: fa_build(args.path, args.jobs, args.iterations, crashed=True),
        ("build", "flowactors-running"):
            lambda: fa_build(args.path, args.jobs, args.iterations, crashed=False),
        ("build", "dbos"): lambda: dbos_build(args.path, args.jobs, args.iterations),
        ("build", "eventsourcing"): lambda: es_build(args.path, args.jobs, args.iterations),
        ("recover", "flowactors-crashed"):
            lambda: fa_recover(args.path, args.jobs, sync, crashed=True),
        ("recover", "flowactors-running"):
            lambda: fa_recover(args.path, args.jobs, sync, crashed=False),
        ("recover", "dbos"): lambda: dbos_recover(args.path, args.jobs),
        ("recover", "eventsourcing"): lambda: es_recover(args.path, args.jobs),
        ("status", "flowactors"): lambda: fa_status(d, args.jobs, args.seconds, sync),
        ("status", "dbos"): lambda: dbos_status(d, args.jobs, args.seconds),
        ("status", "eventsourcing"): lambda: es_status(d, args.jobs, args.seconds),
        ("limit", "raw"): lambda: raw_limit(d, args.jobs, args.iterations, sync, args.path),
    }
    if (w, s) not in runs:
        parser.error(f"no {w!r} measurement for {s!r}")
    result = runs[(w, s)]()
    result.update(workload=w, system=s)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    # Peers leave non-daemon threads behind (DBOS's executor with workflows still running):
    # the measurement is printed, so leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
