"""The command as a new user meets it: short job ids, writes that fail in one line, and a demo
that checks who owns its log before it announces anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import open_runtime, sim_spec, wait_until

from flowactors.cli import main
from flowactors.demo import demo_specs

IDS = ["3f2a9c11", "3f2b0000", "77aa"]


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ids") / "flow.db"
    with open_runtime(path) as rt:
        for job_id in IDS:
            rt.wait(rt.submit(sim_spec(n_iterations=2), job_id=job_id), timeout=60)
    return path


def run(*args: str, db: Path):
    return CliRunner().invoke(main, [*args, "--db", str(db)], catch_exceptions=False)


@pytest.mark.parametrize("argv", [["status", "3f2a"], ["history", "3f2a"],
                                  ["checkpoints", "3f2a"], ["export", "--job", "3f2a"],
                                  ["replay", "--job", "3f2a"]])
def test_a_unique_prefix_names_the_job_everywhere(log, argv):
    """Every command that takes a job id accepts a prefix that only one id starts with, and
    prints what the full id prints."""
    result = run(*argv, db=log)
    assert result.exit_code == 0, result.stderr
    full = run(*[("3f2a9c11" if arg == "3f2a" else arg) for arg in argv], db=log)
    assert full.exit_code == 0 and full.stdout and result.stdout == full.stdout


@pytest.mark.parametrize("argv", [["status", "3f2"], ["history", "3f"], ["pause", "3f2"],
                                  ["report", "3f", "--out", "x.html"]])
def test_an_ambiguous_prefix_is_one_line_naming_the_candidates(log, argv):
    """A prefix several ids start with is refused in one line that lists them."""
    result = run(*argv, db=log)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "ambiguous" in lines[0] and "3f2a9c11" in lines[0] and "3f2b0000" in lines[0]


def test_a_prefix_of_no_job_is_job_not_found(log):
    """A prefix nothing starts with is the same one-line error as an unknown id."""
    result = run("status", "zz", db=log)
    assert result.exit_code == 1 and result.stderr == f"error: job 'zz' not found in {log}\n"


@pytest.mark.timeout(60)
def test_a_prefix_works_for_control_from_another_process(tmp_path):
    """`flowactors pause PREFIX` reaches the owner's inbox under the full id."""
    path = tmp_path / "flow.db"
    with open_runtime(path) as rt:
        job_id = rt.submit(sim_spec(n_iterations=50, task_options={"rollout_seconds": 0.2}),
                           job_id="long-running-job")
        wait_until(lambda: rt.status(job_id).status.value == "running")
        result = run("pause", "long-r", db=path)
        assert result.exit_code == 0, result.stderr
        assert rt.status(job_id).status.value == "paused"


@pytest.mark.timeout(60)
def test_export_to_a_full_device_fails_in_one_line(log):
    """`export > /dev/full` is one `error:` line on stderr and exit 1, no traceback."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "flowactors.cli", "export", "--db",
                               str(log)], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: I/O failed: No space left on device"]


def test_a_report_into_a_missing_directory_fails_in_one_line(log, tmp_path):
    """`report --out missing/dir/report.html` names the file and the reason, in one line."""
    out = tmp_path / "missing" / "report.html"
    result = run("report", "77", "--out", str(out), db=log)
    assert result.exit_code == 1
    assert result.stderr == (f"error: cannot write the report to {out}: "
                             f"No such file or directory\n")


@pytest.mark.timeout(120)
def test_the_demo_on_a_log_another_process_owns_announces_nothing(tmp_path):
    """The demo checks ownership first: on an owned log with unfinished demo jobs it fails
    in one line and never says it is resuming them."""
    path = tmp_path / "flow.db"
    spec = next(iter(demo_specs(1, 500).values()))
    with open_runtime(path) as rt:
        rt.submit(spec, job_id="demo-0")
        result = CliRunner().invoke(main, ["demo", "--db", str(path), "--plain"],
                                    catch_exceptions=False)
    assert result.exit_code == 1
    assert "Resuming" not in result.stdout and "resuming" not in result.stdout
    assert result.stdout == ""
    assert "in use by another flowactors process" in result.stderr
