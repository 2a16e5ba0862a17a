"""The job events: immutable facts, the only thing the log stores about a job.

Each event is a frozen, keyword-only msgspec Struct with an explicit string tag (never the class
name, so a rename cannot break a log) and a schema version. Events carry domain data only: the
store stamps position, stream, version and time on the envelope (`RecordedEvent`).
Evolve additively: a new field gets a default; a tag or a field's type never changes — a change
that cannot be additive is a new schema version with an upcaster in `codec`.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar, Literal

import msgspec

from .spec import JobSpec

Digest = str  # hex SHA-256


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every job event."""

    schema_version: ClassVar[int] = 1


class JobSubmitted(Event, tag="job.submitted", kw_only=True):
    """A job was accepted; its spec is all a restarted process needs to run it."""

    spec: JobSpec


class JobStarted(Event, tag="job.started", kw_only=True):
    """The scheduler admitted the job: it now holds an actor and runs iterations."""


class IterationCompleted(Event, tag="job.iteration_completed", kw_only=True):
    """One GRPO iteration finished and its policy update is part of the job's state.

    Cost counts every trajectory of the iteration, failed ones included.
    """

    schema_version: ClassVar[int] = 2
    iteration: int
    avg_reward: float
    std_reward: float
    loss: float
    success_rate: float = 0.0
    metrics: dict[str, float] = {}
    n_trajectories: int = 0
    n_failed: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    trajectories: bytes | None = None
    """The iteration's trajectories (`flowactors.trajectories`), encoded, when
    `GRPOConfig.record_trajectories` was on and they are small enough to keep in the event."""
    trajectories_ref: Digest | None = None
    """Else the blob holding them, stored where checkpoint states are."""


class CheckpointSaved(Event, tag="job.checkpoint_saved", kw_only=True):
    """The full trainer state after `iteration` is stored in the blob `state_ref`.

    Schema 2: `optimizer_digest` and `rng_digest` are None when the trainer state has no
    `optimizer` / `rng` (schema 1 recorded the digest of None there).
    """

    schema_version: ClassVar[int] = 2
    iteration: int
    state_ref: Digest
    validation_score: float
    metrics: dict[str, float] = {}
    policy_digest: Digest
    optimizer_digest: Digest | None
    rng_digest: Digest | None
    state_digest: Digest
    state_size: int | None = None  # bytes of the state; None in logs written before 0.2
    state_location: str | None = None  # the checkpoint store holding it; None: the log itself


class CheckpointsPruned(Event, tag="job.checkpoints_pruned", kw_only=True):
    """These checkpoints were dropped; `released` blobs are no longer referenced by the job."""

    iterations: list[int]
    released: list[Digest] = []


class BudgetThresholdReached(Event, tag="job.budget_threshold_reached", kw_only=True):
    """The recorded cost crossed `fraction` (0.75, 0.9) of the job's budget."""

    fraction: float
    cost_usd: float
    budget_usd: float


class JobPaused(Event, tag="job.paused", kw_only=True):
    """The job stopped at an iteration boundary; `state_ref` holds its trainer state if it had run."""

    iteration: int
    state_ref: Digest | None = None
    state_size: int | None = None
    state_location: str | None = None  # the checkpoint store holding it; None: the log itself


class JobResumed(Event, tag="job.resumed", kw_only=True):
    """A paused job is queued again; it continues from where it paused."""


class JobCancelled(Event, tag="job.cancelled", kw_only=True):
    """Terminal: the job was cancelled; nothing of an interrupted iteration was recorded."""

    iteration: int
    reason: str = "requested"
    state_digest: Digest


class JobCompleted(Event, tag="job.completed", kw_only=True):
    """Terminal: all iterations ran; `final_state_ref` is the trained state (a blob)."""

    iteration: int
    final_state_ref: Digest
    final_state_digest: Digest
    validation_score: float
    state_digest: Digest
    final_state_size: int | None = None
    final_state_location: str | None = None  # the checkpoint store holding it; None: the log


FailureReason = Literal[
    "task_error", "budget_exhausted", "restarts_exhausted", "checkpoint_unstorable"]


class JobFailed(Event, tag="job.failed", kw_only=True):
    """Terminal: the job failed; the error's type and message say why."""

    iteration: int
    reason: FailureReason
    error_type: str
    message: str
    state_digest: Digest


class JobRecovered(Event, tag="job.recovered", kw_only=True):
    """The job's actor was lost (crash or supervisor restart) and it restarts from a checkpoint.

    Replay rewinds progress, metrics, best checkpoint and budget thresholds to `from_checkpoint`
    (or to the initial state when None); recorded cost still counts.
    """

    from_checkpoint: int | None
    attempt: int
    cause: Literal["crash", "restart"] = "crash"


class JobForked(Event, tag="job.forked", kw_only=True):
    """The job starts from checkpoint `at_iteration` of job `parent_id`, sharing its trainer
    state (the blob `state_ref`, not a copy): recorded after the child's `JobSubmitted`.

    The checkpoint's record is the child's first checkpoint, so a recovery rewinds to it.
    """

    parent_id: str
    at_iteration: int
    state_ref: Digest
    validation_score: float
    metrics: dict[str, float] = {}
    policy_digest: Digest
    optimizer_digest: Digest | None
    rng_digest: Digest | None


class ForkCreated(Event, tag="job.fork_created", kw_only=True):
    """A job `child_id` was forked from this job's checkpoint `at_iteration` (lineage only:
    nothing of this job's training changes)."""

    child_id: str
    at_iteration: int


JobEvent = (
    JobSubmitted
    | JobStarted
    | IterationCompleted
    | CheckpointSaved
    | CheckpointsPruned
    | BudgetThresholdReached
    | JobPaused
    | JobResumed
    | JobCancelled
    | JobCompleted
    | JobFailed
    | JobRecovered
    | JobForked
    | ForkCreated
)

EVENT_TYPES: tuple[type[Event], ...] = JobEvent.__args__  # type: ignore[attr-defined]


def event_tag(cls: type[Event]) -> str:
    """The stored type string of an event class."""
    return cls.__struct_config__.tag  # type: ignore[return-value]


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as the log stored it: the envelope the store stamped, and the event.

    `hash` is the row's link in the log's hash chain (hex), when it came from a log.
    """

    position: int
    stream: str
    version: int
    type: str
    schema_version: int
    recorded_at: datetime
    event: JobEvent
    hash: str = ""
