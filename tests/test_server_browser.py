"""The dashboard in a real headless browser: Debian's Chromium driven by Playwright.

Skipped only when Chromium is not installed (`.ci/run` installs it with apt-get).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import open_runtime, sim_spec, wait_until
from playwright.sync_api import sync_playwright
from serving import TOKEN, served

from flowactors import JobStatus

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed at {CHROMIUM} "
                       "(apt-get install chromium; .ci/run does it)"),
]


@pytest.fixture
def browser():
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


def points(page, job_id: str, chart: str = "reward-chart") -> int:
    """How many points the job's curve in `chart` has (0 before it is drawn)."""
    value = page.get_attribute(f"#{chart} polyline[data-job='{job_id}']", "data-points",
                               timeout=10_000)
    return int(value or 0)


def wait_points(page, job_id: str, condition, message: str, timeout: float = 30.0) -> int:
    """Poll the curve until `condition(points)` holds (the page's CSP allows no eval, so
    Playwright's wait_for_function cannot run there)."""
    return wait_until(lambda: condition(n := points(page, job_id)) and n, timeout=timeout,
                      message=message)


def iterations_in_log(rt, job_id: str) -> int:
    return sum(1 for r in rt.history(job_id) if r.type == "job.iteration_completed")


def test_the_dashboard_shows_live_curves_and_pauses_a_job(tmp_path, quiet_logs, browser):
    """The token is taken from the URL once; the jobs table and the reward curve grow as
    iterations land; on the job's page, clicking Pause pauses the running job (the log says
    so) and the curve then holds exactly the log's iterations; Resume and Cancel work too.
    A screenshot is saved as a test artifact."""
    rt = open_runtime(tmp_path / "flow.db")
    try:
        rt.submit(sim_spec("steady", n_iterations=20, checkpoint_interval=5), job_id="done")
        rt.wait("done", timeout=30)
        rt.submit(sim_spec("slow-agent", n_iterations=2000, checkpoint_interval=5,
                           task_options={"rollout_seconds": 0.02}), job_id="slow")
        with served(rt) as (server, _):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/?token={TOKEN}")
            page.wait_for_selector("#jobs tbody tr[data-job='slow'][data-status='running']",
                                   timeout=20_000)
            assert "token" not in page.url  # taken once, out of the address bar
            assert page.inner_text("#live") == "live"
            wait_points(page, "done", lambda n: n == 20, "the finished job's 20 points")
            assert points(page, "done", "heldout-chart") == 4
            first = points(page, "slow")
            wait_points(page, "slow", lambda n: n >= first + 5, "the curve to grow")

            page.click("#jobs tbody tr[data-job='slow']")
            page.wait_for_selector("#job-title:has-text('Job slow')", timeout=10_000)
            page.wait_for_selector("#pause:not([disabled])", timeout=10_000)
            assert page.is_disabled("#resume")
            page.click("#pause")
            page.wait_for_selector("#job-status:has-text('paused')", timeout=30_000)
            assert rt.status("slow").status is JobStatus.PAUSED
            landed = iterations_in_log(rt, "slow")
            wait_points(page, "slow", lambda n: n == landed, "the curve to match the log")
            page.wait_for_selector("#timeline tbody tr:has-text('paused')", timeout=10_000)
            assert page.locator("#checkpoints tbody tr").count() >= 1
            page.screenshot(path=str(tmp_path / "dashboard-job.png"), full_page=True)

            page.click("#resume")
            wait_until(lambda: rt.status("slow").status is JobStatus.RUNNING, timeout=30,
                       message="the job to run again")
            page.wait_for_selector("#cancel:not([disabled])", timeout=10_000)
            page.click("#cancel")
            page.wait_for_selector("#job-status:has-text('cancelled')", timeout=30_000)
            assert rt.status("slow").status is JobStatus.CANCELLED
            page.click("text=all jobs")
            page.wait_for_selector("#jobs tbody tr[data-job='slow'][data-status='cancelled']",
                                   timeout=10_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert errors == []
    finally:
        rt.close()


def test_the_job_page_shows_trajectories_and_lineage(tmp_path, quiet_logs, browser):
    """On a fork's page: its lineage among the facts, and the trajectories view lists the
    chosen iteration's recorded trajectories (all, then failed only) as the API returns them."""
    rt = open_runtime(tmp_path / "flow.db")
    try:
        rt.submit(sim_spec("flaky", n_iterations=6, task_options={"failure_rate": 0.4}),
                  job_id="parent")
        rt.wait("parent", timeout=30)
        rt.fork("parent", at_iteration=2, job_id="kid")
        rt.wait("kid", timeout=30)
        every = rt.trajectories("kid", iteration=5)
        failed = rt.trajectories("kid", iteration=5, success=False)
        assert 0 < len(failed) < len(every)
        with served(rt) as (server, _):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/?token={TOKEN}")
            page.click("#jobs tbody tr[data-job='kid']")
            page.wait_for_selector("#job-facts:has-text('forked from parent at 2')",
                                   timeout=10_000)
            page.fill("#traj-iteration", "5")
            page.dispatch_event("#traj-iteration", "change")
            rows = "#trajectories tbody tr"
            wait_until(lambda: page.locator(rows).count() == len(every)
                       and page.locator(rows).first.inner_text().startswith("5"),
                       timeout=10, message="iteration 5's trajectories")
            page.check("#traj-failed")
            wait_until(lambda: page.locator(rows).count() == len(failed), timeout=10,
                       message="the failed ones only")
            assert all("no" in page.locator(rows).nth(i).inner_text()
                       for i in range(len(failed)))
            assert errors == []
    finally:
        rt.close()
