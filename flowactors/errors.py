"""The errors flowactors raises. Every message names what went wrong and where."""

from __future__ import annotations


def one_line(text: str) -> str:
    """`text` made safe for a one-line message: control characters (newlines, terminal
    escapes) and lone surrogates, which damaged files and hostile input carry, are escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF
                   else repr(c)[1:-1] for c in text)


class FlowError(Exception):
    """Base class of every error flowactors raises on purpose.

    Its message is always one line: text quoted from a damaged file or hostile input has its
    control characters escaped.
    """

    def __str__(self) -> str:
        return one_line(str(self.args[0]) if len(self.args) == 1 else super().__str__())


class SpecError(FlowError, ValueError):
    """A job spec (or a task name) is invalid; the message names the field path."""


class JobNotFound(FlowError, KeyError):
    """No job with this id exists in the log."""


class InvalidTransition(FlowError):
    """A command is not allowed in the job's current status (e.g. resume a running job)."""


class ConcurrencyConflict(FlowError):
    """An append stated an expected version, but the stream had moved on."""


class LogCorrupted(FlowError):
    """The file is not a flowactors log, or its content fails verification."""


class StoreLocked(FlowError):
    """Another runtime (in this process or another) already owns the log."""


class StoreUnavailable(FlowError):
    """An append could not be made durable (disk full, I/O error, closed store)."""


class CheckpointNotFound(FlowError, KeyError):
    """No such checkpoint, or it was pruned (its state is gone)."""


class BlobNotFound(FlowError, KeyError):
    """No blob with this digest is stored in the log (never stored, or released and deleted)."""


class CheckpointUnstorable(FlowError):
    """A trainer state could not be stored (the checkpoint store refused it, or is gone)."""


class LogNotFound(FlowError, FileNotFoundError):
    """A read-only or requester open found no log at the path (only an owner creates one)."""


class InvalidRequest(FlowError, ValueError):
    """A control request that cannot be made (unknown command, a job id the log cannot store)."""


class StateNotStorable(FlowError, TypeError):
    """A trainer state holds a value that cannot be stored; the message names where."""
