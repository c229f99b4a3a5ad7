"""Who owns a job, and the proof of it in the broker: the one home of job ownership.

A job belongs to exactly one worker, and the proof of it lives in the broker, so it dies
with the worker's connection:

* at first, the unacknowledged delivery of its launch (RabbitMQ hands a message to one
  consumer at a time, and gives it back if that consumer's channel goes);
* once **claimed**, the exclusive queue ``brokerexec.rpc.<job id>``, which also receives the
  job's RPCs. The launch is acknowledged right after the claim.

A job is claimed when it has run ``claim_after`` seconds, when a client asks for it (an
RPC it could not route, sent to every worker), when its launch comes back redelivered
(claimed before it starts, so two workers never run it at once), and after a reconnect
(its delivery is void then). A job shorter than ``claim_after`` never pays for a queue: a
queue costs the broker more CPU than the rest of a trivial job together. Launches stay
unacknowledged at most ``claim_after`` plus a claim, far below ``consumer_timeout``.

A worker that loses a claim race (someone else claimed the job while this one was cut off)
is *superseded*: it aborts its copy silently, with no events and no record; the owner's are
the job's. A job ends here with :meth:`Ownership.finish`: its record is stored (confirmed),
then the claim is let go (or the launch acknowledged).

Everything here runs on the connection's loop thread, except :meth:`Ownership.silenced`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions

from .. import codec
from ..protocol import topology
from ..protocol.messages import Record
from ..protocol.names import (
    BCC_HEADER,
    KIWIPY_EXCHANGE,
    RECORD_TYPE,
    RESULTS_STREAM,
    rpc_queue,
    rpc_routing_key,
)
from .amqp_connection import AmqpConnection, Outgoing
from .amqp_records import find_record
from .base import PreparedJob

__all__ = ["OwnedJob", "Ownership"]

log = logging.getLogger(__name__)

#: How many ended job ids a worker remembers, to drop their launches if they come back.
ENDED_KEPT = 10_000

#: Delivers one RPC message to a claimed job (the signal server's).
DeliverRpc = Callable[[str, aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]]
#: Aborts this worker's copy of a job, silently (the worker's hooks).
AbortCopy = Callable[[str, str], None]


@dataclass(eq=False)
class OwnedJob:
    """A job this worker runs, and what makes it this worker's."""

    job: PreparedJob
    delivery: aio_pika.abc.AbstractIncomingMessage | None  # the unacked launch, until claimed
    generation: int  # of the launch channel that delivered it
    reply_to: str | None
    claimed: bool = False
    claiming: asyncio.Task[bool] | None = None
    superseded: bool = False
    timer: asyncio.TimerHandle | None = None


