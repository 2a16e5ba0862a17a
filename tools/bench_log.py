"""Benchmark of the event log: the store's group commit and replay against raw SQLite.

Not a test: it prints rows/s and each figure's ratio to the raw one. Both sides use the same
table schema (the store creates it) with journal_mode=WAL and synchronous=FULL.

  1. raw sqlite3 executemany of N rows in ONE transaction (hashes precomputed, 100 streams
     interleaved, 4 events each): the limit;
  2. raw commits of 100 rows each;
  3. the store's acknowledged appends from 1, 10 and 100 threads, 4 events per append, each
     thread its own stream;
  4. replay: the store's read_all with a trivial fold, against raw SELECT data + msgspec decode.

Targets: 100 appenders >= 40% of (1); replay >= 50% of raw read + decode. Other processes on the
machine move every figure, so each one is the best of --rounds interleaved rounds.

Usage: python tools/bench_log.py [--rows N] [--rounds R]
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

import msgspec
import structlog

from flowactors import codec
from flowactors.events import IterationCompleted, JobEvent
from flowactors.store import GENESIS_HASH, EventStore, row_hash

EVENTS_PER_APPEND = 4
SYNCHRONOUS_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
INSERT = ("INSERT INTO events (position, stream, version, type, schema_version, recorded_at, "
          "data, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def make_event(i: int) -> IterationCompleted:
    """An iteration event as a job of the built-in tool-choice task records it (its update
    reports grad_norm, success_rate and entropy besides the loss): ~240 bytes of MessagePack."""
    return IterationCompleted(
        iteration=i, avg_reward=0.5 + i * 1e-6, std_reward=0.125, loss=0.75 - i * 1e-6,
        success_rate=0.625,
        metrics={"grad_norm": 0.0123 * (i % 7), "success_rate": 0.625, "entropy": 1.0986},
        n_trajectories=64, n_failed=2, tokens=12_345 + i, cost_usd=0.0123)


def new_log(directory: str, name: str) -> str:
    """A fresh, empty log with the store's schema; the store is closed again."""
    path = os.path.join(directory, name)
    EventStore(path).close()
    return path


def raw_rows(n: int, n_streams: int = 100) -> list[tuple]:
    """n event rows as the store would write them: streams interleaved 4 events at a time,
    one timestamp per 100 appends (a group commit), hashes chained in advance."""
    streams = [uuid.uuid4().hex for _ in range(n_streams)]
    versions = dict.fromkeys(streams, 0)
    rows: list[tuple] = []
    prev = GENESIS_HASH
    append = 0
    while len(rows) < n:
        stream = streams[append % n_streams]
        ts = f"2026-01-01T00:00:{append // 100 % 60:02d}.{append:06d}+00:00"
        append += 1
        for _ in range(EVENTS_PER_APPEND):
            position = len(rows) + 1
            versions[stream] += 1
            type_, schema_version, data = codec.encode_event(make_event(position))
            prev = row_hash(prev, position, stream, versions[stream], type_, schema_version,
                            ts, data)
            rows.append((position, stream, versions[stream], type_, schema_version, ts, data,
                         prev))
    return rows[:n]


def settings_of(conn: sqlite3.Connection) -> str:
    journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    return f"journal_mode={journal}, synchronous={SYNCHRONOUS_NAMES[synchronous]}"


def bench_raw(directory: str, rows: list[tuple], per_commit: int) -> tuple[float, str]:
    """Rows/s of raw executemany, committing every `per_commit` rows."""
    path = new_log(directory, f"raw-{per_commit}-{uuid.uuid4().hex[:6]}.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    start = time.perf_counter()
    for k in range(0, len(rows), per_commit):
        conn.execute("BEGIN")
        conn.executemany(INSERT, rows[k:k + per_commit])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    settings = settings_of(conn)
    conn.close()
    return len(rows) / elapsed, settings


def bench_store(path: str, n_threads: int, appends_per_thread: int) -> tuple[float, str]:
    """Rows/s of acknowledged appends from `n_threads` threads, each on its own stream."""
    batches = [[make_event(i * EVENTS_PER_APPEND + j) for j in range(EVENTS_PER_APPEND)]
               for i in range(appends_per_thread)]
    with EventStore(path, synchronous="full") as store:
        barrier = threading.Barrier(n_threads + 1)
        errors: list[BaseException] = []

        def appender() -> None:
            stream = uuid.uuid4().hex
            version = 0
            barrier.wait()
            try:
                for events in batches:
                    version = store.append(stream, events, version)[-1].version
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=appender, daemon=True) for _ in range(n_threads)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        rows = n_threads * appends_per_thread * EVENTS_PER_APPEND
        assert store.head()[0] == rows
        settings = store._call_in_writer(settings_of).result()
    return rows / elapsed, settings


