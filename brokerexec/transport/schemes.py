"""Which transports serve a broker URL: one table, by the URL's scheme.

Every part that turns a URL into a connection asks here — :class:`~brokerexec.Client`,
:class:`~brokerexec.AsyncClient`, ``brokerexec worker``, the CLI's one-shot verbs and the
worker's metrics — so a new transport is one row of :data:`SCHEMES` and the functions it
names. Each transport module is imported only when its row is used: a one-shot verb never
imports aio-pika, and a ``memory://`` client never imports pika.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ..errors import ConfigurationError
from ..urls import redacted_url

if TYPE_CHECKING:
    from ..settings import Settings
    from .base import AsyncClientTransport, ClientTransport, WorkerTransport

__all__ = ["SCHEMES", "Scheme", "scheme_of"]


class Scheme:
    """The transports of one URL scheme.

    Parameters:
        name: the scheme, as in ``name://``.
        shared: other processes reach the same broker (RabbitMQ); ``memory://`` lives
            inside one process, so the verbs that reach workers elsewhere refuse it.
        client: ``client(url, listener_heartbeat)``, the blocking client's transport.
        async_client: ``async_client(url, heartbeat)``, the asyncio client's.
        worker: ``worker(url, settings, host)``, a worker's transport (``settings``: the
            whole tree; each transport reads its own section).
        oneshot_client: ``oneshot_client(url)``: one or two round trips, no listener (the
            CLI's verbs); None where there is none.
        queue_depths: ``queue_depths(url, services)``, the launches waiting per service
            (for metrics); None where the broker cannot tell.

    A plain class rather than a dataclass: every CLI verb imports this table, and making a
    dataclass costs it half a millisecond.
    """

    __slots__ = ("async_client", "client", "name", "oneshot_client", "queue_depths", "shared",
                 "worker")

    def __init__(self, name: str, *, shared: bool, client: Callable[[str, int], ClientTransport],
                 async_client: Callable[[str, int], AsyncClientTransport],
                 worker: Callable[[str, Settings, dict[str, Any]], WorkerTransport],
                 oneshot_client: Callable[[str], ClientTransport] | None = None,
                 queue_depths: Callable[[str, Sequence[str]], list[tuple[str, int]]] | None = None,
                 ) -> None:
        self.name, self.shared = name, shared
        self.client, self.async_client, self.worker = client, async_client, worker
        self.oneshot_client, self.queue_depths = oneshot_client, queue_depths

    def __repr__(self) -> str:
        return f"Scheme({self.name!r})"


# ---- memory:// ---------------------------------------------------------------------------


def _memory_client(url: str, _heartbeat: int) -> ClientTransport:
    from .memory.broker import MemoryBroker
    from .memory.clients import MemoryClientTransport

    return MemoryClientTransport(MemoryBroker.of_url(url))


def _memory_async_client(url: str, _heartbeat: int) -> AsyncClientTransport:
    from .memory.broker import MemoryBroker
    from .memory.clients import MemoryAsyncClientTransport

    return MemoryAsyncClientTransport(MemoryBroker.of_url(url))


def _memory_worker(url: str, _settings: Settings, host: dict[str, Any]) -> WorkerTransport:
    from .memory.broker import MemoryBroker
    from .memory.worker import MemoryWorkerTransport

    return MemoryWorkerTransport(MemoryBroker.of_url(url), host_info=host)


# ---- amqp:// and amqps:// ----------------------------------------------------------------


def _pika_client(url: str, heartbeat: int) -> ClientTransport:
    from .pika.client import PikaClientTransport

    # A caller's connections are used only during a call: no heartbeats to miss.
    return PikaClientTransport(url, heartbeat=0, push_records=True, listener_heartbeat=heartbeat)


def _pika_oneshot_client(url: str) -> ClientTransport:
    from .pika.client import PikaClientTransport

    return PikaClientTransport(url, name="brokerexec-cli")


def _rabbitmq_async_client(url: str, heartbeat: int) -> AsyncClientTransport:
    from .rabbitmq.client import RabbitClientTransport
    from .rabbitmq.connection_settings import ConnectionSettings

    return RabbitClientTransport(ConnectionSettings(url=url, heartbeat=heartbeat,
                                                    name="brokerexec-aio-client",
                                                    reconnect_deadline=30.0))


def _rabbitmq_worker(url: str, settings: Settings, host: dict[str, Any]) -> WorkerTransport:
    from .rabbitmq.connection_settings import ConnectionSettings
    from .rabbitmq.worker.transport import RabbitWorkerTransport

    return RabbitWorkerTransport(ConnectionSettings(
        url=url, heartbeat=settings.rabbitmq.heartbeat, reconnect_deadline=None,
        name=f"brokerexec-worker-{host.get('hostname', '')}-{host.get('pid', '')}"),
        host_info=host, rabbitmq=settings.rabbitmq)


def _rabbitmq_queue_depths(url: str, services: Sequence[str]) -> list[tuple[str, int]]:
    from .pika.queue_depth import launch_queue_depths

    return launch_queue_depths(url, services)


def _rabbitmq(name: str) -> Scheme:
    return Scheme(name, shared=True, client=_pika_client, async_client=_rabbitmq_async_client,
                  worker=_rabbitmq_worker, oneshot_client=_pika_oneshot_client,
                  queue_depths=_rabbitmq_queue_depths)


#: Every scheme brokerexec serves.
SCHEMES: dict[str, Scheme] = {
    "amqp": _rabbitmq("amqp"),
    "amqps": _rabbitmq("amqps"),  # TLS: from the URL's query (.tls)
    "memory": Scheme("memory", shared=False, client=_memory_client,
                     async_client=_memory_async_client, worker=_memory_worker),
}


def scheme_of(url: str) -> Scheme:
    """The transports of ``url``'s scheme.

    Raises:
        ConfigurationError: no transport serves that scheme (the message lists those that do).
    """
    scheme = SCHEMES.get(urlparse(url.partition(",")[0].strip()).scheme)
    if scheme is None:
        *others, last = (f"{name}://" for name in SCHEMES)
        known = f"{', '.join(others)} or {last}"
        raise ConfigurationError(f"unsupported broker URL {redacted_url(url)!r}: use {known}")
    return scheme
