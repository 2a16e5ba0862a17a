"""Rollouts as Ray tasks: on a running cluster (`address="auto"`, `"ray://host:10001"`) or a
local one started for this process.

What runs where: the runtime, its log and every job's `init`/`update`/`evaluate` stay in this
process; each rollout is one Ray task anywhere in the cluster, given one msgspec-encoded
argument. The runtime's process never imports Ray: a child process of it is the Ray driver
(`ray_link`, `ray_driver`), so that Ray ending its driver (it does when its node's object
store goes away) cannot end the runtime. Short rollouts share: once a job's rollouts are
measured to take less than `SHARED_TASK_S` together, up to `max_rollouts_per_task` of one
iteration run in one task, one after another, so Ray's cost per task (about a millisecond of
CPU) is paid once for them.
Per iteration a large trainer state goes to the object store once (`ray.put` of its msgspec
encoding) and every rollout of that iteration reads it there; a small one (up to
`max_inline_state` bytes) travels inside each task's argument instead, which costs less than
an object store round trip. Trajectories come back msgspec-encoded. Nothing of ours is
pickled: Ray pickles its own function reference, we hand it bytes.

Failures: a rollout that raises, whose worker process or node dies (with the other rollouts
of its task), or which outlives `rollout_timeout_s` is a failed trajectory. A job with a
rollout timeout gets a task per rollout, so that a timeout stops its own rollout only. With
`max_retries=N`, Ray first re-runs a task whose worker died up to N times; the rerun draws
the same generators, so a retried rollout is the same rollout. A cancelled job's tasks are
cancelled in the cluster (`ray.cancel`). If the cluster goes away or the driver ends,
rollouts in flight wait (each still bounded by `rollout_timeout_s`) while the backend starts
a new driver; `unavailable` says why; they are submitted again once the cluster is back.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import socket
import sys
import threading
import time
import weakref
from typing import Any

from ..logs import get_logger
from ..spec import JobSpec, TrainingQuery
from ..tasks import Task, Trajectory, failed_trajectory, snapshot
from .base import Deadlines, OnComplete, RolloutBatch, RolloutHandle
from .ray_batch import Batch, ClusterUnreachable, RayTask, Rollout
from .ray_link import Done, DriverGone, DriverLink, Setup, describe

log = get_logger(__name__)

TASKS_PER_SEND = 64
"""Ray tasks sent to the driver in one message, at most."""
SHARED_TASK_S = 0.002
"""Rollouts of one iteration share a Ray task while together they take about this long."""
MAX_RECONNECT_WAIT_S = 30.0
"""The longest wait between two attempts to start a driver while the cluster is gone."""


class RayRollouts:
    """Each rollout a Ray task. `Runtime(path, rollouts=RayRollouts("auto"))`.

    Args:
        address: a running cluster (`"auto"`, `"host:6379"`, `"ray://host:10001"`); None
            starts a local one for this backend (or, if this process called `ray.init`,
            connects to that cluster).
        runtime_env: Ray's `runtime_env` for the rollouts, e.g. `{"pip": [...]}`,
            `{"working_dir": "."}` or `{"env_vars": {"PYTHONPATH": ...}}`: the workers must be
            able to import flowactors and the task's module (by the spec's task name).
        num_cpus: CPUs each rollout task reserves (Ray schedules by it).
        remote_options: more options for every rollout task (`resources`, `scheduling_strategy`
            by name). These options and `init_options` are sent to the driver process, so
            they must be plain data (str, numbers, lists, dicts).
        max_in_flight: rollouts submitted at once across all jobs; the rest wait here.
        max_retries: times Ray re-runs a rollout whose worker or node died (0: it fails).
        force_cancel: stop a cancelled or timed-out rollout by killing its worker process
            (True), or by raising KeyboardInterrupt in it (False).
        init_options: more keyword arguments for `ray.init` (e.g. `num_cpus` of a local one).
        health_check_s: how often to check that the cluster is reachable while rollouts run.
        max_inline_state: a trainer state of at most this many bytes (encoded) travels
            inside each rollout's task; a larger one is put in the object store once per
            iteration.
        max_rollouts_per_task: how many short rollouts of one iteration one Ray task may run
            (1: a task per rollout, always).
        connect_timeout_s: how long the driver process may take to connect.

    Raises ImportError without Ray, ValueError for options Ray refuses (or that are not plain
    data), ConnectionError if the cluster cannot be reached.
    """

    def __init__(self, address: str | None = None, *, runtime_env: dict[str, Any] | None = None,
                 num_cpus: float = 1, remote_options: dict[str, Any] | None = None,
                 max_in_flight: int = 1024, max_retries: int = 0, force_cancel: bool = True,
                 init_options: dict[str, Any] | None = None,
                 health_check_s: float = 1.0, max_inline_state: int = 16 * 1024,
                 max_rollouts_per_task: int = 8, connect_timeout_s: float = 120.0) -> None:
        if importlib.util.find_spec("ray") is None:
            raise ImportError("RayRollouts needs Ray: pip install 'flowactors[ray]'")
        if max_in_flight < 1 or max_retries < 0 or max_rollouts_per_task < 1:
            raise ValueError("max_in_flight and max_rollouts_per_task must be >= 1, "
                             "max_retries >= 0")
        self.address = address if address is not None else _this_process_cluster()
        _check_answers(self.address)
        self._setup = Setup(address=self.address, runtime_env=runtime_env,
                            init_options=dict(init_options or {}),
                            remote_options={"num_cpus": num_cpus, "max_retries": max_retries,
                                            "retry_exceptions": False, **(remote_options or {})})
        self._force = force_cancel
        self._max_in_flight = max_in_flight
        self._health_check_s = health_check_s
        self._connect_timeout_s = connect_timeout_s
        self.max_inline_state = max_inline_state
        self._max_per_task = max_rollouts_per_task
        self.deadlines = Deadlines()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._waiting: collections.deque[Rollout] = collections.deque()
        self._running: dict[int, RayTask] = {}  # by task number
        self._task_numbers = itertools.count()
        self._state_keys = itertools.count()
        self._seconds: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._pumping = threading.local()
        self._unavailable: str | None = None
        self._closed = False
        self._gcs: tuple[str, int] | None = None  # the cluster's address, watched
        self._link: DriverLink | None = None  # the driver; what an older one says is ignored
        self._retry_s, self._retry_at = health_check_s, 0.0
        self._connect()
        self._wake = threading.Event()  # set on close
        self._wake_check = threading.Event()  # check the cluster now
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="ray-watchdog")
        self._watchdog.start()

    @property
    def unavailable(self) -> str | None:
        """Why the cluster cannot take rollouts now (None while it can)."""
        return self._unavailable

    # --- the backend protocol ---

    def start(self, *, task: Task, state: Any, spec: JobSpec, iteration: int,
              queries: list[TrainingQuery], on_complete: OnComplete) -> RolloutHandle:
        batch = Batch(self, spec, snapshot(task, state), iteration, queries)
        handle = RolloutBatch(launcher=batch, deadlines=self.deadlines, spec=spec,
                              n_queries=len(queries), on_complete=on_complete).start()
        self._pump()  # the rollouts it launched, in shared tasks if they are short
        return handle

    def runs_inline(self, task: Task, spec: JobSpec) -> bool:
        return False

    def close(self) -> None:
        """Cancel what is in flight; the driver shuts Ray down (and a local cluster) and ends."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = list(self._running.values())
            self._running.clear()
            self._waiting.clear()
            link, self._link = self._link, None
        self._wake.set()
        self._wake_check.set()
        if link is not None:
            for ray_task in running:
                self._cancel_in_cluster(link, ray_task)
            link.close()
        self.deadlines.close()
        self._watchdog.join(timeout=5)

    def __enter__(self) -> RayRollouts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submitting, bounded ---

    def _enqueue(self, rollout: Rollout) -> None:
        with self._lock:
            if self._closed:
                return
            self._waiting.append(rollout)
        if rollout.batch.per_task == 1:
            self._pump()
        # else it waits for the rest of its batch's launches: `start` and a finished task pump

    def _pump(self) -> None:
        """Submit waiting rollouts while there is room in flight. Called again from within
        (a refused submission resolves its rollouts, which launch the next), it returns at
        once: the loop it is in takes those too, and the stack stays flat."""
        if getattr(self._pumping, "active", False):
            return
        self._pumping.active = True
        try:
            while True:
                with self._lock:
                    tasks = list(itertools.islice(iter(self._next_task, None), TASKS_PER_SEND))
                    link = self._link
                if not tasks:
                    return
                self._submit(tasks, link)
        finally:
            self._pumping.active = False

    def _next_task(self) -> RayTask | None:
        """The next Ray task to submit: the first waiting rollout and those of its batch
        waiting after it, up to the batch's `per_task` (called with the lock held)."""
        while (self._waiting and self._unavailable is None and not self._closed
               and self._in_flight < self._max_in_flight):
            first = self._waiting.popleft()
            if first.stopped:
                continue
            rollouts = [first]
            room = min(first.batch.per_task, self._max_in_flight - self._in_flight)
            while len(rollouts) < room and self._waiting and self._waiting[0].batch is first.batch:
                rollout = self._waiting.popleft()
                if not rollout.stopped:
                    rollouts.append(rollout)
            ray_task = RayTask(next(self._task_numbers), first.batch, rollouts)
            self._in_flight += len(rollouts)
            self._running[ray_task.number] = ray_task
            return ray_task
        return None

    def _submit(self, tasks: list[RayTask], link: DriverLink) -> None:
        """Send tasks to the driver in one message."""
        try:
            link.submit([ray_task.submission(link) for ray_task in tasks])
        except (ClusterUnreachable, DriverGone) as exc:  # they wait for the next driver
            self._lost(link, str(exc))
        except Exception as exc:  # the message cannot be made or sent: each of its tasks fails
            for ray_task in tasks:
                self._finished(ray_task, [_refused(describe(exc))])

    def _done(self, link: DriverLink, done: Done) -> None:
        """A task's `Done` from a driver (called on its link's thread)."""
        with self._lock:
            ray_task = self._running.get(done.task)
            if link is not self._link or ray_task is None:
                return  # from before a new driver (it is submitted again), or cancelled
        if done.result is not None:
            try:
                trajectories = ray_task.trajectories(done.result)
            except Exception as exc:  # not a list of one result per rollout
                trajectories = [failed_trajectory(describe(exc))]
            self._finished(ray_task, trajectories)
        elif not done.submitted:  # Ray refused it
            self._finished(ray_task, [_refused(done.error or "no reason given")])
        else:  # the worker or its node died, the object was lost, ... A dying head kills
            # workers first: is it this task, or the cluster?
            failed = [failed_trajectory(done.error or "the task ended without a result")]
            self.deadlines.call_at(time.monotonic() + self._health_check_s,
                                   lambda: self._judge(ray_task, link, failed))

    def _judge(self, ray_task: RayTask, link: DriverLink, failed: list[Trajectory]) -> None:
        """A task's worker died a moment ago: failed trajectories, unless the whole cluster
        is gone (then its rollouts are submitted again once the cluster is back)."""
        with self._lock:
            if link is not self._link or self._unavailable is not None:
                return
        if self._gcs is not None and not _reachable(self._gcs):
            self._wake_check.set()  # the watchdog takes it from here
            return
        self._finished(ray_task, failed)

    def _finished(self, ray_task: RayTask, trajectories: list[Trajectory]) -> None:
        """Resolve the task's rollouts (one failed trajectory given: it is each one's)."""
        with self._lock:
            if self._running.pop(ray_task.number, None) is None:
                return
            self._in_flight -= len(ray_task.rollouts)
        if len(trajectories) == 1:
            trajectories = trajectories * len(ray_task.rollouts)
        for rollout, trajectory in zip(ray_task.rollouts, trajectories):
            rollout.resolve(trajectory)
        self._pump()

    def _stop(self, rollout: Rollout) -> None:
        """A cancelled or timed-out rollout: once its task has no other rollout to run, free
        their slots and cancel the task in the cluster."""
        rollout.stopped = True
        ray_task = rollout.task
        with self._lock:
            stopping = (ray_task is not None and ray_task.number in self._running
                        and all(r.stopped for r in ray_task.rollouts))
            if stopping:
                del self._running[ray_task.number]
                self._in_flight -= len(ray_task.rollouts)
            link = self._link
        if stopping:
            if link is not None:
                self._cancel_in_cluster(link, ray_task)
            self._pump()

    def _cancel_in_cluster(self, link: DriverLink, ray_task: RayTask) -> None:
        if ray_task.submitted_to is link:
            try:
                link.cancel(ray_task.number, force=self._force)
            except DriverGone:  # nothing runs there any more
                pass

    # --- how long rollouts take, how many share a task ---

    def _per_task(self, spec_key: str, spec: JobSpec) -> int:
        """How many rollouts of a batch may share a Ray task: one until the job's rollouts
        were measured, and always with a rollout timeout."""
        if self._max_per_task == 1 or spec.config.rollout_timeout_s is not None:
            return 1
        with self._lock:
            seconds = self._seconds.get(spec_key)
        if seconds is None:
            return 1
        return max(1, min(self._max_per_task, int(SHARED_TASK_S / max(seconds, 1e-6))))

    def _measured(self, spec_key: str, seconds: list[float]) -> None:
        mean = sum(seconds) / len(seconds)
        with self._lock:
            last = self._seconds.pop(spec_key, mean)
            self._seconds[spec_key] = (last + mean) / 2
            while len(self._seconds) > 1024:
                self._seconds.popitem(last=False)

    def _put(self, batch: Batch, data: bytes) -> tuple[DriverLink, int]:
        """Put a batch's state in the object store (the driver does): the driver that holds
        it, and its key there. Its object ref is released when the batch is gone."""
        link = self._link
        if link is None:
            raise ClusterUnreachable(self._unavailable or "no Ray driver")
        key = next(self._state_keys)
        try:
            link.put(key, data)
        except DriverGone as exc:
            raise ClusterUnreachable(str(exc)) from None
        weakref.finalize(batch, link.drop_later, key)
        return link, key

    # --- the cluster going away and coming back ---

    def _connect(self) -> DriverLink | None:
        """Start a driver (None: the backend was closed meanwhile); raises if it does not
        connect."""
        link = DriverLink(self._setup, on_done=self._done, on_exit=self._lost,
                          timeout=self._connect_timeout_s)
        self._gcs = _host_port(link.gcs_address) if link.gcs_address else None
        with self._lock:
            closed = self._closed
            if not closed:
                self._link = link
        if closed:
            link.close()
            return None
        link.start_reading()
        return link

    def _watch(self) -> None:
        """Check the cluster while rollouts are in flight; start a new driver when the old one
        is gone (waiting longer between failed attempts, up to `MAX_RECONNECT_WAIT_S`)."""
        while not self._wake.is_set():
            self._wake_check.wait(self._health_check_s)
            self._wake_check.clear()
            if self._closed:
                return
            if self._unavailable is None:
                if not self._running or self._gcs is None or _reachable(self._gcs):
                    continue
                host, port = self._gcs
                self._lost(self._link, f"the Ray cluster at {host}:{port} is unreachable")
            elif time.monotonic() >= self._retry_at:
                self._reconnect()

    def _lost(self, link: DriverLink | None, reason: str) -> None:
        """`link`'s driver ended, or its cluster is unreachable: end it, and keep its rollouts
        waiting for the next driver."""
        with self._lock:
            if link is None or link is not self._link or self._closed:
                return  # already known, or about an older driver
            self._unavailable = reason
            self._link = None
            rollouts = [r for ray_task in self._running.values() for r in ray_task.rollouts]
            self._waiting.extendleft(sorted(rollouts, key=lambda r: r.order, reverse=True))
            self._running.clear()
            self._in_flight = 0
            self._retry_s = self._health_check_s
            self._retry_at = time.monotonic()
        log.error("ray_cluster_unavailable", reason=reason)
        threading.Thread(target=link.kill, daemon=True, name="ray-driver-kill").start()
        self._wake_check.set()

    def _reconnect(self) -> None:
        if self.address is not None and self._gcs is not None and not _reachable(self._gcs):
            self._retry_later("the cluster does not answer")
            return
        try:
            link = self._connect()
        except Exception as exc:
            self._retry_later(describe(exc))
            return
        with self._lock:
            if self._closed or link is None or self._link is not link:
                return  # closed, or this driver ended already (`_lost` said so)
            self._unavailable = None  # batches put their state again: a new driver
        log.info("ray_cluster_reconnected", address=self.address or "a local cluster")
        self._pump()

    def _retry_later(self, why: str) -> None:
        log.info("ray_reconnect_failed", error=why, retry_in_s=round(self._retry_s, 1))
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, MAX_RECONNECT_WAIT_S)


def _check_answers(address: str | None) -> None:
    """A `host:port` address where nothing listens is a ConnectionError now (Ray itself would
    wait for it until `connect_timeout_s`)."""
    if address is None or address == "auto" or "://" in address or ":" not in address:
        return
    try:
        host_port = _host_port(address)
    except ValueError:
        return  # not host:port: Ray says what is wrong with it
    if not _reachable(host_port):
        raise ConnectionError(f"no Ray cluster answers at {address}")


def _this_process_cluster() -> str | None:
    """The cluster this process's `ray.init` connected to, if any (Ray is not imported)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)  # an IPv6 host comes in brackets


def _reachable(address: tuple[str, int], timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def _refused(reason: str) -> Trajectory:
    return failed_trajectory(f"rollout could not be submitted to Ray: {reason}")
