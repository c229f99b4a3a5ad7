"""How a RabbitMQ worker takes launches: prefetch as concurrency, holding, giving back.

The consumer's prefetch is the worker's concurrency. A launch that arrives while every slot
is busy is *held* (unacknowledged) for at most ``HOLD_SECONDS``: short jobs free a slot long
before that and the held launch starts without a broker round trip. If it is still held
then, the worker is busy with long jobs: the held launches go back to the queue (for other
workers) and the consumer is cancelled until a slot frees.

A taken launch becomes an :class:`OwnedJob`; ``amqp_worker`` says when it is claimed and how
it ends. :class:`LaunchIntake` is a mixin of ``RabbitWorkerTransport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aio_pika.abc

from .. import codec
from ..constants import LAUNCH_QUEUE
from ..errors import DecodeError
from ..protocol import parse_launch
from .amqp_records import read_record
from .base import PreparedJob, WorkerHooks

if TYPE_CHECKING:
    from .amqp import AmqpConnection, ConnectionSettings

__all__ = ["LaunchIntake", "OwnedJob"]

log = logging.getLogger(__name__)


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



class LaunchIntake:
    """The launch consumer of a worker (see the module docstring)."""

    #: A launch that arrives while every slot is busy is held this long at most.
    HOLD_SECONDS = 1.0

    if TYPE_CHECKING:  # provided by RabbitWorkerTransport
        settings: ConnectionSettings
        connection: AmqpConnection
        hooks: WorkerHooks | None
        claim_after: float
        _free: int
        _capacity: int
        _consumer_tag: str | None
        _held: deque[tuple[aio_pika.abc.AbstractIncomingMessage, float]]
        _taking_work: bool
        _owned: dict[str, OwnedJob]
        _silenced: set[str]
        _ended: OrderedDict[str, None]
        _launch_generation: int
        _refusal_reply_to: dict[str, str]

        def _claim_later(self, owned: OwnedJob, delay: float) -> None: ...

        async def _ensure_claimed(self, owned: OwnedJob) -> bool: ...

        def _note_ended(self, job_id: str) -> None: ...

    async def _setup_launch(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self._launch_generation += 1
        self._consumer_tag = None
        self._held.clear()  # deliveries of a dead channel are the broker's again
        for owned in list(self._owned.values()):
            if not owned.claimed and not owned.superseded:
                # Its launch went back to the queue with the old channel: claim it before
                # another worker takes the launch again (the loser of that race stops).
                self._claim_later(owned, 0)
        await channel.set_qos(prefetch_count=self._capacity)
        await self._consume_launches(channel)

    async def _consume_launches(self, channel: aio_pika.abc.AbstractChannel) -> None:
        if self._consumer_tag is not None or self._free <= 0 or not self._taking_work:
            return
        queue = await channel.get_queue(LAUNCH_QUEUE, ensure=False)
        self._consumer_tag = await queue.consume(self._on_launch)

    def _set_free(self, free: int) -> None:
        self._free = free if self._taking_work else 0
        channel = self.connection.channel_of("launch")
        if channel is None or channel.is_closed:
            return
        if not self._taking_work:
            self.connection._spawn(self._give_back_held(channel, cancel=True))
        elif self._free > 0 and self._held:
            self.connection._spawn(self._start_held())
        elif self._free > 0 and self._consumer_tag is None:
            self.connection._spawn(self._consume_launches(channel))

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
            await self._consume_launches(channel)  # a slot freed meanwhile

    async def _expire_held(self) -> None:
        await asyncio.sleep(self.HOLD_SECONDS)
        now = time.monotonic()
        if self._held and now - self._held[0][1] >= self.HOLD_SECONDS:
            channel = self.connection.channel_of("launch")
            if channel is not None:
                await self._give_back_held(channel, cancel=self._free <= 0)

    async def _on_launch(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.message_id in self._owned or message.message_id in self._ended:
            await message.ack()  # its job runs or ran here: a launch come back, or a duplicate
            if message.message_id in self._owned:
                self._claim_later(self._owned[message.message_id], 0)
            return
        if self._free <= 0 or not self._taking_work or self._held:
            if not self._taking_work:
                await message.nack(requeue=True)
                return
            self._held.append((message, time.monotonic()))
            if len(self._held) == 1:
                self.connection._spawn(self._expire_held())
            return
        await self._take(message)

    async def _take(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self.hooks is not None
        try:
            launch = parse_launch(codec.decode_object(
                message.body, message.content_type, max_bytes=self.settings.max_message_bytes,
                allow_yaml=False)[0])
            if message.reply_to:  # a refusal's record goes to the launcher too
                self._refusal_reply_to[launch["job_id"]] = message.reply_to
            try:
                job = self.hooks.prepare(launch)
            finally:
                self._refusal_reply_to.pop(launch["job_id"], None)
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
        existing = self._owned.get(job.job_id)
        if existing is not None or job.job_id in self._ended:
            # A duplicate, or our own launch back after a reconnect (held meanwhile, maybe).
            self.hooks.cancel(job, "it runs or ran here already")
            await message.ack()
            if existing is not None and not existing.superseded:
                self._claim_later(existing, 0)
            return
        owned = OwnedJob(job, message, self._launch_generation, message.reply_to)
        self._owned[job.job_id] = owned
        if message.redelivered or self.claim_after <= 0:
            # Someone had it before (a worker that died or was cut off, or one that gave it
            # back): claim first, so two workers never run it at once. (claim_after=0 asks
            # for that for every job.)
            try:
                claimed = await self._ensure_claimed(owned)
            except Exception as exc:
                claimed = False
                log.warning("claim of %s failed: %r", job.job_id, exc)
                if not owned.superseded:
                    with contextlib.suppress(Exception):
                        await message.nack(requeue=True)
            if not claimed:
                self._owned.pop(job.job_id, None)
                self._silenced.discard(job.job_id)
                self.hooks.cancel(job, f"job {job.job_id} is claimed by another worker"
                                  if owned.superseded else "claim failed")
                return
            if message.redelivered and await self._ended_elsewhere(owned):
                return
        else:
            self._claim_later(owned, self.claim_after)
        self.hooks.begin(job)

    async def _ended_elsewhere(self, owned: OwnedJob) -> bool:
        """True (and the claim let go) if a redelivered launch's job has a record already.

        That happens when a worker stored a short job's record but was cut off before its
        ack reached the broker: the launch comes back, and must not run the job again.
        """
        assert self.hooks is not None
        job_id = owned.job.job_id
        try:
            record = await read_record(self.connection, job_id, 0)
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
        await self.connection._remove_setup(f"job:{job_id}", None)  # the claim, let go
        self.hooks.cancel(owned.job, "it ended already")
        return True
