"""`GET /events` and `GET /metrics` through a real client on a loopback port.

The stream is the log: every frame's id is its position, a client that reconnects with
Last-Event-ID misses nothing and sees nothing twice, and the data is the event's export line.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from helpers import sim_spec, wait_until
from serving import frames, result, served, spec_json

from flowactors.events import CheckpointSaved, IterationCompleted, RecordedEvent
from flowactors.history import history_line
from flowactors.server.metrics import Tally

pytestmark = pytest.mark.timeout(90)


def log_lines(rt) -> dict[int, dict]:
    """Every event of the log as its export line, by position."""
    return {r.position: json.loads(history_line(r)) for r in rt.store.read_all()}


def burst(client: httpx.Client, jobs: int = 4, iterations: int = 25,
          rollout_seconds: float = 0.0) -> list[str]:
    """Start `jobs` jobs at once: a burst of events from several writers."""
    ids = [f"burst-{i}" for i in range(jobs)]
    for i, job_id in enumerate(ids):
        result(client, "training.start_grpo", job_id=job_id, spec=spec_json(sim_spec(
            n_iterations=iterations, seed=i, task_options={"rollout_seconds": rollout_seconds})))
    return ids


def test_a_reconnect_with_last_event_id_misses_nothing_and_repeats_nothing(rt):
    """Cut the stream mid-burst, reconnect with the last id received: the two connections
    together carry each position of the log exactly once, in order, as the log holds it."""
    with served(rt) as (_, client):
        received: list[tuple[int, dict]] = []
        with client.stream("GET", "/events", params={"after": 0}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            ids = burst(client, iterations=40, rollout_seconds=0.005)
            for frame in frames(response):
                received.append((frame.id, frame.data))
                if len(received) == 30:
                    break  # the connection drops mid-burst
        for job_id in ids:
            rt.wait(job_id, timeout=60)
        final = rt.store.head()[0]
        assert final > 4 * 40 > received[-1][0]  # much was written while disconnected
        headers = {"Last-Event-ID": str(received[-1][0])}
        with client.stream("GET", "/events", params={"after": 0}, headers=headers) as response:
            for frame in frames(response):
                received.append((frame.id, frame.data))
                if frame.id == final:
                    break
    positions = [p for p, _ in received]
    assert positions == list(range(1, final + 1))
    assert dict(received) == log_lines(rt)


def test_a_client_far_behind_reads_the_log_itself(rt):
    """A stream that starts before the buffer's reach (here 16 events) is served from the log,
    with the same frames; one that starts within it from the buffer."""
    with served(rt, event_buffer=16) as (_, client):
        with client.stream("GET", "/events") as response:  # keeps the hub reading
            for job_id in burst(client, jobs=2, iterations=20):
                rt.wait(job_id, timeout=60)
            final = rt.store.head()[0]
            for frame in frames(response):
                if frame.id == final:
                    break
        for start in (0, final - 5):
            with client.stream("GET", "/events", params={"after": start}) as response:
                got = []
                for frame in frames(response):
                    got.append(frame.id)
                    if frame.id == final:
                        break
            assert got == list(range(start + 1, final + 1))


def test_a_stream_of_one_job_and_where_streams_start(rt):
    """`?job=` carries only that job's events and resumes after its Last-Event-ID; with no
    position a stream starts at the log's head (only what comes next)."""
    with served(rt) as (_, client):
        result(client, "training.start_grpo", job_id="early", spec=spec_json(sim_spec()))
        rt.wait("early", timeout=30)
        start = rt.store.head()[0]
        with client.stream("GET", "/events") as live:
            burst(client, jobs=2, iterations=10)
            first = next(frames(live))
            assert first.id == start + 1 and first.data["type"] == "job.submitted"
        rt.wait("burst-1", timeout=30)
        with client.stream("GET", "/events", params={"job": "burst-1", "after": 0}) as one:
            got = []
            for frame in frames(one):
                got.append(frame)
                if frame.data["type"] == "job.completed":
                    break
        positions = [p for p, line in log_lines(rt).items() if line["stream"] == "burst-1"]
        assert [f.id for f in got] == positions
        assert {f.data["stream"] for f in got} == {"burst-1"}
        middle = positions[len(positions) // 2]
        with client.stream("GET", "/events", params={"job": "burst-1"},
                           headers={"Last-Event-ID": str(middle)}) as again:
            rest = []
            for frame in frames(again):
                rest.append(frame.id)
                if frame.id == positions[-1]:
                    break
        assert rest == [p for p in positions if p > middle]


def test_bad_stream_requests(rt):
    """An unknown job is 404; a Last-Event-ID that is not a position, or beyond the log's
    head, is 400."""
    with served(rt) as (_, client):
        result(client, "training.start_grpo", job_id="j", spec=spec_json(sim_spec()))
        rt.wait("j", timeout=30)
        assert client.get("/events", params={"job": "nope"}).status_code == 404
        for bad in ("abc", "-1", "1e3", str(rt.store.head()[0] + 1)):
            answer = client.get("/events", headers={"Last-Event-ID": bad})
            assert answer.status_code == 400, bad
            assert client.get("/events", params={"after": bad}).status_code == 400


def test_event_streams_are_bounded(rt):
    """Beyond `max_streams` open streams a new one is refused with 503 and Retry-After; once
    one closes, a new one is served."""
    with served(rt, max_streams=2) as (_, client):
        with client.stream("GET", "/events") as one:
            assert one.status_code == 200
            with client.stream("GET", "/events") as two:
                assert two.status_code == 200
                refused = client.get("/events")
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"

            def served_again() -> bool:
                with client.stream("GET", "/events") as three:
                    return three.status_code == 200

            wait_until(served_again, timeout=10, message="a stream slot to free up")


_SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\]|\\.)*",?)*\})? -?[0-9.e+-]+$|^[a-z_]+'
                     r'(\{[^}]*\})? NaN$')


