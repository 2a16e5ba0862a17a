"""The errors flowactors raises. Every message names what went wrong and where."""

from __future__ import annotations


class FlowError(Exception):
    """Base class of every error flowactors raises on purpose."""


class SpecError(FlowError, ValueError):
    """A job spec (or a task name) is invalid; the message names the field path."""


class JobNotFound(FlowError, KeyError):
    """No job with this id exists in the log."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "job not found"


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

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "checkpoint not found"


class BlobNotFound(FlowError, KeyError):
    """No blob with this digest is stored in the log (never stored, or released and deleted)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "blob not found"


class LogNotFound(FlowError, FileNotFoundError):
    """A read-only or requester open found no log at the path (only an owner creates one)."""
