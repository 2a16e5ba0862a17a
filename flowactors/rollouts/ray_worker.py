"""The code a Ray worker runs for one rollout. It never imports Ray: it gets bytes, returns bytes.

Everything crossing the cluster is msgspec-encoded by us: the job's spec (once per job), the
trainer state (once per iteration, put in the object store by the runtime), the query, and the
trajectory that comes back. The worker finds the task's code by the spec's task name, exactly as
a restarted runtime does, so the task's module must be importable on every node (installed
there, or shipped with Ray's `runtime_env`). Built tasks and decoded states are cached per
worker process, so the rollouts of one iteration decode its state once per worker.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Any

import msgspec

from .. import codec
from ..errors import one_line
from ..spec import JobSpec, TrainingQuery
from ..tasks import (
    Task,
    Trajectory,
    build_task,
    failed_trajectory,
    restore,
    state_decoder,
)
from ..training import rollout_rng
from .base import checked, is_async_task

_spec_decoder = msgspec.msgpack.Decoder(JobSpec)
_query_decoder = msgspec.msgpack.Decoder(TrainingQuery)
_trajectory_encoder = msgspec.msgpack.Encoder()
_CACHE_SIZE = 8
_tasks: OrderedDict[str, tuple[JobSpec, Task]] = OrderedDict()
_states: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()  # a worker may run tasks on several threads


def rollout_on_worker(spec_key: str, spec_bytes: bytes, state_key: str, state_bytes: bytes,
                      query_bytes: bytes, iteration: int, query_index: int,
                      index: int) -> bytes:
    """One rollout on a worker: the encoded `Trajectory` (a failure is a failed trajectory)."""
    try:
        spec, task = _task(spec_key, spec_bytes)
        state = _state(state_key, task, state_bytes)
        query = _query_decoder.decode(query_bytes)
    except Exception as exc:  # the task cannot be loaded on this node: say which and why
        return encode_trajectory(failed_trajectory(
            f"rollout could not start on the worker: {type(exc).__name__}: "
            f"{one_line(str(exc))}"))
    rng = rollout_rng(spec.config.seed, iteration, query_index, index)
    never = threading.Event()  # a Ray task is stopped by ray.cancel, not by a signal
    try:
        if is_async_task(task):
            result = asyncio.run(task.rollout(state, query, rng=rng,
                                              max_steps=spec.config.max_steps_per_trajectory,
                                              cancelled=never))
        else:
            result = task.rollout(state, query, rng=rng,
                                  max_steps=spec.config.max_steps_per_trajectory,
                                  cancelled=never)
        trajectory = checked(result)
    except Exception as exc:
        trajectory = failed_trajectory(f"{type(exc).__name__}: {exc}")
    try:
        return encode_trajectory(trajectory)
    except Exception as exc:  # its data is not msgspec-encodable
        return encode_trajectory(failed_trajectory(
            f"trajectory cannot be encoded: {type(exc).__name__}: {exc}"))


def encode_trajectory(trajectory: Trajectory) -> bytes:
    return _trajectory_encoder.encode(trajectory)


def _task(key: str, data: bytes) -> tuple[JobSpec, Task]:
    with _lock:
        found = _tasks.get(key)
        if found is not None:
            _tasks.move_to_end(key)
            return found
    spec = _spec_decoder.decode(data)
    found = (spec, build_task(spec))
    with _lock:
        _tasks[key] = found
        while len(_tasks) > _CACHE_SIZE:
            _tasks.popitem(last=False)
    return found


def _state(key: str, task: Task, data: bytes) -> Any:
    with _lock:
        if key in _states:
            _states.move_to_end(key)
            return _states[key]
    state = restore(task, state_decoder(task).decode(data))
    with _lock:
        _states[key] = state
        while len(_states) > _CACHE_SIZE:
            _states.popitem(last=False)
    return state


def spec_bytes(spec: JobSpec) -> bytes:
    """The spec as the worker decodes it."""
    return codec.encode(spec)
