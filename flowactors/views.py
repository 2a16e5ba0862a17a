"""Read models users receive: JobStatus, JobView, CheckpointInfo. Plain data derived by `job.view`."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

import msgspec

from .spec import ValidationSet


class JobStatus(str, Enum):
    """Where a job is in its lifecycle (see DESIGN.md for the allowed transitions)."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    current_iteration: int
    total_iterations: int
    percent_complete: float


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    tokens_consumed: int
    cost_usd: float
    budget_usd: float | None
    budget_remaining_usd: float | None


class JobError(msgspec.Struct, frozen=True, kw_only=True):
    """Why a job failed: the exception's type and message, and the failure reason."""

    type: str
    message: str
    reason: str


class ForkOrigin(msgspec.Struct, frozen=True, kw_only=True):
    """Where a forked job came from: its parent's checkpoint, whose trainer state it shares."""

    parent_id: str
    at_iteration: int
    state_ref: str


class ForkNote(msgspec.Struct, frozen=True, kw_only=True):
    """A job forked from this one, at this one's checkpoint `at_iteration`."""

    child_id: str
    at_iteration: int


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    """A job's status as users see it; every field derives from the job's recorded events."""

    job_id: str
    agent_id: str
    status: JobStatus
    progress: Progress
    metrics: dict[str, float]
    cost: Cost
    best_checkpoint: int | None
    error: JobError | None
    attempts: int
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    task: str = ""
    priority: int = 0
    version: int = 0
    validation_score: float | None = None
    waiting: str | None = None
    """Why an unfinished job makes no progress although nothing is wrong with it: its task
    cannot be loaded here, or no runtime owns its log. Set by whoever serves the view, not by
    the job's events; None otherwise."""
    validation_set: ValidationSet | None = None
    """Which queries `validation_score` and every checkpoint's score were computed on:
    `validation_data` (the spec's own), `held_out` (`eval_fraction` of `training_data`, never
    trained on) or `training_data` (nothing held out: `eval_fraction=0`)."""
    forked_from: ForkOrigin | None = None
    forks: list[ForkNote] = []


class CheckpointInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One saved checkpoint: where it is, how good it was, and digests of what it holds."""

    iteration: int
    validation_score: float
    metrics: dict[str, float]
    pruned: bool
    state_ref: str
    policy_digest: str
    optimizer_digest: str | None
    rng_digest: str | None
