"""A runtime outlives its Ray cluster: the cluster's head is killed (SIGKILL of all its
processes) while a job's rollouts run on it; the runtime process waits, says why, reconnects
when a head is back at the same address, and the job finishes with the digest of an
uninterrupted run, with no recovery (the runtime never stopped). With states inline and with
every state in the object store: there, Ray may end its driver process when the head dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")

from helpers import ray_child_reference, wait_until  # noqa: E402

import flowactors as fa  # noqa: E402
from flowactors.events import IterationCompleted, JobCompleted, JobRecovered  # noqa: E402
from flowactors.store import EventStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tools" / "ray_child.py"
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(port: int, env: dict[str, str]) -> subprocess.Popen:
    """A head node as a process group of its own (so it can be killed whole)."""
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    return head


def _kill(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.timeout(240)
@pytest.mark.parametrize("max_inline_state", ["16384", "0"], ids=["inline", "stored"])
def test_the_runtime_waits_for_its_cluster_and_resumes_when_it_is_back(tmp_path,
                                                                       max_inline_state):
    """Killed head mid-run: the job waits (`ray_cluster_unavailable`), the runtime survives,
    reconnects (`ray_cluster_reconnected`) and completes the job bit-identically."""
    JOB_ID, job_spec, reference = ray_child_reference(tmp_path)

    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray")}  # short: Unix socket paths
    port = _free_port()
    db = tmp_path / "flow.db"
    head = _start_head(port, env)
    child = None
    try:
        wait_until(lambda: _reachable(port), timeout=60, message="the head to listen")
        output = tmp_path / "child.out"
        with open(output, "wb") as out:
            child = subprocess.Popen([sys.executable, str(CHILD), str(db), f"127.0.0.1:{port}",
                                      max_inline_state],
                                     env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT)

        def iterations() -> int:
            try:
                with EventStore(db, mode="readonly") as store:
                    return sum(isinstance(r.event, IterationCompleted)
                               for r in store.read_all())
            except fa.FlowError:
                return 0

        wait_until(lambda: iterations() >= 3 or child.poll() is not None, timeout=60,
                   message="3 iterations on the cluster")
        _kill(head)
        wait_until(lambda: b"ray_cluster_unavailable" in output.read_bytes()
                   or child.poll() is not None, timeout=60,
                   message="the runtime to notice the cluster is gone")
        assert child.poll() is None, output.read_text()
        stalled_at = iterations()
        head = _start_head(port, env)
        assert child.wait(timeout=120) == 0, output.read_text()
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        _kill(head)
    text = output.read_text()
    assert "ray_cluster_reconnected" in text, text
    with EventStore(db, mode="readonly") as store:
        events = [r.event for r in store.read_all()]
    assert not any(isinstance(e, JobRecovered) for e in events)  # it never stopped
    assert stalled_at < job_spec().config.n_iterations
    assert [e.final_state_digest for e in events if isinstance(e, JobCompleted)] == [reference]
