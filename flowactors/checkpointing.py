"""Where trainer states go, and how the runtime keeps the checkpoint files true to the log.

A state of at most `inline_max_bytes` travels with its event into the log (one transaction, one
fsync: cheapest for small states). A larger one is first made durable in the checkpoint store
(`flowactors.filestore.FileCheckpoints`); only then is the event naming it — with its address,
size and location — appended. So a crash between the two leaves at most a file no event names:
an orphan, which the next open sweeps, with every other file no job's folded state needs any
more (`flowactors.liveness`). The open checks the files' presence and size; `verify` and every
load check their content.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from . import codec
from .errors import BlobNotFound, CheckpointUnstorable, FlowError
from .events import Digest
from .faults import fault_point
from .filestore import FileCheckpoints, default_location
from .job import JobState
from .liveness import STORING_EVENTS, StoredState, live_states, stored_states
from .logs import get_logger
from .replay import replay
from .store import EventStore

log = get_logger(__name__)

__all__ = ["INLINE_MAX_BYTES", "StateStore", "StoredBlob", "open_state_store",
           "verify_files"]

INLINE_MAX_BYTES = 128 << 10
"""States up to this size stay in the log: measured (`tools/bench_checkpoints.py`), a state in
the log's transaction costs less than a file's own two fsyncs up to 64 KiB and more from
256 KiB on; 128 KiB is between the two."""

PUT_ATTEMPTS = 3
PUT_BACKOFF_SECONDS = 0.2  # doubled after each failed attempt


class StoredBlob(msgspec.Struct, frozen=True, kw_only=True):
    """A state made durable: its address, size, and location (None: it goes into the log
    with its event, so the event's append carries the bytes)."""

    address: Digest
    size: int
    location: str | None


class StateStore:
    """The log's blobs and the checkpoint files, as one place to store and load states.

    Args:
        log: the event log (small states and every old log's states live in it).
        files: the checkpoint store for larger states.
        jobs: every job's folded state now (which files are live is derived from them).
        inline_max_bytes: the largest state kept in the log.
    """

    def __init__(self, log: EventStore, files: FileCheckpoints,
                 jobs: Callable[[], Iterable[JobState]] = tuple, *,
                 inline_max_bytes: int = INLINE_MAX_BYTES) -> None:
        self.log = log
        self.files = files
        self.jobs = jobs
        self.location = files.url
        self.inline_max_bytes = inline_max_bytes
        self._lock = threading.Lock()
        self._pending: dict[Digest, int] = {}  # stored, its event not yet appended

    # --- storing and loading ---

    def store(self, blob: bytes) -> StoredBlob:
        """Make a state durable (a large one in the checkpoint store) before its event is
        appended; call `settled` once the event is appended or abandoned.

        Raises:
            CheckpointUnstorable: the checkpoint store refused it `PUT_ATTEMPTS` times.
        """
        if len(blob) <= self.inline_max_bytes:
            return StoredBlob(address=codec.digest(blob), size=len(blob), location=None)
        delay = PUT_BACKOFF_SECONDS
        for attempt in range(1, PUT_ATTEMPTS + 1):
            try:
                address = self.files.put(blob)
                with self._lock:  # a release deleting the same bytes meanwhile is seen here
                    if self.files.size(address) != len(blob):
                        address = self.files.put(blob)
                    self._pending[address] = self._pending.get(address, 0) + 1
                fault_point("checkpoint.stored")  # durable, its event not yet appended
                return StoredBlob(address=address, size=len(blob), location=self.location)
            except (OSError, FlowError, ValueError) as exc:
                log.warning("checkpoint_put_failed", attempt=attempt, size=len(blob),
                            location=self.location, error=repr(exc))
                if attempt == PUT_ATTEMPTS:
                    raise CheckpointUnstorable(
                        f"a state of {len(blob)} bytes could not be stored in "
                        f"{self.location} ({PUT_ATTEMPTS} attempts): {exc}") from exc
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def settled(self, stored: StoredBlob) -> None:
        """The event naming `stored` was appended (or will never be): it is the log's now."""
        if stored.location is None:
            return
        with self._lock:
            left = self._pending.get(stored.address, 0) - 1
            if left > 0:
                self._pending[stored.address] = left
            else:
                self._pending.pop(stored.address, None)

    def get(self, address: Digest) -> bytes:
        """A state's bytes, checked against their address, wherever they are.

        Raises:
            BlobNotFound: neither in the log nor in the checkpoint store.
            LogCorrupted: the bytes do not match the address.
        """
        try:
            return self.log.get_blob(address)
        except BlobNotFound:
            pass
        return self.files.get(address)

    def release(self, addresses: Iterable[Digest], releasing: JobState) -> None:
        """Delete the checkpoint files among `addresses` that no job needs, once the event
        that let them go is durable (call it after the append, with `releasing` the state of
        the job that let them go, folded with it)."""
        wanted = list(addresses)
        if not wanted:
            return
        others = (s for s in self.jobs() if s.job_id != releasing.job_id)
        live = live_states([releasing, *others])
        with self._lock:
            for address in wanted:
                if address not in live and address not in self._pending \
                        and self.files.has(address):
                    self.files.delete(address)
                    log.info("checkpoint_file_deleted", address=address)

    # --- checks ---

    def open_check(self, states: dict[str, JobState]) -> list[str]:
        """On open: delete files no job needs (orphans of a crash, releases a crash cut
        short, unfinished writes); check each needed file's presence and size. Returns the
        problems found, each naming its checkpoint (empty: all is well)."""
        for name in self.files.leftovers():
            self.files.remove_leftover(name)
        files = self.files.files()
        live = live_states(states.values())
        for address in files.keys() - live:
            self.files.delete(address)
            log.info("checkpoint_file_swept", address=address)
        return self._missing(states, files)

    def _missing(self, states: dict[str, JobState], files: dict[str, int]) -> list[str]:
        problems = []
        for ref in self._needed(states):
            size = files.get(ref.address)
            if size is None:
                problems.append(f"{ref.describe()}: checkpoint file {ref.address} is missing "
                                f"from {self.location}")
            elif size != ref.size:
                problems.append(f"{ref.describe()}: checkpoint file {ref.address} has "
                                f"{size} bytes, the log recorded {ref.size}")
        return problems

    def _needed(self, states: dict[str, JobState]) -> list[StoredState]:
        """The states in the checkpoint store that some job needs, as their events say."""
        outside = {a for a in live_states(states.values()) if not self.log.has_blob(a)}
        if not outside:  # every needed state is in the log: no need to read the events
            return []
        stored = stored_states(self.log.read_types(STORING_EVENTS))
        return [ref for address, ref in stored.items() if address in outside]

    def verify(self, states: dict[str, JobState]) -> tuple[int, str | None]:
        """Check every needed checkpoint file: present, of its size, matching its address.
        Returns (files checked, the first problem naming its checkpoint, or None)."""
        checked = 0
        for ref in self._needed(states):
            size = self.files.size(ref.address)
            if size is None:
                return checked, (f"{ref.describe()}: checkpoint file {ref.address} is missing "
                                 f"from {self.location}")
            if size != ref.size:
                return checked, (f"{ref.describe()}: checkpoint file {ref.address} has {size} "
                                 f"bytes, the log recorded {ref.size}")
            try:
                self.files.get(ref.address)
            except FlowError as exc:
                return checked, f"{ref.describe()}: {exc}"
            checked += 1
        return checked, None


def open_state_store(log: EventStore, log_path: str | os.PathLike[str], where: Any,
                     jobs: Callable[[], Iterable[JobState]] = tuple, *,
                     create: bool = True) -> StateStore:
    """The state store of a runtime (or, with `create=False`, of a reader): `where` is None
    (a directory beside the log), a path or fsspec URL, or a `FileCheckpoints`."""
    if where is None:
        where = default_location(log_path)
    files = where if isinstance(where, FileCheckpoints) else FileCheckpoints(where,
                                                                             create=create)
    return StateStore(log, files, jobs)


def verify_files(log: EventStore, log_path: str | os.PathLike[str], where: Any = None
                 ) -> tuple[int, str | None]:
    """`StateStore.verify` for a log opened to read: (files checked, first problem)."""
    states = replay(log.read_all())
    return open_state_store(log, log_path, where, create=False).verify(states)
