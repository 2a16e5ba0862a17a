"""JSON-RPC 2.0 over the Runtime: `training.*` methods, typed params, errors as error objects.

Every body is decoded by msgspec into typed Structs: the envelope (`Request`), then the
method's params (`StartParams`, `JobParams`, ...), so a bad field is refused with -32602 and
its path (`$.spec.config.batch_size`) before anything runs. Results are the JSON the CLI's
`--json` prints: a `JobView` for a job, lists of them, `CheckpointInfo`s, and history lines
(the `flowactors export` format). A method is one entry of `METHODS`: its params type, a
function, and whether it may block (then it runs in a worker thread, off the event loop).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from ..errors import (
    ConcurrencyConflict,
    FlowError,
    InvalidTransition,
    JobNotFound,
    LogCorrupted,
    SpecError,
    StoreLocked,
    StoreUnavailable,
)
from ..events import JobSubmitted
from ..history import history_line
from ..runtime import Runtime
from ..spec import JobSpec, validate_spec
from ..views import JobStatus

# The protocol's own codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application codes (the implementation-defined range).
JOB_NOT_FOUND = -32001
INVALID_TRANSITION = -32002
CONFLICT = -32003
LOG_UNAVAILABLE = -32004

MAX_BATCH = 100
HISTORY_LIMIT = 10_000

JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=128,
                                    pattern=r"^[A-Za-z0-9_:-][A-Za-z0-9._:-]*$")]


# --- the envelope ------------------------------------------------------------------------------


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One JSON-RPC 2.0 request; without `id` it is a notification (no response)."""

    jsonrpc: Literal["2.0"]
    method: str
    params: msgspec.Raw = msgspec.Raw(b"{}")
    id: int | str | None | UnsetType = UNSET


class _IdOnly(msgspec.Struct):
    """What is left of an invalid request: its id, if it has a usable one."""

    id: int | str | None = None


class Error(msgspec.Struct, frozen=True, omit_defaults=True):
    code: int
    message: str
    data: dict[str, Any] | None = None


class ErrorResponse(msgspec.Struct, frozen=True):
    error: Error
    id: int | str | None
    jsonrpc: str = "2.0"


class Response(msgspec.Struct, frozen=True):
    result: Any
    id: int | str | None
    jsonrpc: str = "2.0"


class RpcError(Exception):
    """A JSON-RPC error to answer with."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = Error(code=code, message=message, data=data)


# --- the params of each method -----------------------------------------------------------------


class StartParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`training.start_grpo`: a JobSpec; with `job_id`, starting again is idempotent."""

    spec: JobSpec
    job_id: JobId | None = None


class JobParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`get_status`, `pause`, `resume`, `cancel`, `checkpoints`: one job."""

    job_id: JobId


class ListParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`training.list_jobs`: every job, or those of one status."""

    status: JobStatus | None = None


class HistoryParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`training.history`: a job's events from a log position, at most `limit` of them
    (page on with the last position + 1)."""

    job_id: JobId
    from_position: Annotated[int, msgspec.Meta(ge=1)] = 1
    limit: Annotated[int, msgspec.Meta(ge=1, le=HISTORY_LIMIT)] = HISTORY_LIMIT


# --- the methods -------------------------------------------------------------------------------


def start_grpo(rt: Runtime, p: StartParams) -> Any:
    if p.job_id is not None and _exists(rt, p.job_id):
        _require_same_spec(rt, p.job_id, p.spec)
        return rt.status(p.job_id)
    try:
        job_id = rt.submit(p.spec, job_id=p.job_id)
    except SpecError:
        if p.job_id is not None and _exists(rt, p.job_id):  # another client got there first
            _require_same_spec(rt, p.job_id, p.spec)
            return rt.status(p.job_id)
        raise
    return rt.status(job_id)


def _exists(rt: Runtime, job_id: str) -> bool:
    try:
        rt.status(job_id)
    except JobNotFound:
        return False
    return True


def _require_same_spec(rt: Runtime, job_id: str, spec: JobSpec) -> None:
    first = next(iter(rt.history(job_id)))
    assert isinstance(first.event, JobSubmitted)
    if first.event.spec != validate_spec(spec):
        raise RpcError(CONFLICT, f"job {job_id!r} already exists with a different spec",
                       {"type": "Conflict", "job_id": job_id})


def history(rt: Runtime, p: HistoryParams) -> msgspec.Raw:
    lines = []
    for recorded in rt.history(p.job_id):
        if recorded.position >= p.from_position:
            lines.append(history_line(recorded))
            if len(lines) == p.limit:
                break
    return msgspec.Raw(b"[" + b",".join(lines) + b"]")


class TrajectoriesParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`training.export_trajectories`: `Runtime.trajectories`'s filters."""

    job_id: JobId
    iteration: Annotated[int, msgspec.Meta(ge=1)] | None = None
    success: bool | None = None
    min_reward: float | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=HISTORY_LIMIT)] = HISTORY_LIMIT


def export_trajectories(rt: Runtime, p: TrajectoriesParams) -> Any:
    return rt.trajectories(p.job_id, iteration=p.iteration, success=p.success,
                           min_reward=p.min_reward, limit=p.limit)


