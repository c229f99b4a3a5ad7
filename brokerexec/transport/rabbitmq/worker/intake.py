"""How a RabbitMQ worker takes launches: one queue per service it offers, prefetch as
concurrency, holding, giving back, and resuming jobs whose worker was lost.

The worker consumes the launch queue of each service it offers, on one channel; each
consumer's prefetch is the worker's concurrency. A launch that arrives while every slot is
busy is *held* (unacknowledged) for at most :attr:`LaunchIntake.HOLD_SECONDS`: short jobs
free a slot long before that and the held launch starts without a broker round trip. If it
is still held then, the worker is busy with long jobs: the held launches go back to their
queues (for other workers) and the consumers are cancelled until a slot frees.

What a launch queue holds:

* a **launch** (:class:`~brokerexec.protocol.messages.Launch`): decoded, checked by the worker
  (``prepare``) and handed to :class:`~.ownership.Ownership`. One that cannot be decoded
  but names its job (``message_id``) ends with a failed record its client sees; one that
  names nothing is dead-lettered. A *redelivered* launch (its worker was cut off before
  claiming it) is claimed first and checked against the journal, so it never runs twice.
* a **lease** (:class:`~brokerexec.protocol.messages.Lease`), dead-lettered there when its
  worker died, or handed over by a worker that stopped: the job is resumed. After
  ``resume_grace`` seconds (its worker may only be reconnecting: it then keeps its claim and
  this worker lets go), the job is claimed, its journal read for the newest checkpoint and
  attempt, a ``started`` entry of the next attempt written, and it begins from that
  checkpoint (:mod:`brokerexec.protocol.ownership` decides each step, :mod:`.resume_point`
  reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aio_pika.abc

from .... import codec
from ....constants import MAX_ENTRY_BYTES
from ....errors import DecodeError
from ....protocol.messages import Launch, Lease, Record
from ....protocol.names import LEASE_TYPE, check_name, launch_queue
from ...base import PreparedJob, WorkerHooks
from ..connection import AmqpConnection
from ..delivery import Delivery
from .ownership import Ownership

__all__ = ["LaunchIntake"]

log = logging.getLogger(__name__)

Message = Delivery

#: Stores a record of a launch that never ran here (the worker's ``OwnerWrites.finish``).
Finish = Callable[[Record, "str | None"], Coroutine[Any, Any, None]]


class LaunchIntake:
    """The launch consumers of a worker (see the module docstring).

    Parameters:
        connection: the worker's connection.
        ownership: who owns what; every job taken goes there.
        finish: stores the record of a launch refused as it came.
        host_info: who this worker is, in those records.
    """

    #: A launch that arrives while every slot is busy is held this long at most.
    HOLD_SECONDS = 1.0

    def __init__(self, connection: AmqpConnection, ownership: Ownership, *, finish: Finish,
                 host_info: dict[str, Any]) -> None:
        self.connection = connection
        self.ownership = ownership
        self.hooks: WorkerHooks | None = None
        self.services: tuple[str, ...] = ()
        self._finish = finish
        self._host_info = host_info
        self._free = 0
        self._capacity = 1
        self._taking_work = True
        self._consumer_tags: dict[str, str] = {}
        self._held: deque[tuple[Message, float]] = deque()
        self._refusal_reply_to: dict[str, str] = {}

    def start(self, hooks: WorkerHooks, capacity: int, services: Sequence[str]) -> None:
        """Remember the hooks, capacity and services; :meth:`setup` then starts consuming."""
        self.hooks, self._free, self._capacity = hooks, capacity, max(capacity, 1)
        self.services = tuple(services)

    def held(self) -> list[dict[str, Any]]:
        """Summaries of the launches held here, waiting for a slot (queued, for ``jobs``)."""
        summaries: list[dict[str, Any]] = []
        for message, _ in list(self._held):
            try:
                body = codec.decode_object(message.body, message.content_type, allow_yaml=False,
                                           max_bytes=self._limit(message))[0]
                launch = Lease.decode(body).launch if message.type == LEASE_TYPE else Launch.decode(body)
            except DecodeError:
                continue
            summaries.append({"job_id": launch.job_id, "service": launch.service,
                              "state": "resuming" if message.type == LEASE_TYPE else "queued",
                              "since": launch.sent, "attempt": 0, "worker": {}})
        return summaries

    def _limit(self, message: Message) -> int:
        # A lease was written by a worker (it carries the changes made since the job's last
        # checkpoint, docs/durability.md); a launch comes from anyone allowed to launch.
        return MAX_ENTRY_BYTES if message.type == LEASE_TYPE else self.connection.settings.max_message_bytes

    def reply_to_of(self, job_id: str) -> str | None:
        """Where a launch being prepared wants its record (for a refusal's record)."""
        return self._refusal_reply_to.get(job_id)

    # ---- the consumers ---------------------------------------------------------------------

    async def setup(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The launch consumers' setup: run again on every new channel."""
        self._consumer_tags.clear()
        self._held.clear()  # deliveries of a dead channel are the broker's again
        self.ownership.launch_channel_opened(channel)
        await channel.set_qos(prefetch_count=self._capacity)
        await self._consume(channel)

    def _channel(self) -> aio_pika.abc.AbstractChannel | None:
        channel = self.connection.setups.channel_of("launch")
        return channel if channel is not None and not channel.is_closed else None

    async def _consume(self, channel: aio_pika.abc.AbstractChannel) -> None:
        if self._consumer_tags or self._free <= 0 or not self._taking_work:
            return
        underlay = await channel.get_underlay_channel()
        for service in self.services:  # aiormq's own consumer: Delivery says why
            consumed = await underlay.basic_consume(
                launch_queue(service), lambda message: self._on_launch(Delivery(message)))
            assert consumed.consumer_tag is not None
            self._consumer_tags[service] = consumed.consumer_tag

    async def _cancel(self, channel: aio_pika.abc.AbstractChannel) -> None:
        tags, self._consumer_tags = self._consumer_tags, {}
        for service, tag in tags.items():
            try:
                underlay = await channel.get_underlay_channel()
                await underlay.basic_cancel(tag)
            except Exception as exc:  # the channel is going away: the setup re-runs
                log.debug("cancel of the %s launch consumer failed: %r", service, exc)

    def set_free(self, free: int) -> None:
        """How many more launches the worker takes now (loop thread)."""
        self._free = free if self._taking_work else 0
        channel = self._channel()
        if channel is None:
            return
        if not self._taking_work:
            self.connection.spawn(self._give_back_held(channel, cancel=True))
        elif self._free > 0 and self._held:
            self.connection.spawn(self._start_held())
        elif self._free > 0 and not self._consumer_tags:
            self.connection.spawn(self._consume(channel))

    def stop_taking_work(self) -> None:
        """Take no more launches; held ones go back (loop thread)."""
        self._taking_work = False
        self.set_free(0)

    async def stop(self) -> None:
        """Take no more launches, and return once the launch consumers are cancelled and
        held launches given back (loop thread).

        Awaited, not spawned: a spawned cancel still waiting for its ``Basic.CancelOk``
        when the connection closed was cancelled with the other background tasks, and
        aiormq then closed its channel with a WARNING (``Closing channel ... because RPC
        call Basic.Cancel cancelled``) on a clean stop.
        """
        self._taking_work, self._free = False, 0
        channel = self._channel()
        if channel is not None:
            await self._give_back_held(channel, cancel=True)

    # ---- holding ---------------------------------------------------------------------------

    async def _start_held(self) -> None:
        while self._held and self._free > 0:
            message, _ = self._held.popleft()
            await self._take(message)

    async def _give_back_held(self, channel: aio_pika.abc.AbstractChannel, *, cancel: bool) -> None:
        if cancel:
            await self._cancel(channel)
        while self._held:
            message, _ = self._held.popleft()
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        if self._free > 0 and self._taking_work and not channel.is_closed:
            await self._consume(channel)  # a slot freed meanwhile

    async def _expire_held(self) -> None:
        await asyncio.sleep(self.HOLD_SECONDS)
        if self._held and time.monotonic() - self._held[0][1] >= self.HOLD_SECONDS:
            channel = self._channel()
            if channel is not None:
                await self._give_back_held(channel, cancel=self._free <= 0)

    # ---- a launch arrives ------------------------------------------------------------------

    async def _on_launch(self, message: Message) -> None:
        job_id = message.message_id
        if job_id is not None and self.ownership.ran_here(job_id):
            await message.ack()  # its job runs or ran here: a launch come back, or a duplicate
            self.ownership.came_back(job_id)
            return
        if self._free <= 0 or not self._taking_work or self._held:
            if not self._taking_work:
                await message.nack(requeue=True)
                return
            self._held.append((message, time.monotonic()))
            if len(self._held) == 1:
                self.connection.spawn(self._expire_held())
            return
        await self._take(message)

    async def _take(self, message: Message) -> None:
        assert self.hooks is not None
        try:
            body = codec.decode_object(message.body, message.content_type, allow_yaml=False,
                                       max_bytes=self._limit(message))[0]
            lease = Lease.decode(body) if message.type == LEASE_TYPE else None
            launch = lease.launch if lease is not None else Launch.decode(body)
            if launch.service not in self.services:
                raise DecodeError(f"a launch of service {launch.service!r} in the queue of "
                                  f"{', '.join(self.services)}")
            reply_to = lease.reply_to if lease is not None else message.reply_to
            if reply_to:  # a refusal's record goes to the launcher too
                self._refusal_reply_to[launch.job_id] = reply_to
            try:
                job = self.hooks.prepare(launch)
            finally:
                self._refusal_reply_to.pop(launch.job_id, None)
        except DecodeError as exc:
            await self._refuse(message, exc)
            return
        except Exception:
            log.exception("launch could not be prepared; dead-lettered")
            await message.reject(requeue=False)
            return
        if job is None:
            await message.ack()
            return
        self._start(job, message, lease)

    async def _refuse(self, message: Message, exc: DecodeError) -> None:
        """A launch that cannot be run: a failed record if it names its job, else dead-lettered."""
        job_id, service = message.message_id, self._service_of(message)
        try:
            check_name("job id", job_id)
        except DecodeError:
            log.warning("launch dead-lettered: %s", exc)
            await message.reject(requeue=False)
            return
        assert job_id is not None
        log.warning("launch of job %s refused: %s", job_id, exc)
        await message.ack()
        record = Record.refusal(job_id, service, self._host_info, exc)
        self.connection.spawn(self._finish(record, message.reply_to))

    def _service_of(self, message: Message) -> str:
        key = message.routing_key or ""
        return key if key in self.services else (self.services[0] if len(self.services) == 1 else "")

    def _start(self, job: PreparedJob, message: Message, lease: Lease | None) -> None:
        """Hand the job to ownership: its state machine claims it (first, if its launch was
        redelivered or ``claim_after`` is 0, or if it is resumed), then begins it, or gives
        its slot back."""
        self.ownership.take(job, message, lease)
