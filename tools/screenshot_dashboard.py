"""Take the README's screenshot of the dashboard (docs/dashboard.png).

    python tools/screenshot_dashboard.py [--out docs/dashboard.png]

Trains the demo's four `toolchoice` jobs on a temporary log, serves it, pauses one job
halfway, and photographs the dashboard in Debian's Chromium (/usr/bin/chromium) while the
others finish.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from flowactors import Runtime
from flowactors.console import stderr_logs
from flowactors.demo import demo_specs
from flowactors.server import BackgroundServer, create_app

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, stderr_logs(), \
            Runtime(Path(tmp) / "flow.db", handle_signals=False) as rt:
        ids = [rt.submit(spec, job_id=job_id) for job_id, spec in demo_specs().items()]
        with BackgroundServer(create_app(rt, token="screenshot")) as server, \
                sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            page.goto(f"{server.url}/?token=screenshot")
            while rt.status(ids[3]).progress.current_iteration < 30:
                time.sleep(0.05)
            rt.pause(ids[3])
            for job_id in ids[:3]:
                rt.wait(job_id, timeout=120)
            time.sleep(1.5)  # the page's next redraw
            page.screenshot(path=str(args.out))
            browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
