"""The control vocabulary: the commands a user sends a job, in one place.

`pause`, `resume` and `cancel` are what `Runtime.pause/resume/cancel`, the `flowactors
pause|resume|cancel` commands and the log's control inbox speak; `decision` turns one into the
decider's command (`job.Pause`, `job.Resume`, `job.Cancel`). The inbox also takes `fork`,
whose arguments (`ForkRequest`) travel with the request. Pure: no I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec

from .errors import InvalidRequest
from .job import Cancel, Pause, Resume
from .spec import GRPOConfig

ControlCommand = Literal["pause", "resume", "cancel"]
CONTROL_COMMANDS: tuple[ControlCommand, ...] = get_args(ControlCommand)
RequestCommand = Literal["pause", "resume", "cancel", "fork"]
"""What the inbox takes: a control command, or a fork (with its `ForkRequest`)."""
REQUEST_COMMANDS: tuple[RequestCommand, ...] = get_args(RequestCommand)
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


class ForkRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The arguments of `Runtime.fork` as a request carries them to the log's owner.

    `job_id` (the child's) is chosen by the requester, so an applied answer needs to say
    nothing more: the child is that job. A fork with a caller's id is idempotent, so the same
    request decided twice (the owner went away after forking, before answering) forks once.
    `config` is the child's whole GRPOConfig and `task_options` its whole options (None: the
    parent's).
    """

    at_iteration: Annotated[int, msgspec.Meta(ge=1)]
    job_id: Annotated[str, msgspec.Meta(min_length=1)]
    config: GRPOConfig | None = None
    task_options: dict[str, Any] | None = None


_fork_encoder = msgspec.msgpack.Encoder()
_fork_decoder = msgspec.msgpack.Decoder(ForkRequest)


def encode_fork(request: ForkRequest) -> bytes:
    """The stored form of a fork's arguments (MessagePack)."""
    return _fork_encoder.encode(request)


def decode_fork(data: bytes | None) -> ForkRequest:
    """A fork's arguments from their stored form, validated.

    Raises:
        InvalidRequest: missing, or not a valid ForkRequest (the message says where).
    """
    if data is None:
        raise InvalidRequest("a fork request carries no arguments")
    try:
        return _fork_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"invalid fork request: {exc}") from None
