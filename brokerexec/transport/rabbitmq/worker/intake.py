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
  :attr:`LaunchIntake.resume_grace` seconds (its worker may only be reconnecting: it then
  keeps its claim and this worker lets go), the job is claimed, its journal read for the
  newest checkpoint and attempt, a ``started`` entry of the next attempt written, and it
  begins from that checkpoint.
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
from ....protocol.changes import uncovered
from ....protocol.journal import Entry, entry_of
from ....protocol.messages import Launch, Lease, Record
from ....protocol.names import CHECKPOINT_TYPE, LEASE_TYPE, STARTED_TYPE, check_name, launch_queue
from ...base import PreparedJob, Resumed, WorkerHooks
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
        resume_grace: seconds before a lease from a lost worker is claimed.
    """

    #: A launch that arrives while every slot is busy is held this long at most.
    HOLD_SECONDS = 1.0

    def __init__(self, connection: AmqpConnection, ownership: Ownership, *, finish: Finish,
                 host_info: dict[str, Any], resume_grace: float) -> None:
        self.connection = connection
        self.ownership = ownership
        self.resume_grace = resume_grace
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
            owned = self.ownership.get(job_id)
            if owned is not None and not owned.superseded:
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
        if lease is not None:
            await self._resume(job, lease, message)
        else:
            await self._start(job, message)

    async def _resume_point(self, job_id: str, lease: Lease) -> tuple[bool, dict[str, Any] | None, int]:
        """Whether the job ended, the checkpoint to resume from (its body, with its
        ``offset``) and the newest attempt seen, read without reading the job's life:

        * the checkpoint at the offset its lease points at, one entry;
        * the stream back from its end to the newest entry of the lease's attempt (its last
          checkpoint, or its start), for a record: a copy of a lease may wait in its queue
          while every worker is busy, and meanwhile its worker may have come back, claimed
          the job again and ended it. A handed-over lease was sent after its worker let the
          job go: no record to look for;
        * and back to the newest checkpoint where the pointer does not answer (an older
          lease, an entry gone).
        """
        journal = self.ownership.journal
        pointer = lease.checkpoint or {}
        checkpoint: dict[str, Any] | None = None
        at = pointer.get("offset")
        if isinstance(at, int) and not isinstance(at, bool) and at >= 0:
            for entry in await journal.read_at(job_id, at):
                if (entry.kind == CHECKPOINT_TYPE and entry.body.get("attempt") == pointer.get("attempt")
                        and entry.body.get("time") == pointer.get("time")):
                    checkpoint = {**entry.body, "offset": at}
            if checkpoint is None:
                log.warning("job %s: no checkpoint at offset %d, where its lease points: searching",
                            job_id, at)
        ended, newest = False, lease.attempt
        if lease.handed_over and (checkpoint is not None or not pointer):
            return ended, checkpoint, newest  # sent once its worker let the job go: no record
        attempt = lease.attempt

        def enough(entries: list[Entry]) -> bool:  # nothing older changes the answer
            if checkpoint is None and pointer:
                return any(e.kind == CHECKPOINT_TYPE for e in entries)
            return any(e.kind in (STARTED_TYPE, CHECKPOINT_TYPE) and _attempt_of(e) >= attempt
                       for e in entries)

        search = await journal.search_back(job_id, enough)
        history = search.history
        ended = history.record is not None
        if checkpoint is None and history.checkpoint is not None:
            found = entry_of(search.entries, CHECKPOINT_TYPE, time=history.checkpoint.get("time"))
            checkpoint = {**history.checkpoint, "offset": found.offset if found else None}
        return ended, checkpoint, max(newest, history.attempt)

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

    async def _start(self, job: PreparedJob, message: Message) -> None:
        assert self.hooks is not None
        ownership = self.ownership
        owned = ownership.take(job, message)
        if message.redelivered or ownership.claim_after <= 0:
            # Someone had it before (a worker that died or was cut off, or one that gave it
            # back): claim first, so two workers never run it at once. (claim_after=0 asks
            # for that for every job.)
            owned.check_journal = bool(message.redelivered)
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
                self.hooks.cancel(job, owned.superseded_why or "claim failed")
                return
        else:
            ownership.claim_later(owned, ownership.claim_after)
        self.hooks.begin(job)

    async def _resume(self, job: PreparedJob, lease: Lease, message: Message) -> None:
        assert self.hooks is not None
        ownership = self.ownership
        owned = ownership.take(job, message, reply_to=lease.reply_to)
        owned.resuming = True  # not claimed by a status asked meanwhile: by this, below
        try:
            if not lease.handed_over:
                # Its worker may be reconnecting: wait. Meanwhile look for its record: a stale
                # copy of a lease (its job ended since) goes at once, not after the grace.
                loop = asyncio.get_running_loop()
                until = loop.time() + self.resume_grace
                early = asyncio.ensure_future(self._resume_point(job.job_id, lease))
                await asyncio.wait({early}, timeout=self.resume_grace)
                if early.done() and not early.cancelled() and early.exception() is None and early.result()[0]:
                    ownership.drop(job.job_id)
                    self.hooks.cancel(job, "it ended already")
                    return
                # Not cancelled if still reading: closing a stream consumer's channel in the
                # middle of its deliveries is how a worker's connection got closed (504).
                early.add_done_callback(lambda done: done.cancelled() or done.exception())
                await asyncio.sleep(max(until - loop.time(), 0.0))
            # A handed-over job's queue is gone before its lease is sent; a few tries ride out
            # a broker that is a moment behind.
            if not await ownership.lock(owned, tries=5 if lease.handed_over else 1):
                ownership.drop(job.job_id)
                self.hooks.cancel(job, "its worker still holds it")
                return
            ended, checkpoint, newest = await self._resume_point(job.job_id, lease)
        except Exception as exc:
            log.warning("resume of %s failed (%r); the lease goes back to its queue", job.job_id, exc)
            await asyncio.sleep(1.0)  # not at once: the same failure would come straight back
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            owned.delivery = None
            ownership.drop(job.job_id)
            self.hooks.cancel(job, "resume failed")
            return
        # The job's queue is ours: no other execution runs it now (every execution but a
        # launch shorter than claim_after holds it). A started entry newer than the lease is
        # one whose worker died before it held its lease: resumed past it, not dropped.
        if ended:
            ownership.drop(job.job_id)
            self.hooks.cancel(job, "it ended already")
            return
        if checkpoint is not None and checkpoint.get("service") not in (None, job.service):
            checkpoint = None
        job.attempt = max(newest, lease.attempt) + 1
        covers = _covers(checkpoint)
        settable = checkpoint.get("settable") if checkpoint else None
        # The lease's changes were noted after ITS checkpoint: the one found may be newer.
        changes = uncovered(lease.changes, covers)
        job.resumed = Resumed(checkpoint.get("state") if checkpoint else None, checkpoint is not None,
                              lease.worker, lease.handed_over,
                              settable=settable if isinstance(settable, dict) else {}, changes=changes,
                              checkpoint_time=checkpoint.get("time") if checkpoint else None, covers=covers)
        owned.checkpoint = lease.checkpoint
        if checkpoint is not None:
            owned.checkpoint = {"time": checkpoint["time"], "attempt": checkpoint.get("attempt", 1),
                                "covers": covers}
            if checkpoint.get("offset") is not None:
                owned.checkpoint["offset"] = checkpoint["offset"]
        # Carried by this execution's lease until one of its checkpoints covers them.
        owned.changes, owned.covered = changes, covers
        owned.resuming = False
        try:
            claimed = await ownership.ensure_claimed(owned)
        except Exception as exc:  # the started entry or the lease could not be written
            log.warning("claim of %s while resuming failed (%r); the lease goes back to its queue",
                        job.job_id, exc)
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            owned.delivery = None
            with contextlib.suppress(Exception):
                await ownership.unlock(owned)  # never left locked with no lease
            claimed = False
        if not claimed:
            ownership.drop(job.job_id)
            self.hooks.cancel(job, "claim failed")
            return
        before = "a handover" if lease.handed_over else f"losing {lease.worker.get('hostname', 'its worker')}"
        log.info("job %s resumed here as attempt %d (%s), after %s", job.job_id, job.attempt,
                 "from its checkpoint" if checkpoint else "from the start", before)
        self.hooks.begin(job)


def _covers(checkpoint: dict[str, Any] | None) -> int:
    covers = (checkpoint or {}).get("covers", 0)
    return covers if isinstance(covers, int) and not isinstance(covers, bool) and covers >= 0 else 0


def _attempt_of(entry: Entry) -> int:
    attempt = entry.body.get("attempt", 1)
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1
