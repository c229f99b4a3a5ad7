"""The one error tree of brokerexec.

::

    BrokerExecError
    ├── ConfigurationError        bad settings or arguments given to brokerexec itself
    ├── BrokerConnectionError     the broker cannot be reached or the connection was lost
    ├── DecodeError               a message could not be decoded (size, type, JSON, YAML tags)
    │   └── MessageTooLarge
    ├── ServiceError              a service refused something
    │   ├── UnknownService        no service of that name is registered
    │   ├── InvalidRequest        a request does not match the service's declared inputs
    │   └── SignalRefused         set/invoke of an undeclared or private name, bad argument types
    ├── InvalidState              the operation is not allowed in the current state
    ├── JobNotFound               no worker answers for that job id
    ├── RemoteError               the remote side failed: carries its type, message, traceback
    └── Timeout                   something did not answer in time (also a TimeoutError)

    Aborted (BaseException, outside the tree): raised by ``ready()`` in the computation
    thread so that ``except Exception`` in user code cannot swallow an abort.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Aborted",
    "BrokerConnectionError",
    "BrokerExecError",
    "ConfigurationError",
    "DecodeError",
    "InvalidRequest",
    "InvalidState",
    "JobNotFound",
    "MessageTooLarge",
    "RemoteError",
    "ServiceError",
    "SignalRefused",
    "Timeout",
    "UnknownService",
    "error_to_wire",
]


class BrokerExecError(Exception):
    """Root of every error brokerexec raises on purpose."""


class ConfigurationError(BrokerExecError):
    """Settings or arguments given to brokerexec are invalid."""


class BrokerConnectionError(BrokerExecError):
    """The broker cannot be reached, or the connection to it was lost."""


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
    """A ``set`` or ``invoke`` names something the service does not expose, or has bad types."""


class InvalidState(BrokerExecError):
    """The operation is not allowed in the current state (e.g. starting a busy handler)."""


class JobNotFound(BrokerExecError):
    """No worker answers for that job id."""


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

    @classmethod
    def from_wire(cls, error: Any) -> RemoteError:
        """Build from the ``error`` object of a reply or a state message."""
        if isinstance(error, dict):
            return cls(
                str(error.get("type", "Exception")),
                str(error.get("message", "")),
                str(error.get("traceback", "") or ""),
            )
        return cls("Exception", str(error))


class Aborted(BaseException):
    """Raised in the computation thread by ``ready()`` when the job is aborted."""


def error_to_wire(exc: BaseException, traceback_text: str = "") -> dict[str, str]:
    """The ``error`` object sent for an exception: its type, message and traceback."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ in ("builtins", __name__) else (
        f"{kind.__module__}.{kind.__qualname__}"
    )
    if kind.__module__ == __name__:
        name = f"brokerexec.{kind.__qualname__}"
    return {"type": name, "message": str(exc), "traceback": traceback_text}
