"""`flowactors demo`: several real training jobs, concurrently, with live progress — resumable.

The demo trains `toolchoice` jobs (seeds 0, 1, 2, … alternating two learning rates) in one
`Runtime` on an ordinary log file and shows what flowactors is for: the jobs really learn
(held-out success rises from ≤ 0.4 untrained to ≥ 0.9), they survive a crash or Ctrl-C (run the
demo again and the unfinished jobs resume from their last checkpoints), and everything can be
inspected afterwards from the log alone (`status`, `history`, `report`).

Which file a run uses is decided from the logs themselves, never by asking: the demo's runs go
to `flow.db`, then `flow-2.db`, `flow-3.db`, …; the latest one is resumed if it holds an
unfinished demo, otherwise a fresh run starts in the next free name and no log is ever removed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Literal, TextIO

import click
import msgspec

from .console import Failure, stderr_logs
from .errors import FlowError, LogCorrupted, StoreLocked
from .events import JobSubmitted
from .job import JobState, evolve, initial_state
from .runtime import Runtime
from .spec import GRPOConfig, JobSpec
from .store import EventStore
from .tasks import build_task, reward_scale
from .tasks.toolchoice import make_training_data
from .training import split_data
from .views import CheckpointInfo, JobStatus, JobView

__all__ = ["BASELINE_MAX", "DEFAULT_ITERATIONS", "DEFAULT_JOBS", "LEARNED_MIN", "JOB_PREFIX",
           "RunPlan", "baseline_score", "demo", "demo_specs", "learned", "plan_run"]

DEFAULT_JOBS = 4
DEFAULT_ITERATIONS = 60
LEARNING_RATES = (0.05, 0.01)
TORCH_TASK = "toolchoice-torch"
TORCH_LEARNING_RATES = (0.005, 0.003)  # Adam on a network: slower, so learning is visible
N_QUERIES = 200  # 160-169 distinct; 20% held out: 32-33 queries the policy never trains on
BATCH_SIZE = 32
TRAJECTORIES_PER_QUERY = 8
CHECKPOINT_INTERVAL = 5
MAX_STEPS = 4
BASELINE_MAX = 0.4
"""An untrained policy's held-out success is at most this…"""
LEARNED_MIN = 0.9
"""…and a trained one's at least this, within the demo's iterations: the demo's claim."""
JOB_PREFIX = "demo-"
REFRESH_SECONDS = 0.125  # 8 Hz


# --- what the demo trains -----------------------------------------------------------------------


def demo_specs(n_jobs: int = DEFAULT_JOBS, n_iterations: int = DEFAULT_ITERATIONS,
               task: str = "toolchoice") -> dict[str, JobSpec]:
    """The demo's jobs by id: seed i, learning rates alternating, everything else equal.

    Fixed ids and deterministic specs make a second submission idempotent, and two runs of
    the demo train bit-identical policies. The agent id records the run's size, so a run
    killed between two submissions can be completed when it resumes.
    """
    return {
        f"{JOB_PREFIX}{seed}": JobSpec(
            agent_id=f"toolchoice-agent-{seed}-of-{n_jobs}",
            training_data=make_training_data(N_QUERIES, seed, distinct=True),
            config=GRPOConfig(
                n_iterations=n_iterations, batch_size=BATCH_SIZE,
                n_trajectories_per_query=TRAJECTORIES_PER_QUERY,
                learning_rate=(TORCH_LEARNING_RATES if task == TORCH_TASK
                               else LEARNING_RATES)[seed % len(LEARNING_RATES)],
                checkpoint_interval=CHECKPOINT_INTERVAL, max_steps_per_trajectory=MAX_STEPS,
                seed=seed),
            task=task)
        for seed in range(n_jobs)
    }


def baseline_score(spec: JobSpec) -> float:
    """Held-out success of the untrained policy: cheap and deterministic, so computed here."""
    task = build_task(spec)
    _, held_out = split_data(spec)
    return task.evaluate(task.init(spec), held_out)


def learned(baseline: float, final: float | None) -> bool:
    """The demo's claim for one job: from ≤ BASELINE_MAX to ≥ LEARNED_MIN."""
    return final is not None and baseline <= BASELINE_MAX and final >= LEARNED_MIN


# --- which log a run uses -------------------------------------------------------------------------


LogKind = Literal["missing", "empty", "other", "unfinished", "finished"]


class RunPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What this invocation does: run `specs` in `path`, fresh or resuming."""

    path: Path
    base: Path  # the --db the user named: later runs go to its numbered siblings
    resume: bool
    specs: dict[str, JobSpec]
    states: dict[str, JobState]  # the demo jobs as the log left them (resume only)
    reason: str  # one sentence for the screen: why this file, and what happens


def _numbered(path: Path, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def _chain(path: Path) -> list[Path]:
    """`path`, `path-2`, `path-3`, … as long as they exist (at least `path`)."""
    chain = [path]
    while _numbered(path, len(chain) + 1).exists():
        chain.append(_numbered(path, len(chain) + 1))
    return chain


def _read_demo_jobs(path: Path) -> tuple[LogKind, dict[str, JobState]]:
    """Fold the log's demo jobs, read-only. Raises LogCorrupted for a foreign file."""
    if not path.exists():
        return "missing", {}
    states: dict[str, JobState] = {}
    other = False
    with EventStore(path, mode="readonly") as store:
        for recorded in store.read_all():
            stream = recorded.stream
            if stream not in states:
                if not (stream.startswith(JOB_PREFIX) and isinstance(recorded.event, JobSubmitted)
                        and recorded.event.spec.task in ("toolchoice", TORCH_TASK)):
                    other = True
                    continue
                states[stream] = initial_state(stream)
            states[stream] = evolve(states[stream], recorded)
    if not states:
        return ("other" if other else "empty"), {}
    if all(s.status.is_terminal for s in states.values()):
        return "finished", states
    return "unfinished", states


def plan_run(db: Path, *, fresh: bool = False, n_jobs: int = DEFAULT_JOBS,
             n_iterations: int = DEFAULT_ITERATIONS, task: str = "toolchoice") -> RunPlan:
    """Decide, from the logs alone, where this run goes and whether it resumes.

    The latest of `db`, `db-2`, `db-3`, … that exists is resumed when it holds an unfinished
    demo (its recorded specs win over `n_jobs`/`n_iterations`); a missing or empty one is used
    for a fresh run; otherwise the fresh run goes to the next free name. `fresh` always starts
    a new run (in a new file, unless `db` does not exist yet).

    Raises:
        LogCorrupted: the latest file is not a flowactors log.
    """
    chain = _chain(db)
    latest, following = chain[-1], _numbered(db, len(chain) + 1)
    specs = demo_specs(n_jobs, n_iterations, task)
    if fresh:
        if not db.exists():
            return RunPlan(path=db, base=db, resume=False, specs=specs, states={},
                           reason=f"starting a fresh run in {db}")
        return RunPlan(path=following, base=db, resume=False, specs=specs, states={},
                       reason=f"--fresh: starting a new run in {following} "
                              f"({_list(chain)} {'is' if len(chain) == 1 else 'are'} kept)")
    kind, states = _read_demo_jobs(latest)
    if kind in ("missing", "empty"):
        return RunPlan(path=latest, base=db, resume=False, specs=specs, states={},
                       reason=f"starting a fresh run in {latest}")
    if kind == "unfinished":
        recorded = {job_id: s.spec for job_id, s in states.items() if s.spec is not None}
        unfinished = {j: s for j, s in states.items() if not s.status.is_terminal}
        points = "; ".join(f"{j} from iteration {_resume_iteration(s)}"
                           if _resume_iteration(s) else f"{j} from the start (no checkpoint yet)"
                           for j, s in unfinished.items())
        # A run killed between its submissions: submit the rest, as that run would have.
        first = next(iter(recorded.values()))
        intended = re.search(r"-of-(\d+)$", first.agent_id)
        if intended:
            same_run = demo_specs(int(intended.group(1)), first.config.n_iterations,
                                  first.task)
            if all(same_run.get(j) == spec for j, spec in recorded.items()):
                recorded = {**same_run, **recorded}
        return RunPlan(path=latest, base=db, resume=True, specs=recorded, states=states,
                       reason=f"resuming {len(unfinished)} unfinished "
                              f"job{'s' if len(unfinished) != 1 else ''} in {latest} from "
                              f"the last checkpoints: {points}. Nothing before a checkpoint is "
                              f"run again (--fresh would start a new run instead)")
    why = ("holds a finished demo run" if kind == "finished" else "holds other jobs")
    return RunPlan(path=following, base=db, resume=False, specs=specs, states={},
                   reason=f"{latest} {why}: starting a fresh run in {following} "
                          f"({latest} is kept)")


