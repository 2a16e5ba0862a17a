"""Validated input types: what a user submits.

msgspec validates on decode, so every spec crosses the boundary through `validate_spec`, which
turns a msgspec ValidationError into a `SpecError` naming the field path.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

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
    validation_data: Annotated[list[TrainingQuery], msgspec.Meta(min_length=1)] | None = None
    """The queries every validation score is computed on, never trained on. None: hold out
    `config.eval_fraction` of `training_data` instead (or, with `eval_fraction=0`, score on
    the training data). Last, and left out of state digests while None, so that jobs
    recorded before it existed still replay to their recorded digests."""


_DIGESTED_BEFORE = [name for name in JobSpec.__struct_fields__ if name != "validation_data"]
_SpecAsDigestedBefore = msgspec.defstruct(
    "JobSpec", [(name, Any) for name in _DIGESTED_BEFORE], kw_only=True, frozen=True)


def digest_form(spec: JobSpec | None) -> Any:
    """`spec` as a state digest encodes it: without `validation_data` while that is None, so
    that a job recorded before the field existed keeps the digests its events recorded (the
    MessagePack of a Struct lists its fields in order, and a new one would change it)."""
    if spec is None or spec.validation_data is not None:
        return spec
    return _SpecAsDigestedBefore(**{name: getattr(spec, name) for name in _DIGESTED_BEFORE})


ValidationSet = Literal["validation_data", "held_out", "training_data"]
"""Which queries a job's validation scores are computed on (`JobView.validation_set`)."""


def held_out_count(n_queries: int, eval_fraction: float) -> int:
    """How many of `n_queries` training queries `eval_fraction` holds out (rounded down)."""
    return int(n_queries * eval_fraction)


def validation_set(spec: JobSpec) -> ValidationSet:
    """Which queries `spec`'s validation scores are computed on.

    `training_data` when nothing is held out: `eval_fraction=0`, or a job recorded before a
    split that leaves a side empty was refused.
    """
    if spec.validation_data is not None:
        return "validation_data"
    n = len(spec.training_data)
    return "held_out" if 0 < held_out_count(n, spec.config.eval_fraction) < n else "training_data"


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
    _require_separate_sets(spec)
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


def _require_separate_sets(spec: JobSpec) -> None:
    """A validation score means something only on queries the job never trains on: refuse a
    split that leaves either side empty, and a query on both sides. (Checked on submit, not
    on reading a log: a job recorded before these rules still replays.)"""
    data = spec.training_data
    first_seen: dict[str, int] = {}
    duplicate = None
    for i, query in enumerate(data):
        if duplicate is None and query.query in first_seen:
            duplicate = i
        first_seen.setdefault(query.query, i)
    if spec.validation_data is not None:
        for i, query in enumerate(spec.validation_data):
            if query.query in first_seen:
                raise SpecError(
                    f"invalid job spec: validation query {query.query!r} is also "
                    f"training_data[{first_seen[query.query]}]: the two sets must not overlap "
                    f"- at `$.validation_data[{i}]`")
        return
    fraction = spec.config.eval_fraction
    if fraction == 0:
        return  # asked for: scores on the training data (JobView.validation_set says so)
    n_eval = held_out_count(len(data), fraction)
    if not 0 < n_eval < len(data):
        raise SpecError(
            f"invalid job spec: eval_fraction {fraction:g} of the {len(data)} "
            f"quer{'y' if len(data) == 1 else 'ies'} of training_data holds out {n_eval}, and "
            f"both sides of the split need one; give more training_data, or validation_data, "
            f"or eval_fraction=0 to score on the training data - at `$.config.eval_fraction`")
    if duplicate is not None:
        text = data[duplicate].query
        raise SpecError(
            f"invalid job spec: training query {text!r} is also training_data"
            f"[{first_seen[text]}], so the held-out split could score on a query it trains "
            f"on; remove the duplicate or give validation_data - at "
            f"`$.training_data[{duplicate}]`")


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
