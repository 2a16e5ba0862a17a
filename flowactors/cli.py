"""The `flowactors` command: inspect, replay, verify and export a log; control its jobs.

A thin layer over `flowactors.replay`, `history` and `remote`: every read-only subcommand
opens the log read-only (it never creates a missing file nor changes one, and works while a
runtime writes it). A user
mistake prints one line, `error: ...`, to stderr and exits non-zero; logs go to stderr, so
stdout carries only the output (JSON lines for `export`). Progress of long reads is shown on
stderr when it is a terminal.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import msgspec

from . import job as core
from . import remote
from . import replay as rp
from . import schemas as schema_files
from .cli_lineage import fork, trajectories
from .checkpointing import open_state_store, verify_files
from .demo import demo
from .console import (
    Failure,
    LogStatus,
    Progress,
    detail,
    echo_json,
    moment,
    number,
    owner_line,
    resolve_job,
    status_rows,
    summary,
    table,
    without_owner,
)
from .errors import CheckpointNotFound, FlowError
from .history import export_lines, history_line
from .logs import log_to_stderr
from .report import report
from .store import owner_of
from .cli_resume import check_resume_command

__all__ = ["main"]


EXIT_UNANSWERED = 3
EXIT_BROKEN_PIPE = 141  # as a shell reports a process that SIGPIPE ended


class _Group(click.Group):
    """Turns every FlowError of a subcommand, and every failed write (a full disk, a closed
    pipe), into a one-line error (never a traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlowError as exc:
            raise Failure(str(exc)) from None
        except BrokenPipeError:  # the reader went away (`| head`): nothing to say, as cat
            _discard_stdout()
            ctx.exit(EXIT_BROKEN_PIPE)
        except OSError as exc:
            _discard_stdout()
            where = f" ({exc.filename})" if exc.filename else ""
            raise Failure(f"I/O failed{where}: {exc.strerror or exc}") from None


def _discard_stdout() -> None:
    """After a write to stdout failed, point it at /dev/null: what is left in its buffer would
    fail again, with a traceback, when the interpreter flushes it at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (a test's capture)
        pass


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Also log what the store and runtime do (to stderr).")
@click.version_option(package_name="flowactors")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Inspect, replay, verify and export a flowactors event log; control its jobs.

    Every subcommand takes --db PATH (default flow.db). Read-only subcommands never create or
    change the log, and work while a runtime is writing it.

    \b
    Example:
        flowactors status --db flow.db
    """
    ctx.call_on_close(log_to_stderr(verbose))


def _db_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--db", type=click.Path(dir_okay=False, path_type=Path), default="flow.db",
        show_default=True, help="The flowactors log (a SQLite file).")(fn)


def _files_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--checkpoint-store", "files", metavar="URL", help="Where the log's "
                        "checkpoint files are [default: DB.checkpoints beside the log].")(fn)


def _json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON instead of text.")(fn)


# --- status, history -----------------------------------------------------------------------


@main.command()
@click.argument("job", required=False)
@_db_option
@_json_option
def status(job: str | None, db: Path, as_json: bool) -> None:
    """Show every job as a table, or one JOB in detail.

    Columns: id, agent, status, iteration/total, average reward, cost, best checkpoint.
    The last line says which process owns the log now; when none does (its runtime ended),
    running and queued jobs are marked *: they resume when the log is opened. With --json,
    the whole log is {"log", "owner", "jobs"} and one JOB is its JobView, whose `waiting`
    says the same.

    \b
    Example:
        flowactors status --db flow.db
    """
    owner = owner_of(db)
    with rp.open_log(db) as store:
        if job is not None:
            view = without_owner(core.view(rp.job_state(store, resolve_job(store, job))), owner)
            if as_json:
                echo_json(view)
            else:
                click.echo(detail(view))
            return
        progress = Progress("reading")
        try:
            states = rp.replay_log(store, progress.update)
        finally:
            progress.close()
    views = [without_owner(core.view(s), owner) for s in states.values() if s.exists]
    if as_json:
        echo_json(LogStatus(log=str(db), owner=owner, jobs=views))
        return
    click.echo(status_rows(views) if views else f"no jobs in {db}")
    click.echo(owner_line(db, owner))


