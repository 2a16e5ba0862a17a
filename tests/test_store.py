"""The append-only SQLite event log: appends, reads, blobs, the inbox, ownership, verification."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from flowactors import codec
from flowactors.errors import (
    BlobNotFound,
    ConcurrencyConflict,
    InvalidTransition,
    LogCorrupted,
    LogNotFound,
    StoreLocked,
    StoreUnavailable,
)
from flowactors.events import (
    IterationCompleted,
    JobStarted,
    JobSubmitted,
    RecordedEvent,
)
from flowactors.spec import JobSpec, TrainingQuery
from flowactors.store import (
    APPLICATION_ID,
    FORMAT_VERSION,
    GENESIS_HASH,
    Answer,
    EventStore,
    Request,
    _Append,
    row_hash,
)
from flowactors.store.writer import Writer

SPEC = JobSpec(agent_id="agent-1", training_data=[TrainingQuery(query="2+2?")])
WAIT = 10  # seconds: a bound on every wait, never a sleep


def iteration(i: int, reward: float = 0.5) -> IterationCompleted:
    return IterationCompleted(iteration=i, avg_reward=reward, std_reward=0.1, loss=1.0 / i,
                              metrics={"kl": 0.01 * i}, n_trajectories=8, tokens=100 * i)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "flow.db"


@pytest.fixture
def store(log_path: Path) -> Iterator[EventStore]:
    with EventStore(log_path) as s:
        yield s


@contextlib.contextmanager
def writer_held(store: EventStore) -> Iterator[None]:
    """Keep the writer thread busy, so that appends submitted meanwhile form one batch."""
    entered, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(WAIT)

    call = store._call_in_writer(hold)
    assert entered.wait(WAIT)
    try:
        yield
    finally:
        release.set()
        call.result()


def writer_sql(store: EventStore, sql: str) -> list:
    """Run SQL on the owner's write connection, in its writer thread (fault injection)."""
    return store._call_in_writer(lambda conn: conn.execute(sql).fetchall()).result()


def tampered_copy(src: Path, dst: Path, *statements: str) -> Path:
    """A copy of a closed log with its triggers dropped and `statements` applied."""
    shutil.copyfile(src, dst)
    conn = sqlite3.connect(dst, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"
                                ).fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    for sql in statements:
        conn.execute(sql)
    conn.close()
    return dst


def filled_log(path: Path, n: int = 6) -> str:
    """A closed log with `n` events over two streams; returns its head hash."""
    with EventStore(path) as s:
        s.append("job-a", [JobSubmitted(spec=SPEC), JobStarted()], 0)
        for i in range(1, n - 1):
            s.append("job-a" if i % 2 else "job-b", [iteration(i)],
                     s.stream_version("job-a" if i % 2 else "job-b"))
        return s.head()[1]


# --- appending and reading ----------------------------------------------------------------

def test_append_returns_stamped_events_that_read_back_identical(store: EventStore) -> None:
    """An append returns the stamped envelopes; read_stream and read_all return them equal."""
    a = store.append("job-a", [JobSubmitted(spec=SPEC), JobStarted()], 0)
    b = store.append("job-b", [JobSubmitted(spec=SPEC)], 0)
    a += store.append("job-a", [iteration(1), iteration(2)], 2)

    assert [(r.position, r.version) for r in a] == [(1, 1), (2, 2), (4, 3), (5, 4)]
    assert [r.type for r in a] == ["job.submitted", "job.started",
                                   "job.iteration_completed", "job.iteration_completed"]
    assert a[2].schema_version == IterationCompleted.schema_version
    assert a[0].recorded_at.tzinfo is not None
    assert a[0].recorded_at.utcoffset() == timezone.utc.utcoffset(None)
    assert list(store.read_stream("job-a")) == a
    assert list(store.read_stream("job-a", from_version=3)) == a[2:]
    assert list(store.read_all()) == sorted(a + b, key=lambda r: r.position)
    assert list(store.read_all(from_position=2, to_position=4)) == [a[1], b[0], a[2]]
    assert store.stream_version("job-a") == 4
    assert store.stream_version("job-x") == 0
    assert store.streams() == {"job-a": 4, "job-b": 1}
    assert store.head()[0] == 5


def test_reads_from_a_readonly_open_match_the_owner(store: EventStore, log_path: Path) -> None:
    """A read-only open sees what the owner acknowledged: events, heads and head hash."""
    for n in (1, 2, 3, 5, 8, 9, 17):  # the read-only head search probes powers of two
        stream = f"job-{n}"
        store.append(stream, [iteration(i) for i in range(1, n + 1)], 0)
    with EventStore(log_path, mode="readonly") as reader:
        assert list(reader.read_all()) == list(store.read_all())
        assert reader.streams() == store.streams()
        assert reader.head() == store.head()
        for stream, version in store.streams().items():
            assert reader.stream_version(stream) == version
            assert list(reader.read_stream(stream)) == list(store.read_stream(stream))
        assert reader.stream_version("nobody") == 0


