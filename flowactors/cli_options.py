"""The options several `flowactors` subcommands share: --db, --checkpoint-store, --json."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["db_option", "files_option", "json_option"]


def db_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--db", type=click.Path(dir_okay=False, path_type=Path), default="flow.db",
        show_default=True, help="The flowactors log (a SQLite file).")(fn)


def files_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--checkpoint-store", "files", metavar="URL", help="Where the log's "
                        "checkpoint files are [default: DB.checkpoints beside the log].")(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON instead of text.")(fn)
