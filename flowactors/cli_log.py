"""`flowactors replay`, `verify` and `export`: the whole log, read-only. Registered on the
`flowactors` group by `cli`."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import msgspec

from . import job as core
from . import replay as rp
from .checkpointing import verify_files
from .cli_options import db_option, files_option, json_option
from .console import Failure, Progress, detail, echo_json, resolve_job, table
from .history import export_lines

__all__ = ["export", "replay_command", "verify"]


@click.command("replay")
@click.option("--job", help="Only this job.")
@click.option("--until", type=click.IntRange(min=0), metavar="POSITION",
              help="Replay events up to this position (inclusive): the state at that time.")
@click.option("--check", is_flag=True,
              help="Recompute the state digests that checkpoint and terminal events recorded; "
                   "fail on the first difference.")
@db_option
@json_option
def replay_command(job: str | None, until: int | None, check: bool, db: Path,
                   as_json: bool) -> None:
    """Rebuild job states from the log alone (up to a position) and print them.

    With --check, also recompute every state digest recorded when a checkpoint or terminal
    event was written, and exit 1 naming the position of the first difference: this catches
    a change to evolve that alters old histories.

    \b
    Example:
        flowactors replay --check --db flow.db
    """
    with rp.open_log(db) as store:
        job = None if job is None else resolve_job(store, job)
        progress = Progress("replaying")
        events = progress.counted(rp.read_events(store, job_id=job, until=until),
                                  until or store.head()[0])
        if check:
            _check(rp.check(events), until, as_json)
            return
        seen = _Seen()
        states = rp.replay(seen.through(events))
        if job is not None and job not in states:
            raise Failure(f"job {job!r} has no events at or before position {until} in {db}")
    entries = [s for s in states.values() if s.exists]
    if as_json:
        echo_json({
            "position": seen.position, "events": seen.count,
            "jobs": [{"view": core.view(s), "state_digest": core.state_digest(s),
                      **({"state": s} if job is not None else {})} for s in entries]})
        return
    click.echo(f"state after position {seen.position} ({seen.count} events replayed)")
    if job is not None:
        state = states[job]
        click.echo(detail(core.view(state)))
        click.echo(f"{'digest':<11} {core.state_digest(state)}")
        return
    rows = [[s.job_id, s.status.value,
             f"{s.iteration}/{s.spec.config.n_iterations if s.spec else '?'}",
             str(s.version), core.state_digest(s)] for s in entries]
    click.echo(table(["JOB", "STATUS", "ITERATION", "VERSION", "STATE DIGEST"], rows)
               if rows else "no jobs")


class _Seen:
    """Counts events passing through, and remembers the last position."""

    def __init__(self) -> None:
        self.position = 0
        self.count = 0

    def through(self, events: Iterable[Any]) -> Iterator[Any]:
        for recorded in events:
            self.position = recorded.position
            self.count += 1
            yield recorded


def _check(report: rp.CheckReport, until: int | None, as_json: bool) -> None:
    scope = "" if until is None else f", up to position {until}"
    if as_json:
        echo_json({"ok": report.ok, "events": report.events,
                    "digests_checked": report.digests_checked, "mismatch": report.mismatch})
    if report.mismatch is not None:
        raise Failure(f"replay check failed at {report.mismatch}")
    if not as_json:
        click.echo(f"ok: {report.digests_checked} recorded state digests match the replay "
                   f"({report.events} events, {len(report.states)} jobs{scope})")


@click.command()
@click.option("--expect-head", metavar="HASH",
              help="A head hash printed by an earlier verify: the log must still contain it "
                   "(detects a cut-off tail or a rewritten chain).")
@db_option
@files_option
@json_option
def verify(expect_head: str | None, db: Path, files: str | None, as_json: bool) -> None:
    """Check the log: hash chain, contiguous positions and versions, every event decodes
    against its schema version, blobs against their addresses, SQLite's integrity_check,
    that every state a job needs and every recorded trajectories' blob is there, and every
    checkpoint file a job needs (present, of its size, matching its address).

    Exits 0 only when all hold, else 1 naming the first bad position. Prints the head hash:
    keep it, and pass it to a later verify with --expect-head.

    \b
    Example:
        flowactors verify --expect-head 9c1d...e4 --db flow.db
    """
    if expect_head is not None:
        try:
            if len(bytes.fromhex(expect_head)) != 32:
                raise ValueError
        except ValueError:
            raise click.BadParameter("expected a SHA-256 hash in hex (64 characters)",
                                     param_hint="--expect-head") from None
    with rp.open_log(db) as store:
        progress = Progress("verifying")
        try:
            result = rp.verify(store, expect_head, progress=progress.update)
        finally:
            progress.close()
        if result.ok:
            n_files, problem = verify_files(store, db, files)
            result = msgspec.structs.replace(result, ok=problem is None, problem=problem,
                                             blobs_checked=result.blobs_checked + n_files)
    if as_json:
        echo_json(result)
    else:
        if result.ok:
            click.echo(f"ok: {result.events_checked} events and {result.blobs_checked} blobs "
                       f"verified")
        click.echo(f"head: position {result.head_position}, hash {result.head_hash}")
    if not result.ok:
        where = "" if result.first_bad_position is None else \
            f" at position {result.first_bad_position}"
        raise Failure(f"verification failed{where}: {result.problem}")


@click.command()
@click.option("--job", help="Only this job's events.")
@click.option("--from", "from_position", type=click.IntRange(min=1), default=1,
              metavar="POSITION", help="Start at this position.")
@db_option
def export(job: str | None, from_position: int, db: Path) -> None:
    """Write the log's events to stdout as JSON lines, in log order, exactly as stored.

    One line per recorded event: position, stream, version, type, schema_version,
    recorded_at, data (schema: schemas/HistoryLine.json). flowactors.testing.load_history
    reads it back: this is how histories are recorded for tests.

    \b
    Example:
        flowactors export --job 3f2a9c --db flow.db > tests/histories/my_job.jsonl
    """
    out = sys.stdout.buffer
    with rp.open_log(db) as store:
        job = None if job is None else resolve_job(store, job)
        progress = Progress("exporting")
        for line in progress.counted(export_lines(store, job_id=job,
                                                     from_position=from_position),
                                     store.head()[0]):
            out.write(line + b"\n")
    out.flush()
