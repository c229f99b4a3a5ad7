"""The worker's side of the RabbitMQ transport (docs/protocol.md is its specification).

**Who owns a job.** A job belongs to exactly one worker, and the proof of it lives in the
broker, so it dies with the worker's connection:

* at first, the unacknowledged delivery of its launch (RabbitMQ hands a message to one
  consumer at a time, and gives it back if that consumer's channel goes);
* once *claimed*, the exclusive queue ``brokerexec.rpc.<job id>``, which also receives the
  job's RPCs. The launch is acknowledged right after the claim.

A job is claimed when it has run ``claim_after`` seconds, when a client asks for it (an
RPC it could not route, sent to every worker), when its launch comes back redelivered
(claimed before it starts, so two workers never run it at once), and after a reconnect
(its delivery is void then). A job shorter than ``claim_after`` never pays for a queue: a
queue costs the broker more CPU than the rest of a trivial job together. Launches stay
unacknowledged at most ``claim_after`` plus a claim, far below ``consumer_timeout``.

A worker that loses a claim race (someone else claimed the job while this one was cut off)
aborts its copy silently: no events, no record; the owner's are the job's.

Records go to the stream ``brokerexec.results`` and, if the launch named a ``reply_to``,
straight to the launching client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
from collections import OrderedDict, deque
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from .. import codec
from ..constants import (
    BROADCAST_TOPIC,
    DEFAULT_CLAIM_AFTER,
    EVENTS_EXCHANGE,
    KIWIPY_EXCHANGE,
    RECORD_TYPE,
    RESULTS_STREAM,
    STATE_CHANGED_HEADER,
    STATE_CHANGED_TYPE,
    rpc_queue,
    rpc_routing_key,
)
from ..protocol import Event
from . import amqp_topology as topology
from .amqp import AmqpConnection, ConnectionSettings, Outgoing
from .amqp_launches import LaunchIntake, OwnedJob
from .amqp_signals import WorkerSignals
from .base import WorkerHooks, WorkerTransport

__all__ = ["RabbitWorkerTransport"]

log = logging.getLogger(__name__)

#: How many ended job ids a worker remembers, to drop their launches if they come back.
_ENDED_KEPT = 10_000
#: The header of every state_changed broadcast (built once: it goes with every state event).
_STATE_CHANGED_HEADERS = dict([STATE_CHANGED_HEADER])


class RabbitWorkerTransport(LaunchIntake, WorkerSignals, WorkerTransport):
    """See the module docstring."""

    def __init__(self, settings: ConnectionSettings, *, host_info: dict[str, Any],
                 claim_after: float = DEFAULT_CLAIM_AFTER) -> None:
        super().__init__()
        self.settings = settings
        self.host_info = host_info
        self.claim_after = claim_after
        self.connection = AmqpConnection(settings)
        self.hooks: WorkerHooks | None = None
        self._free = 0
        self._consumer_tag: str | None = None
        self._capacity = 1
        self._held: deque[tuple[aio_pika.abc.AbstractIncomingMessage, float]] = deque()
        self._taking_work = True
        self._owned: dict[str, OwnedJob] = {}  # loop thread only
        self._silenced: set[str] = set()  # superseded jobs; read from computation threads
        self._launch_generation = 0
        self._refusal_reply_to: dict[str, str] = {}
        # Jobs that ended here: their launch may still come back (redelivered after a
        # reconnect, or held while the job ran) and must not run them again.
        self._ended: OrderedDict[str, None] = OrderedDict()

    # ---- WorkerTransport -----------------------------------------------------------------

    def serve(self, hooks: WorkerHooks, capacity: int) -> None:
        self.hooks, self._free, self._capacity = hooks, capacity, max(capacity, 1)
        self.connection.start()
        add = self.connection.add_setup
        add("topology", topology.declare_all).result(30)
        add("broadcasts", self._setup_broadcasts).result(30)
        add("control", self._setup_control, prefetch=100).result(30)
        add("workers", self._setup_workers).result(30)
        add("launch", self._setup_launch).result(30)

    def set_free_capacity(self, free: int) -> None:
        if self.connection.on_loop_thread():
            self._set_free(free)  # from a hook: at once, before the next delivery is seen
        else:
            self.connection.call(self._set_free, free)

    def publish_event(self, event: Event) -> None:
        if event.job_id in self._silenced:
            return  # a copy that lost its claim: the owner speaks for the job
        self.connection.post(Outgoing.json(EVENTS_EXCHANGE, event.routing_key,
                                           codec.encode(event.encode())))
        if event.kind == "state":  # what plumpy processes broadcast, for kiwipy tools
            body = {"body": None, "sender": event.job_id, "correlation_id": None,
                    "subject": f"state_changed.{event.data.get('from')}.{event.data.get('to')}"}
            # The header makes the broker drop it on the workers' side (constants.
            # KIWIPY_FILTER_EXCHANGE); the type lets a worker skip it undecoded if it gets it.
            self.connection.post(Outgoing.json(KIWIPY_EXCHANGE, BROADCAST_TOPIC, codec.encode(body),
                                               message_type=STATE_CHANGED_TYPE,
                                               headers=_STATE_CHANGED_HEADERS))

    def finish(self, job_id: str, record: dict[str, Any]) -> cf.Future[None]:
        reply_to = self._refusal_reply_to.get(job_id)  # set while a launch is being prepared
        return self.connection.submit(self._finish(job_id, record, reply_to))

    def stop_taking_work(self) -> None:
        self._taking_work = False
        self.connection.call(self._set_free, 0)

    def close(self) -> None:
        self.connection.close()

    # ---- ownership ---------------------------------------------------------------------------

    def _delivery_valid(self, owned: OwnedJob) -> bool:
        channel = self.connection.channel_of("launch")
        return (owned.delivery is not None and owned.generation == self._launch_generation
                and channel is not None and not channel.is_closed)

    async def _ack_launch(self, owned: OwnedJob) -> None:
        valid = self._delivery_valid(owned)
        delivery, owned.delivery = owned.delivery, None
        if delivery is not None and valid and delivery.delivery_tag is not None:
            # With the next outbox batch; if its channel goes first, the launch is
            # redelivered and claimed there.
            self.connection.outbox.ack(delivery.channel, delivery.delivery_tag)

    async def _ensure_claimed(self, owned: OwnedJob) -> bool:
        """Claim ``owned`` once (callers share the attempt); False if it is someone else's."""
        if owned.claimed:
            return True
        if owned.superseded:
            return False
        if owned.claiming is None:
            owned.claiming = asyncio.get_running_loop().create_task(self._claim(owned))
        try:
            return await asyncio.shield(owned.claiming)
        finally:
            if owned.claiming is not None and owned.claiming.done() and not owned.claimed:
                owned.claiming = None  # a failed attempt may be tried again

    async def _claim(self, owned: OwnedJob) -> bool:
        job_id = owned.job.job_id

        async def setup(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(rpc_queue(job_id), exclusive=True, auto_delete=True,
                                                arguments=topology.RPC_QUEUE_ARGUMENTS)
            exchange = await channel.get_exchange(KIWIPY_EXCHANGE, ensure=False)
            await queue.bind(exchange, rpc_routing_key(job_id))
            await queue.consume(lambda message: self._on_rpc(job_id, message), no_ack=True)

        await self.connection.wait_connected()
        try:
            await self.connection._add_setup(f"job:{job_id}", setup, None)
        except aiormq.exceptions.ChannelLockedResource:
            self._supersede(owned, "another worker claimed it")
            await self._ack_launch(owned)  # a duplicate launch: dropped
            return False
        owned.claimed = True
        if owned.timer is not None:
            owned.timer.cancel()
        await self._ack_launch(owned)
        if self._owned.get(job_id) is not owned:  # it ended while we claimed: let go at once
            await self.connection._remove_setup(f"job:{job_id}", None)
        return True

    async def _locate(self, job_id: str) -> bool:
        owned = self._owned.get(job_id)
        if owned is None:
            return False
        try:
            return await self._ensure_claimed(owned)
        except Exception as exc:
            log.warning("claim of %s on request failed: %r", job_id, exc)
            return False

    def _claim_later(self, owned: OwnedJob, delay: float) -> None:
        async def claim() -> None:
            try:
                await self._ensure_claimed(owned)
            except Exception as exc:
                if owned.job.job_id in self._owned:
                    log.warning("claim of %s failed (%r); again in 1 s", owned.job.job_id, exc)
                    self._claim_later(owned, 1.0)

        owned.timer = self.connection.loop.call_later(
            delay, lambda: self.connection._spawn(claim()))

    def _supersede(self, owned: OwnedJob, reason: str) -> None:
        assert self.hooks is not None
        owned.superseded = True
        self._silenced.add(owned.job.job_id)
        if owned.timer is not None:
            owned.timer.cancel()
        log.warning("job %s stopped here: %s", owned.job.job_id, reason)
        with contextlib.suppress(Exception):
            self.hooks.on_rpc(owned.job.job_id, {"intent": "abort", "message": reason})

    # ---- job ends ----------------------------------------------------------------------------

    async def _finish(self, job_id: str, record: dict[str, Any], reply_to: str | None = None) -> None:
        owned = self._owned.get(job_id)
        delay = self.settings.backoff_initial
        try:
            while True:
                if owned is not None and owned.superseded:
                    return
                try:
                    # A delivery that went with its connection proves nothing; a claim does.
                    if (owned is not None and not owned.claimed and not self._delivery_valid(owned)
                            and not await self._ensure_claimed(owned)):
                        return
                    await self._store_record(job_id, record, owned.reply_to if owned else reply_to)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self.connection._closing:
                        raise
                    log.warning("storing the record of %s failed (%r); retrying", job_id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.backoff_max)
            if owned is not None and owned.claimed:
                # Closing the job's channel cancels its consumer, and RabbitMQ deletes the
                # auto-delete queue with it: the job id is free and unroutable from here on.
                await self.connection._remove_setup(f"job:{job_id}", None)
            elif owned is not None:
                await self._ack_launch(owned)
        finally:
            if owned is not None:
                if owned.timer is not None:
                    owned.timer.cancel()
                self._owned.pop(job_id, None)
                self._silenced.discard(job_id)
            self._note_ended(job_id)

    def _note_ended(self, job_id: str) -> None:
        self._ended[job_id] = None
        if len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)

    async def _store_record(self, job_id: str, record: dict[str, Any], reply_to: str | None) -> None:
        # One publish, one confirm: the launching client (waiting for it, spared a read of the
        # stream) gets its copy by sender-selected distribution (BCC: an extra routing key
        # the broker strips before delivery).
        extra = {"headers": {"BCC": [reply_to]}} if reply_to else {}
        await self.connection.publish_confirmed([Outgoing.json(
            "", RESULTS_STREAM, codec.encode(record), delivery_mode=2, message_id=job_id,
            correlation_id=job_id, message_type=RECORD_TYPE, **extra)])
