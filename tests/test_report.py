"""`flowactors report`: curves built from the log alone, one self-contained HTML file."""

from __future__ import annotations

import html
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

import flowactors as fa
from flowactors.events import CheckpointSaved, IterationCompleted, JobCompleted
from flowactors.report import METRICS, build_figure, load_report, render_html, report
from flowactors.store import EventStore
from flowactors.tasks.toolchoice import ToolChoiceTask, make_training_data

pytest.importorskip("plotly")

N_ITERATIONS, INTERVAL, RERUN = 12, 5, 2


def spec(seed: int) -> fa.JobSpec:
    return fa.JobSpec(
        agent_id=f"agent-{seed}", training_data=make_training_data(40, seed, distinct=True), task="toolchoice",
        config=fa.GRPOConfig(n_iterations=N_ITERATIONS, batch_size=8, n_trajectories_per_query=4,
                             checkpoint_interval=INTERVAL, max_steps_per_trajectory=4,
                             seed=seed))


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    """Two completed jobs; job "a" crashed RERUN iterations after its first checkpoint, so the
    log holds a recovery and iterations 6 and 7 twice (the superseded run and the re-run)."""
    folder = tmp_path_factory.mktemp("report")
    with fa.Runtime(folder / "full.db", synchronous="off", handle_signals=False) as rt:
        for job_id, seed in (("a", 1), ("b", 2)):
            rt.submit(spec(seed), job_id=job_id)
        for job_id in ("a", "b"):
            assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
        history = {job_id: list(rt.history(job_id)) for job_id in ("a", "b")}
        blobs = {r.event.state_ref if isinstance(r.event, CheckpointSaved)
                 else r.event.final_state_ref: rt.store.get_blob(
                     r.event.state_ref if isinstance(r.event, CheckpointSaved)
                     else r.event.final_state_ref)
                 for h in history.values() for r in h
                 if isinstance(r.event, CheckpointSaved | JobCompleted)}
    cut = next(i for i, r in enumerate(history["a"])
               if isinstance(r.event, IterationCompleted) and r.event.iteration == INTERVAL + RERUN)
    path = folder / "flow.db"
    with EventStore(path, mode="owner", synchronous="off") as store:
        for recorded in [*history["b"], *history["a"][:cut + 1]]:
            event = recorded.event
            ref = (event.state_ref if isinstance(event, CheckpointSaved) else
                   event.final_state_ref if isinstance(event, JobCompleted) else None)
            store.append(recorded.stream, [event], recorded.version - 1,
                         blobs=[blobs[ref]] if ref else [])
    with fa.Runtime(path, synchronous="off", handle_signals=False) as rt:  # recovers "a"
        assert rt.wait("a", timeout=60).attempts == 1
    return path


def iterations_in_log(path: Path) -> dict[str, list[int]]:
    """Every recorded iteration event's number, per job, in log order (re-runs included)."""
    with EventStore(path, mode="readonly") as store:
        found: dict[str, list[int]] = {}
        for r in store.read_all():
            if isinstance(r.event, IterationCompleted):
                found.setdefault(r.stream, []).append(r.event.iteration)
    return found