class Ownership:
    """See the module docstring.

    Parameters:
        connection: the worker's connection.
        claim_after: seconds a job runs before it is claimed (0: claim before it starts).
        deliver_rpc: where a claimed job's RPC queue delivers.
        abort_copy: stops this worker's copy of a job that another worker claimed.
    """

    def __init__(self, connection: AmqpConnection, *, claim_after: float,
                 deliver_rpc: DeliverRpc, abort_copy: AbortCopy) -> None:
        self.connection = connection
        self.claim_after = claim_after
        self._deliver_rpc = deliver_rpc
        self._abort_copy = abort_copy
        self._owned: dict[str, OwnedJob] = {}
        self._silenced: set[str] = set()  # superseded jobs; read from computation threads
        # Jobs that ended here: their launch may still come back (redelivered after a
        # reconnect, or held while the job ran) and must not run them again.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._launch_channel: aio_pika.abc.AbstractChannel | None = None
        self._launch_generation = 0

    # ---- what is known ---------------------------------------------------------------------

    def get(self, job_id: str) -> OwnedJob | None:
        """The job, if it runs here."""
        return self._owned.get(job_id)

    def ran_here(self, job_id: str) -> bool:
        """True if the job runs here now or ended here."""
        return job_id in self._owned or job_id in self._ended

    def silenced(self, job_id: str) -> bool:
        """True for a copy that lost its claim: the owner speaks for the job (any thread)."""
        return job_id in self._silenced

    # ---- taking jobs -----------------------------------------------------------------------

    def launch_channel_opened(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The launch consumer's channel is (re)opened: deliveries of the old one are void, so
        every job that ran on one is claimed now, before another worker takes its launch
        again (the loser of that race stops)."""
        self._launch_channel = channel
        self._launch_generation += 1
        for owned in list(self._owned.values()):
            if not owned.claimed and not owned.superseded:
                self.claim_later(owned, 0)

    def take(self, job: PreparedJob, delivery: aio_pika.abc.AbstractIncomingMessage) -> OwnedJob:
        """Own ``job`` on the strength of its unacknowledged launch ``delivery``."""
        owned = OwnedJob(job, delivery, self._launch_generation, delivery.reply_to)
        self._owned[job.job_id] = owned
        return owned

    def drop(self, job_id: str) -> None:
        """Forget a job that will not run here after all (its claim failed)."""
        self._owned.pop(job_id, None)
        self._silenced.discard(job_id)

    def _delivery_valid(self, owned: OwnedJob) -> bool:
        channel = self._launch_channel
        return (owned.delivery is not None and owned.generation == self._launch_generation
                and channel is not None and not channel.is_closed)

    def _ack_launch(self, owned: OwnedJob) -> None:
        valid = self._delivery_valid(owned)
        delivery, owned.delivery = owned.delivery, None
        if delivery is not None and valid:
            # With the next outbox batch; if its channel goes first, the launch is
            # redelivered and claimed there.
            self.connection.ack(delivery)

    # ---- claims ----------------------------------------------------------------------------

    async def ensure_claimed(self, owned: OwnedJob) -> bool:
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
                                                arguments=dict(topology.RPC_QUEUE_ARGUMENTS))
            exchange = await channel.get_exchange(KIWIPY_EXCHANGE, ensure=False)
            await queue.bind(exchange, rpc_routing_key(job_id))
            # Consumed through aiormq's own basic_consume: one task per message, not two.
            underlay = await channel.get_underlay_channel()
            await underlay.basic_consume(queue.name, lambda message: self._deliver_rpc(job_id, message),
                                         no_ack=True)

        await self.connection.wait_connected()
        try:
            await self.connection.setups.add(_claim_key(job_id), setup)
        except aiormq.exceptions.ChannelLockedResource:
            self.supersede(owned, "another worker claimed it")
            self._ack_launch(owned)  # a duplicate launch: dropped
            return False
        owned.claimed = True
        if owned.timer is not None:
            owned.timer.cancel()
        self._ack_launch(owned)
        if self._owned.get(job_id) is not owned:  # it ended while we claimed: let go at once
            await self.connection.setups.remove(_claim_key(job_id))
        return True

    async def locate(self, job_id: str) -> bool:
        """An RPC came for ``job_id`` through every worker: claim it if it runs here, so it
        can answer; False if it does not run here (or is someone else's)."""
        owned = self._owned.get(job_id)
        if owned is None:
            return False
        try:
            return await self.ensure_claimed(owned)
        except Exception as exc:
            log.warning("claim of %s on request failed: %r", job_id, exc)
            return False

    def claim_later(self, owned: OwnedJob, delay: float) -> None:
        """Claim ``owned`` in ``delay`` seconds (again a second after a failed attempt)."""
        async def claim() -> None:
            try:
                await self.ensure_claimed(owned)
            except Exception as exc:
                if owned.job.job_id in self._owned:
                    log.warning("claim of %s failed (%r); again in 1 s", owned.job.job_id, exc)
                    self.claim_later(owned, 1.0)

        if owned.timer is not None:
            owned.timer.cancel()
        owned.timer = self.connection.loop.call_later(delay, lambda: self.connection.spawn(claim()))

    def supersede(self, owned: OwnedJob, reason: str) -> None:
        """Another worker owns the job: stop this copy, which publishes nothing from now on."""
        owned.superseded = True
        self._silenced.add(owned.job.job_id)
        if owned.timer is not None:
            owned.timer.cancel()
        log.warning("job %s stopped here: %s", owned.job.job_id, reason)
        with contextlib.suppress(Exception):
            self._abort_copy(owned.job.job_id, reason)

    # ---- the end of a job ------------------------------------------------------------------

    async def ended_elsewhere(self, owned: OwnedJob) -> bool:
        """True (and the claim let go) if a redelivered launch's job has a record already.

        That happens when a worker stored a short job's record but was cut off before its
        ack reached the broker: the launch comes back, and must not run the job again.
        """
        job_id = owned.job.job_id
        try:
            record = await find_record(self.connection, job_id, 0)
        except Exception as exc:  # cannot tell: running it twice beats never running it
            log.warning("could not look for a record of %s (%r); running it", job_id, exc)
            return False
        if record is None:
            return False
        worker = record.get("worker") or {}
        log.warning("launch of %s came back, but the job ended already (%s, on %s): not run again",
                    job_id, record.get("state"), worker.get("hostname", "another worker"))
        self._owned.pop(job_id, None)
        self._note_ended(job_id)
        await self.connection.setups.remove(_claim_key(job_id))  # the claim, let go
        return True

    async def finish(self, record: Record, reply_to: str | None = None) -> None:
        """Store ``record`` (confirmed, retried across reconnects), then let the job go.

        A copy that lost its claim stores nothing. ``reply_to``: where the record also goes
        for a job that never ran here (a launch refused as it came).
        """
        job_id = record.job_id
        owned = self._owned.get(job_id)
        delay = self.connection.settings.backoff_initial
        try:
            while True:
                if owned is not None and owned.superseded:
                    return
                try:
                    # A delivery that went with its connection proves nothing; a claim does.
                    if (owned is not None and not owned.claimed and not self._delivery_valid(owned)
                            and not await self.ensure_claimed(owned)):
                        return
                    await self._store(record, owned.reply_to if owned else reply_to)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self.connection.closing:
                        raise
                    log.warning("storing the record of %s failed (%r); retrying", job_id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.connection.settings.backoff_max)
            if owned is not None and owned.claimed:
                # Closing the job's channel cancels its consumer, and RabbitMQ deletes the
                # auto-delete queue with it: the job id is free and unroutable from here on.
                await self.connection.setups.remove(_claim_key(job_id))
            elif owned is not None:
                self._ack_launch(owned)
        finally:
            if owned is not None:
                if owned.timer is not None:
                    owned.timer.cancel()
                self._owned.pop(job_id, None)
                self._silenced.discard(job_id)
            self._note_ended(job_id)

    async def _store(self, record: Record, reply_to: str | None) -> None:
        # One publish, one confirm: the launching client (waiting for it, spared a read of the
        # stream) gets its copy by sender-selected distribution (BCC: an extra routing key
        # the broker strips before delivery).
        extra = {"headers": {BCC_HEADER: [reply_to]}} if reply_to else {}
        await self.connection.publish_confirmed([Outgoing.json(
            "", RESULTS_STREAM, codec.encode(record.encode()), delivery_mode=2,
            message_id=record.job_id, correlation_id=record.job_id, message_type=RECORD_TYPE,
            **extra)])

    def _note_ended(self, job_id: str) -> None:
        self._ended[job_id] = None
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)


def _claim_key(job_id: str) -> str:
    """The setup key of a job's claim."""
    return f"job:{job_id}"
