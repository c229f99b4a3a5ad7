"""The worker's side of the RabbitMQ transport (``docs/protocol.md`` is its specification).

* :mod:`.transport` — :class:`~.transport.RabbitWorkerTransport`, which ties the rest;
* :mod:`.intake` — taking launches, holding and giving them back, resuming lost jobs;
* :mod:`.ownership` (with :mod:`.owned_job`) — who owns a job, and the proof in the broker;
* :mod:`.leases` — how the broker learns that a worker died;
* :mod:`.journal_writer` — the ``started``, ``checkpoint`` and ``record`` entries;
* :mod:`.owner_writes` — the writes that need the job to be this worker's;
* :mod:`.signal_server` — RPCs to its jobs, broadcasts, control and queries.
"""
