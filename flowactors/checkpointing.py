"""Where trainer states go, and how the runtime keeps the checkpoint files true to the log.

A state of at most `inline_max_bytes` travels with its event into the log (one transaction, one
fsync: cheapest for small states). A larger one is first made durable in the checkpoint store
(`flowactors.filestore.FileCheckpoints`); only then is the event naming it — with its address,
size and location — appended. So a crash between the two leaves at most a file no event names:
an orphan, which the next open sweeps, with every other file no job's folded state needs any
more (`flowactors.liveness`). The open checks the files' presence and size; `verify` and every
load check their content.

States in the log are kept the same way, with no second bookkeeping: once a pruning event is
durable, `StateStore.release` deletes the blob rows that no job's folded state needs and no
store in flight is about to name (the deletion rides the log's next group commit); the next
open sweeps the rows a crash left in between (states of pruned checkpoints that nothing
needs). Recorded trajectories are blobs too, but no event releases them: they stay.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec

from . import codec
from .errors import BlobNotFound, CheckpointUnstorable, FlowError
from .events import Digest, IterationCompleted, RecordedEvent
from .faults import fault_point
from .filestore import FileCheckpoints, default_location
from .job import JobState
from .liveness import (
    STORING_EVENTS,
    StoredState,
    live_states,
    needed_by,
    pruned_states,
    stored_states,
)
from .logs import get_logger
from .pieces import Pieces
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


def run_now(work: Callable[[], Any]) -> None:
    """Run `work` on the calling thread (what `StateStore.remove_later` does by default)."""
    work()


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
        # runs the removal of discarded files, which is slow (hundreds of megabytes leaving
        # the page cache and the disk): the runtime hands it to its checkpoint writers
        self.remove_later: Callable[[Callable[[], Any]], Any] = run_now
        self._lock = threading.Lock()
        # Stored (in the log's append or a file), its event not yet appended: a release
        # keeps these, whatever the folded states say.
        self._pending: dict[Digest, int] = {}

    # --- storing and loading ---

    def store(self, blob: bytes | Pieces, *, background: bool = False) -> StoredBlob:
        """Make a state durable (a large one in the checkpoint store) before its event is
        appended; call `settled` once the event is appended or abandoned. `background`: no
        one waits for it (`FileCheckpoints.put`).

        Raises:
            CheckpointUnstorable: the checkpoint store refused it `PUT_ATTEMPTS` times.
        """
        if len(blob) <= self.inline_max_bytes:
            address = codec.digest(blob)
            self._hold(address)
            return StoredBlob(address=address, size=len(blob), location=None)
        delay = PUT_BACKOFF_SECONDS
        for attempt in range(1, PUT_ATTEMPTS + 1):
            try:
                address = self.files.put(blob, background=background)
                with self._lock:  # a release deleting the same bytes meanwhile is seen here
                    if self.files.size(address) != len(blob):
                        address = self.files.put(blob, background=background)
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
        self._unhold(stored.address)

    @contextmanager
    def holding(self, address: Digest) -> Iterator[None]:
        """Keep a stored state from being released while an event naming it is appended
        (e.g. a fork's child naming its parent's checkpoint)."""
        self._hold(address)
        try:
            yield
        finally:
            self._unhold(address)

    def _hold(self, address: Digest) -> None:
        """Under the lock: a release deciding meanwhile either sees the hold, or has queued
        its deletion before the append that stores the bytes again is queued."""
        with self._lock:
            self._pending[address] = self._pending.get(address, 0) + 1

    def _unhold(self, address: Digest) -> None:
        with self._lock:
            left = self._pending.get(address, 0) - 1
            if left > 0:
                self._pending[address] = left
            else:
                self._pending.pop(address, None)

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
        """Delete the states among `addresses` that no job needs — blob rows of the log and
        checkpoint files — once the event that let them go is durable (call it after the
        append, with `releasing` the state of the job that let them go, folded with it).

        The same bytes may be needed by another job (two jobs with equal states, a fork
        sharing its parent's checkpoint) or be stored again meanwhile: the decision and the
        queueing of the log's deletion happen under the lock that `store` takes, so an
        append storing them again is queued after the deletion and keeps them.
        """
        wanted = list(addresses)
        if not wanted:
            return
        fault_point("checkpoint.releasing")  # crash tests: released on record, not deleted
        with self._lock:
            others = (s for s in self.jobs() if s.job_id != releasing.job_id)
            live = live_states([releasing, *others])
            unneeded = [a for a in dict.fromkeys(wanted)
                        if a not in live and a not in self._pending]
            in_log = [a for a in unneeded if self.log.has_blob(a)]
            if in_log:
                self.log.delete_blobs(in_log)
                log.info("checkpoint_blobs_deleted", addresses=in_log)
            discarded = []
            for address in unneeded:
                if address not in in_log:
                    name = self.files.discard(address)
                    if name is not None:
                        discarded.append(name)
                        log.info("checkpoint_file_deleted", address=address)
        if discarded:
            self.remove_later(lambda: [self.files.remove_leftover(n) for n in discarded])

    # --- checks ---

    def open_check(self, states: dict[str, JobState]) -> list[str]:
        """On open: delete files no job needs (orphans of a crash, releases a crash cut
        short, unfinished writes) and the log's blob rows of pruned checkpoints no job needs
        (releases a crash cut short); check that each needed state is in the log or in a
        file of its size. Returns the problems found, each naming what needs the state
        (empty: all is well).

        Only the folded states and one read of the blobs table's keys: no event is read
        again (but the few that say where a state outside the log is, if any)."""
        for name in self.files.leftovers():
            self.files.remove_leftover(name)
        files = self.files.files()
        live = live_states(states.values())
        for address in files.keys() - live:
            self.files.delete(address)
            log.info("checkpoint_file_swept", address=address)
        in_log = self.log.blob_digests()
        orphans = sorted((pruned_states(states.values()) - live) & in_log)
        if orphans:
            self.log.delete_blobs(orphans)
            log.info("checkpoint_blobs_swept", addresses=orphans)
        return self._missing(states, files, in_log.difference(orphans))

    def _missing(self, states: dict[str, JobState], files: dict[str, int],
                 in_log: set[Digest]) -> list[str]:
        in_files, problems = self._outside_log(states, in_log)
        for ref in in_files:
            size = files.get(ref.address)
            if size is None:
                problems.append(f"{ref.describe()}: checkpoint file {ref.address} is missing "
                                f"from {self.location}")
            elif size != ref.size:
                problems.append(f"{ref.describe()}: checkpoint file {ref.address} has "
                                f"{size} bytes, the log recorded {ref.size}")
        return problems

    def _outside_log(self, states: dict[str, JobState], in_log: set[Digest]
                     ) -> tuple[list[StoredState], list[str]]:
        """The needed states not in the log: those in the checkpoint store, as their events
        say, and a problem for each of the others (missing), naming what needs it (unless
        the log was written from a recorded history, which has no states)."""
        outside = live_states(states.values()) - in_log
        if not outside:  # every needed state is in the log: no need to read the events
            return [], []
        stored = stored_states(self.log.read_types(STORING_EVENTS))
        needers = needed_by(states.values())
        missing = [f"{needers[a]}: state {a} is missing from the log"
                   for a in sorted(outside - stored.keys()) if self.log.records_states()]
        return [ref for address, ref in stored.items() if address in outside], missing

    def verify(self, states: dict[str, JobState], trajectories: dict[Digest, str] | None = None
               ) -> tuple[int, str | None]:
        """Check that every needed state is in the log or in a checkpoint file (present, of
        its size, matching its address), and that every blob of recorded `trajectories`
        (address: what names it) is in the log. Returns (files checked, the first problem
        naming what needs the missing bytes, or None)."""
        in_log = self.log.blob_digests()
        for address, what in (trajectories or {}).items():
            if address not in in_log:
                return 0, f"{what}: blob {address} is missing from the log"
        in_files, missing = self._outside_log(states, in_log)
        if missing:
            return 0, missing[0]
        checked = 0
        for ref in in_files:
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
    trajectories: dict[Digest, str] = {}
    states = replay(_noting_trajectories(log.read_all(), trajectories))
    return open_state_store(log, log_path, where, create=False).verify(states, trajectories)


def _noting_trajectories(events: Iterable[RecordedEvent], found: dict[Digest, str]
                         ) -> Iterator[RecordedEvent]:
    """The events, noting each blob of recorded trajectories in `found` as they pass."""
    for recorded in events:
        event = recorded.event
        if type(event) is IterationCompleted and event.trajectories_ref is not None:
            found.setdefault(event.trajectories_ref, f"trajectories of iteration "
                             f"{event.iteration} of job {recorded.stream!r}")
        yield recorded
