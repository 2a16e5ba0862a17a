"""What the command-line shells share: one-line failures, logs on stderr, event
summaries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from .errors import JobNotFound, one_line
from .events import (
    BudgetThresholdReached,
    CheckpointSaved,
    CheckpointsPruned,
    IterationCompleted,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobPaused,
    JobRecovered,
    JobResumed,
    JobStarted,
    JobSubmitted,
)
from .logs import log_to_stderr
from .store import EventStore

EXIT_FAILED = 1


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
        case _:
            return ""
