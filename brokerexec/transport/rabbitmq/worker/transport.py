"""The worker's side of the RabbitMQ transport (``docs/protocol.md`` is its specification).

Made of parts, each with a public interface and a module of its own:

* :class:`~..connection.AmqpConnection` — the connection, its setups and its outbox;
* :class:`~.intake.LaunchIntake` — takes launches and leases to resume;
* :class:`~.ownership.Ownership` — which jobs are this worker's, claims, fencing;
* :class:`~.leases.Leases` — the held leases that come back as launches if it dies;
* :class:`~.journal_writer.JournalWriter` — started, checkpoint and record entries;
* :class:`~.owner_writes.OwnerWrites` — checkpoints, records and handovers, once ownership holds;
* :class:`~.signal_server.SignalServer` — RPCs, broadcasts, control, the ``jobs`` query.

This module only wires them together and publishes a job's events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import aiormq.abc

from .... import codec
from ....errors import CheckpointFailed, ConfigurationError
from ....protocol.events import Event
from ....protocol.intents import Intent, Signal
from ....protocol.messages import Record
from ....protocol.names import (
    BROADCAST_TOPIC,
    EVENTS_EXCHANGE,
    KIWIPY_EXCHANGE,
    STATE_CHANGED_HEADER,
    STATE_CHANGED_TYPE,
)
from ....settings import RabbitMQSettings
from ...base import WorkerHooks, WorkerTransport
from ..connection import AmqpConnection, Outgoing
from ..connection_settings import ConnectionSettings
from ..declare import declare_all
from .intake import LaunchIntake
from .journal_writer import JournalWriter
from .leases import Leases
from .owner_writes import OwnerWrites
from .ownership import Ownership
from .signal_server import Request, SignalServer

__all__ = ["RabbitWorkerTransport"]

log = logging.getLogger(__name__)

#: The header of every state_changed broadcast (built once: it goes with every state event).
_STATE_CHANGED_HEADERS = dict([STATE_CHANGED_HEADER])


def _failed(exc: BaseException) -> cf.Future[None]:
    future: cf.Future[None] = cf.Future()
    future.set_exception(exc)
    return future


#: Channels of a worker's connection kept for its own use (setups, publishing, journal
#: reads), besides one per claimed job.
RESERVED_CHANNELS = 64


class RabbitWorkerTransport(WorkerTransport):
    """See the module docstring.

    Parameters:
        settings: how to reach the broker.
        host_info: who this worker is (in records, leases and answers to the ``jobs``
            query); its ``id`` names the lease queue.
        rabbitmq: how it uses the broker (:class:`~brokerexec.settings.RabbitMQSettings`):
            ``claim_after`` (seconds a job runs before it is claimed: its own RPC queue, a
            ``started`` entry and a lease), ``lease_renew`` (seconds between renewals of
            each lease, below half ``consumer_timeout``), ``resume_grace`` (seconds before a
            job whose worker was lost is claimed here), ``max_checkpoint_bytes`` and
            ``queue_type`` (``"quorum"`` launch queues survive the loss of a cluster node,
            docs/clusters.md; every worker of a service must agree). Its ``heartbeat`` is
            ``settings``'.
    """

    def __init__(self, settings: ConnectionSettings, *, host_info: dict[str, Any],
                 rabbitmq: RabbitMQSettings | None = None) -> None:
        rabbitmq = rabbitmq or RabbitMQSettings()
        self.settings = settings
        self.queue_type = rabbitmq.queue_type
        self.journal_max_age = rabbitmq.journal_max_age
        self.host_info = {**host_info, "id": host_info.get("id") or os.urandom(6).hex()}
        self.connection = connection = AmqpConnection(settings)
        self.hooks: WorkerHooks | None = None
        self.leases = Leases(connection, self.host_info["id"], renew_every=rabbitmq.lease_renew,
                             reopened=self._hold_leases_again)
        self.journal = JournalWriter(connection, self.host_info,
                                     max_checkpoint_bytes=rabbitmq.max_checkpoint_bytes)
        self.ownership = Ownership(connection, claim_after=rabbitmq.claim_after,
                                   deliver_rpc=self._deliver_rpc,
                                   abort_copy=self._abort_copy, leases=self.leases, journal=self.journal,
                                   resume_grace=rabbitmq.resume_grace)
        self.owner_writes = OwnerWrites(self.ownership)
        self.intake = LaunchIntake(connection, self.ownership, finish=self.owner_writes.finish,
                                   host_info=self.host_info)
        self.signals = SignalServer(connection, self.ownership, self.host_info, held=self.intake.held)

    # ---- WorkerTransport -----------------------------------------------------------------

    def serve(self, hooks: WorkerHooks, capacity: int, services: Sequence[str] = ()) -> None:
        self.hooks = self.ownership.hooks = hooks
        self.intake.start(hooks, capacity, services)
        self.signals.start(hooks, services)
        self.signals.host_info = {**self.signals.host_info, "concurrency": capacity}  # the jobs query says it
        connection = self.connection
        connection.start()

        async def topology(channel: Any) -> None:
            await declare_all(channel, services, self.queue_type, self.journal_max_age)

        for key, setup, prefetch in (("topology", topology, None),
                                     ("broadcasts", self.signals.setup_broadcasts, None),
                                     ("control", self.signals.setup_control, 100),
                                     ("workers", self.signals.setup_workers, None),
                                     ("leases", self.leases.setup, None),
                                     ("launch", self.intake.setup, None)):
            if key == "broadcasts":  # connected by now (the topology is declared): before any job
                self._check_capacity(capacity)
            # The topology is required: a record published before its journal stream takes
            # messages again (just after a broker starts) would be confirmed and gone.
            connection.submit(connection.setups.add(key, setup, prefetch=prefetch,
                                                    required=key == "topology")).result(30)
        connection.call(lambda: connection.spawn(self._keep_checkpoints_readable()))

    def _check_capacity(self, capacity: int) -> None:
        """Each claimed job holds a channel of this worker's connection (its exclusive RPC
        queue's: a refused declare closes its channel, and only its own): say at start if
        ``capacity`` jobs would not fit, rather than fail claims at the 2,000th."""
        channel_max = self.connection.channel_max()
        if channel_max is None:
            return
        room = channel_max - RESERVED_CHANNELS
        if capacity > room:
            self.connection.close()
            raise ConfigurationError(
                f"--concurrency {capacity} is more jobs than one worker process can claim: each "
                f"claimed job holds a channel, and the broker allows {channel_max} per connection "
                f"({room} for jobs). Run several worker processes of --concurrency {room} at most, "
                "or raise the broker's channel_max (rabbitmq.conf)")

    def set_free_capacity(self, free: int) -> None:
        if self.connection.on_loop_thread():
            self.intake.set_free(free)  # from a hook: at once, before the next delivery is seen
        else:
            self.connection.call(self.intake.set_free, free)

    def publish_event(self, event: Event) -> None:
        items = [Outgoing.json(EVENTS_EXCHANGE, event.routing_key, codec.encode(event.encode()))]
        if event.kind == "state":  # what plumpy processes broadcast, for kiwipy tools
            body = {"body": None, "sender": event.job_id, "correlation_id": None,
                    "subject": f"state_changed.{event.data.get('from')}.{event.data.get('to')}"}
            # The header makes the broker drop it on the workers' side (names.
            # KIWIPY_FILTER_EXCHANGE); the type lets a worker skip it undecoded if it gets it.
            items.append(Outgoing.json(KIWIPY_EXCHANGE, BROADCAST_TOPIC, codec.encode(body),
                                       message_type=STATE_CHANGED_TYPE, headers=_STATE_CHANGED_HEADERS))
        # Ownership says when: now, once its claim is verified again, or never (superseded).
        self.ownership.speak(event.job_id, items)

    def finish(self, record: Record) -> cf.Future[None]:
        # Read now, on the caller's thread: for a refused launch it is set only while the
        # launch is being prepared.
        reply_to = self.intake.reply_to_of(record.job_id)
        return self.connection.submit(self.owner_writes.finish(record, reply_to))

    def store_checkpoint(self, job_id: str, state: Any, settable: dict[str, Any],
                         covers: int) -> cf.Future[None]:
        owned = self.ownership.get(job_id)
        if owned is None:
            return _failed(CheckpointFailed(f"job {job_id} does not run here: checkpoint not stored"))
        taken = time.time()
        try:  # encoded here, on the computation thread: the loop thread never waits for it
            body = self.journal.encode_checkpoint(job_id, owned.job.service, owned.job.attempt, state,
                                                  settable=settable, covers=covers, taken=taken)
        except CheckpointFailed as exc:
            return _failed(exc)
        return self.connection.submit(self.owner_writes.store_checkpoint(job_id, body, taken, covers))

    def note_changes(self, job_id: str, changes: list[dict[str, Any]]) -> cf.Future[None]:
        return self.connection.submit(self.owner_writes.note_changes(job_id, changes))

    def hand_over(self, job_id: str) -> cf.Future[None]:
        return self.connection.submit(self.owner_writes.hand_over(job_id))

    def stop_taking_work(self) -> None:
        if self.connection.on_loop_thread() or not self.connection.loop.is_running():
            self.intake.stop_taking_work()
            return
        try:  # see LaunchIntake.stop: returns once the broker confirmed the consumers' cancel
            self.connection.submit(self.intake.stop()).result(5)
        except Exception as exc:  # the channel is going or gone: its consumers go with it
            log.debug("launch consumers not cancelled before the stop: %r", exc)

    def close(self) -> None:
        if self.connection.loop.is_running():
            with contextlib.suppress(Exception):  # closing anyway
                self.connection.submit(self.leases.close()).result(5)
        self.connection.close()

    async def _keep_checkpoints_readable(self) -> None:
        """A job that runs longer than the journal keeps its entries takes a checkpoint again
        once its newest one is half that old: the one its lease points at never expires
        (and its ``resumed`` invokes and sets stay covered)."""
        every = min(self.leases.renew_every, self.journal_max_age / 4)
        while not self.connection.closing:
            await asyncio.sleep(every)
            horizon = time.time() - self.journal_max_age / 2
            for owned in self.ownership.jobs():
                pointer = owned.checkpoint
                if (pointer is None or owned.superseded or owned.ending or self.hooks is None
                        or float(pointer.get("time", 0)) > horizon):
                    continue
                log.info("job %s: its checkpoint is %.0f s old, half the journal's retention: "
                         "taking one again", owned.job_id, time.time() - float(pointer["time"]))
                with contextlib.suppress(Exception):  # it ended meanwhile, or refuses: next round
                    self.hooks.on_rpc(owned.job_id, Signal.of(Intent.CHECKPOINT))

    # ---- wiring ----------------------------------------------------------------------------

    async def _deliver_rpc(self, job_id: str, message: aiormq.abc.DeliveredMessage) -> None:
        self.signals.deliver_rpc(job_id, Request.of_aiormq(message))

    def _abort_copy(self, job_id: str, reason: str) -> None:
        assert self.hooks is not None
        self.hooks.superseded(job_id, reason)

    def _hold_leases_again(self) -> None:
        """The lease channel opened again (alone): hold every verified claim's lease anew;
        claims made again after a reconnect hold theirs when they are verified."""
        generation = self.connection.generation
        for owned in self.ownership.jobs():
            if owned.claimed and not owned.superseded and owned.machine.verified == generation:
                self.connection.spawn(self._hold(owned.job_id))

    async def _hold(self, job_id: str) -> None:
        owned = self.ownership.get(job_id)
        if owned is not None:
            with contextlib.suppress(Exception):  # the lease setup runs again, and this with it
                await self.leases.hold(job_id, self.ownership.lease_of(owned))