def metrics(client: httpx.Client) -> dict[str, float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in answer.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        assert _SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_count_what_the_log_records(rt):
    """Jobs by status, per-job iterations, rollouts, failed rollouts, latest reward and
    held-out score, and checkpoint and commit latencies, as the log and the views say."""
    weird = 'we"ird\\id'  # job ids cannot hold these any more; agent ids can
    with served(rt) as (_, client):
        before = metrics(client)
        assert before['flowactors_jobs{status="running"}'] == 0
        assert before["flowactors_checkpoint_seconds_count"] == 0
        result(client, "training.start_grpo", job_id="m", spec=spec_json(sim_spec(
            n_iterations=10, checkpoint_interval=2, task_options={"failure_rate": 0.3})))
        rt.submit(sim_spec(weird, n_iterations=3), job_id="w")
        rt.submit(sim_spec(n_iterations=1000, checkpoint_interval=2,
                           task_options={"rollout_seconds": 0.01}), job_id="p")
        rt.wait("w", timeout=30)
        wait_until(lambda: rt.checkpoints("p"), message="p's first checkpoint")
        rt.pause("p")
        latest = max(rt.checkpoints("p"), key=lambda c: c.iteration)
        assert metrics(client)['flowactors_job_validation_score{job_id="p"}'] == \
            latest.validation_score
        rt.cancel("p")
        rt.wait("m", timeout=30)
        wait_until(lambda: metrics(client).get(
            'flowactors_iterations_total{job_id="m"}') == 10, message="the hub to read m")
        wait_until(lambda: metrics(client).get(
            'flowactors_log_position') == rt.store.head()[0], message="the head")
        after = metrics(client)
    iterations = [r.event for r in rt.history("m") if r.type == "job.iteration_completed"]
    view = rt.status("m")
    assert after['flowactors_jobs{status="completed"}'] == 2
    assert after['flowactors_jobs{status="cancelled"}'] == 1
    assert after['flowactors_job_iteration{job_id="m"}'] == 10
    assert after['flowactors_rollouts_total{job_id="m"}'] == \
        sum(e.n_trajectories for e in iterations)
    failures = sum(e.n_failed for e in iterations)
    assert failures > 0 and after['flowactors_rollout_failures_total{job_id="m"}'] == failures
    assert after['flowactors_job_avg_reward{job_id="m"}'] == view.metrics["avg_reward"]
    assert after['flowactors_job_validation_score{job_id="m"}'] == view.validation_score
    assert after['flowactors_job_info{job_id="w",agent_id="we\\"ird\\\\id",task="simulated",'
                 'status="completed"}'] == 1
    saved = sum(1 for job in ("m", "w", "p") for r in rt.history(job)
                if r.type == "job.checkpoint_saved")
    assert after["flowactors_checkpoint_seconds_count"] == saved
    assert after['flowactors_checkpoint_seconds_bucket{le="+Inf"}'] == saved
    assert after["flowactors_commit_delay_seconds_count"] >= 1
    assert after['flowactors_iterations_total{job_id="w"}'] == 3


def test_a_checkpoint_written_in_the_background_is_timed_from_its_own_iteration():
    """A late `CheckpointSaved` (appended after later iterations) is timed from its own
    iteration's event, and a checkpoint of an iteration never seen is not timed."""
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def recorded(position: int, seconds: float, event) -> RecordedEvent:  # noqa: ANN001
        return RecordedEvent(position=position, stream="j", version=position, type="t",
                             schema_version=1, recorded_at=start + timedelta(seconds=seconds),
                             event=event)

    def iteration(n: int) -> IterationCompleted:
        return IterationCompleted(iteration=n, avg_reward=0.0, loss=0.0, std_reward=0.0,
                                  success_rate=0.0)

    def checkpoint(n: int) -> CheckpointSaved:
        return CheckpointSaved(iteration=n, state_ref="0" * 64, validation_score=0.0,
                               policy_digest="0" * 64, optimizer_digest=None, rng_digest=None,
                               state_digest="0" * 64)

    tally = Tally()
    tally([recorded(1, 0.0, iteration(4)), recorded(2, 1.0, iteration(5)),
           recorded(3, 2.0, iteration(6)), recorded(4, 2.5, checkpoint(4)),
           recorded(5, 3.0, checkpoint(2))])
    histogram = "\n".join(tally.lines())
    assert "flowactors_checkpoint_seconds_count 1" in histogram
    assert "flowactors_checkpoint_seconds_sum 2.5" in histogram
