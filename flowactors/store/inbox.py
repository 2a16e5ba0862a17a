"""The control inbox: requests another process leaves for the owner, and the owner's answers.

Both tables are append-only. A request is a control command (`flowactors.control`) for a job,
or a fork of it with its arguments (`ForkRequest`, MessagePack in the `args` column); the owner
tails the requests that have no answer yet and answers each once. A log made before forks went
through the inbox has neither the column nor a trigger that lets `fork` in: its owner adds them
on open (`schema.migrate`); a request for a fork to an older owner fails before it is written.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..control import REQUEST_COMMANDS, ForkRequest, RequestCommand, encode_fork
from ..errors import InvalidRequest, InvalidTransition, StoreUnavailable
from ..ports import Answer, Outcome, Request
from .schema import OUTCOMES, now_iso, parse_time, takes_forks

SELECT_PENDING = (
    "SELECT id, job_id, command, requested_at, args FROM requests AS r WHERE id > ? "
    "AND NOT EXISTS (SELECT 1 FROM answers WHERE request_id = r.id) ORDER BY id")
SELECT_ANSWER = "SELECT outcome, reason, answered_at FROM answers WHERE request_id = ?"


def check_request(job_id: str, command: str, fork: ForkRequest | None = None) -> bytes | None:
    """The stored arguments of a request; raises InvalidRequest for a command, arguments or
    job id the inbox does not take."""
    if command not in REQUEST_COMMANDS:
        raise InvalidRequest(
            f"command must be one of {', '.join(REQUEST_COMMANDS)}, not {command!r}")
    if command == "fork" and not isinstance(fork, ForkRequest):
        raise InvalidRequest(f"a fork request takes its arguments as a ForkRequest, not {fork!r}")
    if command != "fork" and fork is not None:
        raise InvalidRequest(f"a {command} request takes no arguments")
    if type(job_id) is not str or not job_id:
        raise InvalidRequest(f"job_id must be a non-empty str, not {job_id!r}")
    try:
        job_id.encode()
    except UnicodeError:
        raise InvalidRequest(f"job_id {job_id!r} is not valid Unicode") from None
    return None if fork is None else encode_fork(fork)


def check_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")


def _transaction(conn: sqlite3.Connection, body: Callable[[], Any]) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        value = body()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return value


def insert_request(path: str, job_id: str, command: RequestCommand, args: bytes | None
                   ) -> Callable[[sqlite3.Connection], int]:
    """The write of a request (run on a writing connection); returns its id.

    Raises (when run): StoreUnavailable: a fork, and the log's inbox does not take forks yet
    (an older runtime owns it and did not migrate it).
    """
    def body(conn: sqlite3.Connection) -> int:
        if args is None:
            return conn.execute(
                "INSERT INTO requests (job_id, command, requested_at) VALUES (?, ?, ?)",
                (job_id, command, now_iso())).lastrowid
        if not takes_forks(conn):
            raise StoreUnavailable(
                f"{path}: the runtime owning this log does not take fork requests (an older "
                f"flowactors); fork from that runtime (Runtime.fork)")
        return conn.execute(
            "INSERT INTO requests (job_id, command, requested_at, args) VALUES (?, ?, ?, ?)",
            (job_id, command, now_iso(), args)).lastrowid

    return lambda conn: _transaction(conn, lambda: body(conn))


def insert_answer(path: str, request_id: int, outcome: Outcome, reason: str
                  ) -> Callable[[sqlite3.Connection], None]:
    """The write of an answer (run on the owner's connection).

    Raises (when run): InvalidTransition: no such request, or it is answered already.
    """
    def body(conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is None:
            raise InvalidTransition(f"no request {request_id} in {path}")
        if conn.execute("SELECT 1 FROM answers WHERE request_id = ?",
                        (request_id,)).fetchone() is not None:
            raise InvalidTransition(f"request {request_id} in {path} is already answered")
        conn.execute("INSERT INTO answers (request_id, outcome, reason, answered_at) "
                     "VALUES (?, ?, ?, ?)", (request_id, outcome, reason, now_iso()))

    return lambda conn: _transaction(conn, lambda: body(conn))


def requests_of(path: str, rows: list[Any]) -> list[Request]:
    """Requests from rows of SELECT_PENDING."""
    return [Request(id=id_, job_id=job_id, command=command,
                    requested_at=parse_time(at, f"{path}, request {id_}"),
                    args=args if isinstance(args, bytes) else None)
            for id_, job_id, command, at, args in rows]


def answer_from(path: str, request_id: int, rows: list[Any]) -> Answer | None:
    """The answer from rows of SELECT_ANSWER; None while the request is pending."""
    if not rows:
        return None
    outcome, reason, at = rows[0]
    return Answer(request_id=request_id, outcome=outcome, reason=reason,
                  answered_at=parse_time(at, f"{path}, answer {request_id}"))
