"""Checkpoints written in the background: a job takes a snapshot, trains on, and records the
checkpoint once its file is durable.

Writing a state of hundreds of megabytes (hash, write, fsync) takes longer than many
iterations; on the job's thread it stalled training for all of it. Here the job's thread keeps
only what must happen there: the task's snapshot and evaluation, and — when the snapshot holds
something the task may still change (an array, a list, a dict) — its encoding, which is the
copy the task can no longer touch. A snapshot made only of immutable values (bytes, str,
numbers, tuples, frozen Structs) is encoded in the background too. A `SaveInFlight` is the
job's one checkpoint in flight; the pool that writes is the runtime's (`CheckpointSaves`).

Only states bound for the checkpoint store go to the background: a state small enough for the
log (`StateStore.inline_max_bytes`) costs about one more fsync in the iteration's own
transaction, so it stays synchronous and its events keep their order.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgspec

from . import codec, pieces
from .checkpointing import StateStore, StoredBlob, run_now
from .commands import SavedState
from .events import Digest
from .faults import fault_point
from .tasks import snapshot

__all__ = ["CheckpointSaves", "Digests", "SaveInFlight", "Snapshot", "frozen_size",
           "part_digests", "saved_state", "take_snapshot"]

_IMMUTABLE_SCALARS = (bool, int, float, complex, type(None))


def frozen_size(value: Any) -> int | None:
    """A lower bound of `value`'s encoded size when no part of it can change (bytes, str,
    numbers, tuples and frozen Structs all the way down); None when some part can (an array,
    a list, a dict, anything else): then it must be encoded — copied — before training goes on.
    """
    size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (bytes, str)):
            size += len(item)
        elif isinstance(item, _IMMUTABLE_SCALARS):
            size += 1
        elif isinstance(item, (tuple, frozenset)):
            stack.extend(item)
        elif isinstance(item, msgspec.Struct) and item.__struct_config__.frozen:
            stack.extend(getattr(item, name) for name in item.__struct_fields__)
        else:
            return None
    return size


class Digests(msgspec.Struct, frozen=True):
    """The digests a checkpoint records of a snapshot's parts; `policy` None: the snapshot is
    its own policy, whose digest is the stored bytes' address (the same hash, not taken
    twice)."""

    policy: Digest | None
    optimizer: Digest | None
    rng: Digest | None


def part_digests(snap: Any) -> Digests:
    policy = getattr(snap, "policy", snap)
    return Digests(policy=None if policy is snap else codec.digest_of(policy),
                   optimizer=_digest_if_any(getattr(snap, "optimizer", None)),
                   rng=_digest_if_any(getattr(snap, "rng", None)))


def saved_state(digests: Digests, stored: StoredBlob, score: float) -> SavedState:
    """What a checkpoint records of a stored snapshot."""
    return SavedState(
        state_ref=stored.address, size=stored.size, location=stored.location,
        validation_score=score, policy_digest=digests.policy or stored.address,
        optimizer_digest=digests.optimizer, rng_digest=digests.rng)


def _digest_if_any(part: Any) -> Digest | None:
    """The digest of a part of the trainer state; None when the state has no such part."""
    return None if part is None else codec.digest_of(part)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint's state as the job's thread leaves it: `blob`, encoded there with its part
    `digests`; or, when the task can no longer change it, `snap` itself (encoded later)."""

    snap: Any = None
    blob: bytes | pieces.Pieces | None = None
    digests: Digests | None = None
    score: float


def take_snapshot(task: Any, trainer: Any, scored: list[Any], *, defer: bool,
                  inline_max: int) -> Snapshot:
    """Snapshot, encode (unless `defer` and the snapshot is immutable and too large for the
    log) and evaluate the trainer, on the job's thread: the task's own code, in the order it
    always ran."""
    snap = snapshot(task, trainer)
    size = frozen_size(snap)
    if defer and size is not None and size > inline_max:
        return Snapshot(snap=snap, score=float(task.evaluate(trainer, scored)))
    # an immutable snapshot's large bytes are written as they are, not copied (under the GIL)
    blob = pieces.encode(snap) if size is not None else codec.encode(snap)
    score = float(task.evaluate(trainer, scored))
    return Snapshot(blob=blob, digests=part_digests(snap), score=score)


class SaveInFlight:
    """A job's checkpoint being written: its iteration, the metrics the job had then (the
    checkpoint records them, however late it is appended), and the future of its state."""

    def __init__(self, iteration: int, metrics: dict[str, float],
                 future: Future[SavedState]) -> None:
        self.iteration = iteration
        self.metrics = metrics
        self.future = future

    def settled_by(self, state_store: StateStore) -> None:
        """Once written, hand the file's pending mark back (the job will never append its
        event: it stopped or crashed); the next open sweeps the orphan."""
        def settle(future: Future[SavedState]) -> None:
            if future.exception() is None:
                saved = future.result()
                state_store.settled(StoredBlob(address=saved.state_ref, size=saved.size or 0,
                                               location=saved.location))
        self.future.add_done_callback(settle)


class CheckpointSaves:
    """The runtime's bounded pool of checkpoint writers, shared by its jobs (each has at most
    one save in flight). `close` waits for the writes under way and starts no others."""

    def __init__(self, state_store: StateStore, workers: int = 2) -> None:
        self.state_store = state_store
        self._pool = ThreadPoolExecutor(max_workers=workers, initializer=_yield_the_cores,
                                        thread_name_prefix="flowactors-checkpoint")
        state_store.remove_later = self._remove_later  # pruned files, off the jobs' threads

    def start(self, iteration: int, metrics: dict[str, float], taken: Snapshot
              ) -> SaveInFlight:
        """Write a checkpoint (encoding and digesting an immutable snapshot here, on the
        writer); the future's result is its `SavedState`."""
        def write() -> SavedState:
            fault_point("checkpoint.writing")
            snap = taken.snap
            data = pieces.encode(snap) if taken.blob is None else taken.blob
            digests = part_digests(snap) if taken.digests is None else taken.digests
            stored = self.state_store.store(data, background=True)
            return saved_state(digests, stored, taken.score)

        return SaveInFlight(iteration, metrics, self._pool.submit(write))

    def _remove_later(self, work: Any) -> None:
        try:
            self._pool.submit(work)
        except RuntimeError:  # the pool is shut down: remove now
            run_now(work)

    def close(self) -> None:
        """Wait for the writes and removals under way; the next open sweeps what is left."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _yield_the_cores() -> None:
    """Run this writer thread (and the hashing thread it starts, which inherits it) at the
    lowest CPU priority: a checkpoint has until the next one to be written, while training
    and the other jobs' iterations wait for every core it takes (Linux: niceness is per
    thread; elsewhere nothing changes)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