def _history_line(recorded: Any) -> str:
    return (f"{recorded.position:>8}  {recorded.version:>6}  {moment(recorded.recorded_at)}  "
            f"{recorded.type:<28}  {summary(recorded.event)}")


@main.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new events until the job is terminal (or Ctrl-C).")
@click.option("--interval", type=click.FloatRange(min=0.01), default=0.25, show_default=True,
              help="Seconds between reads while following.")
@_db_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the events themselves, one JSON line each (the export format).")
def history(job: str, follow: bool, interval: float, db: Path, as_json: bool) -> None:
    """Print JOB's timeline: position, version, time, event type and a summary of each event.

    With --follow, keep tailing a log that a runtime is writing; stops once the job is
    completed, failed or cancelled, or on Ctrl-C.

    \b
    Example:
        flowactors history 3f2a9c --follow --db flow.db
    """
    with rp.open_log(db) as store:
        job = resolve_job(store, job)
        state = core.initial_state(job)

        def emit(events: Iterable[Any]) -> None:
            nonlocal state
            for recorded in events:
                click.echo(history_line(recorded).decode() if as_json
                           else _history_line(recorded))
                state = core.evolve(state, recorded)

        try:
            events = rp.read_events(store, job_id=job)
            if not as_json:
                click.echo(f"{'POSITION':>8}  {'VERSION':>6}  {'TIME (UTC)':<23}  "
                           f"{'TYPE':<28}  SUMMARY")
            emit(events)
            while follow and not state.status.is_terminal:
                time.sleep(interval)
                emit(store.read_stream(job, state.version + 1))
        except KeyboardInterrupt:
            return


# --- replay, verify, export ----------------------------------------------------------------


@main.command("replay")
@click.option("--job", help="Only this job.")
@click.option("--until", type=click.IntRange(min=0), metavar="POSITION",
              help="Replay events up to this position (inclusive): the state at that time.")
@click.option("--check", is_flag=True,
              help="Recompute the state digests that checkpoint and terminal events recorded; "
                   "fail on the first difference.")
@_db_option
@_json_option
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


@main.command()
@click.option("--expect-head", metavar="HASH",
              help="A head hash printed by an earlier verify: the log must still contain it "
                   "(detects a cut-off tail or a rewritten chain).")
