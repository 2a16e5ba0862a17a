"""The commands `job.decide` turns into events: the decider's input vocabulary.

Whatever varies (the trainer's results, the stored state's address) arrives in the command, so
`decide` stays pure. Pure: no I/O.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .events import Digest, FailureReason, IterationCompleted
from .spec import JobSpec

__all__ = ["Cancel", "Command", "Fail", "Pause", "RecordCheckpoint", "RecordIteration", "Recover",
           "Resume", "SavedState", "Start", "Submit", "checkpoint_due", "needs_saved_state"]


class Submit(msgspec.Struct, frozen=True, kw_only=True):
    spec: JobSpec


class Start(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Pause(msgspec.Struct, frozen=True, kw_only=True):
    """Pause; a running job's actor passes its trainer state so resuming repeats nothing."""

    state_ref: Digest | None = None
    state_size: int | None = None
    state_location: str | None = None


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Cancel(msgspec.Struct, frozen=True, kw_only=True):
    reason: str = "requested"


class SavedState(msgspec.Struct, frozen=True, kw_only=True):
    """A trainer state the actor stored as a blob, with what the checkpoint records about it."""

    state_ref: Digest
    validation_score: float
    policy_digest: Digest
    optimizer_digest: Digest | None
    rng_digest: Digest | None
    size: int | None = None
    location: str | None = None  # the checkpoint store holding it; None: the log itself


class RecordIteration(msgspec.Struct, frozen=True, kw_only=True):
    """An iteration's results; `saved` is required when a checkpoint is due or it was the last,
    unless `checkpoint_later`: its checkpoint is being written and `RecordCheckpoint` records
    it once durable (never for the last iteration, whose state completes the job)."""

    result: IterationCompleted
    saved: SavedState | None = None
    checkpoint_later: bool = False


class RecordCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint of an iteration already recorded, durable now. Only iterations without
    other events may come between the two (the actor sees to it): the checkpoint then rewinds
    to what the job was at `iteration` — its `metrics` as they were then, its budget
    thresholds as they still are."""

    iteration: int
    saved: SavedState
    metrics: dict[str, float]


class Fail(msgspec.Struct, frozen=True, kw_only=True):
    reason: FailureReason
    error_type: str
    message: str


class Recover(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    cause: Literal["crash", "restart"] = "crash"


Command = (Submit | Start | Pause | Resume | Cancel | RecordIteration | RecordCheckpoint | Fail
           | Recover)


def checkpoint_due(spec: JobSpec, iteration: int) -> bool:
    return iteration % spec.config.checkpoint_interval == 0


def needs_saved_state(spec: JobSpec, iteration: int) -> bool:
    """True when recording `iteration` must come with a stored trainer state."""
    return checkpoint_due(spec, iteration) or iteration >= spec.config.n_iterations
