"""Rollouts as Ray tasks: on a running cluster (`address="auto"`, `"ray://host:10001"`) or a
local one started for this process.

What runs where: the runtime, its log and every job's `init`/`update`/`evaluate` stay in this
process; each rollout is one Ray task anywhere in the cluster, given one msgspec-encoded
argument. Short rollouts share: once a job's rollouts are measured to take less than
`SHARED_TASK_S` together, up to `max_rollouts_per_task` of one iteration run in one task, one
after another, so Ray's cost per task (about a millisecond of CPU) is paid once for them.
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
cancelled in the cluster (`ray.cancel`). If the cluster goes away, rollouts in flight wait
(each still bounded by `rollout_timeout_s`) while the backend reconnects; `unavailable` says
why; they are submitted again once the cluster is back.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from typing import Any

from ..logs import get_logger
from ..spec import JobSpec, TrainingQuery
from ..tasks import Task, Trajectory, failed_trajectory, snapshot
from .base import Deadlines, OnComplete, RolloutBatch, RolloutHandle
from .ray_batch import Batch, ClusterUnreachable, RayTask, Rollout
from .ray_worker import rollouts_on_worker

log = get_logger(__name__)

SHARED_TASK_S = 0.002
"""Rollouts of one iteration share a Ray task while together they take about this long."""
# Ray ends a driver whose cluster (its GCS) is unreachable for this long (60 s by default);
# the runtime must outlive its cluster, so when this backend connects, it waits far longer.
_RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"


class RayRollouts:
    """Each rollout a Ray task. `Runtime(path, rollouts=RayRollouts("auto"))`.

    Args:
        address: a running cluster (`"auto"`, `"host:6379"`, `"ray://host:10001"`); None
            starts a local one for this process (or uses the one `ray.init` already made).
        runtime_env: Ray's `runtime_env` for the rollouts, e.g. `{"pip": [...]}`,
            `{"working_dir": "."}` or `{"env_vars": {"PYTHONPATH": ...}}`: the workers must be
            able to import flowactors and the task's module (by the spec's task name).
        num_cpus: CPUs each rollout task reserves (Ray schedules by it).
        remote_options: more options for every rollout task (`resources`, `scheduling_strategy`).
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
    """

    def __init__(self, address: str | None = None, *, runtime_env: dict[str, Any] | None = None,
                 num_cpus: float = 1, remote_options: dict[str, Any] | None = None,
                 max_in_flight: int = 1024, max_retries: int = 0, force_cancel: bool = True,
                 init_options: dict[str, Any] | None = None,
                 health_check_s: float = 1.0, max_inline_state: int = 16 * 1024,
                 max_rollouts_per_task: int = 8) -> None:
        import ray  # the optional extra: flowactors[ray]

        if max_in_flight < 1 or max_retries < 0 or max_rollouts_per_task < 1:
            raise ValueError("max_in_flight and max_rollouts_per_task must be >= 1, "
                             "max_retries >= 0")
        self._ray = ray
        self.address = address
        self._runtime_env = runtime_env
        self._init_options = dict(init_options or {})
        self._force = force_cancel
        self._max_in_flight = max_in_flight
        self._health_check_s = health_check_s
        self.max_inline_state = max_inline_state
        self._max_per_task = max_rollouts_per_task
        options = {"num_cpus": num_cpus, "max_retries": max_retries, "retry_exceptions": False,
                   **(remote_options or {})}
        self._remote = ray.remote(rollouts_on_worker).options(**options)
        self.deadlines = Deadlines()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._waiting: collections.deque[Rollout] = collections.deque()
        self._running: set[RayTask] = set()
        self._seconds: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._pumping = threading.local()
        self._generation = 0  # one per connection; results of an older one are ignored
        self._unavailable: str | None = None
        self._closed = False
        self._owns = not ray.is_initialized()
        self._gcs: tuple[str, int] | None = None  # the cluster's address, watched if owned
        if self._owns:
            self._connect()
        self._wake = threading.Event()  # set on close
        self._wake_check = threading.Event()  # check the cluster now
        self._watchdog: threading.Thread | None = None
        if self._owns:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name="ray-watchdog")
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
        """Cancel what is in flight; shut Ray down if this backend started or connected it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = list(self._running)
            self._running.clear()
            self._waiting.clear()
        self._wake.set()
        self._wake_check.set()
        for ray_task in running:
            self._cancel_in_cluster(ray_task)
        self.deadlines.close()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()

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
                    nxt = self._next_task()
                if nxt is None:
                    return
                self._submit(*nxt)
        finally:
            self._pumping.active = False

    def _next_task(self) -> tuple[RayTask, int] | None:
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
            ray_task = RayTask(first.batch, rollouts)
            self._in_flight += len(rollouts)
            self._running.add(ray_task)
            return ray_task, self._generation
        return None

    def _submit(self, ray_task: RayTask, generation: int) -> None:
        try:
            ref = ray_task.submit(self._remote)
        except ClusterUnreachable as exc:  # its state could not be put: wait for the cluster
            self._lost(str(exc))
            return
        except Exception as exc:  # Ray refused it (not connected, a bad option)
            self._finished(ray_task, [failed_trajectory(
                f"rollout could not be submitted to Ray: {type(exc).__name__}: {exc}")])
            return
        # `_on_completed` is what `ref.future()` is built on, without a Future (its condition
        # and lock) per task: the result, or the exception getting it raised.
        ref._on_completed(lambda result: self._done(ray_task, generation, result))

    def _done(self, ray_task: RayTask, generation: int, result: Any) -> None:
        with self._lock:
            if generation != self._generation or ray_task not in self._running:
                return  # from before a reconnection (it is submitted again), or cancelled
        try:
            if isinstance(result, Exception):  # the worker or its node died, the object was
                raise result                   # lost, the task was cancelled, ...
            trajectories = ray_task.trajectories(result)
        except Exception as exc:
            failed = [failed_trajectory(f"{type(exc).__name__}: {_first_line(exc)}")]
            if self._watchdog is None:
                self._finished(ray_task, failed)
            else:  # a dying head kills workers first: is it this task, or the cluster?
                self.deadlines.call_at(time.monotonic() + self._health_check_s,
                                       lambda: self._judge(ray_task, generation, failed))
            return
        self._finished(ray_task, trajectories)

    def _judge(self, ray_task: RayTask, generation: int, failed: list[Trajectory]) -> None:
        """A task's worker died a moment ago: failed trajectories, unless the whole cluster
        is gone (then its rollouts are submitted again once the cluster is back)."""
        with self._lock:
            if generation != self._generation or self._unavailable is not None:
                return
        if self._gcs is not None and not _reachable(self._gcs):
            self._wake_check.set()  # the watchdog takes it from here
            return
        self._finished(ray_task, failed)

    def _finished(self, ray_task: RayTask, trajectories: list[Trajectory]) -> None:
        """Resolve the task's rollouts (one failed trajectory given: it is each one's)."""
        with self._lock:
            if ray_task not in self._running:
                return
            self._running.discard(ray_task)
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
            stopping = (ray_task is not None and ray_task in self._running
                        and all(r.stopped for r in ray_task.rollouts))
            if stopping:
                self._running.discard(ray_task)
                self._in_flight -= len(ray_task.rollouts)
        if stopping:
            self._cancel_in_cluster(ray_task)
            self._pump()

    def _cancel_in_cluster(self, ray_task: RayTask) -> None:
        if ray_task.ref is not None:
            try:
                self._ray.cancel(ray_task.ref, force=self._force)
            except Exception as exc:  # best effort: nothing waits for it any more
                log.debug("ray_cancel_failed", error=_first_line(exc))

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

    def _put(self, data: bytes) -> Any:
        """`ray.put`, tried only while the cluster answers: Ray ends the process whose put
        finds its node's object store gone (the head died with it), before any exception."""
        if self._watchdog is not None and self._gcs is not None and not _reachable(self._gcs):
            host, port = self._gcs
            raise ClusterUnreachable(f"the Ray cluster at {host}:{port} is unreachable")
        return self._ray.put(data)

    # --- the cluster going away and coming back ---

    def _connect(self) -> None:
        os.environ.setdefault(_RECONNECT_ENV, str(10 ** 9))
        options: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
        if self.address is None:  # a local cluster: no dashboard to start
            options["include_dashboard"] = False
        self._ray.init(address=self.address, runtime_env=self._runtime_env,
                       **{**options, **self._init_options})
        try:
            self._gcs = _host_port(self._ray.get_runtime_context().gcs_address)
        except Exception:  # a Ray Client connection (ray://) has no GCS address to watch
            self._gcs = None

    def _watch(self) -> None:
        """Check the cluster while rollouts are in flight; reconnect when it is gone."""
        while not self._wake.is_set():
            self._wake_check.wait(self._health_check_s)
            self._wake_check.clear()
            if self._closed:
                return
            if self._unavailable is None:
                if not self._running or self._gcs is None or _reachable(self._gcs):
                    continue
                host, port = self._gcs
                self._lost(f"the Ray cluster at {host}:{port} is unreachable")
            self._reconnect()

    def _lost(self, reason: str) -> None:
        with self._lock:
            if self._unavailable is not None:
                return  # the watchdog and a put both found it gone
            self._unavailable = reason
            self._generation += 1
            rollouts = [r for ray_task in self._running for r in ray_task.rollouts]
            self._waiting.extendleft(sorted(rollouts, key=lambda r: r.order, reverse=True))
            self._running.clear()
            self._in_flight = 0
        log.error("ray_cluster_unavailable", reason=reason)
        try:
            self._ray.shutdown()
        except Exception as exc:
            log.warning("ray_shutdown_failed", error=repr(exc))

    def _reconnect(self) -> None:
        try:
            self._connect()
        except Exception as exc:
            log.info("ray_reconnect_failed", error=_first_line(exc))
            try:
                self._ray.shutdown()
            except Exception:
                pass
            return
        with self._lock:
            self._unavailable = None  # batches put their state again: a new generation
        log.info("ray_cluster_reconnected", address=self.address)
        self._pump()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _reachable(address: tuple[str, int], timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