def test_a_long_stream_reads_back_in_order_across_chunks(store: EventStore) -> None:
    """One append larger than one insert statement, read back through several queries."""
    events = [iteration(i) for i in range(1, 4501)]
    store.append("job-b", [JobStarted()], 0)
    recorded = store.append("job-a", events, 0)
    assert [r.event for r in store.read_stream("job-a")] == events
    assert [r.version for r in store.read_stream("job-a", 255)] == list(range(255, 4501))
    assert list(store.read_all(from_position=2)) == recorded
    assert list(store.read_all(from_position=2000, to_position=2002)) == recorded[1998:2001]
    assert store.verify().ok


def test_a_stale_expected_version_conflicts_and_writes_nothing(store: EventStore) -> None:
    """An append expecting an old version raises ConcurrencyConflict and writes nothing."""
    store.append("job-a", [JobSubmitted(spec=SPEC)], 0)
    head = store.head()
    with pytest.raises(ConcurrencyConflict, match="job-a.*version 1.*expected 0"):
        store.append("job-a", [JobStarted()], 0)
    assert store.head() == head
    assert store.stream_version("job-a") == 1
    assert [r.type for r in store.read_all()] == ["job.submitted"]


def test_a_conflict_does_not_fail_another_streams_append_in_the_same_batch(
        store: EventStore) -> None:
    """Conflicts are checked per append before the batch's transaction: the other commits."""
    store.append("job-a", [JobSubmitted(spec=SPEC)], 0)
    with writer_held(store):
        stale = store._submit("job-a", [JobStarted()], 0)
        fine = store._submit("job-b", [JobSubmitted(spec=SPEC), JobStarted()], 0)
        also_fine = store._submit("job-a", [JobStarted()], 1)
    with pytest.raises(ConcurrencyConflict):
        stale.result()
    b = fine.result()
    a = also_fine.result()
    assert b[0].recorded_at == a[0].recorded_at  # one transaction
    assert [(r.stream, r.version) for r in store.read_all()] == [
        ("job-a", 1), ("job-b", 1), ("job-b", 2), ("job-a", 2)]


@pytest.mark.parametrize("stream, events, expected, error", [
    ("job-a", [], 0, ValueError),
    ("", [JobStarted()], 0, ValueError),
    (7, [JobStarted()], 0, ValueError),
    ("job-a", [JobStarted()], -1, ValueError),
    ("job-a", ["not an event"], 0, TypeError),
])
def test_bad_append_arguments_raise_and_write_nothing(
        store: EventStore, stream, events, expected, error) -> None:
    """Zero events, a non-str or empty stream, a negative version, a non-event: rejected."""
    with pytest.raises(error):
        store.append(stream, events, expected)
    assert store.head()[0] == 0


def test_old_schema_versions_are_upcast_on_read(store: EventStore, log_path: Path) -> None:
    """A row stored with an old schema version reads back as the current event type."""
    old = codec.OLD_SHAPES[("job.iteration_completed", 1)](
        iteration=1, avg_reward=0.25, loss=0.5, metrics={"std_reward": 0.125})
    store.close()
    data = codec.encode(old)
    ts = "2026-01-01T00:00:00+00:00"
    args = (1, "job-a", 1, "job.iteration_completed", 1, ts, data)
    conn = sqlite3.connect(log_path, isolation_level=None)
    conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (*args, row_hash(GENESIS_HASH, *args)))
    conn.close()
    with EventStore(log_path, mode="readonly") as reader:
        [recorded] = reader.read_all()
        assert recorded.schema_version == 1
        assert recorded.event == IterationCompleted(
            iteration=1, avg_reward=0.25, std_reward=0.125, loss=0.5,
            metrics={"std_reward": 0.125})
        assert reader.verify().ok


def test_reopening_continues_the_chain_and_the_versions(log_path: Path) -> None:
    """A new owner continues from the log: heads, positions and the hash chain."""
    with EventStore(log_path) as s:
        s.append("job-a", [JobSubmitted(spec=SPEC)], 0)
        head = s.head()
    with EventStore(log_path) as s:
        assert s.head() == head
        assert s.stream_version("job-a") == 1
        [r] = s.append("job-a", [JobStarted()], 1)
        assert (r.position, r.version) == (2, 2)
        assert s.verify().ok


