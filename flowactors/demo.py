"""`flowactors demo`: several real training jobs, concurrently, with live progress — resumable.

The demo trains `toolchoice` jobs (seeds 0, 1, 2, … alternating two learning rates) in one
`Runtime` on an ordinary log file and shows what flowactors is for: the jobs really learn
(held-out success rises from ≤ 0.4 untrained to ≥ 0.9), they survive a crash or Ctrl-C (run the
demo again and the unfinished jobs resume from their last checkpoints), and everything can be
inspected afterwards from the log alone (`status`, `history`, `report`).

Which file a run uses is decided from the logs themselves, never by asking (`demo_plan`, with
what the demo trains); the live display is `demo_display`. This module is the command.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import TextIO

import click

from .console import Failure, stderr_logs
from .demo_display import Display, Row, job_row, number_cell
from .demo_plan import (
    BASELINE_MAX,
    DEFAULT_ITERATIONS,
    DEFAULT_JOBS,
    JOB_PREFIX,
    LEARNED_MIN,
    POLICIES,
    RunPlan,
    baseline_score,
    demo_specs,
    learned,
    log_chain,
    numbered,
    plan_run,
    resume_iteration,
)
from .errors import FlowError, LogCorrupted, StoreLocked
from .runtime import Runtime
from .spec import JobSpec
from .tasks import reward_scale
from .training import split_data
from .views import CheckpointInfo, JobStatus, JobView

__all__ = ["BASELINE_MAX", "DEFAULT_ITERATIONS", "DEFAULT_JOBS", "LEARNED_MIN", "JOB_PREFIX",
           "Display", "Row", "RunPlan", "baseline_score", "demo", "demo_specs", "learned",
           "plan_run"]

REFRESH_SECONDS = 0.125  # 8 Hz


# --- the command --------------------------------------------------------------------------------


def _cmd(*words: str | Path) -> str:
    return " ".join(shlex.quote(str(w)) for w in (_program(), *words))


def _program() -> str:
    """How to run `flowactors` from here: by name when it is on PATH (as after `pip install`),
    else by the path of the virtualenv's script (as after `make demo`)."""
    script = Path(sys.executable).with_name("flowactors")
    found = shutil.which("flowactors")
    if found is None and script.exists():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return "flowactors"


@click.command("demo")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default="flow.db",
              show_default=True, help="The log file (runs after the first go to FILE-2, …).")
@click.option("--fresh", is_flag=True,
              help="Start a new run in a new file even if the latest one is unfinished.")
@click.option("--jobs", "n_jobs", type=click.IntRange(1, 16), default=DEFAULT_JOBS,
              show_default=True, help="Jobs to train (seeds 0…N-1) in a fresh run.")
@click.option("--iterations", "n_iterations", type=click.IntRange(1, 10_000),
              default=DEFAULT_ITERATIONS, show_default=True,
              help="GRPO iterations per job in a fresh run.")
@click.option("--plain", is_flag=True,
              help="Plain lines (one per checkpoint) instead of the live display; the default "
                   "when standard output is not a terminal.")
@click.option("--policy", type=click.Choice(sorted(POLICIES)), default=None,
              help=f"What learns in a fresh run: a PyTorch network ({POLICIES['torch']}; the "
                   f"default when PyTorch is installed) or a linear softmax in pure Python "
                   f"({POLICIES['linear']}).")
@click.pass_context
def demo(ctx: click.Context, db: Path, fresh: bool, n_jobs: int, n_iterations: int,
         plain: bool, policy: str | None) -> None:
    """Train several real jobs concurrently, with live progress; Ctrl-C and run again to resume.

    Each job learns, by GRPO, which tool (calculator, lookup, converter, text) answers a typed
    query, from the query's words alone. The demo checks what it claims: every job's success
    on held-out queries goes from at most 0.4 (untrained) to at least 0.9.

    Run it again after Ctrl-C (or a crash, or `kill -9`): the unfinished jobs resume from their
    last checkpoints and end with exactly the policies an uninterrupted run trains. Run it
    again after it finished: a fresh run starts in a new file (flow-2.db, …); logs are kept.

    \b
    Example:
        flowactors demo
        flowactors demo --jobs 2 --iterations 20 --db quick.db
        flowactors demo --policy linear --db linear.db
    """
    out = sys.stdout
    task = _task_of(policy)  # before any file is touched: a missing torch creates no log
    with stderr_logs():
        try:
            plan = plan_run(db, fresh=fresh, n_jobs=n_jobs, n_iterations=n_iterations,
                            task=task)
        except FlowError as exc:
            raise Failure(f"{exc} (pass --db to use another file)") from None
        code = _run(plan, out, live=not plain and out.isatty())
    ctx.exit(code)


def _task_of(policy: str | None) -> str:
    """The task a fresh run trains: the PyTorch policy when asked for or installed."""
    has_torch = importlib.util.find_spec("torch") is not None
    if policy == "torch" and not has_torch:
        raise Failure("--policy torch needs PyTorch: pip install -e '.[torch]' in a checkout "
                      "(or --policy linear)")
    if policy is None and not has_torch:
        click.echo("PyTorch is not installed: a fresh run trains the linear policy "
                   "(--policy torch needs pip install -e '.[torch]').", err=True)
    return POLICIES[policy or ("torch" if has_torch else "linear")]


