"""Transports: how workers and clients reach each other.

* :mod:`.base` — the interfaces every transport implements (worker and client sides);
* :mod:`.schemes` — the one table from a broker URL's scheme to its transports;
* :mod:`.memory` — ``memory://``: everything in one process;
* :mod:`.rabbitmq` — RabbitMQ on asyncio (aio-pika): the worker's and AsyncClient's;
* :mod:`.pika` — RabbitMQ on pika, blocking: Client's and the CLI's;
* :mod:`.tls` and :mod:`.pushed_records` — what both RabbitMQ transports share, free of I/O.

Every transport passes one behavioural test suite (``tests/test_behaviour.py``).
"""

from __future__ import annotations

from .base import ClientTransport, PreparedJob, Subscription, WorkerHooks, WorkerTransport

__all__ = ["ClientTransport", "PreparedJob", "Subscription", "WorkerHooks", "WorkerTransport"]
