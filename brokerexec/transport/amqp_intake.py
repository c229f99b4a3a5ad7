"""How a RabbitMQ worker takes launches: prefetch as concurrency, holding, giving back.

The consumer's prefetch is the worker's concurrency. A launch that arrives while every slot
is busy is *held* (unacknowledged) for at most :attr:`LaunchIntake.HOLD_SECONDS`: short jobs
free a slot long before that and the held launch starts without a broker round trip. If it
is still held then, the worker is busy with long jobs: the held launches go back to the
queue (for other workers) and the consumer is cancelled until a slot frees.

A taken launch is decoded, checked by the worker (``prepare``) and handed to
:class:`~.amqp_ownership.Ownership`, which says when it is claimed and how it ends. A launch
that cannot be decoded is dead-lettered at once, with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import aio_pika.abc

from .. import codec
from ..errors import DecodeError
from ..protocol.messages import Launch
from ..protocol.names import LAUNCH_QUEUE
from .amqp_connection import AmqpConnection
from .amqp_ownership import Ownership
from .base import WorkerHooks

__all__ = ["LaunchIntake"]

log = logging.getLogger(__name__)


class LaunchIntake:
    """The launch consumer of a worker (see the module docstring).

    Parameters:
        connection: the worker's connection.
        ownership: who owns what; every job taken goes there.
    """

    #: A launch that arrives while every slot is busy is held this long at most.
    HOLD_SECONDS = 1.0

    def __init__(self, connection: AmqpConnection, ownership: Ownership) -> None:
        self.connection = connection
        self.ownership = ownership
        self.hooks: WorkerHooks | None = None
        self._free = 0
        self._capacity = 1
        self._taking_work = True
        self._consumer_tag: str | None = None
        self._held: deque[tuple[aio_pika.abc.AbstractIncomingMessage, float]] = deque()
        self._refusal_reply_to: dict[str, str] = {}

    def start(self, hooks: WorkerHooks, capacity: int) -> None:
        """Remember the hooks and the capacity; :meth:`setup` then starts consuming."""
        self.hooks, self._free, self._capacity = hooks, capacity, max(capacity, 1)

    def reply_to_of(self, job_id: str) -> str | None:
        """Where a launch being prepared wants its record (for a refusal's record)."""
        return self._refusal_reply_to.get(job_id)

    # ---- the consumer ----------------------------------------------------------------------

    async def setup(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The launch consumer's setup: run again on every new channel."""
        self._consumer_tag = None
        self._held.clear()  # deliveries of a dead channel are the broker's again
        self.ownership.launch_channel_opened(channel)
        await channel.set_qos(prefetch_count=self._capacity)
        await self._consume(channel)

    def _channel(self) -> aio_pika.abc.AbstractChannel | None:
        channel = self.connection.setups.channel_of("launch")
        return channel if channel is not None and not channel.is_closed else None

    async def _consume(self, channel: aio_pika.abc.AbstractChannel) -> None:
        if self._consumer_tag is not None or self._free <= 0 or not self._taking_work:
            return
        queue = await channel.get_queue(LAUNCH_QUEUE, ensure=False)
        self._consumer_tag = await queue.consume(self._on_launch)

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
        elif self._free > 0 and self._consumer_tag is None:
            self.connection.spawn(self._consume(channel))

    def stop_taking_work(self) -> None:
        """Take no more launches; held ones go back (loop thread)."""
        self._taking_work = False
        self.set_free(0)

    # ---- holding ---------------------------------------------------------------------------

    async def _start_held(self) -> None:
        while self._held and self._free > 0:
            message, _ = self._held.popleft()
            await self._take(message)

    async def _give_back_held(self, channel: aio_pika.abc.AbstractChannel, *, cancel: bool) -> None:
        if cancel and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                queue = await channel.get_queue(LAUNCH_QUEUE, ensure=False)
                await queue.cancel(tag)
            except Exception as exc:  # the channel is going away: the setup re-runs
                log.debug("cancel of launch consumer failed: %r", exc)
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

    async def _on_launch(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        job_id = message.message_id
        if job_id is not None and self.ownership.ran_here(job_id):
            await message.ack()  # its job runs or ran here: a launch come back, or a duplicate
            owned = self.ownership.get(job_id)
            if owned is not None:
                self.ownership.claim_later(owned, 0)
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

    async def _take(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self.hooks is not None
        try:
            launch = Launch.decode(codec.decode_object(
                message.body, message.content_type,
                max_bytes=self.connection.settings.max_message_bytes, allow_yaml=False)[0])
            if message.reply_to:  # a refusal's record goes to the launcher too
                self._refusal_reply_to[launch.job_id] = message.reply_to
            try:
                job = self.hooks.prepare(launch)
            finally:
                self._refusal_reply_to.pop(launch.job_id, None)
        except DecodeError as exc:
            log.warning("launch dead-lettered: %s", exc)
            await message.reject(requeue=False)
            return
        except Exception:
            log.exception("launch could not be prepared; dead-lettered")
            await message.reject(requeue=False)
            return
        if job is None:
            await message.ack()
            return
        ownership = self.ownership
        if ownership.ran_here(job.job_id):
            # A duplicate, or our own launch back after a reconnect (held meanwhile, maybe).
            self.hooks.cancel(job, "it runs or ran here already")
            await message.ack()
            existing = ownership.get(job.job_id)
            if existing is not None and not existing.superseded:
                ownership.claim_later(existing, 0)
            return
        owned = ownership.take(job, message)
        if message.redelivered or ownership.claim_after <= 0:
            # Someone had it before (a worker that died or was cut off, or one that gave it
            # back): claim first, so two workers never run it at once. (claim_after=0 asks
            # for that for every job.)
            try:
                claimed = await ownership.ensure_claimed(owned)
            except Exception as exc:
                claimed = False
                log.warning("claim of %s failed: %r", job.job_id, exc)
                if not owned.superseded:
                    with contextlib.suppress(Exception):
                        await message.nack(requeue=True)
            if not claimed:
                ownership.drop(job.job_id)
                self.hooks.cancel(job, f"job {job.job_id} is claimed by another worker"
                                  if owned.superseded else "claim failed")
                return
            if message.redelivered and await ownership.ended_elsewhere(owned):
                self.hooks.cancel(job, "it ended already")
                return
        else:
            ownership.claim_later(owned, ownership.claim_after)
        self.hooks.begin(job)
