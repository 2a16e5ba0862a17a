"""`GET /metrics` in Prometheus' text format (version 0.0.4).

Gauges come from the runtime's views (jobs by status; each job's iteration, latest reward,
rollout success, held-out score, cost). Counters and latencies come from the events the hub
reads from the log, so they count from the server's start, as Prometheus counters do:
iterations, rollouts and failed rollouts per job, the time a checkpoint took (from its
iteration's event to its checkpoint's, by the log's own timestamps), and the commit delay (from
the time the store stamped a batch, just before writing it, to the moment the server read it
committed: the commit itself plus at most one poll of the head).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import datetime

from ..events import CheckpointSaved, IterationCompleted, RecordedEvent
from ..runtime import Runtime
from ..views import JobStatus, JobView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus' histogram)."""

    def __init__(self, buckets: Sequence[float] = SECONDS_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in zip(self.buckets,
                                                                       self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_number(self.sum)}",
                f"{name}_count {self.count}"]
        return out


_RECENT_ITERATIONS = 1024  # per job: a checkpoint further behind is not timed


class Tally:
    """Counters and latencies from the events read from the log (fed by the EventHub)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.iterations: dict[str, int] = {}
        self.rollouts: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.checkpoint_seconds = Histogram()
        self.commit_delay_seconds = Histogram()
        # per job, when each iteration since its last checkpoint was recorded: a checkpoint
        # written in the background is appended after later iterations
        self._iterations_at: dict[str, dict[int, datetime]] = {}

    def __call__(self, events: Sequence[RecordedEvent]) -> None:
        now = time.time()
        with self._lock:
            last_stamp = None
            for recorded in events:
                if recorded.recorded_at is not last_stamp:  # one sample per committed batch
                    last_stamp = recorded.recorded_at
                    self.commit_delay_seconds.observe(max(0.0, now - last_stamp.timestamp()))
                event, job = recorded.event, recorded.stream
                if type(event) is IterationCompleted:
                    self.iterations[job] = self.iterations.get(job, 0) + 1
                    self.rollouts[job] = self.rollouts.get(job, 0) + event.n_trajectories
                    self.failures[job] = self.failures.get(job, 0) + event.n_failed
                    recent = self._iterations_at.setdefault(job, {})
                    recent[event.iteration] = recorded.recorded_at
                    if len(recent) > _RECENT_ITERATIONS:
                        del recent[next(iter(recent))]
                elif type(event) is CheckpointSaved:
                    recent = self._iterations_at.get(job, {})
                    at = recent.get(event.iteration)
                    if at is not None:
                        self.checkpoint_seconds.observe(
                            (recorded.recorded_at - at).total_seconds())
                    for iteration in [i for i in recent if i <= event.iteration]:
                        del recent[iteration]

    def lines(self) -> list[str]:
        out: list[str] = []
        with self._lock:
            for name, help_, values in (
                    ("flowactors_iterations_total", "Iterations recorded since the server "
                     "started.", self.iterations),
                    ("flowactors_rollouts_total", "Trajectories rolled out since the server "
                     "started.", self.rollouts),
                    ("flowactors_rollout_failures_total", "Failed trajectories since the "
                     "server started.", self.failures)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                out += [f'{name}{{job_id="{_label(j)}"}} {n}' for j, n in values.items()]
            for name, help_, hist in (
                    ("flowactors_checkpoint_seconds", "From an iteration's event to its "
                     "checkpoint's (evaluation, state saved, committed).",
                     self.checkpoint_seconds),
                    ("flowactors_commit_delay_seconds", "From a batch's timestamp (taken just "
                     "before it is written) to the server reading it committed.",
                     self.commit_delay_seconds)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *hist.lines(name)]
        return out


def _gauge(name: str, help_: str, samples: list[tuple[str, float]]) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} gauge",
            *(f"{name}{labels} {_number(value)}" for labels, value in samples)]


def _held_out(runtime: Runtime, view: JobView) -> float | None:
    if view.validation_score is not None:
        return view.validation_score
    infos = runtime.checkpoints(view.job_id)
    return max(infos, key=lambda c: c.iteration).validation_score if infos else None


def render(runtime: Runtime, tally: Tally, *, streams: int, log_position: int) -> bytes:
    """The whole exposition, as bytes."""
    views = runtime.jobs()
    by_status = {s: 0 for s in JobStatus}
    for v in views:
        by_status[v.status] += 1
    lines = _gauge("flowactors_jobs", "Jobs by status.",
                   [(f'{{status="{s.value}"}}', n) for s, n in by_status.items()])
    per_job = [(f'{{job_id="{_label(v.job_id)}"}}', v) for v in views]
    lines += _gauge("flowactors_job_info", "A job's agent, task and status (always 1).",
                    [(f'{{job_id="{_label(v.job_id)}",agent_id="{_label(v.agent_id)}",'
                      f'task="{_label(v.task)}",status="{v.status.value}"}}', 1)
                     for v in views])
    lines += _gauge("flowactors_job_iteration", "Completed iterations.",
                    [(lb, v.progress.current_iteration) for lb, v in per_job])
    lines += _gauge("flowactors_job_total_iterations", "Iterations the job will run.",
                    [(lb, v.progress.total_iterations) for lb, v in per_job])
    for key, name, help_ in (("avg_reward", "flowactors_job_avg_reward",
                              "Average reward of the latest iteration."),
                             ("success_rate", "flowactors_job_success_rate",
                              "Rollout success rate of the latest iteration.")):
        lines += _gauge(name, help_, [(lb, v.metrics[key]) for lb, v in per_job
                                      if key in v.metrics])
    heldout = [(lb, score) for lb, v in per_job
               if (score := _held_out(runtime, v)) is not None]
    lines += _gauge("flowactors_job_validation_score",
                    "Held-out success at the latest checkpoint (the final one once completed).",
                    heldout)
    lines += _gauge("flowactors_job_cost_usd", "Recorded cost in USD.",
                    [(lb, v.cost.cost_usd) for lb, v in per_job])
    lines += tally.lines()
    lines += _gauge("flowactors_event_streams", "Open /events streams.", [("", streams)])
    lines += _gauge("flowactors_log_position", "The log's head position.",
                    [("", log_position)])
    return ("\n".join(lines) + "\n").encode()
