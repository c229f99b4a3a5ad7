"""A worker's leases: how the broker learns, within milliseconds, that a worker has died.

Each worker has a lease queue ``brokerexec.leases.<worker id>`` (a quorum queue: it survives
a broker restart and dead-letters at least once), with a message time-to-live of one second
and the launches exchange as its dead-letter exchange. For every job it has claimed, the
worker publishes a **lease** (:class:`~brokerexec.protocol.messages.Lease`: the launch, the
attempt, where the last checkpoint is) to its own queue, with the job's service as a ``CC``
routing key, and consumes it *without acknowledging it*.

While the worker lives, the lease is held. When its connection goes (a SIGKILL, a host
lost, missed heartbeats), RabbitMQ puts the lease back in the queue; it is past its
time-to-live by then, so it is dead-lettered at once, with its routing keys, into the
service's launch queue: the job is launched again, to be resumed by whichever worker takes
it. Nothing polls, nothing times out in the client; the cost per running job is one held
message and a renewal every :attr:`Leases.renew_every` seconds.

A lease is *replaced* (publish the new one, confirmed; once it is delivered here, ack the
old) when the job checkpoints, so it points at the newest checkpoint, and every
``renew_every`` seconds, so that no delivery stays unacknowledged as long as RabbitMQ's
``consumer_timeout`` (30 min by default), which would close the channel. When the job
ends, its lease is acknowledged: gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import aio_pika.abc

from .... import codec
from ....protocol import topology
from ....protocol.messages import Lease
from ....protocol.names import ATTEMPT_HEADER, CC_HEADER, LEASE_TYPE, LEASES_EXCHANGE, lease_queue
from ..connection import AmqpConnection, Outgoing

__all__ = ["Leases"]

log = logging.getLogger(__name__)

#: Seconds to wait for a published lease to come back to the worker's own consumer.
HOLD_TIMEOUT = 10.0


class Leases:
    """The lease queue of one worker (see the module docstring); loop thread only.

    Parameters:
        connection: the worker's connection.
        worker_id: names the lease queue.
        renew_every: seconds between renewals of each lease (below half the broker's
            ``consumer_timeout``).
        reopened: called when the lease channel opens again: every lease held on the old
            one is void, and the owner of the jobs holds them again.
    """

    def __init__(self, connection: AmqpConnection, worker_id: str, *, renew_every: float,
                 reopened: Callable[[], None]) -> None:
        self.connection = connection
        self.queue = lease_queue(worker_id)
        self.renew_every = renew_every
        self._reopened = reopened
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._current: dict[str, Lease] = {}  # job id -> its lease, as last published
        self._held: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
        self._expected: dict[str, asyncio.Future[None]] = {}  # nonce -> held
        self._renewer: asyncio.Task[None] | None = None
        self.published = 0

    @property
    def held(self) -> int:
        """How many leases are held now."""
        return len(self._held)

    def lease_of(self, job_id: str) -> Lease | None:
        """The job's lease as last published."""
        return self._current.get(job_id)

    async def setup(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The lease consumer's setup: run again on every new channel."""
        spec = topology.lease_queue_spec(self.queue.removeprefix("brokerexec.leases."))
        queue = await channel.declare_queue(spec.name, durable=True, arguments=dict(spec.arguments))
        await queue.bind(LEASES_EXCHANGE, spec.routing_key)
        await channel.set_qos(prefetch_count=0)  # one held delivery per running job, unbounded
        reopened = self._channel is not None
        self._channel = channel
        self._held.clear()  # deliveries of a closed channel are void: they went back
        for future in self._expected.values():
            if not future.done():
                future.set_exception(ConnectionError("the lease channel closed"))
        self._expected.clear()
        await queue.consume(self._on_lease)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        if reopened:
            self._reopened()

    async def hold(self, job_id: str, lease: Lease) -> None:
        """Publish ``lease`` (replacing the job's current one) and return once it is held.

        Raises:
            BrokerConnectionError, ConnectionError, asyncio.TimeoutError: it is not held.
        """
        nonce = os.urandom(8).hex()
        held = asyncio.get_running_loop().create_future()
        self._expected[nonce] = held
        self._current[job_id] = lease
        try:
            await self.connection.publish_confirmed([Outgoing.json(
                LEASES_EXCHANGE, self.queue, codec.encode(lease.encode()), delivery_mode=2,
                message_id=job_id, correlation_id=nonce, message_type=LEASE_TYPE,
                headers={CC_HEADER: [lease.launch.service], ATTEMPT_HEADER: lease.attempt})])
            self.published += 1
            await asyncio.wait_for(asyncio.shield(held), HOLD_TIMEOUT)
        finally:
            self._expected.pop(nonce, None)

    def release(self, job_id: str) -> None:
        """The job ended here, or went elsewhere: its lease is acknowledged, gone."""
        self._current.pop(job_id, None)
        message = self._held.pop(job_id, None)
        if message is not None:
            self.connection.ack(message)

    async def _on_lease(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        held = self._expected.pop(message.correlation_id or "", None)
        job_id = message.message_id or ""
        if held is None or held.done() or job_id not in self._current:
            # Published before this channel opened and back within its time-to-live, or of a
            # job released meanwhile: not the current lease of anything held here.
            self.connection.ack(message)
            return
        previous = self._held.get(job_id)
        self._held[job_id] = message
        if previous is not None:
            self.connection.ack(previous)
        held.set_result(None)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            for job_id, lease in list(self._current.items()):
                if job_id not in self._held:
                    continue  # being held again after a reconnect: fresh anyway
                try:
                    await self.hold(job_id, lease)
                except Exception as exc:  # the next renewal, or the reconnect, holds it again
                    log.warning("renewing the lease of %s failed: %r", job_id, exc)

    async def close(self) -> None:
        """Stop renewing; drop the lease queue if no job holds a lease in it any more (a
        quorum queue cannot be deleted "if empty": whether it is, is known only here)."""
        if self._renewer is not None:
            self._renewer.cancel()
        channel = self._channel
        if channel is None or channel.is_closed or self._current:
            return  # a job still held: its lease must outlive this process, to resume it
        with contextlib.suppress(Exception):
            underlay = await channel.get_underlay_channel()
            await asyncio.wait_for(underlay.queue_delete(self.queue), 2)
