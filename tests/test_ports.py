"""The contract of each port (`flowactors.ports`): every implementation must pass every test
here. Each test runs against the SQLite log and the in-memory implementation (and the
checkpoint store's tests also against checkpoint files in a directory and under `memory://`)."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowactors.codec import encode_event
from flowactors.control import ForkRequest, decode_fork
from flowactors.errors import (
    BlobNotFound,
    ConcurrencyConflict,
    InvalidRequest,
    InvalidTransition,
    LogCorrupted,
    StoreUnavailable,
)
from flowactors.events import IterationCompleted, JobStarted, JobSubmitted
from flowactors.filestore import FileCheckpoints
from flowactors.memory import MemoryCheckpoints, MemoryEventLog, MemoryInbox
from flowactors.ports import CheckpointStore, ControlInbox, EventLog
from flowactors.spec import GRPOConfig, JobSpec, TrainingQuery
from flowactors.store import EventStore, row_hash

SPEC = JobSpec(agent_id="agent-1", training_data=[TrainingQuery(query="2+2?")])
IMPLEMENTATIONS = ["sqlite", "memory"]


def iteration(i: int) -> IterationCompleted:
    return IterationCompleted(iteration=i, avg_reward=0.5, std_reward=0.1, loss=1.0 / i)


@pytest.fixture(params=IMPLEMENTATIONS)
def event_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    log: EventLog = (EventStore(tmp_path / "flow.db", synchronous="off")
                     if request.param == "sqlite" else MemoryEventLog())
    yield log
    log.close()


@pytest.fixture(params=IMPLEMENTATIONS)
def inbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ControlInbox]:
    if request.param == "memory":
        yield MemoryInbox()
        return
    with EventStore(tmp_path / "flow.db", synchronous="off") as store:
        yield store


@pytest.fixture(params=[*IMPLEMENTATIONS, "files", "fsspec-memory"])
def checkpoints(request: pytest.FixtureRequest, tmp_path: Path
                ) -> Iterator[tuple[CheckpointStore, Callable[[str, bytes], None]]]:
    """A checkpoint store, and how to change the bytes stored at an address behind its back."""
    if request.param == "memory":
        store = MemoryCheckpoints()
        yield store, lambda address, data: store._data.__setitem__(address, data)
        return
    if request.param in ("files", "fsspec-memory"):
        url = (str(tmp_path / "flow.db.checkpoints") if request.param == "files"
               else f"memory://contract-{uuid.uuid4().hex}")
        files = FileCheckpoints(url)
        yield files, lambda address, data: files.fs.pipe_file(f"{files.root}/{address}", data)
        return
    path = tmp_path / "flow.db"

    def tamper(address: str, data: bytes) -> None:
        conn = sqlite3.connect(path)
        conn.execute("DROP TRIGGER blobs_no_update")
        conn.execute("UPDATE blobs SET data = ? WHERE digest = ?", (data, address))
        conn.commit()
        conn.close()

    with EventStore(path, synchronous="off") as log:
        yield log.checkpoints, tamper


# --- the event log ---------------------------------------------------------------------


def test_append_records_positions_versions_and_reads_them_back(event_log: EventLog) -> None:
    """Appends get global positions 1, 2, 3... and per-stream versions; every read returns
    exactly what the appends returned."""
    a = event_log.append("a", [JobSubmitted(spec=SPEC), JobStarted()], 0)
    b = event_log.append("b", [JobSubmitted(spec=SPEC)], 0)
    a += event_log.append("a", [iteration(1)], 2)
    assert [(r.position, r.stream, r.version) for r in a + b] == [
        (1, "a", 1), (2, "a", 2), (4, "a", 3), (3, "b", 1)]
    assert [r.event for r in a] == [JobSubmitted(spec=SPEC), JobStarted(), iteration(1)]
    assert list(event_log.read_all()) == sorted(a + b, key=lambda r: r.position)
    assert list(event_log.read_all(2, 3)) == [a[1], b[0]]
    assert list(event_log.read_stream("a")) == a
    assert list(event_log.read_stream("a", from_version=2)) == a[1:]
    assert event_log.stream_version("a") == 3 and event_log.stream_version("x") == 0
    assert event_log.streams() == {"a": 3, "b": 1}
    assert event_log.head() == (4, a[-1].hash)


def test_a_stale_expected_version_is_a_conflict_and_writes_nothing(event_log: EventLog) -> None:
    """An append whose expected version is not the stream's raises ConcurrencyConflict, and
    the log is as before."""
    event_log.append("a", [JobStarted()], 0)
    head = event_log.head()
    for stale in (0, 2):
        with pytest.raises(ConcurrencyConflict, match="'a'"):
            event_log.append("a", [JobStarted()], stale)
    assert event_log.head() == head and event_log.stream_version("a") == 1


def test_append_many_refuses_only_the_conflicting_append(event_log: EventLog) -> None:
    """Each of many appends succeeds or fails on its own."""
    event_log.append("b", [JobStarted()], 0)
    results = event_log.append_many([("a", [JobStarted()], 0), ("b", [JobStarted()], 0),
                                     ("c", [JobStarted(), JobStarted()], 0)])
    assert [r.version for r in results[0]] == [1]
    assert isinstance(results[1], ConcurrencyConflict)
    assert [r.version for r in results[2]] == [1, 2]
    assert event_log.streams() == {"a": 1, "b": 1, "c": 2}


def test_racing_appends_to_one_stream_leave_gap_free_versions(event_log: EventLog) -> None:
    """Threads appending at the version they read: each version is won by one append, the
    others conflict; the stream ends gap-free with one event per success."""
    wins: list[int] = []
    lock = threading.Lock()

    def race() -> None:
        for _ in range(20):
            version = event_log.stream_version("s")
            try:
                event_log.append("s", [JobStarted()], version)
            except ConcurrencyConflict:
                continue
            with lock:
                wins.append(version + 1)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(wins) == list(range(1, len(wins) + 1))
    assert [r.version for r in event_log.read_stream("s")] == sorted(wins)


def test_events_are_hash_chained_and_verify_checks_the_chain(event_log: EventLog) -> None:
    """Each event's hash chains the previous one's over its columns (the same chain for
    every implementation); verify passes and knows an earlier head, not an unknown one."""
    first = event_log.append("a", [JobStarted()], 0)
    early_head = event_log.head()[1]
    event_log.append("b", [JobSubmitted(spec=SPEC), iteration(1)], 0)
    recorded = list(event_log.read_all())
    prev = bytes(32)
    for r in recorded:
        assert r.hash != prev.hex()
        prev = bytes.fromhex(r.hash)
    assert recorded[0] == first[0]
    assert first[0].hash == row_hash(
        bytes(32), 1, "a", 1, "job.started", JobStarted.schema_version,
        first[0].recorded_at.isoformat(timespec="microseconds"),
        encode_event(JobStarted())[2]).hex()
    report = event_log.verify()
    assert report.ok and report.events_checked == 3 and report.head_hash == recorded[-1].hash
    assert event_log.verify(early_head).ok
    unknown = event_log.verify("ab" * 32)
    assert not unknown.ok and "not in the chain" in unknown.problem


def test_bad_appends_are_refused_before_anything_is_written(event_log: EventLog) -> None:
    """No events, a negative version or an empty stream name are errors; nothing is written."""
    with pytest.raises(ValueError):
        event_log.append("a", [], 0)
    with pytest.raises(ValueError):
        event_log.append("a", [JobStarted()], -1)
    with pytest.raises(ValueError):
        event_log.append("", [JobStarted()], 0)
    assert event_log.head()[0] == 0


def test_a_closed_log_refuses_appends(event_log: EventLog) -> None:
    """After close, an append raises StoreUnavailable; close is idempotent."""
    event_log.append("a", [JobStarted()], 0)
    event_log.close()
    with pytest.raises(StoreUnavailable):
        event_log.append("a", [JobStarted()], 1)
    event_log.close()


def test_blobs_live_while_a_stream_references_them(event_log: EventLog) -> None:
    """A blob appended with events is readable by its digest; released by one stream it
    stays while another references it, and goes when the last one releases it."""
    shared, own = b"shared state", b"own state"
    d_shared, d_own = (hashlib.sha256(b).hexdigest() for b in (shared, own))
    event_log.append("a", [JobStarted()], 0, blobs=[shared, own])
    event_log.append("b", [JobStarted()], 0, blobs=[shared])
    assert event_log.get_blob(d_own) == own  # type: ignore[attr-defined]
    event_log.append("a", [JobStarted()], 1, releases=[d_shared, d_own])
    assert event_log.has_blob(d_shared) and not event_log.has_blob(d_own)  # type: ignore
    event_log.append("b", [JobStarted()], 1, releases=[d_shared])
    assert not event_log.has_blob(d_shared)  # type: ignore[attr-defined]
    assert event_log.verify().ok


# --- the control inbox -----------------------------------------------------------------


def test_requests_wait_for_an_answer_then_leave_the_pending_list(inbox: ControlInbox) -> None:
    """Requests get increasing ids and are pending, oldest first, until answered; an answer
    is read back as given."""
    first = inbox.request("job-1", "pause")
    second = inbox.request("job-2", "cancel")
    assert second > first
    assert [(r.id, r.job_id, r.command) for r in inbox.pending_requests()] == [
        (first, "job-1", "pause"), (second, "job-2", "cancel")]
    assert [r.id for r in inbox.pending_requests(after_id=first)] == [second]
    assert inbox.answer_of(first) is None
    inbox.answer(first, "rejected", "job-1 is not running")
    answer = inbox.answer_of(first)
    assert (answer.request_id, answer.outcome, answer.reason) == (
        first, "rejected", "job-1 is not running")
    assert [r.id for r in inbox.pending_requests()] == [second]


def test_a_request_is_answered_once(inbox: ControlInbox) -> None:
    """A second answer, or an answer to no request, is an InvalidTransition."""
    request_id = inbox.request("job-1", "resume")
    inbox.answer(request_id, "applied")
    with pytest.raises(InvalidTransition, match="already answered"):
        inbox.answer(request_id, "rejected", "late")
    with pytest.raises(InvalidTransition, match="no request"):
        inbox.answer(request_id + 100, "applied")
    assert inbox.answer_of(request_id).outcome == "applied"


def test_the_inbox_takes_only_the_control_vocabulary(inbox: ControlInbox) -> None:
    """Commands other than pause/resume/cancel, empty job ids and unknown outcomes are
    refused; nothing is left pending."""
    with pytest.raises(InvalidRequest):
        inbox.request("job-1", "delete")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        inbox.request("", "pause")
    request_id = inbox.request("job-1", "pause")
    with pytest.raises(ValueError):
        inbox.answer(request_id, "maybe")  # type: ignore[arg-type]
    assert [r.id for r in inbox.pending_requests()] == [request_id]


def test_a_fork_request_carries_its_arguments(inbox: ControlInbox) -> None:
    """A fork request carries a ForkRequest that reads back equal; a fork without one, or
    another command with one, is refused and leaves nothing pending."""
    fork = ForkRequest(at_iteration=4, job_id="child", config=GRPOConfig(learning_rate=0.3),
                       task_options={"rollout_seconds": 0.5})
    with pytest.raises(InvalidRequest):
        inbox.request("job-1", "fork")
    with pytest.raises(InvalidRequest):
        inbox.request("job-1", "pause", fork)
    request_id = inbox.request("job-1", "fork", fork)
    (pending,) = inbox.pending_requests()
    assert (pending.id, pending.job_id, pending.command) == (request_id, "job-1", "fork")
    assert decode_fork(pending.args) == fork
    inbox.answer(request_id, "applied")
    assert inbox.pending_requests() == []


# --- the checkpoint store --------------------------------------------------------------


def test_put_returns_the_content_address_and_is_idempotent(checkpoints) -> None:
    """put returns the hex SHA-256 of the bytes, the same again for the same bytes; get
    returns them, has knows them."""
    store, _ = checkpoints
    data = b"\x00policy\xff" * 1000
    address = store.put(data)
    assert address == hashlib.sha256(data).hexdigest()
    assert store.put(data) == address
    assert store.get(address) == data and store.has(address)
    assert not store.has("00" * 32)


def test_get_of_nothing_is_blob_not_found_and_delete_removes(checkpoints) -> None:
    """get of an unknown address raises BlobNotFound; after delete, has is False and get
    raises; deleting nothing is fine."""
    store, _ = checkpoints
    with pytest.raises(BlobNotFound):
        store.get("00" * 32)
    address = store.put(b"state")
    assert store.delete(address)
    assert not store.has(address)
    with pytest.raises(BlobNotFound):
        store.get(address)
    assert store.delete(address)


def test_get_checks_the_bytes_against_their_address(checkpoints) -> None:
    """Bytes changed behind the store's back are refused with LogCorrupted, not served."""
    store, tamper = checkpoints
    address = store.put(b"the real state")
    tamper(address, b"an edited state")
    with pytest.raises(LogCorrupted, match="does not match its address"):
        store.get(address)
