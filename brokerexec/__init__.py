"""brokerexec: run long computations on workers and steer them while they run.

Write a :class:`Service`, run it locally with ``brokerexec run`` or on workers over RabbitMQ
with ``brokerexec worker``, and steer it from anywhere with :class:`Client`.
"""

from __future__ import annotations

from .client import Client
from .errors import (
    Aborted,
    BrokerConnectionError,
    BrokerExecError,
    ConfigurationError,
    DecodeError,
    InvalidRequest,
    InvalidState,
    JobNotFound,
    MessageTooLarge,
    RemoteError,
    ServiceError,
    SignalRefused,
    Timeout,
    UnknownService,
)
from .handler import ServiceHandler
from .job import Job, JobAborted
from .pool import WorkerPool
from .ports import Input
from .protocol import Event
from .registry import ServiceRegistry
from .service import Service
from .states import JobState
from .worker import Worker, WorkerSettings

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AsyncClient",
    "AsyncJob",
    "BrokerConnectionError",
    "BrokerExecError",
    "Client",
    "ConfigurationError",
    "DecodeError",
    "Event",
    "Input",
    "InvalidRequest",
    "InvalidState",
    "Job",
    "JobAborted",
    "JobNotFound",
    "JobState",
    "MessageTooLarge",
    "RemoteError",
    "Service",
    "ServiceError",
    "ServiceHandler",
    "ServiceRegistry",
    "SignalRefused",
    "Timeout",
    "UnknownService",
    "Worker",
    "WorkerPool",
    "WorkerSettings",
    "__version__",
]


def __getattr__(name: str) -> object:
    # The asyncio twin on first use only: the CLI's one-shot verbs never pay for it.
    if name in ("AsyncClient", "AsyncJob"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'brokerexec' has no attribute {name!r}")
