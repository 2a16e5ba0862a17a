"""Rollouts as Ray tasks on a real local multi-node cluster (a head and two worker nodes, one
cluster for the whole module): fixed order, a large state put once per iteration (a small one
inline), failures on a worker, timeouts and cancellation reaching the cluster, a node dying
mid-iteration, digests equal to the thread backend's, and a SIGKILLed runtime resuming
bit-identically.

The workers run in other processes: they import flowactors from the same environment and the
test tasks (`rollout_tasks`) through `runtime_env={"env_vars": {"PYTHONPATH": ...}}`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pytest

ray = pytest.importorskip("ray")

import rollout_contract as contract  # noqa: E402
from helpers import open_runtime, ray_child_reference, wait_until  # noqa: E402
from rollout_tasks import expected_order  # noqa: E402

import flowactors as fa  # noqa: E402
from flowactors.events import IterationCompleted, JobCompleted  # noqa: E402
from flowactors.rollouts.ray_worker import RolloutCall  # noqa: E402
from flowactors.store import EventStore  # noqa: E402

pytestmark = pytest.mark.timeout(180)

TESTS = Path(__file__).resolve().parent
CHILD = TESTS.parent / "tools" / "ray_child.py"
SYNC, ASYNC = "rollout_tasks:ProbeTask", "rollout_tasks:AsyncProbeTask"


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU) and two worker nodes (1 CPU each) in this machine."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's Unix socket paths must stay under 107 bytes: a short temporary directory.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray")
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def rollouts(cluster):
    """The backend every test shares (it connects this process to the cluster once)."""
    backend = _backend(cluster)
    try:
        yield backend
    finally:
        backend.close()


def _backend(cluster, **options) -> fa.RayRollouts:
    """A backend on the module's cluster whose workers import the test tasks."""
    return fa.RayRollouts(cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}},
                          **options)


def _final_digest(rt, job_id: str) -> str:
    return next(r.event.final_state_digest for r in rt.history(job_id)
                if isinstance(r.event, JobCompleted))


def _pids(marker_dir: Path) -> set[int]:
    return {int(p.name.split("-")[0]) for p in marker_dir.iterdir()}


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command's name: state, parent pid, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _gone(pid: int) -> bool:
    try:
        return _stat(pid)[0] == "Z"  # a zombie is gone too
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while we read
        return True


@pytest.mark.parametrize("task", [SYNC, ASYNC])
def test_results_come_back_in_the_fixed_order(rollouts, task):
    """Ray tasks finishing in a shuffled order reach the job in the order (query, index)."""
    contract.check_fixed_order(rollouts, task)


def test_a_rollout_that_raises_on_a_worker_is_a_failed_trajectory(rollouts):
    """The worker's exception comes back as a failed trajectory with its message."""
    contract.check_failures_are_kept(rollouts, SYNC)


def test_a_large_state_goes_to_the_object_store_once_per_iteration_a_small_one_inline(
        cluster, rollouts, tmp_path, monkeypatch):
    """A state over `max_inline_state` bytes: one `ray.put` (by the driver) per iteration, not
    one per rollout; a small state travels inside each task, with no put at all. Either way
    the job trains to the same final digest as on threads."""
    puts = []
    spec = contract.probe_spec(SYNC, seed=11, seconds=0.2)
    stored = _backend(cluster, max_inline_state=0)
    digests = {}
    try:
        for name, backend in [("stored", stored), ("inline", rollouts)]:
            link = backend._link
            monkeypatch.setattr(link, "put", lambda key, data, put=link.put:
                                puts.append(data) or put(key, data))
            puts.clear()
            with open_runtime(tmp_path / f"{name}.db", rollouts=backend) as rt:
                job_id = rt.submit(spec)
                assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
                digests[name] = _final_digest(rt, job_id)
            assert all(isinstance(p, bytes) for p in puts)  # msgspec bytes, never our objects
            assert len(puts) == (spec.config.n_iterations if name == "stored" else 0), name
    finally:
        stored.close()
    monkeypatch.undo()
    with open_runtime(tmp_path / "threads.db") as rt:
        job_id = rt.submit(spec)
        assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
        assert _final_digest(rt, job_id) == digests["stored"] == digests["inline"]


def test_an_async_task_on_ray_trains_like_on_the_event_loop(rollouts, tmp_path):
    """An `async def` rollout runs on the worker's own loop: the same digest as on the
    runtime's event loop."""
    spec = contract.probe_spec(ASYNC, seed=12, seconds=0.1)
    digests = []
    for name, backend in [("ray", rollouts), ("loop", None)]:
        with open_runtime(tmp_path / f"{name}.db", rollouts=backend) as rt:
            job_id = rt.submit(spec)
            assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
            digests.append(_final_digest(rt, job_id))
    assert digests[0] == digests[1]


