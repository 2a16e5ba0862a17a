"""What the command-line shells share: one-line failures and logs on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from .errors import JobNotFound, one_line
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
