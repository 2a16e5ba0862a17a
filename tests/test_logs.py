"""flowactors logs through the standard `logging` machinery: quiet in a script that configures
nothing, visible (with job_id bound) once the application configures logging."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import logging, sys
    import flowactors as fa
    if sys.argv[1] == "configured":
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    spec = fa.JobSpec(agent_id="a", task="simulated", training_data=[fa.TrainingQuery(query="q")],
                      config=fa.GRPOConfig(n_iterations=2, eval_fraction=0))
    with fa.Runtime("script.db", synchronous="off") as rt:
        view = rt.wait(rt.submit(spec, job_id="job-1"), timeout=60)
    print("last line:", view.status.value)
""")


def _run(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.timeout(150)
def test_a_script_that_configures_nothing_sees_only_its_own_output(tmp_path):
    """Nothing of the runtime's info lines reaches stdout (or stderr): a pipeline that parses
    the script's last line gets that line."""
    done = _run(tmp_path, "unconfigured")
    assert done.stdout == "last line: completed\n"
    assert done.stderr == ""


@pytest.mark.timeout(150)
def test_an_application_that_configures_logging_gets_the_lines_with_job_id(tmp_path):
    """With logging configured, the runtime's lines arrive through the `flowactors` loggers,
    and a job's lines carry its job_id."""
    done = _run(tmp_path, "configured")
    assert done.stdout == "last line: completed\n"
    lines = done.stderr.splitlines()
    assert any(line.startswith("flowactors.runtime ") and "runtime_opened" in line
               for line in lines), done.stderr
    started = [line for line in lines if "job_started" in line]
    assert started and all("job-1" in line for line in started), done.stderr
