"""The code a Ray worker runs for one rollout. It never imports Ray: it gets bytes, returns bytes.

Everything crossing the cluster is msgspec-encoded by us: one `RolloutCall` per Ray task (the
job's `RolloutSpec`, the iteration, its rollouts' queries and places, and the trainer state
when it is small), the trainer state in the object store when it is large (put once per
iteration by the runtime), and what comes back: each rollout's trajectory and the seconds it
took (the runtime gives short rollouts several to a task). The worker finds the task's code
by the task name, exactly as a restarted runtime does, so the task's module must be importable
on every node (installed there, or shipped with Ray's `runtime_env`). Built tasks and decoded
states are cached per worker process by key, so the rollouts of one iteration decode its state
once per worker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Any

import msgspec

from .. import codec
from ..errors import one_line
from ..spec import JobSpec, TrainingQuery
from ..tasks import (
    Task,
    Trajectory,
    build_named_task,
    failed_trajectory,
    restore,
    state_decoder,
)
from ..training import rollout_rng
from .base import checked, is_async_task


class RolloutSpec(msgspec.Struct, frozen=True, array_like=True):
    """What a worker needs of a job's spec (not its training data): the task, and the seed
    and step bound of each rollout."""

    task: str
    task_options: dict[str, Any]
    seed: int
    max_steps: int


class RolloutCall(msgspec.Struct, frozen=True, array_like=True):
    """The arguments of a task's rollouts as one Ray argument (each argument has a cost of its
    own): `rollouts` holds each one's (query, query index, index), run in that order.

    The spec and the state come with keys: a worker decodes each one once. `state` is None
    when the state is in the object store (then Ray passes its bytes as a second argument).
    """

    spec_key: str
    spec: msgspec.Raw
    state_key: str
    state: bytes | None
    iteration: int
    rollouts: list[tuple[TrainingQuery, int, int]]


_spec_decoder = msgspec.msgpack.Decoder(RolloutSpec)
_call_decoder = msgspec.msgpack.Decoder(RolloutCall)
_results_decoder = msgspec.msgpack.Decoder(list[tuple[msgspec.Raw, float]])
_encoder = msgspec.msgpack.Encoder()
_CACHE_SIZE = 8
_tasks: OrderedDict[str, tuple[RolloutSpec, Task]] = OrderedDict()
_states: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()  # a worker may run tasks on several threads


def rollouts_on_worker(call_bytes: bytes, stored_state: bytes | None = None) -> bytes:
    """A task's rollouts on a worker, one after another: the encoded list of (`Trajectory`,
    seconds) in the call's order (a failure is a failed trajectory)."""
    call = _call_decoder.decode(call_bytes)
    try:
        spec, task = _task(call.spec_key, call.spec)
        state = _state(call.state_key, task,
                       stored_state if call.state is None else call.state)
    except Exception as exc:  # the task cannot be loaded on this node: say which and why
        failed = msgspec.Raw(encode_trajectory(failed_trajectory(
            f"rollout could not start on the worker: {type(exc).__name__}: "
            f"{one_line(str(exc))}")))
        return _encoder.encode([(failed, 0.0)] * len(call.rollouts))
    results = []
    for query, query_index, index in call.rollouts:
        started = time.perf_counter()
        trajectory = _rollout(task, spec, state, query, call.iteration, query_index, index)
        results.append((msgspec.Raw(trajectory), time.perf_counter() - started))
    return _encoder.encode(results)


def _rollout(task: Task, spec: RolloutSpec, state: Any, query: TrainingQuery, iteration: int,
             query_index: int, index: int) -> bytes:
    """One rollout, its encoded trajectory."""
    rng = rollout_rng(spec.seed, iteration, query_index, index)
    never = threading.Event()  # a Ray task is stopped by ray.cancel, not by a signal
    try:
        if is_async_task(task):
            result = asyncio.run(task.rollout(state, query, rng=rng, max_steps=spec.max_steps,
                                              cancelled=never))
        else:
            result = task.rollout(state, query, rng=rng, max_steps=spec.max_steps,
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
    return _encoder.encode(trajectory)


def encode_call(spec_key: str, spec: msgspec.Raw, state_key: str, state: bytes | None,
                iteration: int, rollouts: list[tuple[msgspec.Raw, int, int]]) -> bytes:
    """A `RolloutCall` from parts encoded once per batch (`spec` and each query: their
    encodings)."""
    return _encoder.encode((spec_key, spec, state_key, state, iteration, rollouts))


def decode_results(data: bytes) -> list[tuple[msgspec.Raw, float]]:
    """What `rollouts_on_worker` returned: each encoded trajectory and its seconds."""
    return _results_decoder.decode(data)


def _task(key: str, data: msgspec.Raw) -> tuple[RolloutSpec, Task]:
    with _lock:
        found = _tasks.get(key)
        if found is not None:
            _tasks.move_to_end(key)
            return found
    spec = _spec_decoder.decode(data)
    found = (spec, build_named_task(spec.task, spec.task_options))
    with _lock:
        _tasks[key] = found
        while len(_tasks) > _CACHE_SIZE:
            _tasks.popitem(last=False)
    return found


def _state(key: str, task: Task, data: bytes | None) -> Any:
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


def rollout_spec(spec: JobSpec) -> bytes:
    """The encoded `RolloutSpec` of a job's spec."""
    config = spec.config
    return codec.encode(RolloutSpec(task=spec.task, task_options=spec.task_options,
                                    seed=config.seed, max_steps=config.max_steps_per_trajectory))
