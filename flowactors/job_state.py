"""A job's state as its events leave it, and the digest that pins it.

`JobState` is what `job.evolve` folds a job's events into; `state_digest` is the digest that
checkpoint and terminal events record of it, so `replay --check` can recompute it with today's
code. Pure: no I/O, no clocks.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import msgspec
from msgspec.structs import replace

from .events import CheckpointSaved, Digest, JobCancelled, JobCompleted, JobEvent, JobFailed
from .spec import JobSpec, digest_form
from .views import CheckpointInfo, ForkNote, ForkOrigin, JobError, JobStatus

__all__ = ["CheckpointRecord", "JobState", "ResumePoint", "initial_state", "recorded_digest",
           "state_digest"]


class CheckpointRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint as the state remembers it, with what a recovery to it rewinds to."""

    info: CheckpointInfo
    thresholds: tuple[float, ...]


class ResumePoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where an actor starts: after `iteration`, from the trainer state in blob `state_ref`."""

    iteration: int
    state_ref: Digest


class JobState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything known about one job, rebuilt by folding its events."""

    job_id: str
    spec: JobSpec | None = None
    status: JobStatus = JobStatus.QUEUED
    version: int = 0
    position: int = 0
    iteration: int = 0
    metrics: dict[str, float] = {}
    tokens: int = 0
    cost_usd: float = 0.0
    thresholds: tuple[float, ...] = ()
    checkpoints: tuple[CheckpointRecord, ...] = ()
    resume_point: ResumePoint | None = None
    final_state_ref: Digest | None = None
    final_state_digest: Digest | None = None
    validation_score: float | None = None
    error: JobError | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    forked_from: ForkOrigin | None = None
    forks: tuple[ForkNote, ...] = ()

    @property
    def exists(self) -> bool:
        return self.spec is not None

    @property
    def last_checkpoint(self) -> CheckpointRecord | None:
        return self.checkpoints[-1] if self.checkpoints else None


def initial_state(job_id: str) -> JobState:
    return JobState(job_id=job_id)


def state_digest(state: JobState) -> Digest:
    """Digest of the job's folded state, without its timestamps.

    Timestamps come from the envelope, which does not exist yet when an event is decided; every
    other field is a pure function of the events, so this digest pins `evolve` itself.
    """
    canonical = replace(state, created_at=None, started_at=None, finished_at=None, position=0,
                        spec=digest_form(state.spec))
    # Sorted dict keys: a dict's value, not the order its keys were inserted in (an upcast
    # event may build the same metrics in another order), decides the digest. Struct fields
    # keep their order; fields added since digests were first recorded count only when set,
    # so every digest an older flowactors recorded stays the same.
    data = msgspec.to_builtins(canonical, order="deterministic",
                               builtin_types=(bytes, bytearray, memoryview))
    if data["forked_from"] is None:
        del data["forked_from"]
    if not data["forks"]:
        del data["forks"]
    config = (data.get("spec") or {}).get("config")
    if config is not None and config["record_trajectories"] is True:
        del config["record_trajectories"]
    return hashlib.sha256(msgspec.msgpack.encode(data)).hexdigest()


def recorded_digest(event: JobEvent) -> Digest | None:
    """The digest `event` recorded of the job's state before it, if it records one."""
    match event:
        case CheckpointSaved() | JobCompleted() | JobFailed() | JobCancelled():
            return event.state_digest
        case _:
            return None
