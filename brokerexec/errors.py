"""The one error tree of brokerexec.

::

    BrokerExecError
    ├── ConfigurationError        bad settings or arguments given to brokerexec itself
    │   └── ServiceDefinitionError  a Service subclass declares something impossible
    ├── BrokerConnectionError     the broker cannot be reached or the connection was lost
    ├── AccessRefused             the broker refused this user an operation (403 ACCESS_REFUSED)
    ├── DecodeError               a message could not be decoded (size, type, JSON, YAML tags)
    │   └── MessageTooLarge
    ├── ServiceError              a service refused something
    │   ├── UnknownService        no service of that name is registered
    │   ├── InvalidRequest        a request does not match the service's declared inputs
    │   └── SignalRefused         set/invoke of an undeclared or private name, bad arguments
    ├── InvalidState              the operation is not allowed in the current state
    │   └── NotApplied            a set/invoke was accepted, but its execution was lost first
    ├── CheckpointFailed          a checkpoint could not be stored (too large, broker gone)
    ├── NotDurable                a set/invoke was applied, but could not be made durable
    ├── ResultTooLarge            a job's result is over its worker's --max-result-bytes
    ├── WorkerLost                a job's worker was lost and its service does not restart
    ├── JobNotFound               no worker holds that job id and the journal has no trace of it
    ├── HistoryUnavailable        no history indexer answers on the broker (or its store is down)
    ├── RemoteError               the remote side failed: carries its type, message, traceback
    │   └── JobAborted            the job was aborted (raised by ``Job.result``)
    └── Timeout                   something did not answer in time (also a TimeoutError)

    Aborted (BaseException, outside the tree): raised by ``ready()`` in the computation
    thread so that ``except Exception`` in user code cannot swallow an abort.

**Errors cross the wire typed.** A worker sends an error as ``{"type", "message",
"traceback"}`` (:func:`error_to_wire`). The caller raises it with :func:`error_from_wire`:
one of brokerexec's own errors comes back as a class that is both a :class:`RemoteError`
(remote type, message and traceback) and the error itself, so ``except SignalRefused`` or
``except JobNotFound`` catches a refusal made on a worker; a user's own exception stays a
plain :class:`RemoteError`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Aborted",
    "AccessRefused",
    "BrokerConnectionError",
    "BrokerExecError",
    "CheckpointFailed",
    "ConfigurationError",
    "DecodeError",
    "HistoryUnavailable",
    "InvalidRequest",
    "InvalidState",
    "JobAborted",
    "JobNotFound",
    "MessageTooLarge",
    "NotApplied",
    "NotDurable",
    "RemoteError",
    "ResultTooLarge",
    "ServiceDefinitionError",
    "ServiceError",
    "SignalRefused",
    "Timeout",
    "UnknownService",
    "WorkerLost",
    "error_from_wire",
    "error_to_wire",
]

#: How brokerexec's own error types are named on the wire: ``brokerexec.<Class>``.
WIRE_PREFIX = "brokerexec."


class BrokerExecError(Exception):
    """Root of every error brokerexec raises on purpose."""


class ConfigurationError(BrokerExecError):
    """Settings or arguments given to brokerexec are invalid."""


class ServiceDefinitionError(ConfigurationError, TypeError):
    """A :class:`~brokerexec.Service` subclass declares something that cannot work (an input
    type that is not a type, a default of the wrong type, a settable name that is private or
    a method, an invokable that is not a public method); raised when the class is defined,
    naming the class and the mistake. Also a ``TypeError``: a bad class body is one."""


class BrokerConnectionError(BrokerExecError):
    """The broker cannot be reached, or the connection to it was lost."""


class AccessRefused(BrokerExecError):
    """The broker refused this user an operation (``403 ACCESS_REFUSED``): its permissions
    in the vhost do not allow it (``docs/security.md``). Retrying will not help."""


class DecodeError(BrokerExecError):
    """A message body could not be decoded; the text says what was wrong."""


class MessageTooLarge(DecodeError):
    """A message body is larger than the configured limit."""


class ServiceError(BrokerExecError):
    """A service refused a request or a signal."""


class UnknownService(ServiceError):
    """No service of that name is registered with the worker."""


class InvalidRequest(ServiceError):
    """A request does not match the service's declared inputs."""


class SignalRefused(ServiceError):
    """A ``set`` or ``invoke`` names something the service does not expose, or has bad arguments."""


class InvalidState(BrokerExecError):
    """The operation is not allowed in the current state (e.g. starting a busy handler)."""


class NotApplied(InvalidState):
    """A ``set``, ``invoke`` or ``checkpoint`` was accepted (its sender got "pending"), but the
    execution that held it was lost (its worker died, or handed the job over) before it was
    applied: it was not applied, and is not carried to the job's next execution."""


