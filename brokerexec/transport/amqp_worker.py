"""The worker's side of the RabbitMQ transport (``docs/protocol.md`` is its specification).

Made of parts, each with a public interface and a module of its own:

* :class:`~.amqp_connection.AmqpConnection` — the connection, its setups and its outbox;
* :class:`~.amqp_intake.LaunchIntake` — takes launches (prefetch, holding, giving back);
* :class:`~.amqp_ownership.Ownership` — which jobs are this worker's, claims, the end of a job;
* :class:`~.amqp_signal_server.SignalServer` — RPCs, broadcasts, control, the ``jobs`` query.

This module only wires them together and publishes a job's events.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any

import aiormq.abc

from .. import codec
from ..constants import DEFAULT_CLAIM_AFTER
from ..protocol.events import Event
from ..protocol.intents import Intent, Signal
from ..protocol.messages import Record
from ..protocol.names import (
    BROADCAST_TOPIC,
    EVENTS_EXCHANGE,
    KIWIPY_EXCHANGE,
    STATE_CHANGED_HEADER,
    STATE_CHANGED_TYPE,
)
from .amqp_connection import AmqpConnection, ConnectionSettings, Outgoing
from .amqp_declare import declare_all
from .amqp_intake import LaunchIntake
from .amqp_ownership import Ownership
from .amqp_signal_server import Request, SignalServer
from .base import WorkerHooks, WorkerTransport

__all__ = ["RabbitWorkerTransport"]

#: The header of every state_changed broadcast (built once: it goes with every state event).
_STATE_CHANGED_HEADERS = dict([STATE_CHANGED_HEADER])


class RabbitWorkerTransport(WorkerTransport):
    """See the module docstring.

    Parameters:
        settings: how to reach the broker.
        host_info: who this worker is (in records and in answers to the ``jobs`` query).
        claim_after: seconds a job runs before it gets its own RPC queue.
    """

    def __init__(self, settings: ConnectionSettings, *, host_info: dict[str, Any],
                 claim_after: float = DEFAULT_CLAIM_AFTER) -> None:
        self.settings = settings
        self.connection = AmqpConnection(settings)
        self.hooks: WorkerHooks | None = None
        self.ownership = Ownership(self.connection, claim_after=claim_after,
                                   deliver_rpc=self._deliver_rpc, abort_copy=self._abort_copy)
        self.intake = LaunchIntake(self.connection, self.ownership)
        self.signals = SignalServer(self.connection, self.ownership, host_info)

    # ---- WorkerTransport -----------------------------------------------------------------

    def serve(self, hooks: WorkerHooks, capacity: int) -> None:
        self.hooks = hooks
        self.intake.start(hooks, capacity)
        self.signals.start(hooks)
        connection = self.connection
        connection.start()
        for key, setup, prefetch in (("topology", declare_all, None),
                                     ("broadcasts", self.signals.setup_broadcasts, None),
                                     ("control", self.signals.setup_control, 100),
                                     ("workers", self.signals.setup_workers, None),
                                     ("launch", self.intake.setup, None)):
            connection.submit(connection.setups.add(key, setup, prefetch=prefetch)).result(30)

    def set_free_capacity(self, free: int) -> None:
        if self.connection.on_loop_thread():
            self.intake.set_free(free)  # from a hook: at once, before the next delivery is seen
        else:
            self.connection.call(self.intake.set_free, free)

    def publish_event(self, event: Event) -> None:
        if self.ownership.silenced(event.job_id):
            return  # a copy that lost its claim: the owner speaks for the job
        self.connection.post(Outgoing.json(EVENTS_EXCHANGE, event.routing_key,
                                           codec.encode(event.encode())))
        if event.kind == "state":  # what plumpy processes broadcast, for kiwipy tools
            body = {"body": None, "sender": event.job_id, "correlation_id": None,
                    "subject": f"state_changed.{event.data.get('from')}.{event.data.get('to')}"}
            # The header makes the broker drop it on the workers' side (names.
            # KIWIPY_FILTER_EXCHANGE); the type lets a worker skip it undecoded if it gets it.
            self.connection.post(Outgoing.json(KIWIPY_EXCHANGE, BROADCAST_TOPIC, codec.encode(body),
                                               message_type=STATE_CHANGED_TYPE,
                                               headers=_STATE_CHANGED_HEADERS))

    def finish(self, record: Record) -> cf.Future[None]:
        # Read now, on the caller's thread: for a refused launch it is set only while the
        # launch is being prepared.
        reply_to = self.intake.reply_to_of(record.job_id)
        return self.connection.submit(self.ownership.finish(record, reply_to))

    def stop_taking_work(self) -> None:
        self.connection.call(self.intake.stop_taking_work)

    def close(self) -> None:
        self.connection.close()

    # ---- wiring ----------------------------------------------------------------------------

    async def _deliver_rpc(self, job_id: str, message: aiormq.abc.DeliveredMessage) -> None:
        self.signals.deliver_rpc(job_id, Request.of_aiormq(message))

    def _abort_copy(self, job_id: str, reason: str) -> None:
        assert self.hooks is not None
        self.hooks.on_rpc(job_id, Signal.of(Intent.ABORT, message=reason))
