"""The ports of persistence: what the runtime needs of an event log, a control inbox and a
checkpoint store, as `typing.Protocol`s, with the values they exchange.

The SQLite log (`flowactors.store.EventStore`) fills all three in one file; `flowactors.memory`
fills each in memory. `tests/contracts.py` holds the behaviour every implementation must show
(each test there runs against both). A port says what, not how: an index fingerprint, a chain
check in another process, a group commit are the SQLite implementation's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Literal, Protocol

import msgspec

from .control import ForkRequest, RequestCommand
from .errors import FlowError
from .events import Event, RecordedEvent

Outcome = Literal["applied", "rejected"]


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `EventLog.verify` found. `ok` is False as soon as one problem is found."""

    ok: bool
    events_checked: int
    blobs_checked: int
    head_position: int
    head_hash: str
    first_bad_position: int | None = None
    problem: str | None = None


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """A request another process left in the inbox. `args` is a fork's `ForkRequest` as
    stored (decode with `control.decode_fork`), None for the other commands."""

    id: int
    job_id: str
    command: RequestCommand
    requested_at: datetime
    args: bytes | None = None


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """The owner's decision on a request: applied, or rejected with a reason."""

    request_id: int
    outcome: Outcome
    reason: str
    answered_at: datetime


class EventLog(Protocol):
    """An append-only log of events in streams (one per job), ordered and hash-chained.

    Positions are global and gap-free from 1; a stream's versions are 1, 2, 3...; each event
    carries the hash of its row chained to the previous one.
    """

    def append(self, stream: str, events: Iterable[Event], expected_version: int, *,
               blobs: Iterable[bytes] = (), releases: Iterable[str] = ()
               ) -> list[RecordedEvent]:
        """Append to a stream at `expected_version`; durable when it returns.

        Raises:
            ConcurrencyConflict: the stream is not at `expected_version`; nothing written.
            StoreUnavailable: the log cannot write (closed, or failed); nothing written.
        """
        ...

    def append_many(self, appends: Sequence[tuple[str, Sequence[Event], int]]
                    ) -> list[list[RecordedEvent] | FlowError]:
        """Many appends; each one's recorded events or the error that refused it."""
        ...

    def read_all(self, from_position: int = 1, to_position: int | None = None
                 ) -> Iterator[RecordedEvent]:
        """Events in position order, `from_position` to `to_position` (inclusive)."""
        ...

    def read_stream(self, stream: str, from_version: int = 1) -> Iterator[RecordedEvent]:
        """One stream's events in version order."""
        ...

    def stream_version(self, stream: str) -> int:
        """The stream's last version; 0 for a stream with no events."""
        ...

    def streams(self) -> dict[str, int]:
        """Every stream with its last version."""
        ...

    def head(self) -> tuple[int, str]:
        """(position of the last event, its hash as hex); (0, 64 zeros) when empty."""
        ...

    def verify(self, expected_head: str | None = None, *,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Check the whole log (chain, positions, versions, decoding, what it stores)."""
        ...

    def close(self) -> None:
        """Finish what is queued and release everything; idempotent."""
        ...


class ControlInbox(Protocol):
    """Control requests for an owner from elsewhere, and the owner's answers."""

    def request(self, job_id: str, command: RequestCommand,
                fork: ForkRequest | None = None) -> int:
        """Leave a request (a fork's with its arguments); return its id (ids increase).

        Raises:
            InvalidRequest: an unknown command, arguments missing or given where none go.
        """
        ...

    def pending_requests(self, after_id: int = 0) -> list[Request]:
        """Requests above `after_id` with no answer yet, oldest first."""
        ...

    def answer(self, request_id: int, outcome: Outcome, reason: str = "") -> None:
        """Answer a request once. Raises InvalidTransition: unknown or answered already."""
        ...

    def answer_of(self, request_id: int) -> Answer | None:
        """The answer to a request; None while it is pending."""
        ...


class CheckpointStore(Protocol):
    """Bytes under their content address (hex SHA-256)."""

    def put(self, data: bytes) -> str:
        """Store bytes durably; return their address. Idempotent."""
        ...

    def get(self, address: str) -> bytes:
        """The bytes at `address`, checked against it.

        Raises:
            BlobNotFound: nothing there. LogCorrupted: the bytes do not match the address.
        """
        ...

    def has(self, address: str) -> bool:
        ...

    def delete(self, address: str) -> bool:
        """Remove the bytes unless something still holds them; return whether they are gone
        (True also for an address with nothing stored)."""
        ...
