"""The Ray driver: the only process of a runtime that imports Ray (see `ray_link`).

    python -m flowactors.rollouts.ray_driver FD

It reads msgspec messages from the socket FD (`Setup` first, then `Put`, `Submit`, `Cancel`,
`Drop`, `Close`) and writes one `Done` per submitted task from a writer thread, so that a
slow reader on the runtime's side never blocks Ray's callbacks. It ends when the runtime
asks, and when the runtime's end of the socket closes (the runtime ended, even by SIGKILL).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from .ray_link import (
    Cancel,
    Close,
    Connected,
    Done,
    Drop,
    FromDriver,
    Put,
    Refused,
    Setup,
    Submit,
    describe,
    encoder,
    to_driver,
)
from .ray_worker import rollouts_on_worker

_SHUTDOWN_S = 5.0
"""How long `ray.shutdown` may take when the runtime is gone before the driver just exits."""


class Driver:
    """Ray calls on behalf of the runtime: stored states by key, tasks in flight by id."""

    def __init__(self, ray: Any, remote: Any, conn: Connection) -> None:
        self._ray, self._remote, self._conn = ray, remote, conn
        self._states: dict[int, Any] = {}
        self._refs: dict[int, Any] = {}
        self._lock = threading.Lock()  # _refs: the reader adds, Ray's callbacks remove
        self._outbox: queue.SimpleQueue[FromDriver | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, daemon=True, name="ray-driver-out")
        self._writer.start()

    def serve(self) -> None:
        """Carry out messages until `Close`, or until the runtime's end closes."""
        try:
            while True:
                for message in to_driver.decode(self._conn.recv_bytes()):
                    if isinstance(message, Close):
                        return
                    self._handle(message)
        except (EOFError, OSError):
            return

    def _handle(self, message: Any) -> None:
        if isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Put):
            data = self._conn.recv_bytes()  # EOFError: the runtime is gone, as in `serve`
            try:
                self._states[message.key] = self._ray.put(data)
            except Exception as exc:  # its tasks are refused, with this reason
                self._states[message.key] = exc
        elif isinstance(message, Cancel):
            with self._lock:
                ref = self._refs.get(message.task)
            if ref is not None:
                try:
                    self._ray.cancel(ref, force=message.force)
                except Exception:  # best effort: the runtime waits for it no more
                    pass
        elif isinstance(message, Drop):
            for key in message.keys:
                self._states.pop(key, None)

    def _submit(self, message: Submit) -> None:
        try:
            if message.state_key is None:
                ref = self._remote.remote(message.call)
            else:
                state = self._states.get(message.state_key)
                if state is None or isinstance(state, Exception):
                    raise RuntimeError(f"the state could not be stored: {state!r}")
                ref = self._remote.remote(message.call, state)
        except Exception as exc:  # Ray refused it: not connected, a bad option, ...
            self._outbox.put(Done(message.task, error=describe(exc), submitted=False))
            return
        with self._lock:
            self._refs[message.task] = ref
        # What `ref.future()` is built on, without a Future per task: the result, or the
        # exception getting it raised (the worker died, the task was cancelled, ...).
        ref._on_completed(lambda result: self._completed(message.task, result))

    def _completed(self, task: int, result: Any) -> None:
        with self._lock:
            self._refs.pop(task, None)
        if isinstance(result, bytes):
            self._outbox.put(Done(task, result=result))
        elif isinstance(result, BaseException):
            self._outbox.put(Done(task, error=describe(result)))
        else:
            self._outbox.put(Done(task, error=f"TypeError: the task returned "
                                  f"{type(result).__name__}, not bytes"))

    def _write(self) -> None:
        """Send what is in the outbox, all of it in one frame (results come in bursts)."""
        while (message := self._outbox.get()) is not None:
            messages = [message]
            while not self._outbox.empty() and (message := self._outbox.get()) is not None:
                messages.append(message)
            try:
                self._conn.send_bytes(encoder.encode(messages))
            except OSError:  # the runtime is gone: the reader sees it too
                return
            if message is None:
                return

    def stop(self) -> None:
        self._outbox.put(None)
        self._writer.join(timeout=_SHUTDOWN_S)


def _connect(setup: Setup) -> tuple[Any, Any, str | None]:
    import ray

    options: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if setup.address is None:  # a local cluster: no dashboard to start
        options["include_dashboard"] = False
    ray.init(address=setup.address, runtime_env=setup.runtime_env,
             **{**options, **setup.init_options})
    try:
        gcs: str | None = ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client connection (ray://) has no GCS address to watch
        gcs = None
    return ray, ray.remote(rollouts_on_worker).options(**setup.remote_options), gcs


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    try:
        setup = to_driver.decode(conn.recv_bytes())[0]
    except (EOFError, OSError, IndexError):
        return 1
    if not isinstance(setup, Setup):
        return 2
    try:
        ray, remote, gcs = _connect(setup)
    except (ValueError, TypeError) as exc:  # Ray refused an option
        conn.send_bytes(encoder.encode([Refused(describe(exc), bad_options=True)]))
        return 1
    except Exception as exc:
        conn.send_bytes(encoder.encode([Refused(
            f"Ray could not connect to {setup.address or 'a local cluster'}: {describe(exc)}",
            bad_options=False)]))
        return 1
    conn.send_bytes(encoder.encode([Connected(gcs)]))
    driver = Driver(ray, remote, conn)
    driver.serve()
    # The runtime closed or is gone: shut Ray down, unless that hangs (a dead cluster).
    timer = threading.Timer(_SHUTDOWN_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    driver.stop()
    ray.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