# --- append-only, enforced by SQLite --------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "UPDATE events SET data = x'00' WHERE position = 1",
    "UPDATE events SET stream = 'other'",
    "DELETE FROM events WHERE position = 1",
    "DELETE FROM events",
    "UPDATE requests SET command = 'cancel'",
    "DELETE FROM requests",
    "UPDATE answers SET outcome = 'rejected'",
    "DELETE FROM answers",
])
def test_update_and_delete_of_log_rows_raise_from_any_connection(
        log_path: Path, sql: str) -> None:
    """Triggers in the file reject UPDATE and DELETE, even from a plain sqlite3 connection."""
    with EventStore(log_path) as s:
        s.append("job-a", [JobSubmitted(spec=SPEC)], 0, blobs=[b"state"])
        s.answer(s.request("job-a", "pause"), "applied")
    conn = sqlite3.connect(log_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute(sql)
    conn.close()
    with EventStore(log_path, mode="readonly") as reader:
        assert reader.verify().ok
        assert reader.head()[0] == 1


def test_blobs_cannot_be_updated_and_a_new_log_keeps_no_reference_table(
        log_path: Path) -> None:
    """A blob row is never updated; a new log has no `blob_refs` table (which blobs live is
    derived from the folded states) and is of the current format."""
    with EventStore(log_path) as s:
        s.append("job-a", [JobStarted()], 0, blobs=[b"state"])
    conn = sqlite3.connect(log_path)
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        conn.execute("UPDATE blobs SET data = x'00'")
    names = {n for n, in conn.execute("SELECT name FROM sqlite_master")}
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    assert "blobs" in names and not {n for n in names if "blob_refs" in n}
    assert version == FORMAT_VERSION == 2
    with EventStore(log_path, mode="readonly") as reader:
        assert reader.get_blob(codec.digest(b"state")) == b"state"


# --- blobs ----------------------------------------------------------------------------------

def test_blobs_are_stored_with_the_append_and_read_by_digest(store: EventStore) -> None:
    """Blobs are content-addressed; a missing digest raises BlobNotFound (a KeyError)."""
    digest = codec.digest(b"trainer state")
    store.append("job-a", [JobStarted()], 0, blobs=[b"trainer state", b"trainer state"])
    assert store.has_blob(digest)
    assert store.get_blob(digest) == b"trainer state"
    with pytest.raises(BlobNotFound, match="no blob 00"):
        store.get_blob("00" * 32)
    with pytest.raises(KeyError):
        store.get_blob("00" * 32)


def test_deleted_blobs_go_with_the_next_commit_and_an_append_queued_after_keeps_them(
        store: EventStore) -> None:
    """`delete_blobs` returns at once; the deletion is committed with (or before) the next
    append, and is ordered before it: an append queued after it storing the same bytes
    keeps them, one storing other bytes does not."""
    shared, own = b"same initial state", b"job-a only"
    d_shared, d_own = codec.digest(shared), codec.digest(own)
    store.append("job-a", [JobStarted()], 0, blobs=[shared, own])
    store.delete_blobs([d_shared, d_own])
    store.append("job-b", [JobStarted()], 0, blobs=[shared])  # queued after the deletion
    assert store.has_blob(d_shared)
    assert not store.has_blob(d_own)
    with pytest.raises(BlobNotFound):
        store.get_blob(d_own)
    store.delete_blobs([d_shared, "00" * 32])  # an absent one is no problem
    store.append("job-b", [iteration(2)], 1)
    assert not store.has_blob(d_shared)
    assert store.blob_digests() == set()
    assert store.verify().ok


def test_a_deletion_with_no_append_after_it_is_committed_alone(log_path: Path) -> None:
    """An idle writer commits a queued deletion by itself; a reader cannot delete."""
    with EventStore(log_path) as s:
        s.append("job-a", [JobStarted()], 0, blobs=[b"state"])
        s.delete_blobs([codec.digest(b"state")])
    with EventStore(log_path, mode="readonly") as reader:
        assert reader.blob_digests() == set()
        with pytest.raises(StoreUnavailable, match="only the owner"):
            reader.delete_blobs([codec.digest(b"state")])


# --- group commit under concurrency (property) ----------------------------------------------

appends_strategy = st.lists(  # per thread: (stream index, number of events) per append
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=6),
    min_size=2, max_size=5)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=appends_strategy)
