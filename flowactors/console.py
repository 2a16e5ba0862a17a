"""What the command-line shells share: one-line failures and logs on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from .errors import one_line
from .logs import log_to_stderr

EXIT_FAILED = 1


class Failure(click.ClickException):
    """A failure to report as one line, `error: ...`, on stderr (never a traceback)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.message)}", err=True)


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