def _run(plan: RunPlan, out: TextIO, *, live: bool) -> int:
    rt = _open(plan.path)  # before anything is announced: the log may be another's
    specs = plan.specs
    any_spec = next(iter(specs.values()))
    n_held_out = len(split_data(any_spec)[1])
    config = any_spec.config
    several = len(specs) != 1
    click.echo(f"flowactors demo: {len(specs)} job{'s' if several else ''} "
               f"learn{'' if several else 's'}, concurrently, which tool answers a typed query.",
               file=out)
    click.echo(f"Each job: {config.n_iterations} GRPO iterations of {config.batch_size} queries "
               f"x {config.n_trajectories_per_query} trajectories, a checkpoint every "
               f"{config.checkpoint_interval}.", file=out)
    click.echo(f"Goal: held-out success ({n_held_out} queries never trained on) from "
               f"<= {BASELINE_MAX} untrained to >= {LEARNED_MIN}.", file=out)
    click.echo(f"Reward of a trajectory: {reward_scale(any_spec.task)}.", file=out)
    click.echo(textwrap.fill(plan.reason[0].upper() + plan.reason[1:] + ".", width=88,
                             break_on_hyphens=False, break_long_words=False),
               file=out)
    click.echo("Ctrl-C stops cleanly; run the demo again to resume.\n", file=out)
    resumed = {j: resume_iteration(s) for j, s in plan.states.items()
               if not s.status.is_terminal and s.started_at is not None}
    started = time.monotonic()
    display = Display(out, live=live)
    try:
        for job_id, spec in specs.items():
            state = plan.states.get(job_id)
            if state is None:
                rt.submit(spec, job_id=job_id)
            elif state.status is JobStatus.PAUSED:
                rt.resume(job_id)
        display.start(_rows(rt, specs, resumed)[0], resumed)
        while True:
            rows, checkpoints = _rows(rt, specs, resumed)
            display.update(rows, checkpoints)
            unfinished = [r.job_id for r in rows if not r.status.is_terminal]
            if not unfinished:
                break
            for job_id in unfinished:  # raises StoreUnavailable if the job's log writes failed
                try:
                    rt.wait(job_id, timeout=0)
                except TimeoutError:
                    pass
            time.sleep(REFRESH_SECONDS)
        display.finish()
        views = {job_id: rt.status(job_id) for job_id in specs}
        rt.close()
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C; SIGTERM (the runtime closed)
        display.finish()
        rt.close()
        click.echo(f"\n{'Interrupted' if isinstance(exc, KeyboardInterrupt) else 'Stopped'}: "
                   f"the runtime closed cleanly and {plan.path} is intact. Run the demo again "
                   f"to resume the unfinished jobs from their last checkpoints.", file=out)
        if isinstance(exc, SystemExit):
            raise
        return 130
    except FlowError as exc:
        display.finish()
        rt.close()
        raise Failure(str(exc)) from None
    return _summary(plan, views, time.monotonic() - started, out)


def _open(path: Path) -> Runtime:
    try:
        return Runtime(path)
    except StoreLocked as exc:
        raise Failure(f"{path} is in use by another flowactors process ({exc})") from None
    except LogCorrupted as exc:
        raise Failure(str(exc)) from None


def _rows(rt: Runtime, specs: dict[str, JobSpec], resumed: dict[str, int]
          ) -> tuple[list[Row], dict[str, list[CheckpointInfo]]]:
    """Each job's display row and checkpoints, from the runtime's memory (cheap: no I/O)."""
    checkpoints = {job_id: rt.checkpoints(job_id) for job_id in specs}
    rows = [job_row(rt.status(job_id), spec, checkpoints[job_id], resumed.get(job_id))
            for job_id, spec in specs.items()]
    return rows, checkpoints


def _summary(plan: RunPlan, views: dict[str, JobView], elapsed: float, out: TextIO) -> int:
    echo = click.echo
    echo(f"\nDone in {elapsed:.1f} s. Held-out success (the greedy policy on queries never "
         f"trained on):\n", file=out)
    echo(f"  {'job':<8} {'seed':>4} {'lr':>5} {'iterations':>10}  {'before':>6}  {'after':>6}"
         f"  {'resumed':>10}  result", file=out)
    passed = 0
    for job_id, view in views.items():
        spec = plan.specs[job_id]
        before = baseline_score(spec)
        after = view.validation_score if view.status is JobStatus.COMPLETED else None
        ok = learned(before, after)
        passed += ok
        result = ("learned" if ok else
                  f"{view.status.value}: {view.error.message}" if view.error else
                  "did not reach the goal")
        echo(f"  {job_id:<8} {spec.config.seed:>4} {spec.config.learning_rate:>5g} "
             f"{view.progress.current_iteration:>10}  {before:>6.2f}  {number_cell(after, 6)}"
             f"  {view.attempts:>10}  {result}", file=out)
    total = len(views)
    iterations = max(s.config.n_iterations for s in plan.specs.values())
    if passed == total:
        echo(f"\nPASS: {'all ' if total > 1 else ''}{total} job{'s' if total > 1 else ''} "
             f"learned: held-out success went from <= {BASELINE_MAX} "
             f"to >= {LEARNED_MIN} within {iterations} iterations.", file=out)
    else:
        echo(f"\nFAIL: {total - passed} of {total} jobs did not go from <= {BASELINE_MAX} to "
             f">= {LEARNED_MIN} held-out success.", file=out)
    path, job_ids = plan.path, list(views)
    following = numbered(plan.base, len(log_chain(plan.base)) + 1)
    echo("\nLook closer (everything below reads the log alone):", file=out)
    echo(f"  {_cmd('status', '--db', path)}", file=out)
    echo(f"  {_cmd('history', job_ids[0], '--db', path)}", file=out)
    echo(f"  {_cmd('report', *job_ids, '--db', path, '--out', 'report.html')}", file=out)
    echo(f"Running the demo again starts a fresh run in {following}; {path} is kept.", file=out)
    return 0 if passed == total else 1


if __name__ == "__main__":
    demo(prog_name="flowactors demo")
