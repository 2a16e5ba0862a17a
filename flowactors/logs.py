"""Where flowactors' log lines go: the standard `logging` logger `flowactors` and its children.

A library must not print. Each module's structlog logger renders its line with structlog's
processors (the application's, when it configured structlog) and hands it to a stdlib logger,
so nothing appears unless the application configures `logging`; warnings and errors still
reach stderr through logging's last-resort handler. Values bound to a logger (`job_id`) stay
in every line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import structlog

ROOT = "flowactors"


def get_logger(name: str) -> Any:
    """A structlog logger whose rendered lines go to the stdlib logger `name`."""
    return structlog.wrap_logger(logging.getLogger(name))


def log_to_stderr(verbose: bool = False) -> Callable[[], None]:
    """Send flowactors' lines to stderr, info and up when `verbose`, else warnings and up.

    For the command-line shells, which own their process's output. Returns the function that
    undoes it (tests run many commands in one process).
    """
    logger = logging.getLogger(ROOT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(handler)
        logger.level, logger.propagate = previous

    return undo
