"""`flowactors serve` as a user runs it: a real process, its printed URL, its token file, and
a clean stop on SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from helpers import open_runtime, sim_spec
from serving import spec_json

from flowactors import JobStatus
from flowactors.server import TokenFileError, load_or_create_token, token_path
from flowactors.server.security import is_loopback

pytestmark = pytest.mark.timeout(90)


class Serving:
    """`flowactors serve` in a child process; its stdout lines arrive on a queue."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowactors.cli", "serve", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def url(self, timeout: float = 30.0) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, self.proc.stderr.read() if self.proc.stderr else ""
            found = re.search(r"http://\S+", line)
            if found:
                return found.group(0)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)


def test_serve_prints_its_url_keeps_its_token_and_stops_cleanly(tmp_path, quiet_logs):
    """The URL carries the token kept in DB.token (mode 0600, the same on the next start);
    the API answers with it; SIGTERM stops the server and closes the log cleanly (exit 143),
    leaving the running job running, to resume on the next open."""
    db = tmp_path / "flow.db"
    server = Serving("--db", str(db), "--port", "0")
    try:
        url = server.url()
        token = re.search(r"\?token=(\S+)$", url).group(1)
        path = token_path(db)
        assert path == tmp_path / "flow.db.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == token
        base = url.split("/?")[0]
        assert re.match(r"http://127\.0\.0\.1:\d+$", base)
        with httpx.Client(base_url=base, timeout=15,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            answer = client.post("/rpc", json={
                "jsonrpc": "2.0", "id": 1, "method": "training.start_grpo",
                "params": {"job_id": "long", "spec": spec_json(sim_spec(
                    n_iterations=10_000, task_options={"rollout_seconds": 0.01}))}}).json()
            assert answer["result"]["job_id"] == "long"
            assert client.get("/", headers={"Authorization": ""}).status_code == 200
    finally:
        code = server.stop()
    assert code == 128 + signal.SIGTERM, server.proc.stderr.read()
    runtime = open_runtime(db)  # not locked: the server let go of the log
    try:
        events = [r.type for r in runtime.history("long")]
        assert "job.started" in events and events[-1] in ("job.started", "job.recovered",
                                                           "job.iteration_completed",
                                                           "job.checkpoint_saved",
                                                           "job.checkpoints_pruned")
        assert runtime.status("long").status is JobStatus.RUNNING  # recovered, resumes
    finally:
        runtime.close()
    again = Serving("--db", str(db), "--port", "0")
    try:
        assert again.url().endswith(f"?token={token}")
    finally:
        again.stop()


def test_serve_refuses_a_remote_address_without_opt_in(tmp_path):
    """Listening on a non-loopback address needs --allow-remote: without it, one line of
    error, exit 1, and neither a log nor a token file is created."""
    db = tmp_path / "flow.db"
    done = subprocess.run([sys.executable, "-m", "flowactors.cli", "serve", "--db", str(db),
                           "--host", "0.0.0.0", "--port", "0"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert done.stderr.startswith("error: 0.0.0.0 is not a loopback address")
    assert len(done.stderr.splitlines()) == 1 and "--allow-remote" in done.stderr
    assert not db.exists() and not token_path(db).exists()


def test_serve_on_a_log_another_runtime_owns_is_one_line_of_error(tmp_path, quiet_logs):
    """A second owner is refused (StoreLocked) with one line, exit 1."""
    db = tmp_path / "flow.db"
    runtime = open_runtime(db)
    try:
        done = subprocess.run([sys.executable, "-m", "flowactors.cli", "serve", "--db",
                               str(db), "--port", "0"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    finally:
        runtime.close()
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1


def test_the_token_file(tmp_path):
    """Created once with mode 0600 and read back after; refused when others may read it or
    when it is empty."""
    db = tmp_path / "x.db"
    token = load_or_create_token(db)
    assert len(token) >= 40 and load_or_create_token(db) == token
    assert stat.S_IMODE(token_path(db).stat().st_mode) == 0o600
    os.chmod(token_path(db), 0o644)
    with pytest.raises(TokenFileError, match="open to other users"):
        load_or_create_token(db)
    os.chmod(token_path(db), 0o600)
    token_path(db).write_text("\n")
    with pytest.raises(TokenFileError, match="empty"):
        load_or_create_token(db)
    assert load_or_create_token(tmp_path / "y.db") != token


def test_loopback_addresses():
    """Only addresses (and names) that resolve to loopback count as loopback."""
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.1", "8.8.8.8", "no-such-host.invalid"):
        assert not is_loopback(host), host


def test_the_package_ships_the_dashboard():
    """The static files the dashboard needs are inside the package (no CDN)."""
    static = Path(__import__("flowactors.server").server.__file__).parent / "static"
    for name in ("index.html", "app.js", "style.css"):
        assert (static / name).stat().st_size > 0
    html = (static / "index.html").read_text()
    assert "http" not in re.sub(r'(lang|xmlns)="[^"]*"', "", html)


def test_the_listening_socket_disables_nagle():
    """The server's socket is TCP with TCP_NODELAY, inherited by each connection: otherwise
    asyncio leaves Nagle on, and a response written in two parts (headers, body) or an event
    frame waits for the client's delayed ACK (about 40 ms each; the benchmark saw 700
    instead of 4,300 requests/s)."""
    from flowactors.server.serve import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_the_readme_python_client_runs_against_a_server(tmp_path, quiet_logs):
    """The README's Python client example (its ```py block), run as written against a served
    runtime whose token file sits in the working directory: it starts a job, follows its
    events to completion, and prints its status."""
    from serving import TOKEN, served

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [block for block in re.findall(r"^```py\n(.*?)^```", readme, flags=re.S | re.M)
              if "httpx" in block]
    assert len(blocks) == 1
    runtime = open_runtime(tmp_path / "flow.db")
    try:
        with served(runtime) as (server, _):
            (tmp_path / "flow.db.token").write_text(TOKEN + "\n")
            code = blocks[0].replace('"http://127.0.0.1:8600"', repr(server.url))
            assert code != blocks[0]
            (tmp_path / "client.py").write_text(code)
            done = subprocess.run([sys.executable, "client.py"], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "completed"
        assert runtime.status("job-2").status is JobStatus.COMPLETED
    finally:
        runtime.close()
