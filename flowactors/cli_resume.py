"""`flowactors check-resume`: prove a task resumes exactly (see `flowactors.resume_check`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import msgspec

from .console import Failure
from .resume_check import check_resume, default_spec
from .spec import JobSpec

__all__ = ["check_resume_command"]


@click.command("check-resume")
@click.option("--task", required=True, metavar="TASK",
              help="The task: a built-in name, an entry point, or module:Task.")
@click.option("--kills", type=click.IntRange(min=0), default=3, show_default=True,
              help="How many times the second run is SIGKILLed.")
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path),
              help="A JobSpec as JSON to train (its task is replaced by --task); "
                   "default: 8 queries, 6 iterations, a checkpoint every 2.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the moments of the kills.")
def check_resume_command(task: str, kills: int, spec_file: Path | None, seed: int) -> None:
    """Train a task once uninterrupted and once SIGKILLed KILLS times at random moments, and
    compare the final states; exit 1 naming the first difference (and the iteration where the
    runs parted) when they differ.

    Example: flowactors check-resume --task mypackage.tasks:MyTask --kills 5
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--task mymodule:Task` from here, as `python -m` finds
    if spec_file is None:
        spec = default_spec(task)
    else:
        try:
            spec = msgspec.json.decode(spec_file.read_bytes(), type=JobSpec)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise Failure(f"{spec_file}: not a JobSpec: {exc}") from None
        spec = msgspec.structs.replace(spec, task=task)
    try:
        report = check_resume(spec, kills, seed=seed)
    except RuntimeError as exc:
        raise Failure(str(exc)) from None
    click.echo(str(report))
    if not report.ok:
        raise SystemExit(1)
