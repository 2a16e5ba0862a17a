"""Validated input types: what a user submits.

msgspec validates on decode, so every spec crosses the boundary through `validate_spec`, which
turns a msgspec ValidationError into a `SpecError` naming the field path.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import msgspec

from .errors import SpecError, one_line

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
UPPER_BOUNDS = {"rollout_timeout_s": 7 * 24 * 3600.0, "max_budget_usd": 1e12,
                "checkpoint_interval": 1_000_000}
"""Bounds of the `GRPOConfig` fields that have none in their type: checked on submit, not on
reading a log, so that a job recorded before they existed still replays. (An infinite
timeout is `None`; one that overflows a wait stopped every job's timeouts.)"""

JOB_ID_PATTERN = "[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}"
"""Job ids end up in file names (recorded histories, reports): 1-128 characters of a safe
set, not starting with `.`."""
_JOB_ID = re.compile(JOB_ID_PATTERN)


class TrainingQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One training query and the outcome that counts as success."""

    query: Annotated[str, msgspec.Meta(min_length=1)]
    expected_outcome: dict[str, Any] = {}
    kind: str | None = None


class GRPOConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Hyper-parameters of one GRPO training job."""

    n_iterations: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=128)] = 4
    n_trajectories_per_query: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    learning_rate: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.1
    max_budget_usd: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    checkpoint_interval: Annotated[int, msgspec.Meta(ge=1)] = 5
    max_steps_per_trajectory: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    gamma: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.99
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    max_parallel_rollouts: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    rollout_timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    keep_checkpoints: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    eval_fraction: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.2
    record_trajectories: bool = True
    """Keep each iteration's trajectories on record (`Runtime.trajectories`)."""


class JobSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything needed to run (and re-run, after a crash) one training job."""

    agent_id: NonEmptyStr
    training_data: Annotated[list[TrainingQuery], msgspec.Meta(min_length=1)]
    config: GRPOConfig = GRPOConfig()
    task: NonEmptyStr = "simulated"
    task_options: dict[str, Any] = {}
    priority: Annotated[int, msgspec.Meta(ge=-1_000_000, le=1_000_000)] = 0


def validate_spec(value: Any) -> JobSpec:
    """Return a validated JobSpec from a JobSpec or JSON-like data.

    A JobSpec built in Python is not validated by its constructor, so it is round-tripped through
    the decoder: the single place where constraints are checked.

    Raises:
        SpecError: naming the field path, e.g. ``$.config.batch_size``.
    """
    try:
        raw = msgspec.to_builtins(value)
        spec = msgspec.convert(raw, JobSpec)
    except (TypeError, msgspec.EncodeError, msgspec.ValidationError) as exc:
        raise SpecError(f"invalid job spec: {one_line(str(exc))}") from None
    except (UnicodeError, OverflowError) as exc:
        raise SpecError(f"invalid job spec: {type(exc).__name__}: {one_line(str(exc))} - at "
                        f"`{_unencodable_path(value)}`") from None
    _require_storable(spec)
    _require_finite(msgspec.to_builtins(spec))
    for name, bound in UPPER_BOUNDS.items():
        value = getattr(spec.config, name)
        if value is not None and value > bound:
            raise SpecError(f"invalid job spec: Expected a value <= {bound:g}, got {value!r} "
                            f"- at `$.config.{name}`")
    return spec


def validate_job_id(job_id: Any) -> str:
    """Return `job_id` if it is a valid job id.

    Raises:
        SpecError: saying which characters and length are allowed.
    """
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise SpecError(f"invalid job id {job_id!r}: use 1-128 characters of A-Z a-z 0-9 "
                        f"and . _ : - (not starting with .)")
    return job_id


def _require_finite(value: Any, path: str = "$") -> None:
    """NaN and infinities do not survive the JSON of an exported history: refuse them,
    naming the first one's path."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"invalid job spec: {value!r} is not a finite number - at `{path}`")
    items = (value.items() if isinstance(value, dict) else
             enumerate(value) if isinstance(value, list) else ())
    for key, item in items:
        _require_finite(item, path + (f"[{key}]" if isinstance(key, int)
                                      else f".{one_line(str(key))}"))


def _unencodable_path(value: Any, path: str = "$") -> str:
    """The path of the first value inside `value` that the log cannot encode."""
    items = (value.items() if isinstance(value, dict) else
             enumerate(value) if isinstance(value, (list, tuple)) else ())
    for key, item in items:
        if not _encodable({key: item} if isinstance(value, dict) else item):
            step = f"[{key}]" if isinstance(key, int) else f".{one_line(str(key))}"
            return _unencodable_path(item, path + step) if _encodable(key) else path + step
    return path


def _encodable(value: Any) -> bool:
    try:
        msgspec.msgpack.encode(value)
    except (UnicodeError, OverflowError, TypeError, msgspec.EncodeError):
        return False
    return True


def _require_storable(spec: JobSpec) -> None:
    """A spec must fit the log's encoding (64-bit integers, valid Unicode); the error names
    the first value that does not."""
    if not _encodable(spec):
        raise SpecError(f"invalid job spec: the log cannot store it (an integer beyond 64 bits "
                        f"or a string that is not valid Unicode) - at "
                        f"`{_unencodable_path(msgspec.to_builtins(spec))}`")
