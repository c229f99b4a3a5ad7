"""RabbitMQ on pika, blocking: the transport of :class:`~brokerexec.Client` and the CLI.

* :mod:`.client` — :class:`~.client.PikaClientTransport`;
* :mod:`.caller` — one thread's connection, moving the bytes of its calls;
* :mod:`.listener` — subscriptions and pushed records, on a thread of their own;
* :mod:`.journal_reader` — reading the journal and browsing launch queues;
* :mod:`.queue_depth` — launch-queue depths, for the worker's metrics;
* :mod:`.internals` — the one use of pika's internals.
"""