def _resume_iteration(state: JobState) -> int:
    """Where a job continues: its last checkpoint (or pause point); 0 = from the start."""
    return state.resume_point.iteration if state.resume_point is not None else 0


def _list(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)


# --- the live display ---------------------------------------------------------------------------


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One job's line: what the display shows, taken from the runtime's in-memory view."""

    job_id: str
    seed: int
    lr: float
    status: JobStatus
    iteration: int
    total: int
    reward: float | None
    success: float | None
    held_out: float | None  # at the latest checkpoint, or the final score
    held_out_at: int | None
    best: int | None
    resumed_from: int | None


def _row(view: JobView, spec: JobSpec, checkpoints: list[CheckpointInfo],
         resumed_from: int | None) -> Row:
    latest = max(checkpoints, key=lambda c: c.iteration, default=None)
    held_out, held_out_at = ((latest.validation_score, latest.iteration) if latest
                             else (None, None))
    if view.status is JobStatus.COMPLETED and view.validation_score is not None:
        held_out, held_out_at = view.validation_score, view.progress.current_iteration
    return Row(job_id=view.job_id, seed=spec.config.seed, lr=spec.config.learning_rate,
               status=view.status, iteration=view.progress.current_iteration,
               total=view.progress.total_iterations, reward=view.metrics.get("avg_reward"),
               success=view.metrics.get("success_rate"), held_out=held_out,
               held_out_at=held_out_at, best=view.best_checkpoint, resumed_from=resumed_from)


def _num(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else " " * (width - 1) + "-"


class Display:
    """Redraws one line per job in place on a terminal (ANSI cursor-up), or, elsewhere,
    prints a plain line per checkpoint and per status change."""

    HEADER = (f"  {'job':<8} {'seed':>4} {'lr':>5}  {'status':<9} {'progress':<14} "
              f"{'reward':>6} {'success':>7}  {'held-out':<9} {'best':>4}")
    LEGEND = ("reward (the scale above), success (0..1): this iteration's rollouts; held-out: "
              "greedy success on\nunseen queries at the latest checkpoint (@ its iteration); "
              "best: the best checkpoint.")

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self.out = out
        self.live = live
        self.drawn = 0
        self.bar = ("█", "░") if (getattr(out, "encoding", "") or "").lower().startswith(
            "utf") else ("#", "-")
        self.printed: dict[str, tuple[JobStatus, int]] = {}

    def start(self, rows: list[Row], resumed: dict[str, int]) -> None:
        """Remember where each job starts, so plain lines only tell what happens now."""
        for row in rows:
            self.printed[row.job_id] = (row.status if row.status.is_terminal else JobStatus.QUEUED,
                                        resumed.get(row.job_id, 0))
        if self.live:
            self._echo(self.LEGEND + "\n")
            self.out.write("\x1b[?25l")  # hide the cursor while redrawing
            self._echo(self.HEADER[:self._width()])

    def update(self, rows: list[Row], checkpoints: dict[str, list[CheckpointInfo]]) -> None:
        if self.live:
            self._redraw(rows)
        else:
            self._plain(rows, checkpoints)
        self.out.flush()

    def finish(self) -> None:
        if self.live:
            self.out.write("\x1b[?25h")
            self.out.flush()

    def _echo(self, line: str) -> None:
        self.out.write(line + "\n")

    def _redraw(self, rows: list[Row]) -> None:
        width = self._width()
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")
        for row in rows:
            self.out.write("\x1b[2K" + self.line(row)[:width] + "\n")
        self.drawn = len(rows)

    @staticmethod
    def _width() -> int:
        """Columns a line may use: a wrapped line would break the cursor-up redraw."""
        return max(20, shutil.get_terminal_size((100, 24)).columns - 1)

    def line(self, row: Row) -> str:
        """One job's live line."""
        filled = round(8 * row.iteration / row.total) if row.total else 0
        bar = self.bar[0] * filled + self.bar[1] * (8 - filled)
        progress = f"{bar} {row.iteration:>{len(str(row.total))}}/{row.total}"
        held = (f"{row.held_out:.2f} @{row.held_out_at}" if row.held_out is not None else "-")
        note = f"  resumed from {row.resumed_from}" if row.resumed_from is not None else ""
        return (f"  {row.job_id:<8} {row.seed:>4} {row.lr:>5g}  {row.status.value:<9} "
                f"{progress:<14} {_num(row.reward, 6)} {_num(row.success, 7)}  {held:<9} "
                f"{row.best if row.best is not None else '-':>4}{note}")

    def _plain(self, rows: list[Row], checkpoints: dict[str, list[CheckpointInfo]]) -> None:
        for row in rows:
            status, last = self.printed.get(row.job_id, (JobStatus.QUEUED, 0))
            for info in sorted(checkpoints.get(row.job_id, ()), key=lambda c: c.iteration):
                if info.iteration > last:
                    m = info.metrics
                    self._echo(f"{row.job_id}  iteration {info.iteration}/{row.total}  "
                               f"reward {_num(m.get('avg_reward'), 5).strip()}  "
                               f"success {_num(m.get('success_rate'), 4).strip()}  "
                               f"held-out {info.validation_score:.2f}  checkpoint saved")
                    last = info.iteration
            if row.status is not status:
                if row.status is JobStatus.RUNNING and row.resumed_from is not None:
                    self._echo(f"{row.job_id}  running: resumed from checkpoint "
                               f"{row.resumed_from}" if row.resumed_from else
                               f"{row.job_id}  running: restarted (no checkpoint yet)")
                elif row.status is JobStatus.COMPLETED:
                    self._echo(f"{row.job_id}  completed  held-out {_num(row.held_out, 4)}")
                else:
                    self._echo(f"{row.job_id}  {row.status.value}")
                status = row.status
            self.printed[row.job_id] = (status, last)


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
@click.option("--torch", "use_torch", is_flag=True,
              help=f"Train a PyTorch policy ({TORCH_TASK}; needs flowactors[torch]).")
