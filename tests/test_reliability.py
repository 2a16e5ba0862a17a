"""Reliability, measured (short versions; the long ones are tools/crashtest.py and
tools/damage.py): SIGKILLs in the dangerous windows, damaged files, a full disk, two processes
racing to own a log — and a regression test for each problem these harnesses found."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from helpers import sim_spec, wait_until

import flowactors as fa
from flowactors import job as core
from flowactors import replay as rp
from flowactors.cli import main as cli
from flowactors.store import EventStore
from flowactors.testing import log_from_history

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
HISTORIES = ROOT / "tests" / "histories"

import crashtest  # noqa: E402
import damage  # noqa: E402


pytestmark = pytest.mark.usefixtures("quiet_logs")


# --- crash injection --------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_sigkill_in_every_window_loses_no_acknowledged_event(tmp_path):
    """A dozen SIGKILLs over two trials — in a group commit on its production path (before its
    statement, and after it before any caller was told), inside a checkpoint's blob write,
    between iterations, during recovery and at random times — lose no acknowledged event,
    change none, leave no gap or duplicate, keep verify clean, and every job ends with the
    final state of an uninterrupted run."""
    config = crashtest.JobsConfig(n_jobs=3, rollout_seconds=0.05, iterations=(29, 23, 31),
                                  intervals=(3, 2, 3), toolchoice=False)
    figures = crashtest.run(2, 6, seed=11, workers=2, config=config, workdir=tmp_path,
                            plan=crashtest.WINDOWS, say=lambda _: None)
    print("\n".join(figures.lines()))
    assert figures.ok, "\n".join(figures.failures)
    assert figures.total_kills >= 8, figures.lines()
    assert figures.kills["commit"] >= 1 and figures.kills["checkpoint"] >= 1, figures.lines()
    assert figures.kills["committed"] >= 1, figures.lines()
    assert figures.acked_checked > 0
    assert (figures.lost, figures.corrupted, figures.mismatched_final_states) == (0, 0, 0)


# --- damaged files ----------------------------------------------------------------------------


def _assert_no_forbidden_outcome(figures: damage.Figures) -> None:
    assert figures.ok, "\n".join(figures.forbidden[:20])


@pytest.mark.timeout(300)
def test_damaged_copies_fail_clearly_or_work_on_a_verified_prefix(tmp_path):
    """Fifty damaged copies of a real log (flipped bytes, zeroed pages, truncations, a lost or
    cut WAL, a garbage -shm, foreign files), each opened by the store, `flowactors verify`,
    `flowactors status` and a Runtime: never a hang, a traceback, or a log served while verify
    rejects it; when a copy works, its events are a byte-identical prefix of the original's."""
    figures = damage.run(48, seed=3, workers=2, cli="inprocess", workdir=tmp_path,
                         say=lambda _: None)
    print("\n".join(figures.lines()))
    assert figures.copies == 48
    _assert_no_forbidden_outcome(figures)


