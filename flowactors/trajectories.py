"""Trajectories on record: what the policy did in each iteration, kept with its event.

An iteration's trajectories are encoded (MessagePack) once. Up to `INLINE_MAX_BYTES` they are a
field of the iteration's event (`IterationCompleted.trajectories`): recording them costs no
more writes than the event, and the hash chain covers them. Larger ones go where large
checkpoint states go: a content-addressed blob stored in the same append, which the event
names (`trajectories_ref`) and `verify` checks against its address. (A blob for every
iteration cost a third of the runtime's iterations per second on `bench_runtime`'s 100-job
run; the event field costs a few percent. 64 KiB holds the built-in learning task's 256
trajectories of an iteration, steps and features included.) An iteration that a recovery superseded keeps its
trajectories on record, marked superseded as its event is.

Reading one iteration's trajectories looks up the job's rows as stored (`stored_stream`), and
decodes only what it needs: the iteration number of each iteration event (a Struct of that
one field, the rest skipped), then the whole events of that iteration and the recoveries
(which mark runs superseded), and at most their blobs. Nothing else of the stream is decoded,
and no time or hash is read. (On a crashed 1M-event log of 1,000 jobs, cProfile put the
Python side of a read at ~8 ms of its ~18 before, ~0.6 ms after; what is left is SQLite's
point lookups over the job's ~1,000 versions: it grows with the job, not with the log.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from . import codec
from .errors import LogCorrupted
from .events import IterationCompleted, JobRecovered, event_tag
from .spec import TrainingQuery
from .tasks import Trajectory

__all__ = ["INLINE_MAX_BYTES", "RecordedTrajectory", "TrajectoryGroup", "attach",
           "encode_groups", "iteration_result", "read", "select_stored"]

INLINE_MAX_BYTES = 65536
"""Encoded trajectories up to this size are kept in the iteration's event; larger, a blob."""


class TrajectoryGroup(msgspec.Struct, frozen=True, array_like=True):
    """One query of an iteration and its trajectories, as the blob stores them."""

    query: str
    trajectories: list[Trajectory]


class RecordedTrajectory(msgspec.Struct, frozen=True, kw_only=True):
    """One recorded trajectory, with where it is on record.

    `query_index` and `index` place it in its iteration's batch (query, then trajectory);
    `superseded` is True when a recovery re-ran its iteration (the re-run is on record too);
    `position` is the log position of its iteration's event. `data` is what the task's
    rollout returned, when it could be encoded (None otherwise).
    """

    job_id: str
    iteration: int
    query_index: int
    index: int
    query: str
    reward: float
    success: bool
    steps: int
    tokens: int
    cost_usd: float
    failed: bool
    error: str | None
    data: Any
    superseded: bool
    position: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[TrajectoryGroup])


def encode_groups(queries: Sequence[TrainingQuery], groups: Sequence[Sequence[Trajectory]]
                  ) -> bytes:
    """The blob of an iteration's trajectories, in the fixed order (query, then index).

    A trajectory whose `data` cannot be encoded is recorded without it.
    """
    batch = [TrajectoryGroup(q.query, list(g)) for q, g in zip(queries, groups)]
    try:
        return _encoder.encode(batch)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return _encoder.encode([
            TrajectoryGroup(g.query, [t if _encodes(t.data) else msgspec.structs.replace(
                t, data=None) for t in g.trajectories]) for g in batch])


def attach(result: IterationCompleted, queries: Sequence[TrainingQuery],
           groups: Sequence[Sequence[Trajectory]], blobs: list[bytes]) -> IterationCompleted:
    """`result` with its trajectories on record: in the event, or (large) as a blob added to
    the append's `blobs`."""
    encoded = encode_groups(queries, groups)
    if len(encoded) <= INLINE_MAX_BYTES:
        return msgspec.structs.replace(result, trajectories=encoded)
    blobs.append(encoded)
    return msgspec.structs.replace(result, trajectories_ref=codec.digest(encoded))


def _encodes(value: Any) -> bool:
    try:
        _encoder.encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return False
    return True


def decode_groups(blob: bytes, where: str) -> list[TrajectoryGroup]:
    """Decode a trajectories blob.

    Raises:
        LogCorrupted: the blob is not a list of trajectory groups (`where` says whose).
    """
    try:
        return _decoder.decode(blob)
    except msgspec.DecodeError as exc:
        raise LogCorrupted(f"{where}: the trajectories blob does not decode: {exc}") from None


class _Iteration(msgspec.Struct):
    event: IterationCompleted
    position: int
    superseded: bool = False


class _IterationNumber(msgspec.Struct):
    """The one field of an iteration event that says whether a read wants it."""

    iteration: int