def test_concurrent_appends_are_gap_free_contiguous_and_read_back(plan) -> None:
    """Threads appending to shared streams: every acknowledged event is stored exactly once,
    positions are 1..N, each stream's versions are 1..n, and verify() passes."""
    with tempfile.TemporaryDirectory() as directory, \
            EventStore(Path(directory) / "p.db") as store:
        acknowledged: list[RecordedEvent] = []
        errors: list[BaseException] = []
        start = threading.Barrier(len(plan))

        def appender(thread: int, appends: list[tuple[int, int]]) -> None:
            try:
                start.wait(WAIT)
                for k, (stream_index, n) in enumerate(appends):
                    stream = f"job-{stream_index}"
                    events = [iteration(100 * thread + 10 * k + j + 1) for j in range(n)]
                    while True:  # the decide-append loop: re-read the version on conflict
                        try:
                            acknowledged.extend(
                                store.append(stream, events, store.stream_version(stream)))
                            break
                        except ConcurrencyConflict:
                            continue
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=appender, args=(i, a)) for i, a in enumerate(plan)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not errors
        assert not any(t.is_alive() for t in threads)

        stored = list(store.read_all())
        assert [r.position for r in stored] == list(range(1, len(stored) + 1))
        assert sorted(acknowledged, key=lambda r: r.position) == stored
        for stream, head in store.streams().items():
            assert [r.version for r in store.read_stream(stream)] == list(range(1, head + 1))
        assert len(stored) == sum(n for appends in plan for _, n in appends)
        report = store.verify()
        assert report.ok, report.problem
        assert (report.head_position, report.head_hash) == store.head()


# --- verification -----------------------------------------------------------------------------

def test_verify_passes_on_an_intact_log_and_reports_progress(tmp_path: Path) -> None:
    """verify() checks every event and blob, reports the head and calls progress."""
    path = tmp_path / "ok.db"
    head = filled_log(path)
    with EventStore(path, mode="readonly") as reader:
        calls: list[tuple[int, int]] = []
        report = reader.verify(head, progress=lambda done, total: calls.append((done, total)))
    assert report.ok and report.problem is None and report.first_bad_position is None
    assert (report.events_checked, report.head_position, report.head_hash) == (6, 6, head)
    assert calls[-1] == (6, 6)


def test_verify_names_the_position_of_an_edited_payload_byte(tmp_path: Path) -> None:
    """Editing one byte of one event's data (triggers dropped on a copy) is found there."""
    filled_log(tmp_path / "ok.db")
    conn = sqlite3.connect(tmp_path / "ok.db")
    data = bytearray(conn.execute("SELECT data FROM events WHERE position = 4").fetchone()[0])
    conn.close()
    data[-1] ^= 0x01
    bad = tampered_copy(tmp_path / "ok.db", tmp_path / "bad.db",
                        f"UPDATE events SET data = x'{data.hex()}' WHERE position = 4")
    with EventStore(bad, mode="readonly") as reader:
        report = reader.verify()
    assert not report.ok
    assert report.first_bad_position == 4
    assert "position 4" in report.problem and "hash" in report.problem
    assert report.events_checked == 3


def test_verify_detects_a_removed_row(tmp_path: Path) -> None:
    """A deleted event leaves a gap in positions; verify() names the missing position."""
    filled_log(tmp_path / "ok.db")
    bad = tampered_copy(tmp_path / "ok.db", tmp_path / "bad.db",
                        "DELETE FROM events WHERE position = 3")
    with EventStore(bad, mode="readonly") as reader:
        report = reader.verify()
    assert not report.ok and report.first_bad_position == 3
    assert "missing" in report.problem


def test_verify_detects_a_swapped_pair_of_rows(tmp_path: Path) -> None:
    """Two events exchanged (hashes moved along) break the chain at the first of them."""
    filled_log(tmp_path / "ok.db")
    bad = tampered_copy(
        tmp_path / "ok.db", tmp_path / "bad.db",
        "UPDATE events SET position = -1 WHERE position = 3",
        "UPDATE events SET position = 3 WHERE position = 4",
        "UPDATE events SET position = 4 WHERE position = -1")
    with EventStore(bad, mode="readonly") as reader:
        report = reader.verify()
    assert not report.ok and report.first_bad_position == 3


def test_verify_with_expected_head_detects_a_cut_off_tail(tmp_path: Path) -> None:
    """A log cut after its head was noted verifies alone, but not against that head."""
    head = filled_log(tmp_path / "ok.db")
    bad = tampered_copy(tmp_path / "ok.db", tmp_path / "cut.db",
                        "DELETE FROM events WHERE position >= 5")
    with EventStore(bad, mode="readonly") as reader:
        assert reader.verify().ok  # nothing inside one file can tell
        report = reader.verify(expected_head=head)
    assert not report.ok
    assert report.head_position == 4 and report.first_bad_position == 5
    assert "cut off" in report.problem