@_db_option
@_files_option
@_json_option
def verify(expect_head: str | None, db: Path, files: str | None, as_json: bool) -> None:
    """Check the log: hash chain, contiguous positions and versions, every event decodes
    against its schema version, blobs against their addresses, SQLite's integrity_check,
    and every checkpoint file a job needs (present, of its size, matching its address).

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


@main.command()
@click.option("--job", help="Only this job's events.")
@click.option("--from", "from_position", type=click.IntRange(min=1), default=1,
              metavar="POSITION", help="Start at this position.")
@_db_option
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


# --- checkpoints -------------------------------------------------------------------------------


@main.command()
@click.argument("job")
@click.option("--save", type=click.IntRange(min=1), metavar="ITERATION",
              help="Save the trainer state of this checkpoint (needs --out).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="The file --save writes (the state's MessagePack bytes, as stored).")
@_db_option
@_files_option
@_json_option
def checkpoints(job: str, save: int | None, out: Path | None, db: Path, files: str | None,
                as_json: bool) -> None:
    """List JOB's checkpoints, best first; or save one's trainer state to a file.

    \b
    Example:
        flowactors checkpoints 3f2a9c --save 10 --out state-10.msgpack --db flow.db
    """
    if (save is None) != (out is None):
        raise click.UsageError("--save ITERATION and --out FILE go together")
    with rp.open_log(db) as store:
        job = resolve_job(store, job)
        state = rp.job_state(store, job)
        infos = core.checkpoint_infos(state)
        if save is not None and out is not None:
            info = next((i for i in infos if i.iteration == save), None)
            if info is None:
                raise CheckpointNotFound(
                    f"job {job!r} has no checkpoint at iteration {save} (it has "
                    f"{', '.join(str(i.iteration) for i in infos) or 'none'})")
            if info.pruned:
                raise CheckpointNotFound(
                    f"checkpoint {save} of job {job!r} was pruned: its state is gone")
            blob = open_state_store(store, db, files, create=False).get(info.state_ref)
            try:
                out.write_bytes(blob)
            except OSError as exc:
                raise Failure(f"cannot write {out}: {exc.strerror or exc}") from None
            click.echo(f"saved checkpoint {save} of job {job} ({len(blob)} bytes, "
                       f"state {info.state_ref}) to {out}")
            return
    if as_json:
        echo_json(infos)
        return
    if not infos:
        click.echo(f"job {job} has no checkpoints")
        return
    best = core.best_checkpoint(state)
    rows = [[str(i.iteration), f"{i.validation_score:.4f}",
             number(i.metrics.get("avg_reward")), number(i.metrics.get("loss")),
             "pruned" if i.pruned else ("kept, best" if best and best.iteration == i.iteration
                                        else "kept"),
             i.state_ref] for i in infos]
    click.echo(table(["ITERATION", "VALIDATION", "AVG REWARD", "LOSS", "STATE", "REF"], rows))


# --- control -----------------------------------------------------------------------------------


def _control_command(name: str, done: str, summary: str, example: str) -> click.Command:
    @click.argument("job")
    @click.option("--timeout", type=click.FloatRange(min=0.0), default=30.0, show_default=True,
                  help="Seconds to wait for the owning runtime's answer.")
    @_db_option
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


main.add_command(_control_command(
    "cancel", "cancelled", "Cancel JOB (mid-iteration if it runs).",
    "flowactors cancel 3f2a9c --db flow.db"))
main.add_command(_control_command(
    "pause", "paused", "Pause JOB (a running job at its next iteration boundary).",
    "flowactors pause 3f2a9c --db flow.db"))
main.add_command(_control_command(
    "resume", "resumed", "Queue a paused JOB again.",
    "flowactors resume 3f2a9c --db flow.db"))


# --- schemas -----------------------------------------------------------------------------------


@main.command("schemas")
@click.option("--check", is_flag=True,
              help="Do not write: exit 1 when the files differ from the code.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="The schemas directory [default: schemas/ of the source tree].")
def schemas_command(check: bool, directory: Path | None) -> None:
    """Regenerate the JSON Schemas of every event type (per schema version), JobSpec, JobView
    and the export line from the code, or check the committed ones.

    \b
    Example:
        flowactors schemas --check
    """
    if directory is None:
        directory = schema_files.SOURCE_DIR
        if not directory.is_dir():
            raise Failure(f"no schemas directory at {directory} (flowactors does not run "
                           f"from a source checkout); pass --dir")
    if check:
        problems = schema_files.differences(directory)
        if problems:
            for problem in problems:
                click.echo(f"{directory / problem}", err=True)
            raise Failure(f"{len(problems)} schema file(s) in {directory} differ from the "
                           f"code; run `flowactors schemas` to regenerate them")
        click.echo(f"ok: the schemas in {directory} match the code")
        return
    changed = schema_files.write(directory)
    click.echo(f"wrote {len(changed)} changed schema file(s) to {directory}"
               if changed else f"the schemas in {directory} are up to date")


@main.command()
@_db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on (a loopback one unless --allow-remote).")
@click.option("--port", type=click.IntRange(0, 65535), default=8600, show_default=True,
              help="The port (0: any free one).")
@click.option("--allow-remote", is_flag=True,
              help="Allow listening on a non-loopback address.")
def serve(db: Path, host: str, port: int, allow_remote: bool) -> None:
    """Own the log and serve it over HTTP: the training API (JSON-RPC at /rpc), live events
    (/events), Prometheus metrics (/metrics) and a dashboard (/). Prints the dashboard's URL
    with the bearer token (kept in DB.token, mode 0600). Needs the `serve` extra.

    \b
    Example:
        flowactors serve --db flow.db --port 8600
    """
    try:
        from .server import serve as run
    except ImportError as exc:
        raise Failure(f"serve needs the serve extra ({exc.name} is missing): "
                      f"pip install -e '.[serve]' in a checkout of flowactors") from None
    run(db, host=host, port=port, allow_remote=allow_remote, echo=click.echo)


main.add_command(demo)
main.add_command(report)
main.add_command(trajectories)
main.add_command(fork)
main.add_command(check_resume_command)


if __name__ == "__main__":
    main(prog_name="flowactors")
