"""Rollouts as Ray tasks: on a running cluster (`address="auto"`, `"ray://host:10001"`) or a
local one started for this process.

What runs where: the runtime, its log and every job's `init`/`update`/`evaluate` stay in this
process; each rollout is one Ray task anywhere in the cluster, given one msgspec-encoded
argument. Per iteration a large trainer state goes to the object store once (`ray.put` of its
msgspec encoding) and every rollout of that iteration reads it from there; a small one (up to
`max_inline_state` bytes) travels inside each task's argument instead, which costs less than
an object store round trip. The trajectory comes back msgspec-encoded. Nothing of ours is
pickled: Ray pickles its own function reference, we hand it bytes.

Failures: a rollout whose task raises, whose worker process or node dies, or which outlives
`rollout_timeout_s` is a failed trajectory (with `max_retries=N`, Ray first re-runs a rollout
whose worker died up to N times; the rerun draws the same generator, so a retried rollout is
the same rollout). A cancelled job's rollouts are cancelled in the cluster (`ray.cancel`).
If the cluster goes away, rollouts in flight wait (each still bounded by `rollout_timeout_s`)
while the backend reconnects; `unavailable` says why; they are submitted again once the
cluster is back.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import threading
import time
import uuid
from typing import Any

import msgspec

from .. import codec
from ..logs import get_logger
from ..spec import JobSpec, TrainingQuery
from ..tasks import Task, Trajectory, failed_trajectory, snapshot
from .base import Deadlines, OnComplete, Resolve, RolloutBatch, RolloutHandle
from .ray_worker import encode_call, rollout_on_worker, rollout_spec

log = get_logger(__name__)

_trajectory_decoder = msgspec.msgpack.Decoder(Trajectory)
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
        num_cpus: CPUs each rollout reserves (Ray schedules by it).
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
    """

    def __init__(self, address: str | None = None, *, runtime_env: dict[str, Any] | None = None,
                 num_cpus: float = 1, remote_options: dict[str, Any] | None = None,
                 max_in_flight: int = 1024, max_retries: int = 0, force_cancel: bool = True,
                 init_options: dict[str, Any] | None = None,
                 health_check_s: float = 1.0, max_inline_state: int = 16 * 1024) -> None:
        import ray  # the optional extra: flowactors[ray]

        if max_in_flight < 1 or max_retries < 0:
            raise ValueError("max_in_flight must be >= 1 and max_retries >= 0")
        self._ray = ray
        self.address = address
        self._runtime_env = runtime_env
        self._init_options = dict(init_options or {})
        self._force = force_cancel
        self._max_in_flight = max_in_flight
        self._health_check_s = health_check_s
        self.max_inline_state = max_inline_state
        options = {"num_cpus": num_cpus, "max_retries": max_retries, "retry_exceptions": False,
                   **(remote_options or {})}
        self._remote = ray.remote(rollout_on_worker).options(**options)
        self.deadlines = Deadlines()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._waiting: collections.deque[_Rollout] = collections.deque()
        self._running: set[_Rollout] = set()
        self._generation = 0  # one per connection; results of an older one are ignored
        self._unavailable: str | None = None
        self._closed = False
        self._owns = not ray.is_initialized()
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
        batch = _Batch(self, spec, snapshot(task, state), iteration, queries)
        return RolloutBatch(launcher=batch, deadlines=self.deadlines, spec=spec,
                            n_queries=len(queries), on_complete=on_complete).start()

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
        for rollout in running:
            rollout.cancel_in_cluster()
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

    def _enqueue(self, rollout: _Rollout) -> None:
        with self._lock:
            if self._closed:
                return
            if self._in_flight >= self._max_in_flight or self._unavailable is not None:
                self._waiting.append(rollout)
                return
            self._in_flight += 1
            self._running.add(rollout)
            generation = self._generation
        self._submit(rollout, generation)

    def _submit(self, rollout: _Rollout, generation: int) -> None:
        try:
            ref = rollout.submit(self._remote, generation)
        except Exception as exc:  # Ray refused it (not connected, a bad option)
            self._finished(rollout, failed_trajectory(
                f"rollout could not be submitted to Ray: {type(exc).__name__}: {exc}"))
            return
        # `_on_completed` is what `ref.future()` is built on, without a Future (its condition
        # and lock) per rollout: the result, or the exception getting it raised.
        ref._on_completed(lambda result: self._done(rollout, generation, result))

    def _done(self, rollout: _Rollout, generation: int, result: Any) -> None:
        with self._lock:
            if generation != self._generation or rollout not in self._running:
                return  # from before a reconnection (it is submitted again), or cancelled
        try:
            if isinstance(result, Exception):  # the worker or its node died, the object was
                raise result                   # lost, the task was cancelled, ...
            trajectory = _trajectory_decoder.decode(result)
        except Exception as exc:
            failed = failed_trajectory(f"{type(exc).__name__}: {_first_line(exc)}")
            if self._watchdog is None:
                self._finished(rollout, failed)
            else:  # a dying head kills workers first: is it this rollout, or the cluster?
                self.deadlines.call_at(time.monotonic() + self._health_check_s,
                                       lambda: self._judge(rollout, generation, failed))
            return
        self._finished(rollout, trajectory)

    def _judge(self, rollout: _Rollout, generation: int, failed: Trajectory) -> None:
        """A rollout's worker died a moment ago: a failed trajectory, unless the whole
        cluster is gone (then it is submitted again once the cluster is back)."""
        with self._lock:
            if generation != self._generation or self._unavailable is not None:
                return
        if self._gcs is not None and not _reachable(self._gcs):
            self._wake_check.set()  # the watchdog takes it from here
            return
        self._finished(rollout, failed)

    def _finished(self, rollout: _Rollout, trajectory: Trajectory) -> None:
        with self._lock:
            if rollout not in self._running:
                return
            self._running.discard(rollout)
            self._in_flight -= 1
            nxt = self._next_waiting()
        rollout.resolve(trajectory)
        if nxt is not None:
            self._submit(*nxt)

    def _next_waiting(self) -> tuple[_Rollout, int] | None:
        """The next waiting rollout to submit (called with the lock held)."""
        while self._waiting and self._unavailable is None and not self._closed:
            rollout = self._waiting.popleft()
            if rollout.stopped:
                continue
            self._in_flight += 1
            self._running.add(rollout)
            return rollout, self._generation
        return None

    def _stop(self, rollout: _Rollout) -> None:
        """A cancelled or timed-out rollout: free its slot, cancel it in the cluster."""
        rollout.stopped = True
        with self._lock:
            was_running = rollout in self._running
            if was_running:
                self._running.discard(rollout)
                self._in_flight -= 1
            nxt = self._next_waiting() if was_running else None
        if was_running:
            rollout.cancel_in_cluster()
        if nxt is not None:
            self._submit(*nxt)

    # --- the cluster going away and coming back ---

    def _connect(self) -> None:
        os.environ.setdefault(_RECONNECT_ENV, str(10 ** 9))
        options: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
        if self.address is None:  # a local cluster: no dashboard to start
            options["include_dashboard"] = False
        self._ray.init(address=self.address, runtime_env=self._runtime_env,
                       **{**options, **self._init_options})
        try:
            self._gcs: tuple[str, int] | None = _host_port(
                self._ray.get_runtime_context().gcs_address)
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
            self._unavailable = reason
            self._generation += 1
            self._waiting.extendleft(sorted(self._running, key=lambda r: r.order,
                                            reverse=True))
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
        while True:
            with self._lock:
                nxt = self._next_waiting() if self._in_flight < self._max_in_flight else None
            if nxt is None:
                return
            self._submit(*nxt)