def test_verify_accepts_an_expected_head_the_log_has_grown_past(tmp_path: Path) -> None:
    """A head noted earlier is still in the chain after more appends: the log extends it."""
    path = tmp_path / "ok.db"
    with EventStore(path) as s:
        s.append("job-a", [JobSubmitted(spec=SPEC)], 0)
        earlier = s.head()[1]
        s.append("job-a", [JobStarted()], 1)
        assert s.verify(expected_head=earlier).ok
        assert s.verify(expected_head=GENESIS_HASH.hex()).ok
        assert not s.verify(expected_head="ab" * 32).ok


def test_verify_and_reads_report_an_event_that_does_not_decode(tmp_path: Path) -> None:
    """A row whose chain is consistent but whose data is not an event: LogCorrupted there."""
    filled_log(tmp_path / "ok.db")
    conn = sqlite3.connect(tmp_path / "ok.db")
    rows = conn.execute("SELECT position, stream, version, type, schema_version, recorded_at,"
                        " data FROM events ORDER BY position").fetchall()
    conn.close()
    prev, statements = GENESIS_HASH, []
    for position, stream, version, type_, sv, ts, data in rows:
        if position == 2:
            data = b"\xc1 not msgpack"
            statements.append(f"UPDATE events SET data = x'{data.hex()}' WHERE position = 2")
        prev = row_hash(prev, position, stream, version, type_, sv, ts, data)
        statements.append(f"UPDATE events SET hash = x'{prev.hex()}' "
                          f"WHERE position = {position}")
    bad = tampered_copy(tmp_path / "ok.db", tmp_path / "bad.db", *statements)
    with EventStore(bad, mode="readonly") as reader:
        report = reader.verify()
        assert not report.ok and report.first_bad_position == 2
        assert "decode" in report.problem
        with pytest.raises(LogCorrupted, match="position 2"):
            list(reader.read_all())


def test_verify_and_get_blob_detect_an_edited_blob(tmp_path: Path) -> None:
    """A blob whose content no longer matches its digest fails verify() and get_blob()."""
    path = tmp_path / "ok.db"
    with EventStore(path) as s:
        s.append("job-a", [JobStarted()], 0, blobs=[b"policy"])
    bad = tampered_copy(path, tmp_path / "bad.db", "UPDATE blobs SET data = x'00'")
    with EventStore(bad, mode="readonly") as reader:
        report = reader.verify()
        assert not report.ok and "blob" in report.problem
        with pytest.raises(LogCorrupted, match="address"):
            reader.get_blob(codec.digest(b"policy"))


# --- failures -------------------------------------------------------------------------------

def test_a_full_disk_fails_the_batch_and_later_appends_succeed(store: EventStore) -> None:
    """SQLITE_FULL fails exactly the batch's appends with StoreUnavailable; nothing of it is
    written, the heads and chain stay, and appends succeed again once there is room."""
    before = store.append("job-a", [JobSubmitted(spec=SPEC)], 0)
    head = store.head()
    [[pages]] = writer_sql(store, "PRAGMA page_count")
    writer_sql(store, f"PRAGMA max_page_count = {pages}")
    big = os.urandom(64 * 1024)
    errors = []
    with capture_logs() as logs:
        with writer_held(store):
            batch = [store._submit("job-a", [JobStarted()], 1, blobs=[big]),
                     store._submit("job-b", [JobSubmitted(spec=SPEC)], 0),
                     store._submit("job-a", [JobStarted()], 0)]  # a conflict stays one
        for item in batch:
            with pytest.raises((StoreUnavailable, ConcurrencyConflict)) as info:
                item.result()
            errors.append(info.value)
    assert [type(e) for e in errors] == [StoreUnavailable, StoreUnavailable,
                                         ConcurrencyConflict]
    assert "full" in str(errors[0])
    assert any(entry["event"] == "append_batch_failed" for entry in logs)
    with pytest.raises(StoreUnavailable, match="full"):  # a batch without blobs too
        store.append("job-b", [iteration(i) for i in range(1, 400)], 0)
    assert store.head() == head
    assert store.streams() == {"job-a": 1}
    assert list(store.read_all()) == before

    writer_sql(store, "PRAGMA max_page_count = 1073741823")
    after = store.append("job-a", [JobStarted()], 1, blobs=[big])
    assert after[0].position == 2
    assert store.get_blob(codec.digest(big)) == big
    assert list(store.read_all()) == before + after
    assert store.verify().ok


