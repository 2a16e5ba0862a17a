"""`flowactors cancel`, `pause` and `resume` from another process (see `flowactors.remote`).
Registered on the `flowactors` group by `cli`."""

from __future__ import annotations

from pathlib import Path

import click

from . import remote
from . import replay as rp
from .cli_options import db_option
from .console import EXIT_UNANSWERED, Failure, resolve_job

__all__ = ["EXIT_UNANSWERED", "cancel", "pause", "resume"]


def _control_command(name: str, done: str, summary: str, example: str) -> click.Command:
    @click.argument("job")
    @click.option("--timeout", type=click.FloatRange(min=0.0), default=30.0, show_default=True,
                  help="Seconds to wait for the owning runtime's answer.")
    @db_option
    def command(job: str, timeout: float, db: Path) -> None:
        with rp.open_log(db) as store:
            job = resolve_job(store, job)
        outcome = remote.control(db, job, name, timeout=timeout)  # type: ignore[arg-type]
        if outcome.outcome == "unanswered":
            raise Failure(outcome.reason, EXIT_UNANSWERED)
        if outcome.outcome == "rejected":
            raise Failure(f"{name} rejected: {outcome.reason}")
        state = "" if outcome.view is None else f": it is {outcome.view.status.value}"
        how = " (no runtime owns the log: decided directly)" \
            if outcome.decided_by == "direct" else ""
        click.echo(f"{done} job {job}{state}{how}")

    command.__doc__ = f"""{summary}

    While a runtime owns the log, leaves a request in its inbox and waits for the answer:
    exit 0 once applied, 1 with the reason when rejected, 3 when unanswered within
    --timeout. With no runtime running, decides directly.

    \b
    Example:
        {example}
    """
    return click.command(name)(command)


cancel = _control_command(
    "cancel", "cancelled", "Cancel JOB (mid-iteration if it runs).",
    "flowactors cancel 3f2a9c --db flow.db")
pause = _control_command(
    "pause", "paused", "Pause JOB (a running job at its next iteration boundary).",
    "flowactors pause 3f2a9c --db flow.db")
resume = _control_command(
    "resume", "resumed", "Queue a paused JOB again.",
    "flowactors resume 3f2a9c --db flow.db")