def test_timeout_and_cancel_reach_the_ray_tasks_in_flight(rollouts, tmp_path):
    """A rollout past `rollout_timeout_s` is a failed trajectory and its Ray task is stopped;
    a cancelled job's hanging Ray tasks are stopped too (their worker processes end)."""
    contract.run_batch(rollouts, contract.probe_spec(SYNC), timeout=60)  # workers started
    markers = tmp_path / "timeout"
    markers.mkdir()
    spec = contract.probe_spec(SYNC, hang_query="*", marker_dir=str(markers),
                               config={"rollout_timeout_s": 3.0, "batch_size": 1,
                                       "n_trajectories_per_query": 2})
    groups = contract.run_batch(rollouts, spec, timeout=30)
    assert all(t.failed and "timed out" in t.error for t in groups[0])
    hung = _pids(markers)  # on a loaded machine a worker may start only after its timeout
    assert 1 <= len(hung) <= 2
    wait_until(lambda: all(_gone(pid) for pid in hung), timeout=20,
               message="the timed-out rollouts' workers to stop")

    markers = tmp_path / "cancel"
    markers.mkdir()
    spec = contract.probe_spec(SYNC, hang_query="*", marker_dir=str(markers),
                               config={"batch_size": 1, "n_trajectories_per_query": 3})
    with open_runtime(tmp_path / "flow.db", rollouts=rollouts) as rt:
        job_id = rt.submit(spec)
        wait_until(lambda: len(list(markers.iterdir())) == 3, timeout=30,
                   message="3 rollouts running on the cluster")
        started = time.monotonic()
        assert rt.cancel(job_id).status is fa.JobStatus.CANCELLED
        assert time.monotonic() - started < 5
    hung = _pids(markers)
    wait_until(lambda: all(_gone(pid) for pid in hung), timeout=20,
               message="the cancelled rollouts' workers to stop")


def _drivers_of(pid: int) -> list[int]:
    """The Ray driver processes the process `pid` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat(entry.name)[1])
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone while we read
            continue
        if parent == pid and b"flowactors.rollouts.ray_driver" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_runtime_killed_with_ray_rollouts_in_flight_resumes_bit_identically(cluster, tmp_path):
    """SIGKILL of a runtime process whose rollouts run on the cluster, mid-run: its Ray driver
    ends too; the restarted process resumes the job; its final digest equals a thread-backend
    run's."""
    JOB_ID, job_spec, reference = ray_child_reference(tmp_path)

    db = tmp_path / "ray.db"

    def child():
        return subprocess.Popen([sys.executable, str(CHILD), str(db), cluster.address],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)

    def iterations() -> int:
        try:
            with EventStore(db, mode="readonly") as store:
                return sum(isinstance(r.event, IterationCompleted) for r in store.read_all())
        except fa.FlowError:  # not created yet, or its creation not committed yet
            return 0

    first = child()
    try:
        wait_until(lambda: iterations() >= 4 or first.poll() is not None, timeout=60,
                   message="4 iterations on the cluster")
        assert first.poll() is None, first.stderr.read().decode()
        drivers = _drivers_of(first.pid)
        assert len(drivers) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    wait_until(lambda: _gone(drivers[0]), timeout=30,
               message="the killed runtime's Ray driver to end")
    second = child()
    try:
        assert second.wait(timeout=120) == 0, second.stderr.read().decode()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(timeout=10)
    with EventStore(db, mode="readonly") as store:
        events = [r.event for r in store.read_all()]
    assert any(type(e).__name__ == "JobRecovered" for e in events)
    assert [e.final_state_digest for e in events if isinstance(e, JobCompleted)] == [reference]