def test_appends_after_close_raise_store_unavailable(log_path: Path) -> None:
    """close() is idempotent; appends and writes after it raise StoreUnavailable."""
    s = EventStore(log_path)
    s.close()
    s.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        s.append("job-a", [JobStarted()], 0)
    with pytest.raises(StoreUnavailable, match="closed"):
        s.request("job-a", "pause")


def test_close_leaves_no_thread_running(log_path: Path) -> None:
    """The store's threads are daemons and all of them end with close()."""
    before = set(threading.enumerate())
    s = EventStore(log_path)
    started = set(threading.enumerate()) - before
    assert started and all(t.daemon for t in started)
    s.append("job-a", [JobStarted()], 0)
    list(s.read_all())
    s.verify()
    s.close()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_synchronous_setting_reaches_sqlite(tmp_path: Path) -> None:
    """synchronous is FULL by default and configurable; the journal is WAL."""
    for setting, value in (("full", 2), ("normal", 1), ("off", 0)):
        with EventStore(tmp_path / f"{setting}.db", synchronous=setting) as s:
            assert writer_sql(s, "PRAGMA synchronous") == [(value,)]
            assert writer_sql(s, "PRAGMA journal_mode") == [("wal",)]
    with pytest.raises(ValueError, match="synchronous"):
        EventStore(tmp_path / "x.db", synchronous="sometimes")
    with pytest.raises(ValueError, match="mode"):
        EventStore(tmp_path / "x.db", mode="writer")


# --- ownership and opening ------------------------------------------------------------------

def test_a_second_owner_in_the_same_process_is_refused(log_path: Path) -> None:
    """Two owner opens in one process conflict (flock); after close() the log is free."""
    with EventStore(log_path):
        with pytest.raises(StoreLocked, match=str(log_path)):
            EventStore(log_path)
    with EventStore(log_path) as again:
        assert again.head()[0] == 0


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60)


OPEN_OWNER = """
import sys
from flowactors.errors import StoreLocked
from flowactors.store import EventStore
try:
    EventStore(sys.argv[1]).close()
    print("RESULT owned")
except StoreLocked as exc:
    print("RESULT StoreLocked:", exc)
"""


def test_a_second_owner_in_another_process_is_refused(log_path: Path) -> None:
    """Another process cannot own the log while this one does, and can once it is closed."""
    with EventStore(log_path):
        result = _run_python(OPEN_OWNER, str(log_path))
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith("RESULT")]
    assert line.startswith("RESULT StoreLocked:") and str(log_path) in line
    assert "RESULT owned" in _run_python(OPEN_OWNER, str(log_path)).stdout


HOLD_OWNER = """
import sys
from flowactors.store import EventStore
store = EventStore(sys.argv[1])
store.append("job-a", [__import__("flowactors.events").events.JobStarted()], 0)
print("RESULT ready", flush=True)
sys.stdin.readline()
"""


