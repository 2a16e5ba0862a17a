"""One iteration of one job on Ray (`Batch`), its rollouts (`Rollout`) and the Ray tasks that
run them (`RayTask`: one rollout, or several short ones of the same batch one after another).

A batch encodes the job's `RolloutSpec` and its trainer state once; a state too large to travel
inside each task is put in the object store once (and again in a new driver, after the cluster
or the driver went away). The backend (`raycluster.RayRollouts`) decides which rollouts go to
which task and when.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from typing import Any, Protocol

import msgspec

from .. import codec
from ..spec import JobSpec, TrainingQuery
from ..tasks import Trajectory, failed_trajectory
from .base import Resolve
from .ray_link import DriverLink, Submit
from .ray_worker import decode_results, encode_call, rollout_spec

_trajectory_decoder = msgspec.msgpack.Decoder(Trajectory)
_PROCESS = uuid.uuid4().hex[:12]  # with a counter: keys no other runtime process makes
_batch_numbers = itertools.count()


class ClusterUnreachable(Exception):
    """There is no driver to put a state in now (the backend waits for one; this never leaves
    the package)."""


class Backend(Protocol):
    """What a batch needs of its backend (`RayRollouts`, whose own methods these are)."""

    _link: DriverLink | None
    max_inline_state: int

    def _put(self, batch: Batch, data: bytes) -> tuple[DriverLink, int]: ...
    def _enqueue(self, rollout: Rollout) -> None: ...
    def _stop(self, rollout: Rollout) -> None: ...
    def _per_task(self, spec_key: str, spec: JobSpec) -> int: ...
    def _measured(self, spec_key: str, seconds: list[float]) -> None: ...


class Batch:
    """One iteration of one job on Ray: its spec and state encoded once, the state put in the
    object store once when it is too large to travel inline."""

    def __init__(self, backend: Backend, spec: JobSpec, state: Any, iteration: int,
                 queries: list[TrainingQuery]) -> None:
        self.backend = backend
        self.iteration = iteration
        self.queries = [msgspec.Raw(codec.encode(q)) for q in queries]
        spec_data = rollout_spec(spec)
        self.spec_key, self.spec = codec.digest(spec_data), msgspec.Raw(spec_data)
        self.per_task = backend._per_task(self.spec_key, spec)
        self.state_key = f"{_PROCESS}-{next(_batch_numbers)}"  # a worker's cache key
        self._state_data = codec.encode(state)
        inline = len(self._state_data) <= backend.max_inline_state
        self.state = self._state_data if inline else None  # None: in the object store
        self._stored: tuple[DriverLink, int] | None = None  # the driver holding it, its key
        self._lock = threading.Lock()
        if not inline:
            try:  # now, on the job's thread: the put happens once per iteration
                self.stored_key()
            except ClusterUnreachable:  # put when a rollout is submitted
                pass

    def stored_key(self) -> int:
        """The stored state's key in the driver, put again in a new driver."""
        with self._lock:
            if self._stored is None or self._stored[0] is not self.backend._link:
                self._stored = self.backend._put(self, self._state_data)
            return self._stored[1]

    def launch(self, unit: int, query_index: int, index: int, signal: threading.Event,
               resolve: Resolve) -> Any:
        rollout = Rollout(self, query_index, index, resolve)
        self.backend._enqueue(rollout)
        return lambda: self.backend._stop(rollout)


class Rollout:
    """One rollout, submitted again after a reconnection."""

    _orders = itertools.count()

    def __init__(self, batch: Batch, query_index: int, index: int, resolve: Resolve) -> None:
        self.batch = batch
        self.query_index, self.index = query_index, index
        self.resolve = resolve
        self.task: RayTask | None = None  # the Ray task running it, if any
        self.stopped = False
        self.order = next(Rollout._orders)  # submission order, kept across a reconnection


class RayTask:
    """One Ray task running rollouts of one batch, in order (usually just one)."""

    def __init__(self, number: int, batch: Batch, rollouts: list[Rollout]) -> None:
        self.number = number  # the backend's name for it, and its driver's
        self.batch, self.rollouts = batch, rollouts
        self.submitted_to: DriverLink | None = None  # the driver it was sent to
        for rollout in rollouts:
            rollout.task = self

    def submission(self, link: DriverLink) -> Submit:
        """What the driver behind `link` is sent to run it (its `Done` comes back by
        `number`); a large state is put there first if it is not yet."""
        batch = self.batch
        call = encode_call(batch.spec_key, batch.spec, batch.state_key, batch.state,
                           batch.iteration, [(batch.queries[r.query_index], r.query_index,
                                              r.index) for r in self.rollouts])
        self.submitted_to = link
        return Submit(self.number, call, None if batch.state is not None else batch.stored_key())

    def trajectories(self, result: bytes) -> list[Trajectory]:
        """The task's result as one trajectory per rollout (a trajectory that cannot be
        decoded is a failed one); the seconds they took go to the backend's measure."""
        decoded = decode_results(result)
        if len(decoded) != len(self.rollouts):
            raise ValueError(f"{len(decoded)} results for {len(self.rollouts)} rollouts")
        self.batch.backend._measured(self.batch.spec_key, [seconds for _, seconds in decoded])
        return [_trajectory(data) for data, _ in decoded]


def _trajectory(data: msgspec.Raw) -> Trajectory:
    try:
        return _trajectory_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return failed_trajectory(f"the trajectory cannot be decoded: {exc}")