class Method(msgspec.Struct, frozen=True):
    params: type
    call: Callable[[Runtime, Any], Any]
    blocking: bool  # it may wait (the log, a job's iteration boundary): run in a thread


METHODS: dict[str, Method] = {
    "training.start_grpo": Method(StartParams, start_grpo, True),
    "training.get_status": Method(JobParams, lambda rt, p: rt.status(p.job_id), False),
    "training.list_jobs": Method(ListParams, lambda rt, p: rt.jobs(p.status), False),
    "training.pause": Method(JobParams, lambda rt, p: rt.pause(p.job_id), True),
    "training.resume": Method(JobParams, lambda rt, p: rt.resume(p.job_id), True),
    "training.cancel": Method(JobParams, lambda rt, p: rt.cancel(p.job_id), True),
    "training.history": Method(HistoryParams, history, True),
    "training.checkpoints": Method(JobParams, lambda rt, p: rt.checkpoints(p.job_id), False),
    "training.export_trajectories": Method(TrajectoriesParams, export_trajectories, True),
}
_param_decoders = {name: msgspec.json.Decoder(m.params) for name, m in METHODS.items()}
_request_decoder = msgspec.json.Decoder(Request)
_id_decoder = msgspec.json.Decoder(_IdOnly)
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_encoder = msgspec.json.Encoder()


# --- dispatch ----------------------------------------------------------------------------------


RunBlocking = Callable[[Callable[[], Any]], Any]  # awaitable runner for blocking calls


def parse(body: bytes) -> list[msgspec.Raw] | msgspec.Raw:
    """The body as one request or a batch of them, still raw.

    Raises:
        RpcError: -32700 not JSON; -32600 an empty or oversized batch.
    """
    try:
        if body.lstrip()[:1] == b"[":
            batch = _batch_decoder.decode(body)
            if not batch:
                raise RpcError(INVALID_REQUEST, "an empty batch")
            if len(batch) > MAX_BATCH:
                raise RpcError(INVALID_REQUEST, f"a batch of {len(batch)} requests is over "
                                                f"the limit of {MAX_BATCH}")
            return batch
        msgspec.json.decode(body)  # well-formed JSON at all?
        return msgspec.Raw(body)
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise RpcError(PARSE_ERROR, f"parse error: {exc}") from None


async def handle(rt: Runtime, raw: msgspec.Raw, run_blocking: RunBlocking
                 ) -> ErrorResponse | Response | None:
    """Answer one request (None for a notification)."""
    try:
        request = _request_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        try:
            request_id = _id_decoder.decode(raw).id
        except msgspec.DecodeError:
            request_id = None
        return ErrorResponse(error=Error(code=INVALID_REQUEST,
                                         message=f"invalid request: {exc}"), id=request_id)
    request_id = None if request.id is UNSET else request.id
    try:
        result = await _call(rt, request, run_blocking)
    except RpcError as exc:
        response: ErrorResponse | Response = ErrorResponse(error=exc.error, id=request_id)
    else:
        response = Response(result=result, id=request_id)
    return None if request.id is UNSET else response


async def _call(rt: Runtime, request: Request, run_blocking: RunBlocking) -> Any:
    method = METHODS.get(request.method)
    if method is None:
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {request.method!r}",
                       {"methods": sorted(METHODS)})
    try:
        params = _param_decoders[request.method].decode(request.params)
    except msgspec.ValidationError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}", _path_of(str(exc))) from None
    try:
        if method.blocking:
            return await run_blocking(lambda: method.call(rt, params))
        return method.call(rt, params)
    except FlowError as exc:
        raise _as_rpc_error(exc) from None
    except TimeoutError as exc:
        raise RpcError(INTERNAL_ERROR, str(exc), {"type": "TimeoutError"}) from None


_AT = re.compile(r"\bat `?(\$[^`\s:]*)")  # "- at `$.config.batch_size`", "at $.task:"


def _path_of(message: str) -> dict[str, Any] | None:
    match = _AT.search(message)
    return {"path": match.group(1)} if match else None


_CODES: tuple[tuple[type[FlowError], int], ...] = (
    (JobNotFound, JOB_NOT_FOUND),
    (InvalidTransition, INVALID_TRANSITION),
    (ConcurrencyConflict, CONFLICT),
    (StoreUnavailable, LOG_UNAVAILABLE),
    (StoreLocked, LOG_UNAVAILABLE),
    (LogCorrupted, LOG_UNAVAILABLE),
    (SpecError, INVALID_PARAMS),
)


def _as_rpc_error(exc: FlowError) -> RpcError:
    message = str(exc)
    data: dict[str, Any] = {"type": type(exc).__name__}
    for cls, code in _CODES:
        if isinstance(exc, cls):
            if code == INVALID_PARAMS:
                at = _path_of(message)
                if at is not None:  # the spec's own path, seen from the params
                    data["path"] = at["path"].replace("$", "$.spec", 1)
            return RpcError(code, message, data)
    return RpcError(INTERNAL_ERROR, message, data)


def encode(response: ErrorResponse | Response | list[ErrorResponse | Response]) -> bytes:
    return _encoder.encode(response)