def test_the_lock_dies_with_a_killed_owner(log_path: Path) -> None:
    """An owner killed with SIGKILL leaves no stale lock; its acknowledged append is there."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_OWNER, str(log_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        while not (line := proc.stdout.readline()).startswith("RESULT"):
            assert line, "the owner process ended early"
        assert line.strip() == "RESULT ready"
        with pytest.raises(StoreLocked):
            EventStore(log_path)
    finally:
        proc.kill()
        proc.wait(WAIT)
    with EventStore(log_path) as s:
        assert s.stream_version("job-a") == 1
        assert s.verify().ok


@pytest.mark.parametrize("mode", ["readonly", "requester"])
def test_non_owner_opens_never_create_a_missing_log(tmp_path: Path, mode: str) -> None:
    """Read-only and requester opens of a missing file raise LogNotFound and create nothing."""
    path = tmp_path / "missing.db"
    with pytest.raises(LogNotFound, match="missing.db") as info:
        EventStore(path, mode=mode)
    assert isinstance(info.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []


def test_a_readonly_open_works_while_the_owner_writes(store: EventStore,
                                                      log_path: Path) -> None:
    """A read-only open reads a consistent log while the owner keeps appending."""
    first = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(1, 101):
                store.append("job-a", [iteration(i)], i - 1)
                first.set()
        except BaseException as exc:
            errors.append(exc)
        finally:
            first.set()
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert first.wait(WAIT)
    with EventStore(log_path, mode="readonly") as reader:
        seen = 0
        while True:
            finished = done.is_set()
            events = list(reader.read_all())
            assert [r.position for r in events] == list(range(1, len(events) + 1))
            assert len(events) >= seen
            seen = len(events)
            assert reader.verify().ok
            if finished:
                break
        assert seen == 100
        with pytest.raises(StoreUnavailable, match="readonly"):
            reader.append("job-b", [JobStarted()], 0)
    writer.join(WAIT)
    assert not errors


FOREIGN_CONTENT = {
    "random bytes": os.urandom(4096),
    "text": b"hello, this is not a database\n",
}


@pytest.mark.parametrize("mode", ["owner", "readonly", "requester"])
@pytest.mark.parametrize("kind", ["random bytes", "text", "sqlite with other tables"])
def test_a_foreign_file_is_refused_and_left_unchanged(tmp_path: Path, mode: str,
                                                      kind: str) -> None:
    """A file that is not a flowactors log raises LogCorrupted naming it; it is not touched
    and nothing is created beside it."""
    path = tmp_path / "foreign.db"
    if kind in FOREIGN_CONTENT:
        path.write_bytes(FOREIGN_CONTENT[kind])
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
        conn.commit()
        conn.close()
    digest = sha256_of(path)
    with pytest.raises(LogCorrupted, match="foreign.db.*not a flowactors log"):
        EventStore(path, mode=mode)
    assert sha256_of(path) == digest
    assert [p.name for p in tmp_path.iterdir()] == ["foreign.db"]


def test_an_empty_file_becomes_a_log_only_for_an_owner(tmp_path: Path) -> None:
    """A 0-byte file is initialised by an owner; a read-only open refuses and leaves it."""
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(LogCorrupted, match="empty"):
        EventStore(path, mode="readonly")
    assert path.stat().st_size == 0
    with EventStore(path) as s:
        s.append("job-a", [JobStarted()], 0)
    with EventStore(path, mode="readonly") as reader:
        assert reader.head()[0] == 1


def test_a_newer_format_version_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    """A log written by a newer flowactors (higher format version) is a clear error."""
    path = tmp_path / "new.db"
    filled_log(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")
    conn.close()
    digest = sha256_of(path)
    for mode in ("owner", "readonly", "requester"):
        with pytest.raises(LogCorrupted, match=f"format version {FORMAT_VERSION + 1}, newer"):
            EventStore(path, mode=mode)
    assert sha256_of(path) == digest


def test_a_sqlite_file_with_our_id_but_no_schema_is_refused(tmp_path: Path) -> None:
    """The application id alone is not enough: the meta table and tables must be there."""
    path = tmp_path / "half.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    digest = sha256_of(path)
    with pytest.raises(LogCorrupted, match="half.db"):
        EventStore(path, mode="readonly")
    assert sha256_of(path) == digest


# --- the inbox ------------------------------------------------------------------------------

def test_inbox_request_and_answer_round_trip(store: EventStore, log_path: Path) -> None:
    """A requester leaves a request; the owner sees it pending, answers; the requester reads
    the answer. Requests and answers are append-only."""
    with EventStore(log_path, mode="requester") as requester:
        first = requester.request("job-a", "pause")
        second = requester.request("job-b", "cancel")
        pending = store.pending_requests()
        assert [(r.id, r.job_id, r.command) for r in pending] == [
            (first, "job-a", "pause"), (second, "job-b", "cancel")]
        assert all(isinstance(r, Request) and r.requested_at.tzinfo for r in pending)
        assert requester.answer_of(first) is None

        store.answer(first, "applied")
        store.answer(second, "rejected", "job job-b not found")
        answer = requester.answer_of(second)
        assert isinstance(answer, Answer)
        assert (answer.request_id, answer.outcome, answer.reason) == (
            second, "rejected", "job job-b not found")
        assert requester.answer_of(first).outcome == "applied"
        assert store.pending_requests() == []
        assert store.pending_requests(after_id=first) == []

        with pytest.raises(InvalidTransition, match="already answered"):
            store.answer(first, "rejected", "again")
        with pytest.raises(InvalidTransition, match="no request 99"):
            store.answer(99, "applied")
        with pytest.raises(StoreUnavailable, match="requester"):
            requester.append("job-a", [JobStarted()], 0)
        with pytest.raises(StoreUnavailable, match="owner"):
            requester.answer(first, "applied")
        with pytest.raises(ValueError, match="command"):
            requester.request("job-a", "explode")


def test_requests_survive_the_owner_and_wait_for_the_next(log_path: Path) -> None:
    """Requests are durable: one left while no owner runs is pending for the next owner."""
    EventStore(log_path).close()
    with EventStore(log_path, mode="requester") as requester:
        request_id = requester.request("job-a", "resume")
    with EventStore(log_path) as owner:
        [pending] = owner.pending_requests()
        assert pending.id == request_id
        assert owner.request("job-a", "cancel") == request_id + 1  # the owner may ask too
    with EventStore(log_path, mode="readonly") as reader:
        assert len(reader.pending_requests()) == 2
        with pytest.raises(StoreUnavailable, match="readonly"):
            reader.request("job-a", "pause")


def test_verify_report_is_a_frozen_struct(store: EventStore) -> None:
    """The report is plain data: it encodes to JSON for tools and cannot be changed."""
    report = store.verify()
    assert msgspec.json.decode(msgspec.json.encode(report)) == {
        "ok": True, "events_checked": 0, "blobs_checked": 0, "head_position": 0,
        "head_hash": "00" * 32, "first_bad_position": None, "problem": None}
    with pytest.raises(AttributeError):
        report.ok = False  # type: ignore[misc]


# --- the writer's own failures ------------------------------------------------------------

def test_a_broken_writer_fails_appends_and_still_closes(log_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """If the writer thread itself fails, waiting appends fail with StoreUnavailable instead
    of hanging, later appends are refused, and close() still releases the log."""
    store = EventStore(log_path)
    store.append("job-a", [JobStarted()], 0)

    def broken(self: Writer, appends: list) -> None:
        raise RuntimeError("bug in the writer")

    monkeypatch.setattr(Writer, "_commit", broken)
    with capture_logs() as logs, pytest.raises(StoreUnavailable, match="writer stopped"):
        store.append("job-a", [iteration(1)], 1)
    assert any(entry["event"] == "store_writer_crashed" for entry in logs)
    with pytest.raises(StoreUnavailable, match="reopen"):
        store.append("job-b", [JobStarted()], 0)
    store.close()
    monkeypatch.undo()
    with EventStore(log_path) as again:
        assert again.streams() == {"job-a": 1}


def test_an_interrupted_caller_still_passes_the_wake_up_on() -> None:
    """A caller interrupted while waiting (Ctrl-C) waits for its own outcome, wakes the next
    caller of its batch, and only then raises the interrupt."""
    mine = _Append("job-a", 0, [JobStarted()], [codec.encode_event(JobStarted())], [])
    nxt = _Append("job-b", 0, [JobStarted()], [codec.encode_event(JobStarted())], [])
    mine.next, mine.error = nxt, StoreUnavailable("not committed")

    def interrupt(signum: int, frame: object) -> None:
        threading.Thread(target=mine.done.release).start()  # the writer settles it later
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            mine.result()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert nxt.done.acquire(timeout=WAIT)  # the next caller was woken


def test_a_threads_read_connection_goes_with_the_thread(store: EventStore) -> None:
    """Reads from many short-lived threads (actors come and go) leave no connections open."""
    store.append("job-a", [JobStarted()], 0)
    results: list[int] = []

    def read() -> None:
        results.append(len(list(store.read_all())))

    for _ in range(20):
        t = threading.Thread(target=read)
        t.start()
        t.join(WAIT)
    assert results == [1] * 20
    assert len(store._readers) == 0


def test_opening_a_store_keeps_the_locks_of_connections_already_open(tmp_path):
    """Opening (and closing) another store on a log must not drop this process's SQLite locks
    on it — closing any descriptor of a file drops them all — so while a store is open here,
    another process cannot take the exclusive lock that switching the journal mode needs."""
    path = tmp_path / "flow.db"
    switch = ("import sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1], timeout=0)\n"
              "print(c.execute('PRAGMA journal_mode=DELETE').fetchone()[0])\n")
    with EventStore(path, mode="owner", synchronous="off") as owner:
        owner.append("s", [JobStarted()], 0)
        with EventStore(path, mode="readonly") as reader:
            assert len(list(reader.read_all())) == 1
            EventStore(path, mode="readonly").close()  # reads the header again, in this process
            result = subprocess.run([sys.executable, "-c", switch, str(path)],
                                    capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "locked" in result.stderr, result.stdout


def test_append_many_shares_commits_and_refuses_only_the_conflicting_append(tmp_path):
    """append_many records each stream's events (contiguous versions) and returns the
    ConcurrencyConflict of a stale append in its place, without failing the others."""
    from flowactors.errors import ConcurrencyConflict

    with EventStore(tmp_path / "flow.db", mode="owner", synchronous="off") as store:
        store.append("b", [JobStarted()], 0)
        results = store.append_many([("a", [JobStarted(), JobStarted()], 0),
                                     ("b", [JobStarted()], 0),  # stale: b is at 1
                                     ("c", [JobStarted()], 0)])
        assert [r.version for r in results[0]] == [1, 2]
        assert isinstance(results[1], ConcurrencyConflict)
        assert [r.version for r in results[2]] == [1]
        assert store.streams() == {"a": 2, "b": 1, "c": 1}
        assert store.verify().ok
