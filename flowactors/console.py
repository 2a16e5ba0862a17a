"""What the command-line shells share: one-line failures and quiet logs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import structlog

from .errors import one_line

EXIT_FAILED = 1


class Failure(click.ClickException):
    """A failure to report as one line, `error: ...`, on stderr (never a traceback)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.message)}", err=True)


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Run as a subcommand, the `flowactors` group has set up logging (warnings to stderr, or
    more with -v). Run on its own, keep the runtime's info lines off standard output in the
    same way; restored afterwards (tests share the process)."""
    context = click.get_current_context(silent=True)
    if context is not None and context.parent is not None:
        yield
        return
    previous = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        yield
    finally:
        structlog.configure(**previous)