class _Page(HTMLParser):
    """Collects the tags of a page and the sources of its scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.script_sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "script":
            self.script_sources += [v or "" for k, v in attrs if k == "src"]


def plotted_traces(text: str) -> list[dict]:
    """The traces the page hands to Plotly.newPlot, decoded from the file itself."""
    match = re.search(r'Plotly\.newPlot\(\s*"flowactors-curves",\s*', text)
    assert match, "no figure in the page"
    traces, _ = json.JSONDecoder().raw_decode(text, match.end())
    return traces


def test_report_is_self_contained_html_with_one_series_per_job_and_metric(log, tmp_path):
    """The file exists and parses as HTML with no external script; it plots one trace per job
    per metric, and the x values are exactly the log's iterations (each once: the re-run
    replaces the superseded run), the held-out series exactly its checkpoints."""
    out = tmp_path / "report.html"
    result = CliRunner().invoke(report, ["a", "b", "--db", str(log), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"Wrote {out}: 2 job(s)" in result.output
    text = out.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert {"html", "head", "title", "body", "table", "script"} <= set(page.tags)
    assert page.script_sources == [], "the report must not load anything from elsewhere"
    traces = plotted_traces(text)
    logged = iterations_in_log(log)
    assert len(logged["a"]) == N_ITERATIONS + RERUN  # the log really holds the re-run
    for job_id in ("a", "b"):
        for metric in METRICS:
            series = [t for t in traces if t.get("meta") == {"job": job_id, "metric": metric}]
            assert len(series) == 1, (job_id, metric)
            assert series[0]["x"] == sorted(set(logged[job_id])) \
                == list(range(1, N_ITERATIONS + 1))
        held_out = [t for t in traces
                    if t.get("meta") == {"job": job_id, "metric": "validation_score"}]
        assert len(held_out) == 1 and held_out[0]["x"] == [5, 10]
    assert len(traces) == 2 * (len(METRICS) + 1)


def test_recovery_is_marked_and_the_rerun_values_are_the_ones_plotted(log):
    """The recovery of "a" is a point at its checkpoint with the re-run count, drawn as a
    dotted line in each panel; re-run iterations show the values recorded last."""
    data = load_report(log)
    assert [j.job_id for j in data.jobs] == ["b", "a"]  # log order
    a = next(j for j in data.jobs if j.job_id == "a")
    assert [(r.from_iteration, r.rerun, r.cause) for r in a.recoveries] == [(5, RERUN, "crash")]
    assert a.status == "completed" and a.attempts == 1
    with EventStore(log, mode="readonly") as store:
        last = {}
        for r in store.read_stream("a"):
            if isinstance(r.event, IterationCompleted):
                last[r.event.iteration] = r.event.avg_reward
    assert a.metrics["avg_reward"] == [last[i] for i in a.iterations]
    fig = build_figure(data)
    lines = [s for s in fig.layout.shapes if s.x0 == 5 and s.line.dash == "dot"]
    assert len(lines) == 4
    assert any("↻ a" in note.text for note in fig.layout.annotations)


def test_the_same_log_gives_the_same_file_and_every_job_by_default(log, tmp_path):
    """No JOB means every job; the output depends on the log alone (byte for byte)."""
    first, second = tmp_path / "1.html", tmp_path / "2.html"
    for out in (first, second):
        result = CliRunner().invoke(report, ["--db", str(log), "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()
    assert render_html(load_report(log, ["b", "a"])) == first.read_text(encoding="utf-8")


@pytest.mark.parametrize("args, message", [
    (["a", "--db", "{missing}"], "missing.db"),
    (["nope", "--db", "{log}"], "job 'nope' not found"),
    (["a", "--db", "{log}", "--out", "{out}.png"], "HTML"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(log, tmp_path, args, message):
    """A missing log, an unknown job or a non-HTML output: one line on stderr, exit 1, no
    log created, no report written."""
    missing, out = tmp_path / "missing.db", tmp_path / "report.html"
    args = [a.format(missing=missing, log=log, out=tmp_path / "report") for a in args]
    result = CliRunner().invoke(report, [*args, "--out", str(out)] if "--out" not in args
                                else args)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert message in result.output
    assert not missing.exists() and not out.exists()


def test_without_plotly_it_says_how_to_install_it(log, tmp_path, monkeypatch):
    """With plotly missing: one line naming the extra to install, nothing written."""
    monkeypatch.setitem(sys.modules, "plotly", None)  # makes `import plotly` fail
    out = tmp_path / "report.html"
    result = CliRunner().invoke(report, ["--db", str(log), "--out", str(out)])
    assert result.exit_code == 1
    assert "pip install plotly" in result.output
    assert not out.exists()


def test_the_report_says_what_scale_the_reward_is_on(log):
    """An average reward of 1.08 beside a success of 1.00 needs its scale said: the page
    gives the built-in task's reward scale and says which numbers are fractions."""
    text = render_html(load_report(log, ["a"]))
    assert f"toolchoice: {html.escape(ToolChoiceTask.reward_scale)}" in text
    assert "success rates and held-out scores are fractions, 0 to 1" in text
    assert "1.08" in ToolChoiceTask.reward_scale


def test_a_forks_curves_start_at_its_fork_point_and_a_chosen_iteration_has_a_table(tmp_path):
    """A fork's curves begin at its parent's checkpoint (with that checkpoint's metrics), the
    jobs table shows lineage, and --trajectories N adds iteration N's recorded trajectories."""
    from helpers import open_runtime, sim_spec
    db = tmp_path / "flow.db"
    with open_runtime(db) as rt:
        rt.submit(sim_spec(n_iterations=6, task_options={"failure_rate": 0.3}), job_id="p")
        rt.wait("p", timeout=30)
        rt.fork("p", at_iteration=4, job_id="c")
        rt.wait("c", timeout=30)
        at_four = next(c.metrics for c in rt.checkpoints("p") if c.iteration == 4)
        third = rt.trajectories("p", iteration=3) + rt.trajectories("c", iteration=3)
    data = load_report(db, ["p", "c"], trajectory_iteration=3)
    parent, child = data.jobs
    assert parent.iterations == [1, 2, 3, 4, 5, 6] and child.iterations == [4, 5, 6]
    assert child.metrics["avg_reward"][0] == at_four["avg_reward"]
    assert child.lineage == "forked from p at 4" and parent.lineage == "forks: c (at 4)"
    assert data.trajectories == third and len(third) == 4  # the child has no iteration 3
    out = tmp_path / "r.html"
    result = CliRunner().invoke(report, ["p", "c", "--db", str(db), "--out", str(out),
                                         "--trajectories", "3"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "Trajectories of iteration 3" in page and "forked from p at 4" in page
    assert page.count("<tr><td class=l>p</td><td>") == 4
