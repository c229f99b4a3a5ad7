"""The worker a client embeds when its broker lives in its own process (``memory://``).

Imported only then: a client of RabbitMQ never loads the worker's modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.service import Service
    from ..settings import WorkerSettings
    from ..worker.worker import Worker

__all__ = ["embedded_worker"]


def embedded_worker(url: str, services: Iterable[type[Service]], concurrency: int,
                    settings: WorkerSettings | None) -> Worker:
    """A worker on the broker of ``url``, running ``services`` (and the ``brokerexec.services``
    entry points), started; ``concurrency`` jobs at once unless ``settings`` say otherwise.
    ``memory://NAME?history=STORE`` also keeps the broker's jobs in that history store
    (``docs/history.md``)."""
    from urllib.parse import parse_qs, urlsplit

    stores = parse_qs(urlsplit(url).query).get("history")
    if stores:
        from ..history.embedded import keep_history

        keep_history(url, stores[-1])
    from ..core.registry import ServiceRegistry
    from ..settings import Settings, WorkerSettings
    from ..transport.schemes import scheme_of
    from ..worker.worker import Worker, host_info

    registry = ServiceRegistry.from_specs([])
    for service in services:
        registry.add(service)
    transport = scheme_of(url).worker(url, Settings(), host_info())
    return Worker(transport, registry, settings or WorkerSettings(concurrency=concurrency)).start()
