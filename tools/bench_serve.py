"""Benchmark of the server (not part of the test suite).

    python tools/bench_serve.py [--seconds 5] [--jobs 100] [--clients 32] [--subscribers 50]

A child process runs a Runtime with `--jobs` `simulated` jobs (rollouts of `--rollout`
seconds, so they stay running) served on a loopback port, exactly as `flowactors serve` serves
it. This process drives it over HTTP with a minimal asyncio HTTP/1.1 client (keep-alive
connections, hand-parsed responses), so that the client's own cost stays small. Prints, in one
run, each phase `--seconds` long:
  1. the jobs' iterations/s with no HTTP load (the baseline);
  2. `GET /healthz` latency p50/p99 from `--clients` concurrent clients (the server's floor);
  3. `training.get_status` latency p50/p99 from `--clients` concurrent clients, and the jobs'
     iterations/s meanwhile: first closed-loop (each client sends its next request as soon
     as it has the answer: the server's saturation, where latency is queueing), then paced
     at `--hz` requests/s per client (the latency of a loaded but not saturated server);
  4. `/events` fan-out to `--subscribers` streams: delay from a batch's timestamp (taken by the
     store just before its commit) to delivery, p50/p99, and the jobs' iterations/s meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

GOAL_STATUS_P99_MS = 5.0
GOAL_FANOUT_P99_MS = 50.0
ORIGINAL_STATUS_P95_MS = 200.0


# --- the child: the server ---------------------------------------------------------------------


def serve_child(db: str, jobs: int) -> None:
    """Open a runtime, serve it, print `PORT TOKEN`, serve until stdin closes."""
    from flowactors import Runtime
    from flowactors.console import stderr_logs
    from flowactors.server import BackgroundServer, create_app, load_or_create_token

    token = load_or_create_token(db)
    with stderr_logs(), Runtime(db, max_concurrent_jobs=max(jobs, 1), handle_signals=False) as runtime:
        server = BackgroundServer(create_app(runtime, token=token, max_streams=128)).start()
        try:
            print(server.port, token, flush=True)
            sys.stdin.read()
        finally:
            server.stop()


# --- a minimal HTTP/1.1 client -----------------------------------------------------------------


class Conn:
    """One keep-alive connection; `call` sends a request and reads its whole response."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.head = (f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/json\r\n")

    async def open(self) -> Conn:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def send(self, method: str, path: str, body: bytes = b"") -> None:
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}"
                          f"\r\n\r\n".encode() + body)

    async def headers(self) -> int:
        status = int((await self.reader.readline()).split()[1])
        self.length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                self.length = int(value)
        return status

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        await self.send(method, path, body)
        status = await self.headers()
        return status, await self.reader.readexactly(self.length)

    def close(self) -> None:
        self.writer.close()


