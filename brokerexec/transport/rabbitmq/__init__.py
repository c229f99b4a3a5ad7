"""RabbitMQ on asyncio (aio-pika and aiormq): the worker's transport and AsyncClient's.

One connection per process, on a thread and event loop of its own, that comes back by
itself (:mod:`.connection`, :mod:`.connection_settings`, :mod:`.setups`, :mod:`.failures`);
the outbox writes publishes and acks in batches (:mod:`.outbox`, :mod:`.frames`,
:mod:`.aiormq_internals`, the one use of aiormq's internals); launches are read in place
(:mod:`.delivery`); objects are declared from the protocol's topology (:mod:`.declare`);
the journal is read for both sides (:mod:`.journal_reader`). On top: the worker's side
(:mod:`.worker`) and the asyncio client's (:mod:`.client`). The blocking client's RabbitMQ
transport, on pika, is :mod:`brokerexec.transport.pika`.
"""
