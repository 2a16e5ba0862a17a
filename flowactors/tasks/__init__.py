"""Tasks: the protocol, the built-in tasks, and how a job's spec finds its task's code.

A task name is a built-in name, an entry point of the group `flowactors.tasks`, or
`"module:attr"`, so a restarted process finds the same code from the spec alone.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import msgspec

from ..arrays import StateDecoder
from ..errors import SpecError, one_line
from ..spec import JobSpec
from .base import (
    NoOptions,
    Task,
    TrainerState,
    Trajectory,
    failed_trajectory,
    group_advantages,
    restore,
    snapshot,
)

BUILTIN_TASKS = {
    "simulated": "flowactors.tasks.simulated:SimulatedTask",
    "toolchoice": "flowactors.tasks.toolchoice:ToolChoiceTask",
    "toolchoice-torch": "flowactors.tasks.toolchoice_torch:TorchToolChoiceTask",  # [torch]
}
ENTRY_POINT_GROUP = "flowactors.tasks"

__all__ = ["BUILTIN_TASKS", "NoOptions", "Task", "TrainerState", "Trajectory",
           "failed_trajectory", "group_advantages", "load_task_class", "build_task",
           "build_named_task",
           "restore", "reward_scale", "snapshot", "state_decoder"]


def _import(target: str, name: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SpecError(f"task {name!r}: expected a built-in name, an entry point of "
                        f"{ENTRY_POINT_GROUP!r}, or 'module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise SpecError(f"task {name!r} cannot be loaded: {one_line(str(exc))}") from None
    return obj


_TASK_METHODS = ("init", "rollout", "update", "evaluate")


def _require_task_class(obj: Any, name: str) -> type:
    if not isinstance(obj, type) or issubclass(obj, BaseException) or not all(
            callable(getattr(obj, method, None)) for method in _TASK_METHODS):
        raise SpecError(f"task {name!r} is not a task class (a class with "
                        f"{', '.join(_TASK_METHODS)}) - at `$.task`")
    return obj


@functools.cache
def _task_entry_points() -> dict[str, list[EntryPoint]]:
    """The entry points of `ENTRY_POINT_GROUP` by name, read once per process: reading them
    scans every installed distribution's metadata (milliseconds), and a task is built at each
    submission, each job start and on each Ray worker."""
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def load_task_class(name: str) -> type:
    """Find a task class by built-in name, entry point name, or 'module:attr'."""
    if name in BUILTIN_TASKS:
        return _import(BUILTIN_TASKS[name], name)
    for ep in _task_entry_points().get(name, ()):
        try:
            return _require_task_class(ep.load(), name)
        except SpecError:
            raise
        except Exception as exc:  # a broken plugin is the user's spec problem, said clearly
            raise SpecError(f"task {name!r} (entry point {ep.value}) failed to load: "
                            f"{type(exc).__name__}: {one_line(str(exc))}") from None
    if ":" in name:
        return _require_task_class(_import(name, name), name)
    raise SpecError(f"unknown task {name!r} at $.task: not built in "
                    f"({', '.join(sorted(BUILTIN_TASKS))}), not an entry point of "
                    f"{ENTRY_POINT_GROUP!r}, not 'module:attr'")


def reward_scale(name: str) -> str | None:
    """What a trajectory's reward means for the built-in task `name` (its optional
    `reward_scale`), for displays to say beside an average reward; None for other tasks,
    whose code a report built from the log alone does not import."""
    if name not in BUILTIN_TASKS:
        return None
    return getattr(load_task_class(name), "reward_scale", None)


def build_task(spec: JobSpec) -> Task:
    """Instantiate the spec's task with its options validated (SpecError naming the field)."""
    return build_named_task(spec.task, spec.task_options)


def build_named_task(name: str, task_options: dict[str, Any]) -> Task:
    """`build_task` from a spec's two task fields alone (a Ray worker gets no more)."""
    cls = load_task_class(name)
    options_type = getattr(cls, "Options", NoOptions)
    try:
        options = msgspec.convert(task_options, options_type)
    except msgspec.ValidationError as exc:
        raise SpecError(f"invalid task_options for task {name!r}: "
                        f"{str(exc).replace('at `$', 'at `$.task_options')}") from None
    try:
        task = cls(options)
    except Exception as exc:
        raise SpecError(f"task {name!r} cannot be built from its options: "
                        f"{type(exc).__name__}: {one_line(str(exc))} - at `$.task_options`"
                        ) from None
    state_decoder(task)  # built now, on one thread, before any actor decodes with it
    return task


_STATE_DECODERS: dict[type, StateDecoder] = {}


def state_decoder(task: Task) -> StateDecoder:
    """The decoder of a task's trainer state (checkpoints, arrays included), built once per
    task class.

    `build_task` builds it: msgspec prepares a type's decoding information on first use, and
    doing that from many threads at once (a thousand actors recovering together) is not safe.
    """
    cls = type(task)
    decoder = _STATE_DECODERS.get(cls)
    if decoder is None:
        decoder = _STATE_DECODERS[cls] = StateDecoder(getattr(task, "state_type", Any))
    return decoder
