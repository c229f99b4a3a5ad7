"""The outbox: fire-and-forget publishes and acks, written to the socket in batches.

A worker sends several small messages for every job (state events, kiwipy ``state_changed``
broadcasts, the ack of its launch). Here every publish and ack waiting at the moment is
marshalled (``frames.py``) and handed to aiormq's writer as **one** frame batch: one queue pass
and one ``send()`` for all of them (``aiormq_internals.py`` says how, and what it falls back
to should aiormq change).

The publishes go on a channel of their own, **without publisher confirms**: what this carries
is best-effort by design (events go to a topic exchange where nobody may listen). Whatever
must not be lost, like a job's record, goes on a second channel of the outbox's own, in
confirm mode (:meth:`Outbox.publish_confirmed`), in the same batch, and **mandatory**: the
broker confirms a publish it routed to no queue as readily as a stored one (for a moment
after it starts, RabbitMQ 3.10 routes nothing to durable queues and streams whose recovery
has not finished: a record published then was confirmed and gone), so a publish returned
fails instead. aiormq finds the publish a return is about by its ``message_id``: two with
one id never await their confirms at once, the second waits for the first. A message still in the
outbox when the connection drops is kept and sent on the next one; one in the batch being
written when it drops is sent again (so it may arrive twice), and one already written but
still in the kernel's buffers may be lost.

Acks are for deliveries of one channel; an ack whose channel has closed since is dropped
(its delivery went back to the queue with the channel).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.abc
import aiormq.exceptions
from pamqp import commands as spec

from ...errors import BrokerConnectionError
from . import aiormq_internals as internals
from .frames import ack_frame, publish_frames

__all__ = ["Outbox", "Outgoing"]

log = logging.getLogger(__name__)

#: The outbox's two channels: for fire-and-forget publishes, and in confirm mode.
Channels = tuple[aiormq.abc.AbstractChannel, aiormq.abc.AbstractChannel]


@dataclass
class Outgoing:
    """A message for the outbox (fire-and-forget, ordered) or a confirmed publish.

    Body and AMQP properties as they go on the wire: the outbox carries every event a job
    emits, and building an ``aio_pika.Message`` for each cost a worker more than sending it.
    """

    exchange: str
    routing_key: str
    body: bytes
    properties: spec.Basic.Properties

    @classmethod
    def json(cls, exchange: str, routing_key: str, body: bytes, **properties: Any) -> Outgoing:
        """A JSON message, not persistent unless ``delivery_mode=2`` is given."""
        properties.setdefault("delivery_mode", 1)
        return cls(exchange, routing_key, body,
                   spec.Basic.Properties(content_type="application/json", **properties))

    @classmethod
    def reply(cls, reply_to: str, body: bytes, content_type: str, correlation_id: str) -> Outgoing:
        """A reply to a request: by the default exchange, to its ``reply_to`` (kiwipy's reply
        queues and RabbitMQ's direct reply-to alike)."""
        return cls("", reply_to, body, spec.Basic.Properties(
            content_type=content_type, correlation_id=correlation_id, delivery_mode=1))

    def frames(self, channel_number: int, max_content: int, *, mandatory: bool = False) -> bytes:
        """This publish as marshalled AMQP frames (method, header, body in pieces)."""
        return publish_frames(channel_number, self.exchange, self.routing_key, self.body,
                              self.properties, max_content, mandatory=mandatory)

    @property
    def message_id(self) -> str:
        """Its ``message_id``, given one if it had none (how a return finds its publish)."""
        if self.properties.message_id is None:
            self.properties.message_id = uuid.uuid4().hex
        return self.properties.message_id


@dataclass
class _Ack:
    channel: aiormq.abc.AbstractChannel
    delivery_tag: int


_Confirmed = list[tuple[Outgoing, asyncio.Future[None]]]


class Outbox:
    """See the module docstring. Owned by one connection; runs on its loop."""

    LIMIT = 10_000  # messages kept while disconnected; the oldest go first beyond that
    BATCH = 500  # messages per write

    def __init__(self, loop: asyncio.AbstractEventLoop, on_loop_thread: Callable[[], bool]) -> None:
        self._loop = loop
        self._on_loop_thread = on_loop_thread
        self._messages: deque[Outgoing] = deque()
        self._acks: list[_Ack] = []
        self._confirmed: _Confirmed = []
        self._awaiting: set[str] = set()  # the message_ids of confirmed publishes sent, unsettled
        self._posted: deque[Outgoing] = deque()  # from other threads, on the way in
        self._post_scheduled = False
        self._lock = threading.Lock()
        self._wakeup: asyncio.Event | None = None
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._messages) + len(self._posted)

    # ---- putting in ----------------------------------------------------------------------

    def post(self, item: Outgoing) -> None:
        """Queue a fire-and-forget publish (any thread)."""
        if self._on_loop_thread():
            self._take_posted()  # keep the order of what other threads posted before
            self._append(item)
            return
        # One wake-up of the loop for a burst of posts, not one each: waking the loop
        # writes to its self-pipe, a system call per message otherwise.
        with self._lock:
            self._posted.append(item)
            if self._post_scheduled:
                return
            self._post_scheduled = True
        self._loop.call_soon_threadsafe(self._take_posted)

    def send_now(self, item: Outgoing, channels: Channels | None) -> None:
        """Write ``item`` to the socket at once if nothing waits before it (loop thread): a
        reply, which its caller is waiting for, skips the wait for the next batch. Else, or
        while the outbox's channel is not open, it is posted."""
        channel = channels[0] if channels is not None else None
        if (channel is None or channel.is_closed or self._messages or self._posted
                or not internals.supported(channel)):
            self.post(item)
            return
        number, max_content = internals.frame_limits(channel)
        if not internals.write_now(channel, item.frames(number, max_content)):
            self.post(item)

    def publish_confirmed(self, item: Outgoing) -> asyncio.Future[None]:
        """Publish, mandatory, with the next batch on the confirm channel (loop thread); the
        future completes on the broker's confirm, or fails: ``BrokerConnectionError`` (not
        connected, the connection went, or returned: no queue took it) or
        ``aiormq.exceptions.DeliveryError`` (a nack)."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._confirmed.append((item, done))
        self._wake()
        return done

    def ack(self, channel: aiormq.abc.AbstractChannel, delivery_tag: int) -> None:
        """Acknowledge a delivery of ``channel`` with the next batch (loop thread)."""
        self._acks.append(_Ack(channel, delivery_tag))
        self._wake()

    def _take_posted(self) -> None:
        with self._lock:
            self._post_scheduled = False  # a post racing with us schedules again
            posted, self._posted = self._posted, deque()
        for item in posted:
            self._append(item)

    def _append(self, item: Outgoing) -> None:
        if len(self._messages) >= self.LIMIT:
            self._messages.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("outbox full: %d event(s) dropped so far", self.dropped)
        self._messages.append(item)
        self._wake()

    def post_wakeup(self) -> None:
        """Look again (the connection is back)."""
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ---- sending -------------------------------------------------------------------------

    async def run(self, channels: Callable[[], Channels | None], retry_delay: float) -> None:
        """Send batches for as long as the loop runs.

        ``channels()`` gives the channel for fire-and-forget publishes and the confirm channel
        (only the outbox publishes on either), or None while they are not open: messages
        wait, confirmed publishes fail (their callers retry), acks wait unless their own
        channel has closed. ``post_wakeup()`` when they are open again.
        """
        self._wakeup = asyncio.Event()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._messages or self._acks or self._sendable_confirmed():
                pair = channels()
                if pair is None or pair[0].is_closed or pair[1].is_closed:
                    # An ack of a closed channel is void (its delivery went back to the
                    # queue); the others wait for the outbox's channels to open again.
                    self._acks = [ack for ack in self._acks if not ack.channel.is_closed]
                    self._fail(self._confirmed)
                    self._confirmed = []
                    break
                batch = [self._messages.popleft()
                         for _ in range(min(len(self._messages), self.BATCH))]
                acks, self._acks = self._acks, []
                confirmed = self._take_confirmed()
                try:
                    if internals.supported(pair[0]) and internals.supported(pair[1]):
                        await self._write_batch(*pair, batch, acks, confirmed)
                    else:
                        await self._write_one_by_one(*pair, batch, acks, confirmed)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("outbox write failed (%r); %d message(s) kept", exc, len(batch))
                    self._messages.extendleft(reversed(batch))
                    self._fail(confirmed)
                    await asyncio.sleep(retry_delay)
                    self._wakeup.set()
                    break

    def _sendable_confirmed(self) -> bool:
        """Whether a confirmed publish can go now: one whose ``message_id`` awaits no confirm."""
        return any(item.message_id not in self._awaiting for item, _ in self._confirmed)

    def _take_confirmed(self) -> _Confirmed:
        """The confirmed publishes to send now; one whose ``message_id`` another awaits its
        confirm with stays for the batch after that confirm (which wakes the outbox)."""
        taken: _Confirmed = []
        kept: _Confirmed = []
        for item, done in self._confirmed:
            message_id = item.message_id
            if message_id in self._awaiting:
                kept.append((item, done))
            else:
                self._awaiting.add(message_id)
                done.add_done_callback(functools.partial(self._confirm_settled, message_id))
                taken.append((item, done))
        self._confirmed = kept
        return taken

    def _confirm_settled(self, message_id: str, _: asyncio.Future[None]) -> None:
        self._awaiting.discard(message_id)
        if self._confirmed:
            self._wake()

    async def wait_empty(self) -> None:
        """Return once everything posted so far is handed to the socket."""
        while len(self) or self._acks or self._confirmed:
            await asyncio.sleep(0.01)

    @staticmethod
    def _fail(confirmed: _Confirmed) -> None:
        for _, done in confirmed:
            if not done.done():
                done.set_exception(BrokerConnectionError("not connected"))

    async def _write_batch(self, channel: aiormq.abc.AbstractChannel,
                           confirm_channel: aiormq.abc.AbstractChannel, batch: list[Outgoing],
                           acks: list[_Ack], confirmed: _Confirmed) -> None:
        parts: list[bytes] = []
        for ack in acks:
            if not ack.channel.is_closed:
                parts.append(ack_frame(ack.channel.number, ack.delivery_tag))
        number, max_content = internals.frame_limits(channel)
        for item in batch:
            parts.append(item.frames(number, max_content))
        number, max_content = internals.frame_limits(confirm_channel)
        for item, done in confirmed:
            confirmation = internals.expect_confirm(confirm_channel, item.message_id)
            confirmation.add_done_callback(functools.partial(_settle, item, done))
            parts.append(item.frames(number, max_content, mandatory=True))
        if parts:
            await internals.write_frames(channel, b"".join(parts))

    async def _write_one_by_one(self, channel: aiormq.abc.AbstractChannel,
                                confirm_channel: aiormq.abc.AbstractChannel, batch: list[Outgoing],
                                acks: list[_Ack], confirmed: _Confirmed) -> None:
        """The public API's way, should an aiormq release lack what batching relies on."""
        for ack in acks:
            if not ack.channel.is_closed:
                await ack.channel.basic_ack(ack.delivery_tag)
        for item in batch:
            await internals.publish_public(channel, item.exchange, item.routing_key, item.body,
                                           item.properties)
        for item, done in confirmed:
            internals.publish_public(confirm_channel, item.exchange, item.routing_key, item.body,
                                     item.properties, mandatory=True,
                                     ).add_done_callback(functools.partial(_settle, item, done))


def _settle(item: Outgoing, done: asyncio.Future[None], confirmation: asyncio.Future[Any]) -> None:
    if done.done():
        return
    if confirmation.cancelled():
        done.set_exception(BrokerConnectionError("the channel closed before the broker confirmed"))
    elif isinstance(confirmation.exception(), aiormq.exceptions.PublishError):
        done.set_exception(BrokerConnectionError(
            f"the broker routed the publish to {item.routing_key!r} (exchange {item.exchange!r}) "
            f"to no queue: not stored. Right after a broker starts, its queues may not take "
            f"messages yet"))
    elif confirmation.exception() is not None:
        exc = confirmation.exception()
        done.set_exception(exc if isinstance(exc, aiormq.exceptions.DeliveryError)
                           else BrokerConnectionError(f"no confirm: {exc!r}"))
    else:
        done.set_result(None)
