"""Fault points for crash tests: a process can be frozen at a named moment, then killed.

A process started with ``FLOWACTORS_FAULTS="store.commit@5,actor.iteration@2"`` and
``FLOWACTORS_FAULT_FILE=PATH`` appends the point's name to PATH the 5th time it reaches
``store.commit`` and then blocks that thread forever, so a test can SIGKILL it exactly there.
Unset (always, outside tests), a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import threading

_COUNTS: dict[str, int] = {}
_TARGETS: dict[str, int] = {}
for _item in filter(None, os.environ.get("FLOWACTORS_FAULTS", "").split(",")):
    _name, _, _nth = _item.partition("@")
    _TARGETS[_name.strip()] = int(_nth or 1)
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """Freeze here on the configured occurrence of `name` (no-op unless configured)."""
    if name not in _TARGETS:
        return
    with _lock:
        _COUNTS[name] = count = _COUNTS.get(name, 0) + 1
    if count != _TARGETS[name]:
        return
    with open(os.environ["FLOWACTORS_FAULT_FILE"], "a") as announce:
        announce.write(f"{name}\n")
        announce.flush()
        os.fsync(announce.fileno())
    threading.Event().wait()
