"""`flowactors report`: one self-contained HTML file of jobs' training curves, from the log alone.

`load_report` reads a log read-only and extracts, per job, the *final timeline* of its
iterations: a recovery rewinds a job to its checkpoint and the iterations after it are re-run,
so a point superseded by a re-run is dropped, exactly as replay drops it from the job's state.
Checkpoints (with their held-out validation scores) and recovery points are kept to be marked.
`write_report` draws them with plotly (four panels: reward, rollout success rate, loss,
held-out success) and inlines plotly's JavaScript, so the file opens anywhere, offline. The
same log always gives the same bytes: nothing in the file comes from the clock or the machine.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import msgspec

from .console import Failure, resolve_job, stderr_logs
from .errors import FlowError, JobNotFound
from .events import CheckpointSaved, IterationCompleted, JobForked, JobRecovered, RecordedEvent
from .job import JobState, evolve, initial_state
from .store import EventStore
from .tasks import reward_scale
from .trajectories import RecordedTrajectory, read as read_trajectories

__all__ = ["CheckpointPoint", "JobCurves", "Recovery", "ReportData", "METRICS", "build_figure",
           "load_report", "render_html", "report", "write_report"]

METRICS = {
    "avg_reward": "Average reward (rollouts)",
    "success_rate": "Success rate (rollouts)",
    "loss": "Loss (GRPO surrogate)",
}
"""The per-iteration metrics plotted, each in its own panel, one line per job."""
HELD_OUT = "validation_score"
INSTALL_HINT = ("the report needs plotly: pip install plotly (or pip install -e '.[report]' in a "
                "checkout of flowactors)")


class CheckpointPoint(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint of the final timeline and its held-out validation score."""

    iteration: int
    validation_score: float


class Recovery(msgspec.Struct, frozen=True, kw_only=True):
    """A job resumed from `from_iteration` (0: from the start) after a crash or a restart;
    `rerun` iterations recorded before it were superseded."""

    from_iteration: int
    attempt: int
    cause: str
    rerun: int
    position: int


class JobCurves(msgspec.Struct, frozen=True, kw_only=True):
    """One job's plotted data. The metric lists are parallel to `iterations`."""

    job_id: str
    agent_id: str
    task: str
    status: str
    seed: int
    learning_rate: float
    total_iterations: int
    iterations: list[int]
    metrics: dict[str, list[float]]
    checkpoints: list[CheckpointPoint]
    recoveries: list[Recovery]
    final_score: float | None
    best_checkpoint: int | None
    attempts: int
    cost_usd: float
    final_state_digest: str | None
    events: int
    lineage: str = ""

    @property
    def label(self) -> str:
        return f"{self.job_id} (seed {self.seed}, lr {self.learning_rate:g})"


