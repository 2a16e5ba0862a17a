"""The runtime's end of its Ray driver: a child process that alone talks to Ray (`ray_driver`).

Why a child: Ray ends a driver process outright when its node's object store goes away (the
head died on a one-node cluster), from threads of its own and with no exception to catch. The
runtime must outlive its cluster, so it never imports Ray: it sends the driver msgspec messages
over a socket pair (`Put` a state, `Submit` a task, `Cancel` it, `Drop` states no batch needs)
and gets back one `Done` per task. When the driver ends, the link says so once (`on_exit`) and
the backend starts another one when the cluster is back.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec

from ..errors import one_line
from ..logs import get_logger

log = get_logger(__name__)

# Ray ends a driver whose cluster (its GCS) is unreachable for this long (60 s by default);
# the backend decides when the cluster is gone, so its driver waits far longer.
_RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"


class Setup(msgspec.Struct, tag=True):
    """The first message: how the driver connects, and the options of every rollout task."""

    address: str | None
    runtime_env: dict[str, Any] | None
    init_options: dict[str, Any]
    remote_options: dict[str, Any]


class Put(msgspec.Struct, tag=True):
    """Put a trainer state's encoding in the object store, under `key`: the next frame is the
    state's bytes, as they are (no copy of them into a message)."""

    key: int


class Submit(msgspec.Struct, tag=True):
    """Run `rollouts_on_worker(call[, the state stored under state_key])` as Ray task `task`."""

    task: int
    call: bytes
    state_key: int | None


class Cancel(msgspec.Struct, tag=True):
    task: int
    force: bool


class Drop(msgspec.Struct, tag=True):
    """States no batch needs any more (their object refs are released)."""

    keys: list[int]


class Close(msgspec.Struct, tag=True):
    """Shut Ray down and end."""


class Connected(msgspec.Struct, tag=True):
    """The driver is connected; `gcs_address` is None on a Ray Client (ray://) connection."""

    gcs_address: str | None


class Refused(msgspec.Struct, tag=True):
    """The driver could not start: `bad_options` if Ray refused the task options."""

    reason: str
    bad_options: bool


class Done(msgspec.Struct, tag=True):
    """Task `task` ended: its result, or `error` (`submitted`: whether Ray ever took it)."""

    task: int
    result: bytes | None = None
    error: str | None = None
    submitted: bool = True


ToDriver = Setup | Put | Submit | Cancel | Drop | Close
FromDriver = Connected | Refused | Done
encoder = msgspec.msgpack.Encoder()
to_driver = msgspec.msgpack.Decoder(list[ToDriver])  # a frame holds several messages
from_driver = msgspec.msgpack.Decoder(list[FromDriver])


