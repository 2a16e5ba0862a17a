"""The files of a log: a closed log is one file, read-only opens create none, the -wal stays
bounded, and who owns a log can be asked without getting in an owner's way."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import open_runtime, sim_spec, wait_until

from flowactors.cli import main
from flowactors.errors import StoreLocked
from flowactors.events import JobStarted
from flowactors.store import EventStore, Owner, owner_of
from flowactors.store import connections

READ_ONLY = [["status"], ["status", "done"], ["history", "done"], ["replay"],
             ["replay", "--check"], ["verify"], ["export"], ["checkpoints", "done"]]


def listing(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def closed_log(tmp_path_factory) -> Path:
    """A log a runtime wrote (a completed job with checkpoints) and closed cleanly."""
    path = tmp_path_factory.mktemp("files") / "flow.db"
    with open_runtime(path) as rt:
        rt.submit(sim_spec("a", n_iterations=6, keep_checkpoints=1), job_id="done")
        rt.wait("done", timeout=30)
    return path


def test_a_cleanly_closed_log_is_one_file(closed_log: Path) -> None:
    """After a clean close nothing but the log (and the owner's lock file) is left: no -wal,
    no -shm; everything is in the main file."""
    assert sorted(p.name for p in closed_log.parent.iterdir()) == ["flow.db", "flow.db.lock"]


def test_read_only_commands_on_a_lone_closed_copy_create_no_file(closed_log: Path,
                                                                  tmp_path: Path) -> None:
    """status, history, replay, verify, export and checkpoints on a copy of the main file
    alone (a cleanly closed log) succeed, and leave the directory exactly as it was: no
    -wal, no -shm, no lock file, the log byte for byte the same."""
    copy = tmp_path / "flow.db"
    copy.write_bytes(closed_log.read_bytes())
    before = listing(tmp_path)
    for args in READ_ONLY:
        result = CliRunner().invoke(main, [*args, "--db", str(copy)], catch_exceptions=False)
        assert result.exit_code == 0, (args, result.stderr)
        assert listing(tmp_path) == before, args


def test_an_owner_reopens_a_closed_log_in_wal_mode_and_closes_it_to_one_file(
        tmp_path: Path) -> None:
    """The next owner of a closed log writes through the WAL again (a -wal exists while it
    is open) and leaves one file again when it closes."""
    path = tmp_path / "flow.db"
    for version in range(3):
        with EventStore(path, synchronous="off") as store:
            store.append("job", [JobStarted()], version)
            assert Path(f"{path}-wal").exists()
        assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    with EventStore(path, mode="readonly") as reader:
        assert reader.streams() == {"job": 3} and reader.verify().ok


def test_the_wal_shrinks_back_to_its_limit_after_a_checkpoint(tmp_path: Path,
                                                              monkeypatch) -> None:
    """A -wal that grew while a reader held an old snapshot (so no checkpoint could reset it)
    is cut back to the limit once checkpoints catch up, instead of staying at its high-water
    mark for the rest of the run."""
    limit = 1 << 20
    monkeypatch.setattr(connections, "WAL_SIZE_LIMIT", limit)
    path = tmp_path / "flow.db"
    wal = Path(f"{path}-wal")
    with EventStore(path, synchronous="off") as store:
        store.append("job", [JobStarted()], 0)
        with EventStore(path, mode="readonly") as reader:
            pinned = reader._pool.get()
            pinned.execute("BEGIN")
            pinned.execute("SELECT count(*) FROM events").fetchone()  # holds its snapshot
            for version in range(1, 33):  # 32 x 256 KiB: an 8 MiB -wal
                store.append("job", [JobStarted()], version, blobs=[os.urandom(256 << 10)])
            assert wal.stat().st_size > 8 * limit
            pinned.execute("COMMIT")
        version = 33

        def shrunk() -> bool:
            nonlocal version
            store.append("job", [JobStarted()] * 64, version)  # commits make checkpoints due
            version += 64
            return wal.stat().st_size <= limit

        wait_until(shrunk, timeout=30, message="the -wal cut back to its limit")


def test_owner_of_names_the_live_owner_and_nobody_else(tmp_path: Path) -> None:
    """owner_of is None for a missing log and a closed one, and names this process (pid,
    host, start time) while it owns the log; asking creates no file."""
    path = tmp_path / "flow.db"
    assert owner_of(path) is None
    assert list(tmp_path.iterdir()) == []
    before = datetime.now(timezone.utc)
    with EventStore(path, synchronous="off"):
        owner = owner_of(path)
        assert isinstance(owner, Owner)
        assert (owner.pid, owner.host) == (os.getpid(), socket.gethostname())
        assert before <= owner.since <= datetime.now(timezone.utc)
    assert owner_of(path) is None


def test_owner_of_is_none_after_the_owner_was_killed(tmp_path: Path) -> None:
    """A SIGKILLed owner leaves its record in the lock file, but owner_of sees that nobody
    holds the lock: the log is an orphan."""
    path = tmp_path / "flow.db"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from flowactors.store import EventStore\n"
         "s = EventStore(sys.argv[1], synchronous='off'); print('ready', file=sys.stderr)\n"
         "sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert child.stderr.readline() == b"ready\n"
        owner = owner_of(path)
        assert owner is not None and owner.pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdin.close()
        child.stderr.close()
    assert Path(f"{path}.lock").read_bytes()  # the record is still there
    assert owner_of(path) is None
    with EventStore(path, synchronous="off"):  # and the log can be owned again
        assert owner_of(path).pid == os.getpid()


def test_asking_who_owns_a_log_never_makes_an_owner_fail(tmp_path: Path) -> None:
    """While threads ask owner_of without pause, an owner opens and closes the log again and
    again: every open succeeds (asking takes no lock an owner would collide with)."""
    path = tmp_path / "flow.db"
    EventStore(path, synchronous="off").close()
    stop = threading.Event()
    seen: list[Owner | None] = []

    def ask() -> None:
        while not stop.is_set():
            seen.append(owner_of(path))

    askers = [threading.Thread(target=ask, daemon=True) for _ in range(2)]
    for asker in askers:
        asker.start()
    try:
        for _ in range(40):
            try:
                EventStore(path, synchronous="off").close()
            except StoreLocked as exc:
                pytest.fail(f"an owner failed while others asked who owns the log: {exc}")
    finally:
        stop.set()
        for asker in askers:
            asker.join(10)
    assert seen and all(o is None or o.pid == os.getpid() for o in seen)
