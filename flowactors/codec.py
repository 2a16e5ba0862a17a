"""Encoders and decoders, built once, used at the store boundary; upcasting of old versions.

An event is stored as (type tag, schema version, MessagePack of its fields). Reading an old
schema version decodes it with the old Struct and upcasts it to the current one, so a log
written by an older flowactors stays readable forever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from . import arrays, pieces
from .errors import LogCorrupted
from .events import EVENT_TYPES, CheckpointSaved, Event, IterationCompleted, JobEvent, event_tag

_encoder = msgspec.msgpack.Encoder()
DECODERS: dict[str, tuple[int, Callable[[bytes], Any]]] = {
    event_tag(cls): (cls.schema_version, msgspec.msgpack.Decoder(cls).decode)
    for cls in EVENT_TYPES
}
"""The one decoder table: each event type's current schema version and its decoder (the
store's replay loop calls these directly; anything else goes through `decode_event`)."""
_EVENT_CLASSES: dict[str, type[Event]] = {event_tag(cls): cls for cls in EVENT_TYPES}
CURRENT_VERSIONS: dict[str, int] = {tag: version for tag, (version, _) in DECODERS.items()}


class IterationCompletedV1(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                           tag="job.iteration_completed"):
    """`job.iteration_completed` schema 1: std_reward and success_rate lived in `metrics`."""

    iteration: int
    avg_reward: float
    loss: float
    metrics: dict[str, float] = {}
    n_trajectories: int = 0
    n_failed: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


def _upcast_iteration_v1(old: IterationCompletedV1) -> IterationCompleted:
    metrics = dict(old.metrics)
    return IterationCompleted(
        iteration=old.iteration, avg_reward=old.avg_reward, loss=old.loss,
        std_reward=metrics.get("std_reward", 0.0),
        success_rate=metrics.get("success_rate", 0.0),
        metrics=metrics, n_trajectories=old.n_trajectories, n_failed=old.n_failed,
        tokens=old.tokens, cost_usd=old.cost_usd,
    )


class CheckpointSavedV1(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                        tag="job.checkpoint_saved"):
    """`job.checkpoint_saved` schema 1: every digest was a string, the digest of None (the
    MessagePack `nil`) where the trainer state had no optimizer or RNG."""

    iteration: int
    state_ref: str
    validation_score: float
    metrics: dict[str, float] = {}
    policy_digest: str
    optimizer_digest: str
    rng_digest: str
    state_digest: str


def _upcast_checkpoint_v1(old: CheckpointSavedV1) -> CheckpointSaved:
    """Every value as recorded: the recorded state digests cover the digests of None too, so
    rewriting them would make `replay --check` fail on the old log."""
    return CheckpointSaved(**msgspec.structs.asdict(old))


# (type, old schema version) -> (decoder of the old shape, upcaster to the current Struct)
_UPCASTERS: dict[tuple[str, int], tuple[msgspec.msgpack.Decoder, Callable[[Any], Event]]] = {
    ("job.iteration_completed", 1): (
        msgspec.msgpack.Decoder(IterationCompletedV1), _upcast_iteration_v1),
    ("job.checkpoint_saved", 1): (
        msgspec.msgpack.Decoder(CheckpointSavedV1), _upcast_checkpoint_v1),
}
OLD_SHAPES: dict[tuple[str, int], type[msgspec.Struct]] = {
    ("job.iteration_completed", 1): IterationCompletedV1,
    ("job.checkpoint_saved", 1): CheckpointSavedV1,
}


def encode_event(event: Event) -> tuple[str, int, bytes]:
    """Return (type tag, schema version, MessagePack bytes) of an event."""
    cls = type(event)
    return event_tag(cls), cls.schema_version, _encoder.encode(event)


def encode_append(stream: Any, expected_version: Any, events: Iterable[Event]
                  ) -> tuple[list[Event], list[tuple[str, int, bytes]]]:
    """Check an append's arguments, as every event log takes them, and encode its events.

    Raises:
        ValueError: an empty or non-str stream, a bad expected version, no events.
        TypeError: something that is not an Event.
    """
    if type(stream) is not str or not stream:
        raise ValueError(f"stream must be a non-empty str, not {stream!r}")
    if type(expected_version) is not int or expected_version < 0:
        raise ValueError(f"expected_version must be an int >= 0, not {expected_version!r}")
    events = list(events)
    if not events:
        raise ValueError(f"append to stream {stream!r} needs at least one event")
    try:
        return events, [encode_event(event) for event in events]
    except AttributeError:
        bad = next(e for e in events if not isinstance(e, Event))
        raise TypeError(f"append to stream {stream!r}: {bad!r} is not an Event") from None


def decode_event(type_: str, schema_version: int, data: bytes) -> JobEvent:
    """Decode a stored event, upcasting an old schema version to the current type.

    Raises:
        LogCorrupted: the type or version is unknown to this code, or the bytes do not match it.
    """
    current = CURRENT_VERSIONS.get(type_)
    if current is None:
        raise LogCorrupted(f"unknown event type {type_!r} (schema version {schema_version})")
    try:
        if schema_version == current:
            return DECODERS[type_][1](data)  # type: ignore[no-any-return]
        upcaster = _UPCASTERS.get((type_, schema_version))
        if upcaster is None:
            raise LogCorrupted(
                f"event type {type_!r} has schema version {schema_version}, which this version "
                f"of flowactors does not know (it reads up to {current})")
        decoder, upcast = upcaster
        return upcast(decoder.decode(data))  # type: ignore[return-value]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LogCorrupted(f"event of type {type_!r} does not decode: {exc}") from None


def event_from_builtins(type_: str, schema_version: int, data: Any) -> JobEvent:
    """Build an event from JSON-like data (an exported history line), upcasting old versions.

    Raises:
        LogCorrupted: unknown type or version, or data that does not fit it (naming the field).
    """
    current = CURRENT_VERSIONS.get(type_)
    if current is None:
        raise LogCorrupted(f"unknown event type {type_!r} (schema version {schema_version})")
    if not isinstance(data, dict):
        raise LogCorrupted(f"event data of type {type_!r} must be an object")
    data = {**data, "type": type_}
    try:
        if schema_version == current:
            return msgspec.convert(data, _EVENT_CLASSES[type_], strict=False)
        shape = OLD_SHAPES.get((type_, schema_version))
        if shape is None:
            raise LogCorrupted(
                f"event type {type_!r} has schema version {schema_version}, which this version "
                f"of flowactors does not know (it reads up to {current})")
        return _UPCASTERS[(type_, schema_version)][1](msgspec.convert(data, shape, strict=False))
    except msgspec.ValidationError as exc:
        raise LogCorrupted(f"event of type {type_!r} does not fit its schema: {exc}") from None


def stored_data(data: bytes) -> Any:
    """The stored MessagePack of an event as plain data, exactly as written (for export)."""
    return msgspec.msgpack.decode(data)


def encode(value: Any) -> bytes:
    """The stored bytes of a trainer state: MessagePack, or safetensors when it holds arrays
    (`flowactors.arrays`).

    Raises:
        StateNotStorable: a part of the state cannot be stored (the message names where).
    """
    return arrays.encode(value)


def digest(data: bytes | pieces.Pieces) -> str:
    """The content address of bytes (whole or in pieces): hex SHA-256."""
    return pieces.digest(data)


def digest_of(value: Any) -> str:
    """The digest of a value's stored encoding (`encode`): arrays count bit for bit; large
    `bytes` are hashed where they are, not copied into one encoding first."""
    return pieces.digest(pieces.encode(value))