def describe(exc: BaseException) -> str:
    """An exception as one line, "Type: the first line of its message" (how both ends of the
    link report Ray's errors)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {one_line(lines[0]) if lines else ''}"


class DriverGone(Exception):
    """The driver process has ended (or is ending): nothing can be sent to it."""


class DriverLink:
    """One driver process and the socket to it. Sends are thread-safe. Once `start_reading`,
    `on_done(link, done)` and `on_exit(link, why)` are called on the link's reader thread."""

    def __init__(self, setup: Setup, *, on_done: Callable[[DriverLink, Done], None],
                 on_exit: Callable[[DriverLink, str], None], timeout: float) -> None:
        """Start the driver and wait (up to `timeout` seconds) until it is connected; raise
        ValueError (bad options) or ConnectionError (anything else) if it is not."""
        try:
            data = encoder.encode([setup])
        except TypeError as exc:
            raise ValueError(f"Ray's options go to the driver process and must be plain data "
                             f"(str, numbers, lists, dicts): {exc}") from None
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": _with_flowactors(os.environ.get("PYTHONPATH"))}
        env.setdefault(_RECONNECT_ENV, str(10 ** 9))
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "flowactors.rollouts.ray_driver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True)  # no terminal's Ctrl-C
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._dropped: collections.deque[int] = collections.deque()
        self._closing = False
        self._on_done, self._on_exit = on_done, on_exit
        try:
            self._conn.send_bytes(data)
            reply = self._first_reply(timeout)
        except BaseException:
            self.kill()
            self._conn.close()
            raise
        self.gcs_address = reply.gcs_address
        self._reader = threading.Thread(target=self._read, daemon=True, name="ray-driver-link")

    def start_reading(self) -> None:
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _first_reply(self, timeout: float) -> Connected:
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.2):
            if self._process.poll() is not None:
                raise ConnectionError(f"Ray's driver process ended with code "
                                      f"{self._process.returncode} before it connected")
            if time.monotonic() > deadline:
                raise ConnectionError(f"Ray did not connect within {timeout:g} s")
        try:
            reply = from_driver.decode(self._conn.recv_bytes())[0]
        except (EOFError, OSError, IndexError) as exc:
            raise ConnectionError(f"Ray's driver process ended before it connected: "
                                  f"{exc!r}") from None
        if isinstance(reply, Refused):
            raise (ValueError if reply.bad_options else ConnectionError)(reply.reason)
        if not isinstance(reply, Connected):
            raise ConnectionError(f"Ray's driver answered {type(reply).__name__} first")
        return reply

    def put(self, key: int, data: bytes) -> None:
        self._send([Put(key)], data)

    def submit(self, submits: list[Submit]) -> None:
        self._send(submits)

    def cancel(self, task: int, force: bool) -> None:
        self._send([Cancel(task, force)])

    def drop_later(self, key: int) -> None:
        """A state no batch needs: dropped with the next message (callable from any thread,
        a finalizer's too: it only appends)."""
        self._dropped.append(key)

    def _send(self, messages: list[Any], data: bytes | None = None) -> None:
        """One frame: the states to drop, then `messages`, carried out in that order; then
        `data` as a frame of its own if given (a `Put`'s)."""
        with self._send_lock:
            if self._closing:
                raise DriverGone("the Ray driver is closing")
            try:
                if self._dropped:
                    keys = [self._dropped.popleft() for _ in range(len(self._dropped))]
                    messages = [Drop(keys), *messages]
                self._conn.send_bytes(encoder.encode(messages))
                if data is not None:
                    self._conn.send_bytes(data)
            except OSError as exc:
                raise DriverGone(f"the Ray driver process cannot be reached: {exc!r}") from None

    def _read(self) -> None:
        while True:
            try:
                messages = from_driver.decode(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            except msgspec.DecodeError:  # not our driver's: end it, a new one takes over
                log.exception("ray_driver_message_unreadable")
                self._process.kill()
                break
            for message in messages:
                if isinstance(message, Done):
                    try:
                        self._on_done(self, message)
                    except Exception:
                        log.exception("ray_result_callback_failed", task=message.task)
        code = self._process.wait()
        self._conn.close()
        if not self._closing:
            self._on_exit(self, f"Ray's driver process (pid {self._process.pid}) ended with code "
                          f"{code}")

    def close(self, timeout: float = 10.0) -> None:
        """Ask the driver to shut Ray down and end; kill it if it has not within `timeout`."""
        try:
            self._send([Close()])
        except DriverGone:
            pass
        self._closing = True
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("ray_driver_killed", pid=self._process.pid, after_s=timeout)
        self.kill()
        if self._reader.ident is not None and threading.current_thread() is not self._reader:
            self._reader.join(timeout)

    def kill(self) -> None:
        """End the driver now (its cluster is gone, or it never connected): no `on_exit`.
        A send blocked on it fails; the reader thread closes the socket when it reads EOF."""
        self._closing = True
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()


def _with_flowactors(path: str | None) -> str:
    """PYTHONPATH with the directory this flowactors is imported from (the driver imports
    the same one, however the runtime found it)."""
    ours = str(Path(__file__).resolve().parents[2])
    return ours if not path else f"{path}{os.pathsep}{ours}"