@pytest.mark.timeout(120)
def test_a_killed_owners_log_without_its_wal_is_a_new_log_and_a_cut_wal_a_verified_prefix(
        tmp_path):
    """Regression (the harness): a killed owner's log may live in its -wal, tables included,
    so without it the main file is an empty database. The store refuses it, a Runtime starts
    a new log in it, as in an empty file — allowed, not "served data verify rejects" (or, if
    the tables reached the main file, both read the same empty log). With the -wal cut, the
    runtime serves the verified prefix the store read, then appends its recoveries."""
    crashed = damage.make_originals(tmp_path)[0]
    assert crashed.name == "crashed" and "-wal" in crashed.files
    no_wal = {"": crashed.files[""]}
    outcomes = damage.check_copy(crashed, no_wal, "remove-wal", tmp_path / "no-wal",
                                 "inprocess")
    assert (outcomes["store"], outcomes["runtime"]) in (
        (damage.REJECTED, damage.NEW_LOG), (damage.PREFIX, damage.PREFIX)), outcomes
    wal = crashed.files["-wal"]
    cut = {"": crashed.files[""], "-wal": wal[:len(wal) * 3 // 4]}
    outcomes = damage.check_copy(crashed, cut, "truncate-wal", tmp_path / "cut", "inprocess")
    assert outcomes["store"] == outcomes["runtime"] == damage.PREFIX


ORIGINAL = ["a1", "b1", "a2", "b2", "a3"]  # fingerprints, in position order


def _runtime_left(events: list[str], head: int, *, verify_ok: bool = True,
                  warned: tuple[str, ...] = ()) -> dict[str, object]:
    """A runtime probe's result: the copy it left holds `events`, it opened at `head`."""
    return {"open": "ok", "jobs": 2, "warned": list(warned), "head": head,
            "after": {"open": "ok", "verify_ok": verify_ok, "events": events}}


def _store_read(events: list[str] | None) -> dict[str, object]:
    """A store probe's result: read `events` and verified, or (None) refused the copy."""
    if events is None:
        return {"open": "error", "error": "LogCorrupted", "message": "flow.db is empty"}
    return {"open": "ok", "verify_ok": True, "events": events}


@pytest.mark.parametrize("left, head, before, outcome", [
    (ORIGINAL, 5, ORIGINAL, damage.INTACT),
    (["a1", "b1", "a2", "x1", "x2"], 3, ORIGINAL[:3], damage.PREFIX),  # then its own appends
    ([], 0, None, damage.NEW_LOG),
    (["x1"], 0, None, damage.NEW_LOG),  # a new log, then its own appends
    (["a1", "b9", "a2"], 3, None, damage.ACCEPTED),  # served an event the original never had
    (["a1", "a2", "b1"], 3, ORIGINAL[:3], damage.ACCEPTED),  # reordered: not a prefix
    ([*ORIGINAL, "a4"], 6, ORIGINAL, damage.ACCEPTED),  # more than the original had
    (ORIGINAL[:2], 2, ORIGINAL[:3], damage.DIVERGED),  # lost what the store verified
    ([], 0, ORIGINAL[:3], damage.DIVERGED),  # a new log over a readable one
])
def test_the_runtime_is_judged_by_the_events_it_served(left, head, before, outcome):
    """The classifier can fail: what a runtime found on opening must be a byte-identical
    prefix of the original's (its own appends after the head it opened at aside), the same
    events the read-only store read, or nothing where there was no log."""
    result = _runtime_left(left, head)
    assert damage.classify_runtime(result, _store_read(before), ORIGINAL) == outcome


def test_a_runtime_leaving_a_log_verify_rejects_is_forbidden_unless_it_said_so():
    """The copy a runtime leaves is verified again: failing, it is SILENT unless the runtime
    logged the damage."""
    bad = _runtime_left(ORIGINAL[:3], 3, verify_ok=False)
    assert damage.classify_runtime(bad, _store_read(None), ORIGINAL) == damage.SILENT
    warned = _runtime_left(ORIGINAL[:3], 3, verify_ok=False,
                           warned=("warning: log_corrupted position 3",))
    assert damage.classify_runtime(warned, _store_read(None), ORIGINAL) == damage.WARNED


def test_the_runtime_probe_refuses_to_guess_where_its_appends_begin():
    """Without the owner's `store_opened` head the served events cannot be told from the
    runtime's own: the probe fails loudly rather than judging the whole log as served."""
    with pytest.raises(RuntimeError, match="head_position"):
        damage._opened_head([{"event": "store_opened", "mode": "readonly"}])
    assert damage._opened_head([{"event": "store_opened", "mode": "owner",
                                 "head_position": 7}]) == 7


@pytest.fixture(scope="module")
def small_log(tmp_path_factory) -> bytes:
    """A completed two-job log, its WAL folded into the main file: the bytes to damage."""
    path = tmp_path_factory.mktemp("small") / "flow.db"
    with fa.Runtime(path, handle_signals=False) as rt:
        for i in range(2):
            rt.submit(sim_spec(f"agent-{i}", n_iterations=5, checkpoint_interval=2, seed=i),
                      job_id=f"job-{i}")
        for i in range(2):
            rt.wait(f"job-{i}", timeout=60)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path.read_bytes()


def _write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "flow.db"
    path.write_bytes(content)
    return path


def _assert_one_line_cli_error(args: list[str], path: Path) -> str:
    result = CliRunner().invoke(cli, [*args, "--db", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"`flowactors {' '.join(args)}` raised {result.exception!r}"
    assert result.exit_code != 0, f"`flowactors {' '.join(args)}` exited 0: {result.stdout}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _edit(content: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and content.count(old) >= 1
    return content.replace(old, new, 1)


def test_a_schema_error_message_that_is_not_utf8_is_log_corrupted(tmp_path, small_log):
    """Regression: when a damaged schema entry's name is not valid UTF-8, SQLite's error
    message quotes it and Python's sqlite3 raises UnicodeDecodeError (not a sqlite3.Error)
    while decoding the message: every open escaped with it, the CLI printed a traceback."""
    path = _write(tmp_path, small_log)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET name = CAST(X'FF' AS TEXT) || name, "
                 "sql = sql || ' damaged' WHERE name = 'events_no_update'")
    conn.commit()
    conn.close()
    with pytest.raises(fa.LogCorrupted, match="flow.db"):
        EventStore(path, mode="readonly")
    with pytest.raises(fa.LogCorrupted, match="flow.db"):
        fa.Runtime(path, handle_signals=False)
    _assert_one_line_cli_error(["status"], path)
    _assert_one_line_cli_error(["verify"], path)


def test_an_error_quoting_damaged_text_stays_on_one_line(tmp_path, small_log):
    """Regression: errors quote text from the damaged file verbatim — a schema name holding a
    newline, SQLite's multi-line integrity_check report — so `flowactors` printed a
    two-line `error:` (and would print any control character, terminal escapes included).
    A message must be one line, its control characters escaped."""
    path = _write(tmp_path, small_log)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET name = 'events_no' || char(10) || 'update', "
                 "sql = sql || char(27) || ' damaged' WHERE name = 'events_no_update'")
    conn.commit()
    conn.close()
    with pytest.raises(fa.LogCorrupted) as raised:
        EventStore(path, mode="readonly")
    message = str(raised.value)
    assert message.isprintable(), repr(message)
    line = _assert_one_line_cli_error(["status"], path)
    assert line.isprintable(), repr(line)


def test_invalid_utf8_in_an_event_row_is_reported_not_raised(tmp_path, small_log):
    """A flipped byte that makes an event's text column invalid UTF-8: verify reports the bad
    position, reads raise LogCorrupted, a Runtime refuses the log, the CLI says so in one
    line."""
    with EventStore(_write(tmp_path, small_log), mode="readonly") as store:
        recorded_at = next(r for r in store.read_all() if r.position == 3)
        stamp = recorded_at.recorded_at.isoformat(timespec="microseconds").encode()
    path = _write(tmp_path, _edit(small_log, stamp, b"\xff" + stamp[1:]))
    with EventStore(path, mode="readonly") as store:
        report = store.verify()
        assert not report.ok and report.first_bad_position is not None, report
        with pytest.raises(fa.LogCorrupted, match="flow.db"):
            list(store.read_all())
    with pytest.raises(fa.LogCorrupted, match="flow.db"):
        fa.Runtime(path, handle_signals=False)
    _assert_one_line_cli_error(["verify"], path)
    _assert_one_line_cli_error(["status"], path)


def _zero_page_of(content: bytes, tmp_path: Path, name: str) -> bytes:
    probe = _write(tmp_path, content)
    conn = sqlite3.connect(f"file:{probe}?mode=ro", uri=True)
    page, = conn.execute("SELECT min(pageno) FROM dbstat WHERE name = ?", (name,)).fetchone()
    size, = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    start = (page - 1) * size
    return content[:start] + bytes(size) + content[start + size:]


def test_verify_reports_a_malformed_page_instead_of_raising(tmp_path, small_log):
    """Regression: with a zeroed index page, EventStore.verify() — documented to never raise
    for a corrupt log — raised sqlite3.DatabaseError from the COMMIT that ends its read
    snapshot, and `flowactors verify` printed a traceback."""
    path = _write(tmp_path, _zero_page_of(small_log, tmp_path, "events_version_stream"))
    with EventStore(path, mode="readonly") as store:
        report = store.verify()
    assert not report.ok and "malformed" in (report.problem or ""), report
    _assert_one_line_cli_error(["verify"], path)


def _with_edited_event(small_log: bytes) -> bytes:
    """The log with one event's data edited in place; it still decodes (same length)."""
    return _edit(small_log, b"agent-1", b"agent-9")


def test_runtime_refuses_a_log_whose_hash_chain_is_broken(tmp_path, small_log):
    """Regression: a Runtime opened (and would resume and append to) a log whose event was
    edited — verify rejects it — without a word: recovery folded events without checking
    their hashes. It must raise LogCorrupted naming the position."""
    path = _write(tmp_path, _with_edited_event(small_log))
    with EventStore(path, mode="readonly") as store:
        report = store.verify()
    assert not report.ok, "the edit must be one verify detects"
    with pytest.raises(fa.LogCorrupted, match=f"position {report.first_bad_position}"):
        rt = fa.Runtime(path, handle_signals=False)
        rt.close()


def test_cli_status_does_not_serve_a_log_whose_hash_chain_is_broken(tmp_path, small_log):
    """Regression: `flowactors status` printed jobs from a log whose event was edited, exit
    0, without saying so; it must fail with one line naming the position (as verify does)."""
    path = _write(tmp_path, _with_edited_event(small_log))
    line = _assert_one_line_cli_error(["status"], path)
    assert "position" in line


def _cut_inside_the_head_row(content: bytes, tmp_path: Path) -> bytes:
    """The log cut inside its last page where SQLite still reads it, but reads the last event
    row's hash as NULL: the bytes past the cut read as zeros."""
    probe = tmp_path / "probe.db"
    last_page = (len(content) - 1) // damage.PAGE * damage.PAGE
    for cut in range(last_page + 16, len(content), 16):
        probe.write_bytes(content[:cut])
        conn = sqlite3.connect(f"file:{probe}?mode=ro", uri=True)
        try:
            row = conn.execute(
                "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError:
            continue
        finally:
            conn.close()
        if row is not None and row[1] is None:
            return content[:cut]
    raise AssertionError("no cut of the last page leaves the head row with a NULL hash")


def test_a_log_cut_inside_its_head_row_fails_with_log_corrupted(tmp_path, small_log):
    """Regression (tools/damage.py, truncate-db, rare): a main file cut inside its last page
    opened as a TypeError traceback — in a Runtime and in `flowactors status`. It must fail
    with LogCorrupted, one line."""
    path = _write(tmp_path, _cut_inside_the_head_row(small_log, tmp_path))
    with pytest.raises(fa.LogCorrupted, match="position"):
        fa.Runtime(path, handle_signals=False)
    with EventStore(path, mode="readonly") as store, pytest.raises(fa.LogCorrupted):
        store.head()
    _assert_one_line_cli_error(["status"], path)


def _with_a_blob_row_out_of_its_index(content: bytes, tmp_path: Path) -> bytes:
    """The log with one character of a blob's digest changed in the blobs table only: every
    page still reads (quick_check passes) and the index, which the blob reads go through,
    still holds the old digest — only integrity_check sees the row missing from the index."""
    probe = tmp_path / "probe.db"
    probe.write_bytes(content)
    conn = sqlite3.connect(probe)
    digest = conn.execute("SELECT min(digest) FROM blobs").fetchone()[0].encode()
    conn.close()
    at = content.find(digest)
    while at >= 0:
        damaged = content[:at + 1] + (b"0" if content[at + 1:at + 2] != b"0" else b"1") + \
            content[at + 2:]
        probe.write_bytes(damaged)
        conn = sqlite3.connect(f"file:{probe}?mode=ro", uri=True)
        try:
            quick = conn.execute("PRAGMA quick_check").fetchall()
            full = " ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()
        if quick == [("ok",)] and "missing from index sqlite_autoindex_blobs_1" in full:
            return damaged
        at = content.find(digest, at + 1)
    raise AssertionError("no copy of the digest, changed, leaves its row out of the index")


def test_a_blob_row_out_of_its_index_is_refused_on_open_as_verify_refuses_it(tmp_path, small_log):
    """Regression (tools/damage.py, flip-db, copy 141 of the 500-copy run): a byte flipped in
    a blob's digest in the blobs table; verify's integrity_check refused the log, a Runtime
    and `flowactors status` (quick_check) served it without a word."""
    path = _write(tmp_path, _with_a_blob_row_out_of_its_index(small_log, tmp_path))
    with EventStore(path, mode="readonly") as store:
        assert not store.verify().ok
    with pytest.raises(fa.LogCorrupted, match="integrity_check"):
        fa.Runtime(path, handle_signals=False).close()
    _assert_one_line_cli_error(["status"], path)


def _with_an_events_index_entry_renamed(content: bytes, tmp_path: Path) -> bytes:
    """The log with one entry of the events index naming job-3 instead of job-1: the table
    and every page still read (quick_check passes); only integrity_check, which looks up
    every row in the index, sees it, and an open must see it too."""
    probe = tmp_path / "probe.db"
    at = content.find(b"job-1")
    while at >= 0:
        damaged = content[:at] + b"job-3" + content[at + 5:]
        probe.write_bytes(damaged)
        conn = sqlite3.connect(f"file:{probe}?mode=ro", uri=True)
        try:
            quick = conn.execute("PRAGMA quick_check").fetchall()
            full = " ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
            table = conn.execute("SELECT DISTINCT stream FROM events NOT INDEXED").fetchall()
        finally:
            conn.close()
        if quick == [("ok",)] and "events_version_stream" in full and \
                sorted(table) == [("job-0",), ("job-1",)]:
            return damaged
        at = content.find(b"job-1", at + 1)
    raise AssertionError("no copy of the stream name, changed, is an index entry alone")


def _with_the_index_left_behind(content: bytes, tmp_path: Path, change: str,
                                undo: str) -> bytes:
    """The log after the SQL `change` with the events index following it, then `undo` behind
    the index's back (hidden from SQLite meanwhile): the table and its chain as they were,
    every page sound (quick_check passes), but the index telling another story, which
    integrity_check sees."""
    path = tmp_path / "damaged.db"
    path.write_bytes(content)
    conn = sqlite3.connect(path, isolation_level=None)
    triggers = [sql for sql, in conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'events'")]
    index = conn.execute("SELECT * FROM sqlite_master WHERE name = 'events_version_stream'"
                         ).fetchone()
    conn.executescript("".join(f"DROP TRIGGER {sql.split()[2]};" for sql in triggers))
    conn.executescript(change)  # the index follows
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("DELETE FROM sqlite_master WHERE name = 'events_version_stream'")
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(undo)  # the table back as it was; the index, hidden, stays
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("INSERT INTO sqlite_master VALUES (?, ?, ?, ?, ?)", index)
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(";".join(triggers))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert "events_version_stream" in " ".join(
        row[0] for row in conn.execute("PRAGMA integrity_check"))
    conn.close()
    return path.read_bytes()


_PRIME = 2**31 - 1  # the open's fingerprint counts modulo it: damage by it must still show
_TRADE_JOBS = ("UPDATE events SET stream = '-' WHERE stream = 'job-0' AND version = 2;"
               "UPDATE events SET stream = 'job-0' WHERE stream = 'job-1' AND version = 2;"
               "UPDATE events SET stream = 'job-1' WHERE stream = '-'")  # twice: traded back
_TRADE_VERSIONS = ("UPDATE events SET version = -1 WHERE stream = 'job-0' AND version = 2;"
                   "UPDATE events SET version = 2 WHERE stream = 'job-0' AND version = 3;"
                   "UPDATE events SET version = 3 WHERE stream = 'job-0' AND version = -1")
_INDEX_DAMAGE = {  # (change the index follows, undo it does not see)
    "entries-of-two-jobs-trade-rows": (_TRADE_JOBS, _TRADE_JOBS),
    "entries-of-one-job-trade-rows": (_TRADE_VERSIONS, _TRADE_VERSIONS),
    "an-entry-version-plus-the-prime": (
        f"UPDATE events SET version = 2 + {_PRIME} WHERE stream = 'job-0' AND version = 2",
        f"UPDATE events SET version = 2 WHERE stream = 'job-0' AND version = 2 + {_PRIME}"),
    "an-entry-version-not-an-integer": (
        "UPDATE events SET version = 2.5 WHERE stream = 'job-0' AND version = 2",
        "UPDATE events SET version = 2 WHERE stream = 'job-0' AND version = 2.5"),
    "an-entry-position-minus-the-prime": (
        f"UPDATE events SET position = position - {_PRIME} WHERE stream = 'job-0' "
        "AND version = 2",
        f"UPDATE events SET position = position + {_PRIME} WHERE stream = 'job-0' "
        "AND version = 2"),
    "an-entry-past-the-head": (
        "INSERT INTO events SELECT 10000, stream, 1000, type, schema_version, recorded_at, "
        "data, hash FROM events WHERE position = 1",
        "DELETE FROM events WHERE position = 10000"),
}


@pytest.mark.parametrize("damage", ["an-entry-renamed", *_INDEX_DAMAGE])
def test_an_events_index_that_does_not_match_its_table_is_refused_on_open(tmp_path, small_log,
                                                                           damage):
    """An open does not run integrity_check's lookup of every event in the events index (most
    of its time on a long log); it compares a fingerprint of the index entries with that of
    the rows it replays. That must refuse what integrity_check refuses: reads by job go
    through this index. Regressions: two entries trading rows passed a first, replay-based
    summary, and the runtime then served job-1's event as job-0's; versions and positions off
    by the fingerprint's prime, a version stored as a real and an entry past the head passed
    the first version of the fingerprint."""
    content = (_with_an_events_index_entry_renamed(small_log, tmp_path)
               if damage == "an-entry-renamed"
               else _with_the_index_left_behind(small_log, tmp_path, *_INDEX_DAMAGE[damage]))
    path = _write(tmp_path, content)
    with EventStore(path, mode="readonly") as store:
        assert not store.verify().ok
    with pytest.raises(fa.LogCorrupted, match="events_version_stream"):
        fa.Runtime(path, handle_signals=False).close()
    assert "events_version_stream" in _assert_one_line_cli_error(["status"], path)
    assert not [t for t in threading.enumerate() if t.name == "flowactors-open-check"]


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("chain_process", [True, False], ids=["chain-process", "in-thread"])
def test_a_job_named_by_a_blob_is_refused_on_open_in_one_line(tmp_path, small_log, monkeypatch,
                                                              chain_process):
    """Regression: a row whose stream is a BLOB (a flipped bit in its record header) made
    the open's fingerprint raise AttributeError: a traceback instead of LogCorrupted, or (on
    the check's thread) a thread dying with a traceback on stderr."""
    monkeypatch.setattr(rp, "CHAIN_CHECK_PROCESS_EVENTS", 0 if chain_process else 10**9)
    path = _write(tmp_path, small_log)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("UPDATE events SET stream = CAST(stream AS BLOB) WHERE position = 1")
    conn.close()
    with EventStore(path, mode="readonly") as store:
        assert not store.verify().ok
    with pytest.raises(fa.LogCorrupted):
        fa.Runtime(path, handle_signals=False).close()
    _assert_one_line_cli_error(["status"], path)
    assert not [t for t in threading.enumerate() if t.name == "flowactors-open-check"]


def test_versions_out_of_order_in_a_chained_log_are_refused_on_open(tmp_path):
    """Regression: a log whose chain is sound but whose job goes from version 1 to 3 (a
    foreign writer's) was refused by verify and served by an open."""
    rows = [msgspec.json.decode(line)
            for line in (HISTORIES / "completed.jsonl").read_bytes().splitlines()]
    rows[1]["version"], rows[2]["version"] = rows[2]["version"], rows[1]["version"]
    history = tmp_path / "out_of_order.jsonl"
    history.write_bytes(b"\n".join(msgspec.json.encode(row) for row in rows) + b"\n")
    path = log_from_history(history, tmp_path / "flow.db")
    with EventStore(path, mode="readonly") as store:
        assert "from version 1 to 3" in (store.verify().problem or "")
    with pytest.raises(fa.LogCorrupted, match="goes from version 1 to 3 at position 2"):
        fa.Runtime(path, handle_signals=False).close()
    assert "from version 1 to 3" in _assert_one_line_cli_error(["status"], path)
    assert not [t for t in threading.enumerate() if t.name == "flowactors-open-check"]


@pytest.mark.timeout(120)
def test_damaged_copies_through_the_real_command(tmp_path):
    """A few damaged copies (one of each kind) through the `flowactors` executable itself:
    no traceback, no hang, a one-line error or a verified log."""
    figures = damage.run(len(damage.KINDS) * 2, seed=5, workers=2, cli="subprocess",
                         workdir=tmp_path, say=lambda _: None)
    print("\n".join(figures.lines()))
    _assert_no_forbidden_outcome(figures)


# --- a full disk ------------------------------------------------------------------------------


def _limit_pages(store: EventStore, extra: int) -> int:
    """Let the owner's write connection grow the file by `extra` pages only (max_page_count
    is per connection, so a reopen has the space back). Test-only: runs on the writer."""
    def limit(conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + extra}")
        return pages
    return store._call_in_writer(limit).result()


FULL_DISK_SPECS = {f"job-{i}": sim_spec(f"agent-{i}", n_iterations=23, checkpoint_interval=3,
                                        seed=40 + i, task_options={"rollout_seconds": 0.02})
                   for i in range(3)}


def _final_digests(path: Path) -> dict[str, str]:
    with EventStore(path, mode="readonly") as store:
        return {r.stream: r.event.final_state_digest for r in store.read_all()
                if r.type == "job.completed"}


@pytest.mark.timeout(120)
def test_full_disk_stops_jobs_keeps_acknowledged_events_and_reopen_resumes(tmp_path):
    """The log runs out of space mid-run: appends fail with a clear StoreUnavailable, every
    job stops (wait raises, status stays at the last durable event), no acknowledged event is
    lost, verify is clean; reopened with space, the jobs resume and end bit-identical to an
    uninterrupted run."""
    reference = tmp_path / "reference.db"
    with fa.Runtime(reference, handle_signals=False) as rt:
        for job_id, spec in FULL_DISK_SPECS.items():
            rt.submit(spec, job_id=job_id)
        for job_id in FULL_DISK_SPECS:
            assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED

    path = tmp_path / "flow.db"
    seen: list[fa.RecordedEvent] = []
    rt = fa.Runtime(path, handle_signals=False)
    try:
        tail = rt.watch()
        reader = threading.Thread(target=lambda: seen.extend(tail), daemon=True)
        reader.start()
        for job_id, spec in FULL_DISK_SPECS.items():
            rt.submit(spec, job_id=job_id)
        wait_until(lambda: all(rt.status(j).progress.current_iteration >= 4
                               for j in FULL_DISK_SPECS), 30, "a few iterations")
        _limit_pages(rt.store, 0)  # the next append that needs a new page fails
        errors = {}
        for job_id in FULL_DISK_SPECS:
            with pytest.raises(fa.StoreUnavailable) as raised:
                rt.wait(job_id, timeout=60)
            errors[job_id] = str(raised.value)
        assert all("full" in e and job_id in e for job_id, e in errors.items()), errors
        views = {job_id: rt.status(job_id) for job_id in FULL_DISK_SPECS}
        assert all(v.status is fa.JobStatus.RUNNING for v in views.values()), views
        # nothing more fits either: a submission spanning several pages, since the space
        # left in the last pages depends on which append failed first
        late = fa.JobSpec(agent_id="late", task="simulated", training_data=[
            fa.TrainingQuery(query=f"a long query {i} " + "x" * 200) for i in range(100)])
        with pytest.raises(fa.StoreUnavailable, match="full"):
            rt.submit(late, job_id="late")
    finally:
        rt.close()
    reader.join(timeout=10)
    with EventStore(path, mode="readonly") as store:
        assert store.verify().ok
        rows = {(r.stream, r.version): r.hash for r in store.read_all()}
        states = rp.replay(store.read_all())
    assert seen and all(rows.get((r.stream, r.version)) == r.hash for r in seen), \
        "an acknowledged event is missing or changed"
    assert "late" not in states
    for job_id, view in views.items():  # the status served was the last durable state
        assert view == core.view(states[job_id])

    with fa.Runtime(path, handle_signals=False) as rt:
        for job_id in FULL_DISK_SPECS:
            assert rt.wait(job_id, timeout=60).status is fa.JobStatus.COMPLETED
    assert _final_digests(path) == _final_digests(reference)
    with EventStore(path, mode="readonly") as store:
        assert store.verify().ok


# --- two processes racing to own a log --------------------------------------------------------

RACER = textwrap.dedent("""
    import os, sys, time
    path, how, barrier, results, release = sys.argv[1:]
    import flowactors as fa
    from flowactors.store import EventStore
    open(results + "." + str(os.getpid()) + ".ready", "w").close()
    while not os.path.exists(barrier):
        time.sleep(0.0005)
    try:
        owner = EventStore(path, mode="owner") if how == "store" \\
            else fa.Runtime(path, handle_signals=False)
    except fa.StoreLocked as exc:
        line = "locked " + str(exc).replace("\\n", " ")
        owner = None
    except BaseException as exc:
        line = "error " + type(exc).__name__ + ": " + str(exc).replace("\\n", " ")
        owner = None
    else:
        line = "won"
    with open(results, "a") as out:
        out.write(line + "\\n")
    if owner is not None:
        deadline = time.monotonic() + 60
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.005)
        owner.close()
""")


@pytest.mark.parametrize("how", ["store", "runtime"])
@pytest.mark.parametrize("log_exists", [False, True], ids=["missing-log", "existing-log"])
def test_two_processes_racing_to_own_a_log_exactly_one_wins(tmp_path, how, log_exists):
    """Two processes released at the same instant open the same log for writing (as an
    EventStore owner or a Runtime; the log missing or existing): exactly one wins, the other
    gets StoreLocked naming the file — three rounds each."""
    for round_ in range(3):
        rdir = tmp_path / f"round-{round_}"
        rdir.mkdir()
        path = rdir / "flow.db"
        if log_exists:
            EventStore(path, mode="owner").close()
        barrier, results, release = rdir / "go", rdir / "results", rdir / "release"
        racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path), how, str(barrier),
                                    str(results), str(release)], stdin=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE) for _ in range(2)]
        try:
            wait_until(lambda: len(list(rdir.glob("results.*.ready"))) == 2, 30,
                       "both racers to be ready")
            barrier.touch()
            wait_until(lambda: results.exists()
                       and len(results.read_text().splitlines()) == 2, 30, "both outcomes")
            release.touch()
            for racer in racers:
                assert racer.wait(timeout=30) == 0, racer.stderr.read().decode()
        finally:
            for racer in racers:
                if racer.poll() is None:
                    racer.kill()
                    racer.wait()
        outcomes = sorted(results.read_text().splitlines())
        assert outcomes[1] == "won", outcomes
        assert outcomes[0].startswith("locked ") and str(path) in outcomes[0], outcomes
        with EventStore(path, mode="readonly") as store:
            assert store.verify().ok


