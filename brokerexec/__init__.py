"""brokerexec: run long computations on workers and steer them while they run.

Write a :class:`Service`, run it locally with ``brokerexec run`` or on workers over RabbitMQ
with ``brokerexec worker``, and steer it from anywhere with :class:`Client`.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:  # what ``__getattr__`` below provides, for type checkers and IDEs
    from .aio import AsyncClient, AsyncJob
    from .client import Client
    from .errors import (
        Aborted,
        AccessRefused,
        BrokerConnectionError,
        BrokerExecError,
        CheckpointFailed,
        ConfigurationError,
        DecodeError,
        InvalidRequest,
        InvalidState,
        JobAborted,
        JobNotFound,
        MessageTooLarge,
        NotApplied,
        RemoteError,
        ServiceDefinitionError,
        ServiceError,
        SignalRefused,
        Timeout,
        UnknownService,
        WorkerLost,
    )
    from .handler import ServiceHandler
    from .job import Job
    from .pool import WorkerPool
    from .ports import Input
    from .protocol.events import Event
    from .protocol.intents import Intent
    from .registry import ServiceRegistry
    from .service import Service
    from .states import JobState
    from .worker import Worker, WorkerSettings

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AccessRefused",
    "AsyncClient",
    "AsyncJob",
    "BrokerConnectionError",
    "BrokerExecError",
    "CheckpointFailed",
    "Client",
    "ConfigurationError",
    "DecodeError",
    "Event",
    "Input",
    "Intent",
    "InvalidRequest",
    "InvalidState",
    "Job",
    "JobAborted",
    "JobNotFound",
    "JobState",
    "MessageTooLarge",
    "NotApplied",
    "RemoteError",
    "Service",
    "ServiceDefinitionError",
    "ServiceError",
    "ServiceHandler",
    "ServiceRegistry",
    "SignalRefused",
    "Timeout",
    "UnknownService",
    "Worker",
    "WorkerLost",
    "WorkerPool",
    "WorkerSettings",
    "__version__",
]


#: Where each exported name lives. Imported on first use (PEP 562): ``import brokerexec``
#: stays cheap, which a one-shot CLI verb (``brokerexec status ID``) feels on every call.
_WHERE = {
    "Aborted": "errors",
    "AccessRefused": "errors",
    "AsyncClient": "aio",
    "AsyncJob": "aio",
    "BrokerConnectionError": "errors",
    "BrokerExecError": "errors",
    "CheckpointFailed": "errors",
    "Client": "client",
    "ConfigurationError": "errors",
    "DecodeError": "errors",
    "Event": "protocol.events",
    "Input": "ports",
    "Intent": "protocol.intents",
    "InvalidRequest": "errors",
    "InvalidState": "errors",
    "Job": "job",
    "JobAborted": "errors",
    "JobNotFound": "errors",
    "JobState": "states",
    "MessageTooLarge": "errors",
    "NotApplied": "errors",
    "RemoteError": "errors",
    "Service": "service",
    "ServiceDefinitionError": "errors",
    "ServiceError": "errors",
    "ServiceHandler": "handler",
    "ServiceRegistry": "registry",
    "SignalRefused": "errors",
    "Timeout": "errors",
    "UnknownService": "errors",
    "WorkerLost": "errors",
    "Worker": "worker",
    "WorkerPool": "pool",
    "WorkerSettings": "worker",
}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'brokerexec' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