def rpc_body(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the phases --------------------------------------------------------------------------------


async def iterations(conn: Conn) -> int:
    """The jobs' completed iterations, summed (on a fresh connection: uvicorn closes one
    idle for 5 s)."""
    conn = await Conn(conn.port, conn.token).open()
    try:
        status, body = await conn.call("POST", "/rpc", rpc_body("training.list_jobs"))
    finally:
        conn.close()
    assert status == 200, body
    return sum(v["progress"]["current_iteration"] for v in json.loads(body)["result"])


async def rate_during(conn: Conn, seconds: float, work) -> tuple[float, object]:
    """The jobs' iterations/s while `work` (a coroutine, or None) runs for `seconds`."""
    before, start = await iterations(conn), time.perf_counter()
    result = await work if work is not None else await asyncio.sleep(seconds)
    after, end = await iterations(conn), time.perf_counter()
    return (after - before) / (end - start), result


async def load(port: int, token: str, clients: int, seconds: float, path: str,
               bodies: list[bytes] | None, hz: float = 0.0) -> list[float]:
    """Latencies (s) of `clients` clients calling `path` for `seconds`: closed-loop (each
    sends its next request as soon as the last is answered), or paced at `hz` requests/s
    each (open-loop: a late answer does not delay the schedule)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        conn = await Conn(port, token).open()
        clock = time.perf_counter
        due = clock() + random.random() / hz if hz else 0.0
        try:
            while clock() < deadline:
                body = random.choice(bodies) if bodies else b""
                if hz:
                    await asyncio.sleep(max(0.0, due - clock()))
                    due += 1 / hz
                start = clock()
                status, answer = await conn.call("POST" if bodies else "GET", path, body)
                latencies.append(clock() - start)
                if status != 200 or b'"error":{' in answer:
                    errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    assert errors == 0, f"{errors} failed requests"
    return latencies


_STAMP = re.compile(rb'"recorded_at":"([^"]+)"')


async def fan_out(port: int, token: str, subscribers: int, seconds: float
                  ) -> tuple[list[float], list[int]]:
    """Delays (s) from each event's timestamp to its delivery, over `subscribers` streams."""
    delays: list[float] = []
    counts: list[int] = []
    connected = asyncio.Event()
    ready = 0
    stop = asyncio.Event()

    async def subscriber() -> None:
        nonlocal ready
        conn = await Conn(port, token).open()
        await conn.send("GET", "/events")
        assert await conn.headers() == 200
        ready += 1
        if ready == subscribers:
            connected.set()
        await connected.wait()
        n = 0
        now = time.time
        try:
            while not stop.is_set():
                try:
                    line = await asyncio.wait_for(conn.reader.readline(), 1.0)
                except TimeoutError:
                    continue
                if line.startswith(b"data: "):
                    stamp = _STAMP.search(line)
                    delays.append(now() - datetime.fromisoformat(
                        stamp.group(1).decode()).timestamp())
                    n += 1
        finally:
            counts.append(n)
            conn.close()

    tasks = [asyncio.ensure_future(subscriber()) for _ in range(subscribers)]
    await asyncio.wait_for(connected.wait(), 30)
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    return delays, counts


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


async def drive(port: int, token: str, args: argparse.Namespace) -> None:
    conn = await Conn(port, token).open()
    spec = {"agent_id": "bench", "training_data": [{"query": f"q{i}"} for i in range(8)],
            "config": {"n_iterations": 1_000_000, "batch_size": 2,
                       "n_trajectories_per_query": 2, "checkpoint_interval": 10, "seed": 0},
            "task": "simulated", "task_options": {"rollout_seconds": args.rollout}}
    batch = [{"jsonrpc": "2.0", "id": i, "method": "training.start_grpo",
              "params": {"spec": dict(spec, config=dict(spec["config"], seed=i)),
                         "job_id": f"bench-{i}"}} for i in range(args.jobs)]
    if batch:
        status, body = await conn.call("POST", "/rpc", json.dumps(batch).encode())
        assert status == 200 and b'"error":{' not in body, body[:500]
    while True:
        _, body = await conn.call("POST", "/rpc", rpc_body("training.list_jobs",
                                                           status="running"))
        if len(json.loads(body)["result"]) == args.jobs:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let the jobs settle into their pace
    print(f"{args.jobs} jobs running (simulated, rollouts of {args.rollout} s); "
          f"{args.seconds:g} s per phase")

    baseline, _ = await rate_during(conn, args.seconds, None)
    print(f"  iterations/s, no HTTP load:               {baseline:8.1f}")

    health = await load(port, token, args.clients, args.seconds, "/healthz", None)
    print(f"  GET /healthz, {args.clients} clients:  p50 {ms(percentile(health, .5)):>10}  "
          f"p99 {ms(percentile(health, .99)):>10}  ({len(health) / args.seconds:.0f} req/s)")

    bodies = [rpc_body("training.get_status", job_id=f"bench-{i}") for i in range(args.jobs)]
    rate, status_lat = await rate_during(conn, args.seconds, load(
        port, token, args.clients, args.seconds, "/rpc", bodies))
    p99 = percentile(status_lat, .99)
    print(f"  training.get_status, {args.clients} clients:  p50 "
          f"{ms(percentile(status_lat, .5)):>10}  p99 {ms(p99):>10}  "
          f"({len(status_lat) / args.seconds:.0f} req/s; goal p99 <= {GOAL_STATUS_P99_MS} ms: "
          f"{'met' if p99 * 1000 <= GOAL_STATUS_P99_MS else 'NOT met'}; the original system: "
          f"p95 < {ORIGINAL_STATUS_P95_MS:.0f} ms)")
    print(f"  iterations/s meanwhile:                   {rate:8.1f} "
          f"({100 * (rate / baseline - 1) if baseline else 0:+.1f}% against no load)")

    rate, paced = await rate_during(conn, args.seconds, load(
        port, token, args.clients, args.seconds, "/rpc", bodies, hz=args.hz))
    p99 = percentile(paced, .99)
    print(f"  training.get_status, {args.clients} clients at {args.hz:g} req/s each: p50 "
          f"{ms(percentile(paced, .5)):>10}  p99 {ms(p99):>10}  "
          f"({len(paced) / args.seconds:.0f} req/s; goal p99 <= {GOAL_STATUS_P99_MS} ms: "
          f"{'met' if p99 * 1000 <= GOAL_STATUS_P99_MS else 'NOT met'})")
    print(f"  iterations/s meanwhile:                   {rate:8.1f} "
          f"({100 * (rate / baseline - 1) if baseline else 0:+.1f}% against no load)")

    rate, (delays, counts) = await rate_during(conn, args.seconds, fan_out(
        port, token, args.subscribers, args.seconds))
    p99 = percentile(delays, .99)
    print(f"  /events to {args.subscribers} subscribers: {len(delays)} deliveries, "
          f"{min(counts)}-{max(counts)} each; stamp-to-delivery p50 "
          f"{ms(percentile(delays, .5))}  p99 {ms(p99)} (goal p99 <= {GOAL_FANOUT_P99_MS:.0f} "
          f"ms: {'met' if p99 * 1000 <= GOAL_FANOUT_P99_MS else 'NOT met'})")
    print(f"  iterations/s meanwhile:                   {rate:8.1f} "
          f"({100 * (rate / baseline - 1) if baseline else 0:+.1f}% against no load)")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--hz", type=float, default=25.0,
                        help="requests/s of each client in the paced phase")
    parser.add_argument("--rollout", type=float, default=0.2,
                        help="seconds each simulated rollout takes")
    parser.add_argument("--serve", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_child(args.serve, args.jobs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(Path(tmp) / "bench.db"), "--jobs",
             str(args.jobs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        try:
            assert child.stdout is not None and child.stdin is not None
            port, token = child.stdout.readline().split()
            try:
                import uvloop  # the client's own cost matters at thousands of requests/s
                uvloop.run(drive(int(port), token, args))
            except ImportError:
                asyncio.run(drive(int(port), token, args))
        finally:
            if child.stdin is not None:
                child.stdin.close()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


if __name__ == "__main__":
    main()