def test_a_second_owner_in_the_same_process_is_refused(tmp_path):
    """Ownership holds inside one process too: a second Runtime on the same log gets
    StoreLocked naming the file while the first is open, and succeeds once it closed."""
    path = tmp_path / "flow.db"
    with fa.Runtime(path, handle_signals=False):
        with pytest.raises(fa.StoreLocked, match=str(path)):
            fa.Runtime(path, handle_signals=False)
    with fa.Runtime(path, handle_signals=False):
        pass


@pytest.fixture(autouse=True)
def _no_leftover_env(monkeypatch):
    """Fault points are armed only in the children that ask for them."""
    monkeypatch.delenv("FLOWACTORS_FAULTS", raising=False)
    yield


# --- crashes of the runtime's own process (found by the crash harness) ----------------------

CONCURRENT_RECOVERY = textwrap.dedent("""
    import sys, threading
    from types import SimpleNamespace
    from flowactors import codec
    from flowactors.actors import JobActor
    from flowactors.spec import validate_spec
    from flowactors.tasks import build_task
    from flowactors.tasks.toolchoice import make_training_data

    specs = [validate_spec({"agent_id": "a", "training_data": [{"query": "q"}],
                            "task": "simulated", "config": {"eval_fraction": 0}}),
             validate_spec({"agent_id": "b", "training_data": make_training_data(8, seed=1),
                            "task": "toolchoice"})]
    actors = []
    for spec in specs:
        task = build_task(spec)
        blob = codec.encode(task.init(spec))
        states = SimpleNamespace(get=lambda digest, blob=blob: blob)
        for _ in range(4):  # what the runtime does: one built task per actor
            actors.append(SimpleNamespace(
                spec=spec, task=build_task(spec), host=SimpleNamespace(state_store=states),
                state=SimpleNamespace(resume_point=SimpleNamespace(
                    iteration=2, state_ref=codec.digest(blob)))))
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: widens any race
    barrier = threading.Barrier(len(actors))

    def recover(actor):
        barrier.wait()
        JobActor._load_trainer(actor)

    threads = [threading.Thread(target=recover, args=(a,)) for a in actors]
    for t in threads: t.start()
    for t in threads: t.join()
""")