_ITERATION_TAG = event_tag(IterationCompleted)
_RECOVERED_TAG = event_tag(JobRecovered)
_iteration_number = msgspec.msgpack.Decoder(_IterationNumber)


def select_stored(path: str, rows: Iterable[tuple[int, int, str, int, bytes]],
                  iteration: int | None = None) -> list[_Iteration]:
    """The job's iteration events that name trajectories (of `iteration`, or all), in log
    order, each marked superseded when a later recovery rewound to before it; from the
    stream's rows as stored (`EventStore.stored_stream`), decoding only those iteration events
    and the recoveries.

    Raises:
        LogCorrupted: one of those rows does not decode (the message names its position).
    """
    seen: list[_Iteration] = []
    current = IterationCompleted.schema_version
    for position, _version, type_, schema_version, data in rows:
        try:
            if type_ == _ITERATION_TAG:
                if iteration is not None and schema_version == current \
                        and _iteration_number.decode(data).iteration != iteration:
                    continue
                event = codec.decode_event(type_, schema_version, data)
                assert isinstance(event, IterationCompleted)
                if iteration is None or event.iteration == iteration:
                    seen.append(_Iteration(event, position))
            elif type_ == _RECOVERED_TAG:
                recovered = codec.decode_event(type_, schema_version, data)
                assert isinstance(recovered, JobRecovered)
                start = recovered.from_checkpoint or 0
                for item in seen:
                    if item.event.iteration > start:
                        item.superseded = True
        except (msgspec.DecodeError, LogCorrupted) as exc:
            raise LogCorrupted(f"{path}, position {position}: {exc}") from None
    return [item for item in seen if item.event.trajectories is not None
            or item.event.trajectories_ref is not None]


class _Blobs(Protocol):
    path: str

    def stored_stream(self, stream: str, from_version: int = 1
                      ) -> Iterable[tuple[int, int, str, int, bytes]]: ...

    def get_blob(self, digest: str) -> bytes: ...


def read(store: _Blobs, job_id: str, *, iteration: int | None = None,
         success: bool | None = None, min_reward: float | None = None,
         limit: int | None = None) -> list[RecordedTrajectory]:
    """A job's recorded trajectories in log order (iteration, query, index), filtered.

    Args:
        iteration: only this iteration's (its superseded runs included, marked).
        success: only successful (True) or unsuccessful (False) ones.
        min_reward: only those with at least this reward.
        limit: at most this many.

    Raises:
        BlobNotFound, LogCorrupted: a named blob is missing or does not match its address.
    """
    keep: Callable[[Trajectory], bool] = lambda t: (  # noqa: E731
        (success is None or t.success is success)
        and (min_reward is None or t.reward >= min_reward))
    found: list[RecordedTrajectory] = []
    for item in select_stored(store.path, store.stored_stream(job_id), iteration):
        event = item.event
        encoded = event.trajectories
        if encoded is None:
            assert event.trajectories_ref is not None
            encoded = store.get_blob(event.trajectories_ref)
        where = f"{store.path}, job {job_id!r}, iteration {event.iteration}"
        for q, group in enumerate(decode_groups(encoded, where)):
            for i, t in enumerate(group.trajectories):
                if not keep(t):
                    continue
                found.append(RecordedTrajectory(
                    job_id=job_id, iteration=event.iteration, query_index=q, index=i,
                    query=group.query, reward=t.reward, success=t.success, steps=t.steps,
                    tokens=t.tokens, cost_usd=t.cost_usd, failed=t.failed, error=t.error,
                    data=t.data, superseded=item.superseded, position=item.position))
                if limit is not None and len(found) >= limit:
                    return found
    return found


def iteration_result(iteration: int, groups: list[list[Trajectory]],
                      metrics: dict[str, float]) -> IterationCompleted:
    """The iteration's summary, in one pass over its trajectories (this runs every step)."""
    n = n_failed = successes = tokens = 0
    cost = 0.0
    ok: list[float] = []
    for group in groups:
        for t in group:
            n += 1
            tokens += t.tokens
            cost += t.cost_usd
            if t.success:
                successes += 1
            if t.failed:
                n_failed += 1
            else:
                ok.append(t.reward)
    mean = sum(ok) / len(ok) if ok else 0.0
    std = (sum((r - mean) ** 2 for r in ok) / len(ok)) ** 0.5 if ok else 0.0
    return IterationCompleted(
        iteration=iteration,
        avg_reward=mean,
        std_reward=std,
        loss=float(metrics.get("loss", 0.0)),
        success_rate=successes / max(1, n),
        metrics={k: float(v) for k, v in metrics.items() if k != "loss"},
        n_trajectories=n,
        n_failed=n_failed,
        tokens=tokens,
        cost_usd=cost,
    )