def test_a_node_that_dies_mid_iteration_gives_failed_trajectories_not_a_stuck_job(
        cluster, rollouts, tmp_path):
    """Rollouts spread over the nodes; one worker node is killed while they run: its
    rollouts are failed trajectories, the iteration completes, the job trains on."""
    markers = tmp_path / "markers"
    markers.mkdir()
    # A second backend, spreading its rollouts over the nodes.
    spread = _backend(cluster, remote_options={"scheduling_strategy": "SPREAD"})
    spec = contract.probe_spec(SYNC, seconds=3.0, marker_dir=str(markers), config={
        "batch_size": 1, "n_trajectories_per_query": 3, "n_iterations": 2})
    try:
        with open_runtime(tmp_path / "flow.db", rollouts=spread) as rt:
            job_id = rt.submit(spec)
            wait_until(lambda: len(list(markers.iterdir())) == 3, timeout=30,
                       message="3 rollouts running, one per node")
            cluster.remove_node(cluster.workers[1], allow_graceful=False)
            assert rt.wait(job_id, timeout=90).status is fa.JobStatus.COMPLETED
            first = next(r.event for r in rt.history(job_id)
                         if isinstance(r.event, IterationCompleted))
            trainer = rt.load_checkpoint(job_id, 1)
    finally:
        spread.close()
    assert 1 <= first.n_failed < 3
    assert trainer.orders[0].count(-1) == first.n_failed  # failed ones kept in their place
    assert all(e.startswith(("WorkerCrashedError", "NodeDiedError", "ObjectLostError"))
               for e in trainer.errors), trainer.errors


def _task_sizes(backend, monkeypatch) -> list[int]:
    """How many rollouts each Ray task the backend submits runs, in submission order."""
    decoder = msgspec.msgpack.Decoder(RolloutCall)
    sizes: list[int] = []
    submit = backend._link.submit

    def counting(submits) -> None:
        sizes.extend(len(decoder.decode(s.call).rollouts) for s in submits)
        submit(submits)

    monkeypatch.setattr(backend._link, "submit", counting)
    return sizes


def _run(tmp_path, name: str, spec, backend, iteration: int):
    """Run a job to completion; its final digest and its trainer state at `iteration`."""
    with open_runtime(tmp_path / f"{name}.db", rollouts=backend) as rt:
        job_id = rt.submit(spec)
        assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
        return _final_digest(rt, job_id), rt.load_checkpoint(job_id, iteration)


def test_short_rollouts_share_ray_tasks_and_come_back_in_the_fixed_order(
        cluster, rollouts, tmp_path, monkeypatch):
    """Once a job's rollouts are measured short, several of an iteration run in one Ray task:
    fewer tasks than rollouts, every iteration's trajectories in the fixed order, the same
    final digest as on threads. With a rollout timeout, each rollout keeps a task of its own."""
    backend = _backend(cluster, max_rollouts_per_task=4)
    sizes = _task_sizes(backend, monkeypatch)
    spec = contract.probe_spec(SYNC, seed=13, config={"n_iterations": 4})
    try:
        on_ray, trainer = _run(tmp_path, "ray", spec, backend, 4)
        assert sizes[:12] == [1] * 12  # the first iteration, not measured yet
        assert sum(sizes) == 48 and max(sizes) > 1 and max(sizes) <= 4
        assert trainer.orders == [expected_order(13, it, 3, 4) for it in range(1, 5)]
        assert _run(tmp_path, "threads", spec, None, 4)[0] == on_ray

        sizes.clear()
        timed = contract.probe_spec(SYNC, seed=13, config={"n_iterations": 4,
                                                          "rollout_timeout_s": 30.0})
        _run(tmp_path, "timed", timed, backend, 4)
        assert sizes == [1] * 48
    finally:
        backend.close()


def test_a_rollout_that_raises_in_a_shared_task_fails_alone(cluster, rollouts, tmp_path,
                                                            monkeypatch):
    """A failing rollout among others in one Ray task is a failed trajectory in its place;
    the task's other rollouts are not touched."""
    backend = _backend(cluster, max_rollouts_per_task=4)
    sizes = _task_sizes(backend, monkeypatch)
    spec = contract.probe_spec(SYNC, seed=14, fail_query="q1",
                               config={"n_iterations": 3, "batch_size": 6})  # every query
    try:
        _, trainer = _run(tmp_path, "ray", spec, backend, 3)
    finally:
        backend.close()
    assert sizes[:24] == [1] * 24 and max(sizes[24:]) > 1
    for iteration, order in enumerate(trainer.orders, start=1):
        failed = [k for k, draw in enumerate(order) if draw == -1]
        assert len(failed) == 4 and failed == list(range(failed[0], failed[0] + 4))
        assert failed[0] % 4 == 0  # one query's group, in its place
        expected = expected_order(14, iteration, 6, 4)
        assert [d for d in order if d != -1] == [
            d for k, d in enumerate(expected) if k not in failed]
    assert len(trainer.errors) == 12
    assert all("failed on purpose" in error for error in trainer.errors)


