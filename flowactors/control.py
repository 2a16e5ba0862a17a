"""The control vocabulary: the three commands a user sends a job, in one place.

`pause`, `resume` and `cancel` are what `Runtime.pause/resume/cancel`, the `flowactors
pause|resume|cancel` commands and the log's control inbox speak; `decision` turns one into the
decider's command (`job.Pause`, `job.Resume`, `job.Cancel`). Pure: no I/O.
"""

from __future__ import annotations

from typing import Literal, get_args

from .job import Cancel, Pause, Resume

ControlCommand = Literal["pause", "resume", "cancel"]
CONTROL_COMMANDS: tuple[ControlCommand, ...] = get_args(ControlCommand)
CONTROL_REASON = "requested from another process"
"""The reason a cancel recorded from another process gives."""


def decision(command: ControlCommand, reason: str = CONTROL_REASON) -> Pause | Resume | Cancel:
    """The decider's command for a control command (`reason` is a cancel's).

    Raises:
        ValueError: not pause, resume or cancel.
    """
    match command:
        case "pause":
            return Pause()
        case "resume":
            return Resume()
        case "cancel":
            return Cancel(reason=reason)
    raise ValueError(f"command must be one of {', '.join(CONTROL_COMMANDS)}, not {command!r}")
