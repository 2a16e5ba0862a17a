"""Connections to a log, and the owner lock.

Three kinds of connection: the owner's (the writer's, in WAL mode, tuned), a requester's (adds
control requests only) and read-only ones (`mode=ro`, one per reading thread, in a pool that
closes them when their thread ends or the store closes). A cleanly closed log is one file: the
owner's close checkpoints the WAL into the main file and switches it out of WAL mode, so no
`-wal`/`-shm` stays beside it and read-only opens of it create none; the next owner switches
it back.

The owner lock: an exclusive `flock` on `<log>.lock`, plus an open-file-description lock on
the same file that `owner_of` can test without taking it (so a reader never makes a starting
owner fail), and the owner's pid, host and start time written into the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sqlite3
import struct
import threading
import weakref
from datetime import datetime, timezone

import msgspec

from .chain import read_only_uri
from ..errors import StoreLocked, StoreUnavailable
from ..logs import get_logger

log = get_logger(__name__)

BUSY_TIMEOUT_MS = 10_000
# The writer's connection does not checkpoint the WAL itself (copying WAL pages into the
# database file and syncing it takes a commit's time); a checkpointer thread with its own
# connection does, in parallel, every few thousand appended rows. The writer's own
# autocheckpoint stays on as a backstop at a much larger WAL.
WRITER_AUTOCHECKPOINT_PAGES = 50_000
WAL_SIZE_LIMIT = 64 << 20
"""Bytes the -wal keeps after a checkpoint reset it (`journal_size_limit`): without it the
file stays at its high-water mark (the writer's backstop, ~200 MB) for the log's life."""


class Owner(msgspec.Struct, frozen=True, kw_only=True):
    """The runtime that owns a log right now: its process, host and since when."""

    pid: int
    host: str
    since: datetime


_owner_decoder = msgspec.json.Decoder(Owner)
# struct flock of Linux (l_type, l_whence, l_start, l_len, l_pid), for F_OFD_SETLK/GETLK.
_FLOCK = "hhqqi4x"
_OFD = hasattr(fcntl, "F_OFD_GETLK")


def lock_path(path: str) -> str:
    return path + ".lock"


class OwnerLock:
    """The exclusive lock of an owner on `<log>.lock`, with who holds it written inside.

    Raises:
        StoreLocked: another open (in this or another process) owns the log.
        StoreUnavailable: the lock file cannot be created.
    """

    def __init__(self, path: str) -> None:
        self.path = lock_path(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the lock file {self.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLocked(
                f"{path} is owned by another runtime (in this or another process): "
                f"{self.path} is locked") from None
        self._fd: int | None = fd
        owner = Owner(pid=os.getpid(), host=socket.gethostname(),
                      since=datetime.now(timezone.utc))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, msgspec.json.encode(owner), 0)
            if _OFD:  # what owner_of tests; taken after the owner is written
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0))
        except OSError as exc:  # the flock alone still excludes other owners
            log.warning("owner_record_failed", path=self.path, error=str(exc))

    def release(self) -> None:
        """Forget the owner and drop the locks (closing the file drops both)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


def owner_of(path: str | os.PathLike[str]) -> Owner | None:
    """The runtime that owns the log at `path` right now, or None (nobody: a crashed or
    closed runtime's log, or no log).

    Tests the owner's lock without taking it (so it never makes a starting owner fail) and
    creates no file. Where the system has no lock that can be tested this way, it trusts the
    pid written in the lock file when it names a live process of this host.
    """
    where = lock_path(os.fspath(path))
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        held = _held(fd)
        content = os.pread(fd, 4096, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        owner = _owner_decoder.decode(content)
    except msgspec.DecodeError:
        return None  # empty: never owned, closed, or an owner between lock and record
    if held is None:  # no testable lock: is the recorded process alive here?
        held = owner.host == socket.gethostname() and _alive(owner.pid)
    return owner if held else None


def _held(fd: int) -> bool | None:
    if not _OFD:
        return None
    probe = struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0)
    l_type = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
    return l_type != fcntl.F_UNLCK


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def connect_owner(path: str, synchronous: str) -> tuple[sqlite3.Connection, str]:
    """The owner's connection, switched to WAL; returns it with the journal mode SQLite
    reports (the caller refuses anything but "wal" once the schema exists)."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               cached_statements=256)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open {path}: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # WAL first: a crash while creating the schema then leaves an empty database, which
        # the next owner initialises, not a hot rollback journal no reader can roll back.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("PRAGMA cache_size = -32768")  # 32 MiB: keeps hot index pages
        conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA recursive_triggers = ON")
    except BaseException:
        conn.close()
        raise
    return conn, mode


def close_owner(path: str, conn: sqlite3.Connection) -> None:
    """Leave the log one self-contained file: checkpoint the whole WAL into it, truncate
    the WAL, and switch out of WAL mode, so closing deletes `-wal` and `-shm`.

    Done without waiting: while another process reads the log (it holds the WAL open), the
    switch is refused at once and the log stays in WAL mode, as consistent as before.
    """
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        if mode != "delete":
            log.info("log_left_in_wal_mode", path=path, mode=mode)
    except sqlite3.Error as exc:
        log.info("log_left_in_wal_mode", path=path, error=str(exc))
    finally:
        conn.close()


def connect_requester(path: str, synchronous: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open {path}: {exc}") from None
    return conn


def connect_checkpointer(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return conn


def connect_ro(path: str) -> sqlite3.Connection:
    """A read-only connection: it never creates or changes the file."""
    conn = sqlite3.connect(read_only_uri(path), uri=True, isolation_level=None,
                           check_same_thread=False, cached_statements=64)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


class _Reader:
    """A thread's read connection. Only the thread-local holds it strongly, so it goes when
    the thread ends, and closes its connection then: a connection is in a reference cycle
    with its statement cache, so without the close it would stay open until a garbage
    collection, and keep the owner's close from leaving one file. The pool keeps a weak set
    to close the rest."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        self.conn.close()


class ReaderPool:
    """One read-only connection per reading thread (SQLite connections are not meant to be
    shared by concurrent threads)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False
        self.readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        reader = getattr(self._local, "reader", None)
        if reader is None:
            if self.closed:
                raise StoreUnavailable(f"{self.path}: the store is closed")
            try:
                reader = _Reader(connect_ro(self.path))
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot read {self.path}: {exc}") from None
            with self._lock:
                if self.closed:
                    reader.conn.close()
                    raise StoreUnavailable(f"{self.path}: the store is closed")
                self.readers.add(reader)
            self._local.reader = reader
        return reader.conn

    def close(self) -> None:
        with self._lock:
            self.closed = True
            readers = list(self.readers)
            self.readers.clear()
        for reader in readers:
            reader.conn.close()
