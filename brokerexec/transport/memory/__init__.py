"""The in-memory transport (``memory://``): a whole brokerexec deployment inside one process.

* :mod:`.broker` — :class:`~.broker.MemoryBroker`, standing in for RabbitMQ;
* :mod:`.worker` — a worker's side of it;
* :mod:`.clients` — the clients' side, blocking and asyncio.
"""
