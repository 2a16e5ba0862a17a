"""The `flowactors` command: inspect, replay, verify and export a log; control its jobs.

A thin layer over `flowactors.replay`, `history` and `remote`: every read-only subcommand
opens the log read-only (it never creates a missing file nor changes one, and works while a
runtime writes it). A user
mistake prints one line, `error: ...`, to stderr and exits non-zero; logs go to stderr, so
stdout carries only the output (JSON lines for `export`). Progress of long reads is shown on
stderr when it is a terminal.

The group and the commands that read one job live here; the others, each in the module its
name says: `cli_log` (replay, verify, export), `cli_control` (cancel, pause, resume),
`cli_lineage` (trajectories, fork), `cli_resume` (check-resume), `demo` and `report`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from . import job as core
from . import replay as rp
from . import schemas as schema_files
from .checkpointing import open_state_store
from .cli_control import EXIT_UNANSWERED, cancel, pause, resume  # EXIT_UNANSWERED: re-exported
from .cli_lineage import fork, trajectories
from .cli_log import export, replay_command, verify
from .cli_options import db_option, files_option, json_option
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
from .history import history_line
from .logs import log_to_stderr
from .report import report
from .store import owner_of
from .cli_resume import check_resume_command

__all__ = ["main"]

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


# --- status, history -----------------------------------------------------------------------


@main.command()
@click.argument("job", required=False)
@db_option
@json_option
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
    click.echo(owner_line(db, owner, views))


def _history_line(recorded: Any) -> str:
    return (f"{recorded.position:>8}  {recorded.version:>6}  {moment(recorded.recorded_at)}  "
            f"{recorded.type:<28}  {summary(recorded.event)}")


@main.command()
@click.argument("job")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new events until the job is terminal (or Ctrl-C).")
@click.option("--interval", type=click.FloatRange(min=0.01), default=0.25, show_default=True,
              help="Seconds between reads while following.")
@db_option
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


# --- checkpoints -------------------------------------------------------------------------------


@main.command()
@click.argument("job")
@click.option("--save", type=click.IntRange(min=1), metavar="ITERATION",
              help="Save the trainer state of this checkpoint (needs --out).")
@click.option("--out", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="The file --save writes (the state's MessagePack bytes, as stored).")
@db_option
@files_option
@json_option
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
@db_option
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


main.add_command(replay_command)
main.add_command(verify)
main.add_command(export)
main.add_command(cancel)
main.add_command(pause)
main.add_command(resume)
main.add_command(demo)
main.add_command(report)
main.add_command(trajectories)
main.add_command(fork)
main.add_command(check_resume_command)


if __name__ == "__main__":
    main(prog_name="flowactors")
