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
    StateNotStorable,
    StoreLocked,
    StoreUnavailable,
)
from typing import TYPE_CHECKING, Any

from .events import RecordedEvent
from .rollouts import AsyncRollouts, RolloutBackend, ThreadRollouts
from .runtime import Runtime
from .spec import GRPOConfig, JobSpec, TrainingQuery
from .tasks import Task, TrainerState, Trajectory
from .trajectories import RecordedTrajectory
from .views import CheckpointInfo, ForkNote, ForkOrigin, JobStatus, JobView

if TYPE_CHECKING:
    from .rollouts.raycluster import RayRollouts

__all__ = [
    "AsyncRollouts",
    "BlobNotFound",
    "CheckpointInfo",
    "CheckpointNotFound",
    "ConcurrencyConflict",
    "FlowError",
    "ForkNote",
    "ForkOrigin",
    "GRPOConfig",
    "InvalidTransition",
    "JobNotFound",
    "JobSpec",
    "JobStatus",
    "JobView",
    "LogCorrupted",
    "LogNotFound",
    "RayRollouts",
    "RecordedEvent",
    "RecordedTrajectory",
    "RolloutBackend",
    "Runtime",
    "SpecError",
    "StateNotStorable",
    "StoreLocked",
    "StoreUnavailable",
    "Task",
    "ThreadRollouts",
    "TrainerState",
    "TrainingQuery",
    "Trajectory",
]


def __getattr__(name: str) -> Any:
    """`flowactors.RayRollouts` imports Ray (the optional extra) only when it is used."""
    if name == "RayRollouts":
        from .rollouts.raycluster import RayRollouts
        return RayRollouts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