def bench_replay_raw(path: str) -> float:
    decoder = msgspec.msgpack.Decoder(JobEvent)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    start = time.perf_counter()
    n = 0
    total = 0
    for (data,) in conn.execute("SELECT data FROM events ORDER BY position"):
        total += decoder.decode(data).iteration
        n += 1
    rate = n / (time.perf_counter() - start)
    conn.close()
    return rate


def bench_replay_store(path: str) -> float:
    with EventStore(path, mode="readonly") as store:
        start = time.perf_counter()
        last_reward: dict[str, float] = {}  # a trivial fold: the latest reward per job
        n = 0
        for recorded in store.read_all():
            last_reward[recorded.stream] = recorded.event.avg_reward
            n += 1
        return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the raw runs")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each figure is the best")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    rows = raw_rows(args.rows)
    figures: dict[str, list[float]] = {}
    settings: dict[str, str] = {}
    runs: list[tuple[str, Callable[[str], tuple[float, str] | float]]] = [
        ("raw_one", lambda d: bench_raw(d, rows, len(rows))),
        ("raw_100", lambda d: bench_raw(d, rows, 100)),
        ("store_1", lambda d: bench_store(os.path.join(d, "s1.db"), 1, 500)),
        ("store_10", lambda d: bench_store(os.path.join(d, "s10.db"), 10, 250)),
        ("store_100", lambda d: bench_store(os.path.join(d, "s100.db"), 100, 250)),
        ("replay_raw", lambda d: bench_replay_raw(os.path.join(d, "s100.db"))),
        ("replay_store", lambda d: bench_replay_store(os.path.join(d, "s100.db"))),
    ]
    started = time.perf_counter()
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-log-") as directory:
            for name, run in runs:
                result = run(directory)
                if isinstance(result, tuple):
                    result, settings[name] = result
                figures.setdefault(name, []).append(result)
    best = {name: max(values) for name, values in figures.items()}

    size = len(codec.encode_event(make_event(1))[2])
    print(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{EVENTS_PER_APPEND} events per append, {size}-byte payloads; "
          f"best of {args.rounds} rounds")
    print(f"raw side:   {settings['raw_one']}")
    print(f"store side: {settings['store_100']}")
    limit = best["raw_one"]

    def line(label: str, name: str, base: float, base_label: str) -> None:
        print(f"  {label:<38}{best[name]:>11,.0f} rows/s  {best[name] / base:7.1%} "
              f"of {base_label}")

    print(f"  {'raw executemany, one transaction':<38}{limit:>11,.0f} rows/s  (the limit)")
    line("raw commits of 100 rows", "raw_100", limit, "the limit")
    for n in (1, 10, 100):
        line(f"store, {n} appender thread{'s' if n > 1 else ''}", f"store_{n}", limit,
             "the limit")
    print(f"  {'raw SELECT data + msgspec decode':<38}{best['replay_raw']:>11,.0f} rows/s")
    line("store read_all + decode + fold", "replay_store", best["replay_raw"], "raw read")
    appenders = best["store_100"] / limit
    replay = best["replay_store"] / best["replay_raw"]
    print(f"targets: 100 appenders >= 40% of the limit: {appenders:.1%} "
          f"{'met' if appenders >= 0.4 else 'NOT met'}; replay >= 50% of raw: {replay:.1%} "
          f"{'met' if replay >= 0.5 else 'NOT met'}  ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
