"""`flowactors trajectories` and `flowactors fork`: what a job's policy did, and a new job from
one of its checkpoints. Registered on the `flowactors` group by `cli`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import msgspec

from . import lineage, remote
from . import replay as rp
from . import trajectories as recorded
from .console import EXIT_UNANSWERED, Failure, echo_json, number, resolve_job, table

__all__ = ["fork", "trajectories"]

_db = click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default="flow.db",
                   show_default=True, help="The flowactors log (a SQLite file).")


@click.command()
@click.argument("job")
@click.option("--iteration", type=click.IntRange(min=1), metavar="N",
              help="Only iteration N's (a superseded run of it included, marked).")
@click.option("--failed", is_flag=True, help="Only the trajectories that did not succeed.")
@click.option("--min-reward", type=float, help="Only those with at least this reward.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many.")
@_db
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def trajectories(job: str, iteration: int | None, failed: bool, min_reward: float | None,
                 limit: int | None, db: Path, as_json: bool) -> None:
    """List JOB's recorded trajectories: iteration, query, reward, success, steps, tokens,
    cost and error of each.

    \b
    Example:
        flowactors trajectories 3f2a9c --iteration 12 --failed --db flow.db
    """
    with rp.open_log(db) as store:
        job = resolve_job(store, job)
        found = recorded.read(store, job, iteration=iteration,
                              success=False if failed else None, min_reward=min_reward,
                              limit=limit)
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo(f"job {job} has no recorded trajectories"
                   + (f" in iteration {iteration}" if iteration is not None else ""))
        return
    rows = [[str(t.iteration) + (" (superseded)" if t.superseded else ""),
             f"{t.query_index}.{t.index}", _short(t.query), number(t.reward),
             "yes" if t.success else "no", str(t.steps), str(t.tokens), f"${t.cost_usd:.4f}",
             _short(t.error or "")] for t in found]
    click.echo(table(["ITERATION", "#", "QUERY", "REWARD", "SUCCESS", "STEPS", "TOKENS",
                      "COST", "ERROR"], rows))


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


@click.command()
@click.argument("job")
@click.option("--at", "at_iteration", type=click.IntRange(min=1), required=True, metavar="N",
              help="The checkpoint (its iteration) to start from.")
@click.option("--set", "settings", multiple=True, metavar="FIELD=VALUE",
              help="Change a GRPOConfig field (VALUE is JSON, else a string); repeatable.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Change a task option (VALUE is JSON, else a string); repeatable.")
@click.option("--id", "child_id", help="The new job's id (default: a new uuid).")
@click.option("--timeout", type=click.FloatRange(min=0.0), default=30.0, show_default=True,
              help="Seconds to wait for the owning runtime's answer.")
@_db
def fork(job: str, at_iteration: int, settings: tuple[str, ...], options: tuple[str, ...],
         child_id: str | None, timeout: float, db: Path) -> None:
    """Fork JOB at its checkpoint N into a new job with changed settings; print its id.

    The new job starts from that checkpoint's trainer state (shared, not copied); both jobs
    record the lineage. The settings are checked first: a bad one writes nothing. While a
    runtime owns the log, the fork is a request in its inbox: the runtime forks and the
    child runs there; exit 0 once applied, 1 with the reason when rejected, 3 when
    unanswered within --timeout. With no runtime running, the child is recorded directly
    and queued: it runs when a runtime opens the log.

    \b
    Example:
        flowactors fork 3f2a9c --at 20 --set learning_rate=0.01 --db flow.db
    """
    with rp.open_log(db) as reader:
        job = resolve_job(reader, job)
        parent = rp.job_state(reader, job)
    assert parent.spec is not None
    config = _changed(msgspec.to_builtins(parent.spec.config), settings, "--set")
    task_options = _changed(dict(parent.spec.task_options), options, "--option") \
        if options else None
    request = lineage.fork_request(parent, at_iteration=at_iteration, job_id=child_id,
                                   config=config, task_options=task_options)
    outcome = remote.fork(db, job, request, timeout=timeout)
    if outcome.outcome == "unanswered":
        raise Failure(outcome.reason, EXIT_UNANSWERED)
    if outcome.outcome == "rejected":
        raise Failure(f"fork rejected: {outcome.reason}")
    click.echo(request.job_id)


def _changed(base: dict[str, Any], pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """`base` with each FIELD=VALUE of `pairs` set (VALUE parsed as JSON, else a string)."""
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"{flag} takes FIELD=VALUE, not {pair!r}")
        try:
            base[key] = msgspec.json.decode(text)
        except msgspec.DecodeError:
            base[key] = text
    return base