@click.pass_context
def demo(ctx: click.Context, db: Path, fresh: bool, n_jobs: int, n_iterations: int,
         plain: bool, use_torch: bool) -> None:
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
        flowactors demo --torch --db torch.db
    """
    out = sys.stdout
    with stderr_logs():
        try:
            plan = plan_run(db, fresh=fresh, n_jobs=n_jobs, n_iterations=n_iterations,
                            task=TORCH_TASK if use_torch else "toolchoice")
        except FlowError as exc:
            raise Failure(f"{exc} (pass --db to use another file)") from None
        code = _run(plan, out, live=not plain and out.isatty())
    ctx.exit(code)


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
    resumed = {j: _resume_iteration(s) for j, s in plan.states.items()
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
    rows = [_row(rt.status(job_id), spec, checkpoints[job_id], resumed.get(job_id))
            for job_id, spec in specs.items()]
    return rows, checkpoints


def _summary(plan: RunPlan, views: dict[str, JobView], elapsed: float, out: TextIO) -> int:
    echo = click.echo
    echo(f"\nDone in {elapsed:.1f} s. Held-out success (the greedy policy on queries never "
         f"trained on):\n", file=out)
    echo(f"  {'job':<8} {'seed':>4} {'lr':>5} {'iterations':>10}  {'before':>6}  {'after':>6}"
         f"  {'recoveries':>10}  result", file=out)
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
             f"{view.progress.current_iteration:>10}  {before:>6.2f}  {_num(after, 6)}"
             f"  {view.attempts:>10}  {result}", file=out)
    total = len(views)
    iterations = max(s.config.n_iterations for s in plan.specs.values())
    if passed == total:
        echo(f"\nPASS: all {total} jobs learned: held-out success went from <= {BASELINE_MAX} "
             f"to >= {LEARNED_MIN} within {iterations} iterations.", file=out)
    else:
        echo(f"\nFAIL: {total - passed} of {total} jobs did not go from <= {BASELINE_MAX} to "
             f">= {LEARNED_MIN} held-out success.", file=out)
    path, job_ids = plan.path, list(views)
    following = _numbered(plan.base, len(_chain(plan.base)) + 1)
    echo("\nLook closer (everything below reads the log alone):", file=out)
    echo(f"  {_cmd('status', '--db', path)}", file=out)
    echo(f"  {_cmd('history', job_ids[0], '--db', path)}", file=out)
    echo(f"  {_cmd('report', *job_ids, '--db', path, '--out', 'report.html')}", file=out)
    echo(f"Running the demo again starts a fresh run in {following}; {path} is kept.", file=out)
    return 0 if passed == total else 1


if __name__ == "__main__":
    demo(prog_name="flowactors demo")