class ReportData(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a report shows: the log's identity and each job's curves."""

    path: str
    head_position: int
    head_hash: str
    jobs: list[JobCurves]
    trajectory_iteration: int | None = None
    trajectories: list[RecordedTrajectory] = []


# --- extraction: plain functions on the log --------------------------------------------------------


class _Timeline:
    """Folds one job's events into its final timeline (and its JobState, for the summary)."""

    def __init__(self, job_id: str) -> None:
        self.state: JobState = initial_state(job_id)
        self.points: dict[int, IterationCompleted] = {}
        self.checkpoints: dict[int, float] = {}
        self.recoveries: list[Recovery] = []
        self.events = 0

    def add(self, recorded: RecordedEvent) -> None:
        self.state = evolve(self.state, recorded)
        self.events += 1
        match recorded.event:
            case IterationCompleted() as event:
                self.points[event.iteration] = event
            case CheckpointSaved(iteration=iteration, validation_score=score):
                self.checkpoints[iteration] = score
            case JobForked(at_iteration=at, metrics=m):  # the child's curves start there
                self.points[at] = IterationCompleted(
                    iteration=at, avg_reward=m.get("avg_reward", 0.0),
                    std_reward=m.get("std_reward", 0.0), loss=m.get("loss", 0.0),
                    success_rate=m.get("success_rate", 0.0))
            case JobRecovered(from_checkpoint=checkpoint, attempt=attempt, cause=cause):
                start = checkpoint or 0
                superseded = [i for i in self.points if i > start]
                for i in superseded:
                    del self.points[i]
                for i in [i for i in self.checkpoints if i > start]:
                    del self.checkpoints[i]
                self.recoveries.append(Recovery(from_iteration=start, attempt=attempt,
                                                cause=cause, rerun=len(superseded),
                                                position=recorded.position))
            case _:
                pass

    def curves(self) -> JobCurves:
        state = self.state
        spec = state.spec
        if spec is None:
            raise JobNotFound(f"job {state.job_id!r} has no submission event")
        iterations = sorted(self.points)
        points = [self.points[i] for i in iterations]
        metrics = {name: [float(getattr(p, name)) for p in points] for name in METRICS}
        live = [c.info for c in state.checkpoints if not c.info.pruned]
        best = max(live, key=lambda c: (c.validation_score, c.iteration), default=None)
        return JobCurves(
            job_id=state.job_id, agent_id=spec.agent_id, task=spec.task,
            status=state.status.value, seed=spec.config.seed,
            learning_rate=spec.config.learning_rate,
            total_iterations=spec.config.n_iterations, iterations=iterations, metrics=metrics,
            checkpoints=[CheckpointPoint(iteration=i, validation_score=s)
                         for i, s in sorted(self.checkpoints.items())],
            recoveries=self.recoveries, final_score=state.validation_score,
            best_checkpoint=best.iteration if best else None, attempts=state.attempts,
            cost_usd=state.cost_usd, final_state_digest=state.final_state_digest,
            events=self.events, lineage=_lineage(state))


def _lineage(state: JobState) -> str:
    parts = []
    if state.forked_from is not None:
        origin = state.forked_from
        parts.append(f"forked from {origin.parent_id} at {origin.at_iteration}")
    if state.forks:
        parts.append("forks: " + ", ".join(f"{f.child_id} (at {f.at_iteration})"
                                           for f in state.forks))
    return "; ".join(parts)


def load_report(path: str | Path, job_ids: Sequence[str] = (),
                trajectory_iteration: int | None = None) -> ReportData:
    """Read the curves of `job_ids` (every job when empty) from the log at `path`, read-only,
    and each job's recorded trajectories of `trajectory_iteration` when given.

    Raises:
        LogNotFound: no file at `path` (nothing is created).
        LogCorrupted: not a flowactors log, or an undecodable event.
        JobNotFound: a requested job has no events in this log.
    """
    with EventStore(path, mode="readonly") as store:
        timelines: dict[str, _Timeline] = {}
        if job_ids:
            for job_id in dict.fromkeys(job_ids):
                timeline = timelines[job_id] = _Timeline(job_id)
                for recorded in store.read_stream(job_id):
                    timeline.add(recorded)
                if not timeline.events:
                    raise JobNotFound(f"job {job_id!r} not found in {path}")
        else:
            for recorded in store.read_all():
                timeline = timelines.get(recorded.stream)
                if timeline is None:
                    timeline = timelines[recorded.stream] = _Timeline(recorded.stream)
                timeline.add(recorded)
        position, head_hash = store.head()
        found = [] if trajectory_iteration is None else [
            t for job_id in timelines
            for t in read_trajectories(store, job_id, iteration=trajectory_iteration)]
    return ReportData(path=str(path), head_position=position, head_hash=head_hash,
                      jobs=[t.curves() for t in timelines.values()],
                      trajectory_iteration=trajectory_iteration, trajectories=found)


# --- drawing --------------------------------------------------------------------------------------


def build_figure(data: ReportData) -> Any:
    """A plotly Figure: four panels, one trace per job and metric; checkpoints as markers,
    recoveries as dotted vertical lines. Each trace's `meta` names its job and metric.

    Raises:
        ImportError: plotly is not installed.
    """
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    panels = [*METRICS, HELD_OUT]
    titles = [*METRICS.values(), "Held-out success at checkpoints (greedy, unseen queries)"]
    cells = [(1, 1), (1, 2), (2, 1), (2, 2)]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.14)
    palette = qualitative.Plotly
    for index, job in enumerate(data.jobs):
        color = palette[index % len(palette)]
        at_checkpoint = {c.iteration for c in job.checkpoints}
        sizes = [8 if i in at_checkpoint else 0 for i in job.iterations]
        for panel, (row, col) in zip(panels, cells):
            if panel == HELD_OUT:
                x = [c.iteration for c in job.checkpoints]
                y = [c.validation_score for c in job.checkpoints]
                marker: dict[str, Any] = {"size": 8, "symbol": "diamond"}
                mode = "lines+markers"
            else:
                x, y = job.iterations, job.metrics[panel]
                marker = {"size": sizes, "symbol": "diamond"}
                mode = "lines+markers"
            fig.add_trace(go.Scatter(
                x=x, y=y, mode=mode, name=job.label, legendgroup=job.job_id,
                showlegend=panel == panels[0], line={"color": color, "width": 2},
                marker={**marker, "color": color},
                meta={"job": job.job_id, "metric": panel},
                hovertemplate=f"{html.escape(job.job_id)}: %{{y:.3f}}<extra></extra>"),
                row=row, col=col)
        for recovery in job.recoveries:
            for row, col in cells:
                fig.add_vline(x=recovery.from_iteration, row=row, col=col,
                              line={"color": color, "dash": "dot", "width": 1.5})
    _label_recoveries(fig, data.jobs)
    for row, col in cells:
        fig.update_xaxes(title_text="iteration", row=row, col=col, rangemode="tozero")
    for row, col in [(1, 2), (2, 2)]:
        fig.update_yaxes(range=[-0.03, 1.03], row=row, col=col)
    fig.update_layout(template="plotly_white", height=760, hovermode="x unified",
                      margin={"l": 50, "r": 20, "t": 60, "b": 50},
                      legend={"orientation": "h", "y": 1.1, "x": 0, "title": {"text": ""}})
    return fig


