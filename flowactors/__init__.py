"""flowactors: an embedded, event-sourced actor runtime for long-running RL training jobs."""

from .errors import (
    BlobNotFound,
    CheckpointNotFound,
    ConcurrencyConflict,
    FlowError,
    InvalidTransition,
    JobNotFound,
    LogCorrupted,
    LogNotFound,
    SpecError,
    StoreLocked,
    StoreUnavailable,
)
from .events import RecordedEvent
from .runtime import Runtime
from .spec import GRPOConfig, JobSpec, TrainingQuery
from .tasks import Task, TrainerState, Trajectory
from .views import CheckpointInfo, JobStatus, JobView

__all__ = [
    "BlobNotFound",
    "CheckpointInfo",
    "CheckpointNotFound",
    "ConcurrencyConflict",
    "FlowError",
    "GRPOConfig",
    "InvalidTransition",
    "JobNotFound",
    "JobSpec",
    "JobStatus",
    "JobView",
    "LogCorrupted",
    "LogNotFound",
    "RecordedEvent",
    "Runtime",
    "SpecError",
    "StoreLocked",
    "StoreUnavailable",
    "Task",
    "TrainerState",
    "TrainingQuery",
    "Trajectory",
]