def test_cancel_reaches_a_shared_ray_task(cluster, rollouts, tmp_path, monkeypatch):
    """A cancelled job's shared Ray task is cancelled in the cluster: its worker process
    ends, and cancel returns at once."""
    backend = _backend(cluster, max_rollouts_per_task=4)
    sizes = _task_sizes(backend, monkeypatch)
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = contract.probe_spec(SYNC, hang_query="*", hang_after=1, marker_dir=str(markers),
                               config={"batch_size": 1, "n_trajectories_per_query": 3})
    try:
        with open_runtime(tmp_path / "flow.db", rollouts=backend) as rt:
            job_id = rt.submit(spec)
            wait_until(lambda: len(list(markers.iterdir())) >= 4, timeout=30,
                       message="the first iteration, then a hanging rollout")
            started = time.monotonic()
            assert rt.cancel(job_id).status is fa.JobStatus.CANCELLED
            assert time.monotonic() - started < 5
    finally:
        backend.close()
    assert max(sizes[3:]) > 1  # the hanging iteration's rollouts shared a task
    by_time = sorted(markers.iterdir(), key=lambda p: int(p.name.split("-")[2]))
    hung = {int(p.name.split("-")[0]) for p in by_time[3:]}
    wait_until(lambda: all(_gone(pid) for pid in hung), timeout=20,
               message="the cancelled shared task's worker to stop")


def test_a_refused_submission_is_a_failed_trajectory_for_each_rollout(cluster, rollouts,
                                                                      monkeypatch):
    """A submission that cannot be made gives each rollout a failed trajectory that says so,
    however many rollouts there are: each refusal resolving its rollout and launching the next
    does not nest on the stack."""
    backend = fa.RayRollouts(cluster.address)

    def refusing(submits):
        raise ValueError("bad option")

    monkeypatch.setattr(backend._link, "submit", refusing)
    spec = contract.probe_spec(SYNC, config={"batch_size": 6, "n_trajectories_per_query": 100})
    try:
        groups = contract.run_batch(backend, spec)
    finally:
        backend.close()
    errors = {t.error for group in groups for t in group}
    assert errors == {"rollout could not be submitted to Ray: ValueError: bad option"}


def test_options_ray_refuses_fail_the_backend_when_it_is_made(cluster):
    """An option Ray refuses, or one that is not plain data, is a ValueError at once, not a
    failed trajectory per rollout."""
    with pytest.raises(ValueError, match="num_cpus"):
        fa.RayRollouts(cluster.address, num_cpus=-1)
    with pytest.raises(ValueError, match="plain data"):
        fa.RayRollouts(cluster.address, remote_options={"scheduling_strategy": object()})


def test_a_killed_driver_is_replaced_and_the_job_trains_on(cluster, tmp_path):
    """SIGKILL of the backend's Ray driver (as Ray does when its object store goes away) while
    rollouts run with their state in the object store: the runtime is untouched, a new driver
    takes the rollouts in flight, and the job ends with the digest of a run on threads. A
    driver killed while nothing runs is replaced too."""
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = contract.probe_spec(SYNC, seed=15, seconds=0.3, marker_dir=str(markers),
                               config={"n_iterations": 4})
    backend = _backend(cluster, max_inline_state=0)
    try:
        first = backend._link.pid
        with open_runtime(tmp_path / "ray.db", rollouts=backend) as rt:
            job_id = rt.submit(spec)
            per_iteration = spec.config.batch_size * spec.config.n_trajectories_per_query
            wait_until(lambda: len(list(markers.iterdir())) > per_iteration, timeout=60,
                       message="the second iteration's rollouts running")
            os.kill(first, signal.SIGKILL)
            assert rt.wait(job_id, timeout=120).status is fa.JobStatus.COMPLETED
            on_ray = _final_digest(rt, job_id)
            trainer = rt.load_checkpoint(job_id, 4)
            assert not any(type(r.event).__name__ == "JobRecovered" for r in rt.history(job_id))
        second = backend._link.pid
        assert second != first
        os.kill(second, signal.SIGKILL)  # now with nothing in flight: replaced all the same
        wait_until(lambda: backend.unavailable is None and backend._link is not None
                   and backend._link.pid != second, timeout=60,
                   message="a new driver for an idle backend")
        groups = contract.run_batch(backend, spec, timeout=60)
        assert not any(t.failed for group in groups for t in group)
    finally:
        backend.close()
    assert not any(trainer.errors), trainer.errors  # no rollout was lost with the driver
    assert _run(tmp_path, "threads", spec, None, 4)[0] == on_ray


def test_an_address_where_nothing_answers_is_a_connection_error_at_once():
    """No Ray cluster at the address: ConnectionError naming it, without waiting for Ray's
    own connection timeouts."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        fa.RayRollouts(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5