def _label_recoveries(fig: Any, jobs: list[JobCurves]) -> None:
    """One vertical label per recovery point in the first panel, naming the jobs resumed there
    (hover for the details)."""
    at: dict[int, list[tuple[JobCurves, Recovery]]] = {}
    for job in jobs:
        for recovery in job.recoveries:
            at.setdefault(recovery.from_iteration, []).append((job, recovery))
    for iteration, resumed in sorted(at.items()):
        names = ", ".join(dict.fromkeys(job.job_id for job, _ in resumed))
        details = "<br>".join(
            f"{html.escape(job.job_id)}: {r.cause}, attempt {r.attempt}, resumed from "
            + (f"checkpoint {iteration}" if iteration else "the start")
            + f", {r.rerun} iteration(s) re-run" for job, r in resumed)
        fig.add_annotation(
            x=iteration, y=0.02, xref="x", yref="y domain", text=f"↻ {html.escape(names)}",
            textangle=-90, showarrow=False, xanchor="left", yanchor="bottom", xshift=1,
            font={"size": 11, "color": "#444"}, bgcolor="rgba(255,255,255,0.75)",
            hovertext=details)


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 24px 32px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
p.meta { color: #666; margin: 0 0 16px 0; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 8px; }
th, td { padding: 4px 10px; text-align: right; border-bottom: 1px solid #e4e4e4;
         white-space: nowrap; }
td.wrap { white-space: normal; }
th { background: #f6f6f6; font-weight: 600; }
td.l, th.l { text-align: left; }
code { font-size: 12px; }
code.cmd { white-space: nowrap; }
p.note { color: #555; font-size: 13px; max-width: 1100px; }
"""


def render_html(data: ReportData) -> str:
    """The whole report as one HTML document, plotly's JavaScript inlined."""
    fig = build_figure(data)
    esc = html.escape
    rows = []
    for job in data.jobs:
        recoveries = ", ".join(
            f"{r.cause} → " + (f"checkpoint {r.from_iteration}" if r.from_iteration
                               else "start") + f" ({r.rerun} re-run)"
            for r in job.recoveries) or "–"
        rows.append(
            f"<tr><td class=l>{esc(job.job_id)}</td><td class=l>{esc(job.task)}</td>"
            f"<td>{job.seed}</td><td>{job.learning_rate:g}</td>"
            f"<td class=l>{esc(job.status)}</td>"
            f"<td>{len(job.iterations)}/{job.total_iterations}</td>"
            f"<td>{_fmt(job.final_score)}</td>"
            f"<td>{job.best_checkpoint if job.best_checkpoint is not None else '–'}</td>"
            f"<td class='l wrap'>{esc(recoveries)}</td><td>${job.cost_usd:.4f}</td>"
            f"<td class=l><code>{esc((job.final_state_digest or '–')[:16])}</code></td>"
            f"<td class='l wrap'>{esc(job.lineage or '–')}</td></tr>")
    figure = fig.to_html(full_html=False, include_plotlyjs=True, div_id="flowactors-curves",
                         config={"displaylogo": False, "responsive": True})
    title = f"flowactors report: {Path(data.path).name}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">Built from the log alone: {len(data.jobs)} job(s), log head at position
{data.head_position}, hash <code>{esc(data.head_hash[:16])}</code>.
Check that the log still holds what this report shows:<br>
<code class="cmd">flowactors verify --expect-head {esc(data.head_hash)} --db {esc(shlex.quote(data.path))}</code></p>
<table>
<tr><th class=l>job</th><th class=l>task</th><th>seed</th><th>lr</th><th class=l>status</th>
<th>iterations</th><th>final held-out</th><th>best checkpoint</th>
<th class=l>recoveries</th><th>cost</th><th class=l>final state digest</th>
<th class=l>lineage</th></tr>
{chr(10).join(rows)}
</table>
{figure}
{_trajectory_table(data)}
<p class="note">One line per job and metric over its iterations. {esc(_scales(data))}
Diamonds mark checkpoints;
the held-out panel shows the validation score saved with each checkpoint (the greedy policy's
success on queries it never trained on). A dotted vertical line (labelled ↻ in the first panel)
marks a recovery: the job resumed from that checkpoint after a crash, and the iterations after
it were run again — the curves show the final timeline, the one replay rebuilds. Click a job in
the legend to hide it; drag to zoom, double-click to reset.</p>
</body>
</html>
"""


def _scales(data: ReportData) -> str:
    """What the numbers mean: the reward is each task's own sum, not a fraction."""
    tasks = sorted({job.task for job in data.jobs})
    said = [f"{task}: {scale}" for task in tasks if (scale := reward_scale(task))]
    return ("Average reward is the mean of a trajectory's reward on its task's own scale"
            + (f" ({'; '.join(said)})" if said else "") + "; success rates and held-out "
            "scores are fractions, 0 to 1.")


def _trajectory_table(data: ReportData) -> str:
    """The recorded trajectories of the chosen iteration, one row each."""
    if data.trajectory_iteration is None:
        return ""
    esc = html.escape
    rows = [f"<tr><td class=l>{esc(t.job_id)}</td><td>{t.query_index}.{t.index}</td>"
            f"<td class='l wrap'>{esc(t.query)}</td><td>{t.reward:.4f}</td>"
            f"<td class=l>{'yes' if t.success else 'no'}</td><td>{t.steps}</td>"
            f"<td>{t.tokens}</td><td>${t.cost_usd:.4f}</td>"
            f"<td class='l wrap'>{esc(t.error or '')}"
            f"{' (superseded)' if t.superseded else ''}</td></tr>" for t in data.trajectories]
    return (f"<h2 id=trajectories>Trajectories of iteration {data.trajectory_iteration}</h2>"
            "<table><tr><th class=l>job</th><th>#</th><th class=l>query</th><th>reward</th>"
            "<th class=l>success</th><th>steps</th><th>tokens</th><th>cost</th>"
            "<th class=l>error</th></tr>" + "".join(rows) + "</table>"
            + ("" if rows else "<p class=note>No trajectories on record there.</p>"))


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def write_report(data: ReportData, out: str | Path) -> Path:
    """Write the HTML report to `out` (overwriting it); returns the path.

    Raises:
        ImportError: plotly is not installed.
    """
    text = render_html(data)
    out = Path(out)
    out.write_text(text, encoding="utf-8")
    return out


# --- the command ----------------------------------------------------------------------------------


def _plotly_available() -> bool:
    try:
        import plotly  # noqa: F401
    except ImportError:
        return False
    return True


@click.command("report")
@click.argument("job_ids", metavar="[JOB]...", nargs=-1)
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), default="flow.db",
              show_default=True, help="The log file (opened read-only).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="report.html",
              show_default=True, help="The HTML file to write.")
@click.option("--trajectories", "iteration", type=click.IntRange(min=1), metavar="N",
              help="Add a table of the jobs' recorded trajectories of iteration N.")
def report(job_ids: tuple[str, ...], db: Path, out: Path, iteration: int | None) -> None:
    """Write an HTML report of jobs' reward, success and loss curves, from the log alone.

    Every job of the log when no JOB is given. Checkpoints and their held-out scores are
    marked, and so are recovery points (where a job resumed after a crash); a fork's curves
    start at its fork point, on its parent's. The file is
    self-contained (it works offline) and the same log always gives the same file.

    \b
    Example:
        flowactors report demo-0 demo-1 --db flow.db --out report.html
    """
    if not _plotly_available():
        raise Failure(INSTALL_HINT)
    if out.suffix.lower() not in (".html", ".htm"):
        raise Failure(f"--out {out}: the report is an HTML file (name it *.html)")
    with stderr_logs():
        try:
            with EventStore(db, mode="readonly") as store:
                job_ids = tuple(resolve_job(store, job_id) for job_id in job_ids)
            data = load_report(db, job_ids, iteration)
        except FlowError as exc:
            raise Failure(str(exc)) from None
    if not data.jobs:
        raise Failure(f"{db} holds no jobs yet")
    try:
        write_report(data, out)
    except OSError as exc:
        raise Failure(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    points = sum(len(j.iterations) for j in data.jobs)
    recovered = sum(len(j.recoveries) for j in data.jobs)
    click.echo(f"Wrote {out}: {len(data.jobs)} job(s), {points} iterations, "
               f"{sum(len(j.checkpoints) for j in data.jobs)} checkpoints, "
               f"{recovered} recovery point(s). Open it in a browser.")


if __name__ == "__main__":
    report(prog_name="flowactors report")
