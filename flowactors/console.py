"""What the command-line shells share: one-line failures, logs on stderr, event
summaries."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

import click
import msgspec

from .errors import JobNotFound, one_line
from .events import (
    BudgetThresholdReached,
    CheckpointSaved,
    CheckpointsPruned,
    ForkCreated,
    IterationCompleted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobForked,
    JobPaused,
    JobRecovered,
    JobResumed,
    JobStarted,
    JobSubmitted,
)
from .logs import log_to_stderr
from .store import EventStore, Owner
from .views import JobStatus, JobView

EXIT_FAILED = 1
EXIT_UNANSWERED = 3
"""The exit code of a request the owning runtime did not answer in time."""
T = TypeVar("T")
_json_encoder = msgspec.json.Encoder()


class Failure(click.ClickException):
    """A failure to report as one line, `error: ...`, on stderr (never a traceback)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.message)}", err=True)


def resolve_job(store: EventStore, given: str) -> str:
    """The job `given` names: its full id, or a prefix that only one job's id starts with.

    Raises:
        JobNotFound: no job's id is or starts with `given`.
        Failure: several do (the message names them).
    """
    if store.stream_version(given) > 0:
        return given
    shown = 5
    matches = store.streams_starting_with(given, limit=shown + 1) if given else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise JobNotFound(f"job {given!r} not found in {store.path}")
    more = " and more" if len(matches) > shown else ""
    raise Failure(f"job id prefix {given!r} is ambiguous in {store.path}: candidates "
                  f"{', '.join(matches[:shown])}{more}")


@contextmanager
def stderr_logs() -> Iterator[None]:
    """Run as a subcommand, the `flowactors` group has sent logs to stderr (warnings, or more
    with -v). Run on its own (a test, an application calling the command), do the same for
    the duration; undone afterwards (tests share the process)."""
    context = click.get_current_context(silent=True)
    if context is not None and context.parent is not None:
        yield
        return
    undo = log_to_stderr()
    try:
        yield
    finally:
        undo()


def summary(event: JobEvent) -> str:
    """A one-line, human summary of an event (for `flowactors history`)."""
    match event:
        case IterationCompleted():
            failed = f", {event.n_failed}/{event.n_trajectories} failed" if event.n_failed else ""
            return (f"iteration {event.iteration}: avg reward {event.avg_reward:.4f}, "
                    f"loss {event.loss:.4f}, cost ${event.cost_usd:.4f}{failed}")
        case JobSubmitted(spec=spec):
            config = spec.config
            budget = "" if config.max_budget_usd is None else \
                f", budget ${config.max_budget_usd:g}"
            return (f"agent {spec.agent_id}, task {spec.task}, {config.n_iterations} "
                    f"iterations, seed {config.seed}{budget}")
        case JobStarted():
            return "admitted: running"
        case CheckpointSaved():
            return (f"checkpoint {event.iteration}: validation score "
                    f"{event.validation_score:.4f}")
        case CheckpointsPruned(iterations=iterations):
            return f"pruned checkpoints {', '.join(map(str, iterations))}"
        case BudgetThresholdReached():
            return (f"{event.fraction:.0%} of the budget: ${event.cost_usd:.4f} of "
                    f"${event.budget_usd:.4f}")
        case JobPaused(iteration=iteration, state_ref=state_ref):
            where = "with its trainer state" if state_ref else "to resume from its last checkpoint"
            return f"paused after iteration {iteration}, {where}"
        case JobResumed():
            return "resumed: queued again"
        case JobCancelled():
            return f"cancelled after iteration {event.iteration}: {event.reason}"
        case JobCompleted():
            return (f"completed {event.iteration} iterations, validation score "
                    f"{event.validation_score:.4f}")
        case JobFailed():
            return (f"failed ({event.reason}) after iteration {event.iteration}: "
                    f"{event.error_type}: {event.message}")
        case JobRecovered(from_checkpoint=checkpoint, attempt=attempt, cause=cause):
            start = "the start" if checkpoint is None else f"checkpoint {checkpoint}"
            return f"recovered after a {cause}: attempt {attempt}, from {start}"
        case JobForked(parent_id=parent, at_iteration=at):
            return f"forked from job {parent} at checkpoint {at}"
        case ForkCreated(child_id=child, at_iteration=at):
            return f"job {child} forked from checkpoint {at}"
        case _:
            return ""


# --- output helpers of the commands -----------------------------------------------------