def test_actors_recovering_at_once_do_not_crash_the_process():
    """Regression: a runtime reopened on a log with several running jobs crashed with SIGSEGV
    (seen in the crash harness: the restarted child died, no job resumed). Each recovering
    actor decodes its checkpoint with `msgspec.msgpack.decode(blob, type=state_type)`; the
    first decode of a Struct type builds msgspec's type info lazily, and several threads
    building it at once crash msgspec. Eight actors load their trainers at once, in six
    processes: none may crash (unfixed, most do)."""
    for attempt in range(6):
        child = subprocess.run([sys.executable, "-X", "faulthandler", "-c",
                                CONCURRENT_RECOVERY], capture_output=True, timeout=60)
        assert child.returncode == 0, \
            f"attempt {attempt}: exit {child.returncode}\n{child.stderr.decode()[-3000:]}"


CLOSE_WHILE_READING = textwrap.dedent("""
    import logging, shutil, sqlite3, sys, time
    import structlog
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    import flowactors as fa
    from flowactors.store import EventStore

    src = sys.argv[1]
    EventStore(src, mode="owner").close()
    conn = sqlite3.connect(src)  # a long inbox: the inbox thread's first query takes a while
    conn.executemany("INSERT INTO requests (job_id, command, requested_at) "
                     "VALUES (?, 'cancel', '2026-01-01T00:00:00+00:00')",
                     [(f"no-such-job-{i}",) for i in range(20000)])
    conn.commit()
    conn.close()
    for i in range(15):
        path = f"{src}.{i}"
        shutil.copy(src, path)
        rt = fa.Runtime(path, handle_signals=False)
        time.sleep((i % 15) * 0.002)
        rt.close()
""")