class CheckpointFailed(BrokerExecError):
    """A checkpoint could not be stored: over the size limit, or the broker did not take it.
    The job goes on; its previous checkpoint stays the one it resumes from."""


class NotDurable(BrokerExecError):
    """A ``set`` or ``invoke`` was applied, but the broker did not take the note that makes it
    survive a crash (docs/durability.md): if the job's worker dies before its next
    checkpoint, a ``set`` may be undone, and an ``invoke`` goes unlisted at the resume."""


class ResultTooLarge(BrokerExecError):
    """A job's result, as JSON, is larger than its worker's ``--max-result-bytes``: the job
    failed with this error rather than have its record refused by the broker or a reader."""


class WorkerLost(BrokerExecError):
    """The worker running a job was lost, and the job could not resume from a checkpoint
    while its service says ``on_lost = "fail"``: the reason in its failed record."""


class HistoryUnavailable(BrokerExecError):
    """No history indexer answers on this broker (start ``brokerexec history``)."""


class JobNotFound(BrokerExecError):
    """No worker holds that job id, and the journal has no trace of it."""


class Timeout(BrokerExecError, TimeoutError):
    """Something did not answer in time; the message names what."""


class RemoteError(BrokerExecError):
    """The remote side failed.

    Attributes:
        remote_type: the qualified name of the remote exception type.
        remote_message: the remote exception's message.
        remote_traceback: the remote traceback as text ("" when unknown).
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, for process pools and tests
        return (error_from_wire, ({"type": self.remote_type, "message": self.remote_message,
                                  "traceback": self.remote_traceback},))


class JobAborted(RemoteError):
    """The job was aborted; raised by ``Job.result``."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"{WIRE_PREFIX}Aborted", f"job {job_id} was aborted")
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (JobAborted, (self.job_id,))


class Aborted(BaseException):
    """Raised in the computation thread by ``ready()`` when the job is aborted."""


#: brokerexec's errors that may be raised remotely and are raised typed in the caller.
_WIRE_TYPES: dict[str, type[BrokerExecError]] = {
    f"{WIRE_PREFIX}{kind.__name__}": kind
    for kind in (ConfigurationError, BrokerConnectionError, DecodeError, MessageTooLarge,
                 ServiceError, UnknownService, InvalidRequest, SignalRefused, InvalidState,
                 NotApplied, CheckpointFailed, WorkerLost, JobNotFound, Timeout, HistoryUnavailable)
}


_REMOTE_CLASSES: dict[type[BrokerExecError], type[RemoteError]] = {}


def remote_class(kind: type[BrokerExecError]) -> type[RemoteError]:
    """The class of ``kind`` raised remotely: a ``RemoteError`` that is also a ``kind``."""
    cls = _REMOTE_CLASSES.get(kind)
    if cls is None:
        cls = _REMOTE_CLASSES[kind] = type(f"Remote{kind.__name__}", (RemoteError, kind), {
            "__module__": __name__,
            "__doc__": f"A {kind.__name__} raised on the remote side (see RemoteError).",
        })
    return cls


def error_to_wire(exc: BaseException, traceback_text: str = "") -> dict[str, str]:
    """The ``error`` object sent for an exception: its type, message and traceback.

    brokerexec's own errors are named ``brokerexec.<Class>``, also when they were raised
    remotely and pass through again; builtins by their bare name; the rest as
    ``module.Class``.
    """
    if isinstance(exc, RemoteError):  # passed on: keep what the first side said
        return {"type": exc.remote_type, "message": exc.remote_message,
                "traceback": exc.remote_traceback or traceback_text}
    kind = type(exc)
    if kind.__module__ == __name__:
        name = f"{WIRE_PREFIX}{kind.__qualname__}"
    elif kind.__module__ == "builtins":
        name = kind.__qualname__
    else:
        name = f"{kind.__module__}.{kind.__qualname__}"
    return {"type": name, "message": str(exc), "traceback": traceback_text}


def error_from_wire(error: Any) -> RemoteError:
    """The exception to raise for an ``error`` object of a reply or a record.

    ``{"type": "brokerexec.SignalRefused", ...}`` gives an instance of both
    :class:`RemoteError` and :class:`SignalRefused`; an unknown type a :class:`RemoteError`.
    """
    if not isinstance(error, dict):
        return RemoteError("Exception", str(error))
    remote_type = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    traceback_text = str(error.get("traceback", "") or "")
    if remote_type == f"{WIRE_PREFIX}Aborted":
        return RemoteError(remote_type, message, traceback_text)
    kind = _WIRE_TYPES.get(remote_type)
    cls = remote_class(kind) if kind is not None else RemoteError
    return cls(remote_type, message, traceback_text)
