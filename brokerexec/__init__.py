"""brokerexec: run long computations on workers and steer them while they run.

Write a :class:`Service`, run it locally with ``brokerexec run`` or on workers over RabbitMQ
with ``brokerexec worker``, and steer it from anywhere with :class:`Client`.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from . import _moved

_moved.install()  # the flat layout's module paths still import (brokerexec._moved)

if _typing.TYPE_CHECKING:  # what ``__getattr__`` below provides, for type checkers and IDEs
    from .client.aio import AsyncClient, AsyncJob
    from .client.aio_operation import AsyncOperation
    from .client.blocking import Client
    from .client.job import Job
    from .client.operation import Operation
    from .core.child_command import ChildCommand
    from .core.inputs import Input
    from .core.map_pool import WorkerPool
    from .core.registry import ServiceRegistry
    from .core.service import Service
    from .core.service_handler import ServiceHandler
    from .errors import (
        Aborted,
        AccessRefused,
        BrokerConnectionError,
        BrokerExecError,
        CheckpointFailed,
        ConfigurationError,
        DecodeError,
        HistoryUnavailable,
        InvalidRequest,
        InvalidState,
        JobAborted,
        JobNotFound,
        MessageTooLarge,
        NotApplied,
        NotDurable,
        RemoteError,
        ResultTooLarge,
        ServiceDefinitionError,
        ServiceError,
        SignalRefused,
        Timeout,
        UnknownService,
        WorkerLost,
    )
    from .operations.outcomes import Outcome
    from .operations.registry import Item, ItemState, OperationStatus, Plan
    from .operations.requests import Grid, grid
    from .protocol.events import Event
    from .protocol.history import HistoryPage
    from .protocol.intents import Intent
    from .protocol.states import JobState
    from .settings import WorkerSettings
    from .worker.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AccessRefused",
    "AsyncClient",
    "AsyncJob",
    "AsyncOperation",
    "BrokerConnectionError",
    "BrokerExecError",
    "CheckpointFailed",
    "ChildCommand",
    "Client",
    "ConfigurationError",
    "DecodeError",
    "Event",
    "Grid",
    "HistoryPage",
    "HistoryUnavailable",
    "Input",
    "Intent",
    "InvalidRequest",
    "InvalidState",
    "Item",
    "ItemState",
    "Job",
    "JobAborted",
    "JobNotFound",
    "JobState",
    "MessageTooLarge",
    "NotApplied",
    "NotDurable",
    "Operation",
    "OperationStatus",
    "Outcome",
    "Plan",
    "RemoteError",
    "ResultTooLarge",
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
    "grid",
]


#: Where each exported name lives, by layer. Imported on first use (PEP 562): ``import
#: brokerexec`` stays cheap, which a one-shot CLI verb (``brokerexec status ID``) feels on
#: every call.
_WHERE = {
    # writing services: the core
    "Service": "core.service",
    "ChildCommand": "core.child_command",
    "Input": "core.inputs",
    "ServiceHandler": "core.service_handler",
    "WorkerPool": "core.map_pool",
    "ServiceRegistry": "core.registry",
    # states, intents and events: the protocol
    "JobState": "protocol.states",
    "Intent": "protocol.intents",
    "HistoryPage": "protocol.history",
    "Event": "protocol.events",
    # workers
    "Worker": "worker.worker",
    "WorkerSettings": "settings",
    # clients and jobs
    "Client": "client.blocking",
    "Job": "client.job",
    "AsyncClient": "client.aio",
    "AsyncJob": "client.aio",
    "AsyncOperation": "client.aio_operation",
    "Operation": "client.operation",
    # operations: their items, states and outcomes
    "grid": "operations.requests",
    "Grid": "operations.requests",
    "Item": "operations.registry",
    "ItemState": "operations.registry",
    "OperationStatus": "operations.registry",
    "Plan": "operations.registry",
    "Outcome": "operations.outcomes",
    # errors: one tree (brokerexec.errors draws it)
    **{name: "errors" for name in (
        "Aborted", "AccessRefused", "BrokerConnectionError", "BrokerExecError",
        "CheckpointFailed", "ConfigurationError", "DecodeError", "HistoryUnavailable", "InvalidRequest",
        "InvalidState",
        "JobAborted", "JobNotFound", "MessageTooLarge", "NotApplied", "NotDurable", "RemoteError",
        "ResultTooLarge", "ServiceDefinitionError", "ServiceError", "SignalRefused", "Timeout",
        "UnknownService", "WorkerLost")},
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