@pytest.mark.timeout(120)
def test_closing_a_runtime_while_its_inbox_thread_reads_is_clean(tmp_path):
    """Regression: Runtime.close() closed the store — and with it every thread's read
    connection — without waiting for its inbox thread, which may be inside a query: that
    thread died with `sqlite3.ProgrammingError: Cannot operate on a closed database` (a
    traceback on stderr), and a connection closed under a running statement can crash the
    process (SIGSEGV at close, seen in the crash harness and in a test run)."""
    child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CLOSE_WHILE_READING,
                            str(tmp_path / "flow.db")], capture_output=True, timeout=100)
    stderr = child.stderr.decode()
    assert child.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr[-3000:]


CREATION_CUT_OFF = textwrap.dedent("""
    import os, signal, sqlite3, sys
    connect = sqlite3.connect

    def cut_off_connect(database, *args, **kwargs):
        conn = connect(database, *args, **kwargs)
        if "mode=ro" not in str(database):  # the owner's connection, creating the log
            conn.execute("PRAGMA cache_size = 1")  # pages reach the file before the commit
            conn.set_trace_callback(  # die inside the creating transaction, at its end
                lambda sql: "INSERT INTO meta" in sql and os.kill(os.getpid(), signal.SIGKILL))
        return conn

    sqlite3.connect = cut_off_connect
    from flowactors.store import EventStore
    EventStore(sys.argv[1], mode="owner")
""")


def test_a_log_whose_creation_was_cut_off_by_a_crash_opens(tmp_path):
    """Regression (found by random-time kills during a first open): the schema is created in
    rollback-journal mode (WAL is switched on only after it), so a crash inside that
    transaction leaves a hot `-journal` next to a half-written file. Every later open failed,
    even the owner's: `_check_header` reads through a read-only connection, which cannot roll
    the journal back ("not a flowactors log (not a SQLite database: attempt to write a
    readonly database)"). The next owner must open the log."""
    path = tmp_path / "flow.db"
    child = subprocess.run([sys.executable, "-c", CREATION_CUT_OFF, str(path)],
                           capture_output=True, timeout=60)
    assert child.returncode == -9, child.stderr.decode()[-2000:]  # died where it should
    with EventStore(path, mode="owner") as store:
        assert store.head()[0] == 0
    with fa.Runtime(path, handle_signals=False) as rt:
        assert rt.jobs() == []
    with EventStore(path, mode="readonly") as store:
        assert store.verify().ok