class _Batch:
    """One iteration of one job on Ray: its spec and state encoded once, the state put in the
    object store once when it is too large to travel inline."""

    def __init__(self, backend: RayRollouts, spec: JobSpec, state: Any, iteration: int,
                 queries: list[TrainingQuery]) -> None:
        self.backend = backend
        self.iteration = iteration
        self.queries = [msgspec.Raw(codec.encode(q)) for q in queries]
        spec_data = rollout_spec(spec)
        self.spec_key, self.spec = codec.digest(spec_data), msgspec.Raw(spec_data)
        self.state_key = uuid.uuid4().hex  # a worker's cache key for this iteration's state
        self._state_data = codec.encode(state)
        inline = len(self._state_data) <= backend.max_inline_state
        self.state = self._state_data if inline else None  # None: in the object store
        self._put: tuple[int, Any] | None = None
        self._lock = threading.Lock()
        if not inline:
            self._state_ref()  # now, on the job's thread: the put happens once per iteration

    def _state_ref(self) -> Any:
        """The stored state's object ref, put again after a reconnection."""
        backend = self.backend
        with self._lock:
            if self._put is None or self._put[0] != backend._generation:
                self._put = (backend._generation, backend._ray.put(self._state_data))
            return self._put[1]

    def launch(self, unit: int, query_index: int, index: int, signal: threading.Event,
               resolve: Resolve) -> Any:
        rollout = _Rollout(self, unit, query_index, index, resolve)
        self.backend._enqueue(rollout)
        return lambda: self.backend._stop(rollout)


class _Rollout:
    """One rollout, submitted again after a reconnection."""

    _orders = itertools.count()

    def __init__(self, batch: _Batch, unit: int, query_index: int, index: int,
                 resolve: Resolve) -> None:
        self.batch, self.unit = batch, unit
        self.query_index, self.index = query_index, index
        self.resolve = resolve
        self.ref: Any = None
        self.stopped = False
        self.order = next(_Rollout._orders)  # submission order, kept across a reconnection

    def submit(self, remote: Any, generation: int) -> Any:
        batch = self.batch
        call = encode_call(batch.spec_key, batch.spec, batch.state_key, batch.state,
                           batch.queries[self.query_index], batch.iteration, self.query_index,
                           self.index)
        self.ref = (remote.remote(call) if batch.state is not None
                    else remote.remote(call, batch._state_ref()))
        return self.ref

    def cancel_in_cluster(self) -> None:
        if self.ref is not None:
            try:
                self.batch.backend._ray.cancel(self.ref, force=self.batch.backend._force)
            except Exception as exc:  # best effort: nothing waits for it any more
                log.debug("ray_cancel_failed", error=_first_line(exc))


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