class Progress:
    """A counter on stderr, only when stderr is a terminal: stdout never sees it."""

    def __init__(self, label: str, stream: TextIO | None = None, every: float = 0.2) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.every = every
        self.shown = False
        self._next = 0.0  # the first update shows at once

    def update(self, done: int, total: int | None = None) -> None:
        if not self.enabled or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every
        of = f"/{total}" if total else ""
        self.stream.write(f"\r{self.label}: {done}{of} events")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False

    def counted(self, items: Iterable[T], total: int | None = None) -> Iterator[T]:
        """Yield items, updating the counter every 1000 of them."""
        done = 0
        try:
            for item in items:
                yield item
                done += 1
                if done % 1000 == 0:
                    self.update(done, total)
        finally:
            self.close()


def moment(at: datetime | None) -> str:
    return "-" if at is None else at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [headers, *rows])


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


ORPHANED = "no runtime owns its log now: it resumes when the log is opened"
"""`JobView.waiting` of a running or queued job whose log nobody owns (its runtime ended)."""


class LogStatus(msgspec.Struct, frozen=True, kw_only=True):
    """`flowactors status --json` of a whole log: who owns it now, and every job's view."""

    log: str
    owner: Owner | None
    jobs: list[JobView]


def without_owner(view: JobView, owner: Owner | None) -> JobView:
    """`view` as the log's owner (None: nobody) leaves it: a running or queued job of a log
    nobody owns is not running, it waits for the next open."""
    if owner is not None or view.waiting or view.status not in (JobStatus.RUNNING,
                                                                JobStatus.QUEUED):
        return view
    return msgspec.structs.replace(view, waiting=ORPHANED)


def owner_line(log: object, owner: Owner | None, views: list[JobView]) -> str:
    """The last line of `status`: who owns the log; when nobody does and some job waits for
    an owner, how it resumes."""
    if owner is not None:
        return f"{log} is owned by pid {owner.pid} on {owner.host} since {moment(owner.since)}"
    if not any(v.waiting == ORPHANED for v in views):
        return f"no runtime owns {log} now"
    return (f"no runtime owns {log} now: jobs marked * resume when the log is opened "
            f"(`flowactors demo --db {log}` or `Runtime({str(log)!r})`)")


def status_rows(views: list[JobView]) -> str:
    """The table of `flowactors status`; a status marked * waits for an owner of the log."""
    rows = [[v.job_id, v.agent_id, v.status.value + ("*" if v.waiting == ORPHANED else ""),
             f"{v.progress.current_iteration}/{v.progress.total_iterations}",
             number(v.metrics.get("avg_reward")), money(v.cost.cost_usd),
             "-" if v.best_checkpoint is None else str(v.best_checkpoint)]
            for v in views]
    return table(["JOB", "AGENT", "STATUS", "ITERATION", "AVG REWARD", "COST", "BEST"], rows)


def detail(v: JobView) -> str:
    budget = "" if v.cost.budget_usd is None else \
        f" of {money(v.cost.budget_usd)} ({money(v.cost.budget_remaining_usd)} left)"
    metrics = ", ".join(f"{k} {val:.4f}" for k, val in sorted(v.metrics.items())) or "-"
    error = "-" if v.error is None else f"{v.error.reason}: {v.error.type}: {v.error.message}"
    lines = [
        ("job", v.job_id), ("agent", v.agent_id), ("task", v.task or "-"),
        ("status", v.status.value + (f" (waiting: {v.waiting})" if v.waiting else "")),
        ("progress", f"{v.progress.current_iteration}/{v.progress.total_iterations} "
                     f"iterations ({v.progress.percent_complete:g}%)"),
        ("metrics", metrics),
        ("cost", f"{money(v.cost.cost_usd)}{budget}, {v.cost.tokens_consumed} tokens"),
        ("best", "-" if v.best_checkpoint is None else f"checkpoint {v.best_checkpoint}"),
        ("validation", number(v.validation_score)),
        ("attempts", str(v.attempts)), ("error", error),
        ("created", moment(v.created_at)), ("started", moment(v.started_at)),
        ("finished", moment(v.finished_at)), ("version", str(v.version)),
    ]
    if v.forked_from is not None:
        lines.append(("forked from", f"job {v.forked_from.parent_id} at checkpoint "
                                     f"{v.forked_from.at_iteration}"))
    if v.forks:
        lines.append(("forks", ", ".join(f"{f.child_id} (at {f.at_iteration})"
                                         for f in v.forks)))
    return "\n".join(f"{name:<11} {value}" for name, value in lines)


def echo_json(value: Any) -> None:
    click.echo(_json_encoder.encode(value).decode())
