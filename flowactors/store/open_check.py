"""The checks of a log that an open runs beside its replay, so that an open refuses what
`verify` refuses in a fraction of its time.

The replay reads every event (checking each job's versions follow one another); meanwhile,
on another thread (SQLite and hashlib release the GIL), the storage steps of `integrity` run:
every blob against its address, every page (quick_check), the small tables' indexes entry by
entry, and the fingerprint of the events index entries, which the rows the replay reads must
match. In a process of its own, if asked: the hash chain (`chain.CheckProcess`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


from ..errors import LogCorrupted
from ..events import RecordedEvent
from ..ports import VerifyReport
from . import chain, integrity
from .connections import connect_ro
from .reader import Reader
from ..logs import get_logger

log = get_logger(__name__)
_PRIME = integrity.PRIME


class Fingerprint(dict[str, int]):
    """One open's weights (by job, drawn from its name and a random key) and mix."""

    def __init__(self) -> None:
        super().__init__()
        self._key = os.urandom(16)
        self.mix = tuple(1 + int.from_bytes(os.urandom(8), "little") % (_PRIME - 1)
                         for _ in range(2))

    def __missing__(self, stream: str) -> int:
        if type(stream) is not str:
            raise TypeError(f"a job named by {type(stream).__name__}, not text")
        digest = hashlib.blake2b(stream.encode("utf-8", "surrogatepass"), digest_size=8,
                                 key=self._key).digest()
        weight = self[stream] = 1 + int.from_bytes(digest, "little") % (_PRIME - 1)
        return weight

    def mixed(self, rows: Iterable[Sequence[Any]]) -> int:
        """The weighted sum over rows of (position, stream, version, ...), not yet reduced."""
        a, b = self.mix
        total = 0
        for row in rows:
            position, version = row[0], row[2]
            total += self[row[1]] * (position * (a + version) + b * version)
        return total


class OpenCheck:
    """The checks of a log besides its replay, running meanwhile (`EventStore.check_meanwhile`).

    With a replay of `events()` that checks each job's versions follow one another, an open
    refuses what `verify` refuses (the index but for a chance of about 1 in 2^31).
    """

    def __init__(self, path: str, reader: Reader, head: tuple[int, bytes],
                 chain_process: bool) -> None:
        self._path = path
        self._reader = reader
        position, head_hash = head
        self.upto = position
        """The last position checked: replay up to it (a log being written grows meanwhile)."""
        self._head_hash = head_hash.hex()
        self._conn: sqlite3.Connection | None = None  # the thread's, to interrupt it
        self._report: VerifyReport | None = None
        self.fingerprint = Fingerprint()
        self._index_sums: tuple[int, ...] | None = None  # the thread's: entries up to upto
        self._replay_mixed: int | None = None  # the replay's: see _tallied
        self._thread = threading.Thread(target=self._check_storage, daemon=True,
                                        name="flowactors-open-check")
        self._thread.start()
        self._process: chain.CheckProcess | None = None
        if chain_process:
            try:
                self._process = chain.CheckProcess(path, self.upto)
            except OSError as exc:
                log.warning("chain_check_process_unavailable", path=path, error=str(exc))

    @property
    def checks_chain(self) -> bool:
        """Whether the chain is checked here; if not, the replay must (`verify_chain`)."""
        return self._process is not None

    def _check_storage(self) -> None:
        """The storage steps of `integrity`, over one snapshot."""
        try:
            conn = self._conn = connect_ro(self._path)
        except sqlite3.Error as exc:
            self._report = VerifyReport(ok=False, events_checked=0, blobs_checked=0,
                                        head_position=0, head_hash="",
                                        problem=f"cannot read {self._path}: {exc}")
            return

        def steps(check: integrity.Pass) -> VerifyReport:
            check.read_head()
            problem = check.check_blobs() or check.quick_checks()
            if problem is None:
                sums = integrity.index_fingerprint(
                    check.conn, self.upto, self.fingerprint.__getitem__, self.fingerprint.mix,
                    self.fingerprint.mixed)
                if isinstance(sums, str):
                    problem = sums
                else:
                    self._index_sums = sums
            return check.report(problem)

        try:
            self._report = integrity.in_snapshot(self._path, conn, steps)
        finally:
            conn.close()

    def events(self) -> Iterator[RecordedEvent]:
        """The events to replay: the whole log up to `upto`, read from the table, tallied for
        the index sums, and chain-checked here if no process does."""
        here = not self.checks_chain
        rows = self._reader.rows(1, self.upto, here, here)
        return itertools.chain.from_iterable(self._reader.events(self._tallied(rows)))

    def _tallied(self, batches: Iterable[list[Any]]) -> Iterator[list[Any]]:
        """Pass rows through, adding up the fingerprint's weighted sum (its other sums follow
        from the positions and from each job's versions being 1, 2, 3...)."""
        mixed = 0
        for rows in batches:
            try:
                mixed += self.fingerprint.mixed(rows)
            except TypeError as exc:
                raise LogCorrupted(
                    f"{self._path}: an event at positions {rows[0][0]} to {rows[-1][0]} "
                    f"has a job or version of the wrong type ({exc}); run `flowactors verify`"
                ) from None
            yield rows
        self._replay_mixed = mixed

    def _rows_match_index(self, versions: dict[str, int]) -> bool:
        if self._replay_mixed is None:
            raise RuntimeError("OpenCheck.finish() before its events() were all replayed")
        upto = self.upto
        rows = (upto, sum(last * (last + 1) // 2 for last in versions.values()),
                upto * (upto + 1) // 2, self._replay_mixed % _PRIME)
        return rows == self._index_sums

    def finish(self, versions: dict[str, int]) -> None:
        """Wait for the checks of the log that the caller replayed up to position `upto`
        (all of `events()`), `versions` holding the last version it replayed of each stream.

        Raises:
            LogCorrupted: a check failed, or the log checked was not the one replayed.
            RuntimeError: `events()` was not replayed to its end.
        """
        path = self._path
        if self._process is not None:
            verdict = self._process.verdict()
            if verdict is None:
                log.warning("chain_check_process_failed", path=path)
                self._reader.check_chain(self.upto)
            elif not verdict["ok"]:
                raise LogCorrupted(f"{path}: {verdict['problem']}; run `flowactors verify`")
            elif verdict["position"] != self.upto or verdict["hash"] != self._head_hash:
                raise LogCorrupted(
                    f"{path}: the chain was checked up to position {verdict['position']}, not "
                    f"the head {self.upto} that was replayed: the log changed while it was "
                    f"opened")
        replayed = sum(versions.values())  # each event is its stream's next version
        if replayed != self.upto:
            raise LogCorrupted(
                f"{path}: the jobs replayed up to position {self.upto} hold {replayed} events: "
                f"the log changed while it was opened")
        self._thread.join()
        report = self._report
        problem = "the check did not finish" if report is None else report.problem
        if problem is None and not self._rows_match_index(versions):
            problem = ("SQLite index events_version_stream does not match the events table "
                       "(the fingerprints of its entries and of the rows differ)")
        if problem is not None:
            raise LogCorrupted(f"{path} fails verification: {problem}; "
                               f"run `flowactors verify --db {path}`")

    def cancel(self) -> None:
        """Stop what still runs: the chain process, and the thread's query (interrupted)."""
        if self._process is not None:
            self._process.kill()
        if self._thread.is_alive():
            with contextlib.suppress(sqlite3.Error, AttributeError):
                self._conn.interrupt()  # type: ignore[union-attr]
            self._thread.join()
