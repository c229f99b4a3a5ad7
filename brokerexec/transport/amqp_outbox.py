"""The outbox: fire-and-forget publishes and acks, written to the socket in batches.

A worker sends several small messages for every job (state events, kiwipy ``state_changed``
broadcasts, the ack of its launch). Sent one by one through aio-pika, each costs a message
object, a confirm future, a pass through aiormq's write queue and a ``send()`` system call:
together the largest part of a trivial job's cost on the worker (``docs/performance.md``).
Here every publish and ack waiting at the moment is marshalled with pamqp and handed to
aiormq's writer as **one** frame batch: one queue pass and one ``send()`` for all of them.

The publishes go on a channel of their own, **without publisher confirms**: what this carries
is best-effort by design (events go to a topic exchange where nobody may listen; whatever must
not be lost, like a job's record, is published with a confirm by the connection instead).
A message still in the outbox when the connection drops is kept and sent on the next one;
one in the batch being written when it drops is sent again (so it may arrive twice), and
one already written but still in the kernel's buffers may be lost.

Acks are for deliveries of one channel (``aiormq.Channel``); an ack whose channel has closed
since is dropped (its delivery went back to the queue with the channel).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.exceptions
import pamqp.frame
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from ..errors import BrokerConnectionError

__all__ = ["Outbox", "Outgoing"]

log = logging.getLogger(__name__)


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

    def frames(self, channel_number: int, max_content: int) -> list[bytes]:
        """This publish as marshalled AMQP frames (method, header, body in pieces)."""
        frames = [pamqp.frame.marshal(spec.Basic.Publish(exchange=self.exchange,
                                                         routing_key=self.routing_key),
                                      channel_number),
                  pamqp.frame.marshal(ContentHeader(properties=self.properties,
                                                    body_size=len(self.body)), channel_number)]
        for start in range(0, len(self.body), max_content):
            frames.append(pamqp.frame.marshal(ContentBody(self.body[start:start + max_content]),
                                              channel_number))
        return frames


@dataclass
class _Ack:
    channel: aiormq.abc.AbstractChannel
    delivery_tag: int


class Outbox:
    """See the module docstring. Owned by one ``AmqpConnection``; runs on its loop."""

    LIMIT = 10_000  # messages kept while disconnected; the oldest go first beyond that
    BATCH = 500  # messages per write

    def __init__(self, loop: asyncio.AbstractEventLoop, on_loop_thread: Callable[[], bool]) -> None:
        self._loop = loop
        self._on_loop_thread = on_loop_thread
        self._messages: deque[Outgoing] = deque()
        self._acks: list[_Ack] = []
        self._confirmed: list[tuple[Outgoing, asyncio.Future[None]]] = []
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

    def publish_confirmed(self, item: Outgoing) -> asyncio.Future[None]:
        """Publish with the next batch on the confirm channel (loop thread); the future
        completes on the broker's confirm, or fails (``BrokerConnectionError``, or
        ``aiormq.exceptions.DeliveryError`` on a nack)."""
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

    async def run(self, channels: Callable[[], tuple[aiormq.abc.AbstractChannel,
                                                     aiormq.abc.AbstractChannel] | None],
                  retry_delay: float) -> None:
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
            while self._messages or self._acks or self._confirmed:
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
                confirmed, self._confirmed = self._confirmed, []
                try:
                    await self._write(*pair, batch, acks, confirmed)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("outbox write failed (%r); %d message(s) kept", exc, len(batch))
                    self._messages.extendleft(reversed(batch))
                    self._fail(confirmed)
                    await asyncio.sleep(retry_delay)
                    self._wakeup.set()
                    break

    async def wait_empty(self) -> None:
        """Return once everything posted so far is handed to the socket."""
        while len(self) or self._acks or self._confirmed:
            await asyncio.sleep(0.01)

    @staticmethod
    def _fail(confirmed: list[tuple[Outgoing, asyncio.Future[None]]]) -> None:
        for _, done in confirmed:
            if not done.done():
                done.set_exception(BrokerConnectionError("not connected"))

    async def _write(self, channel: aiormq.abc.AbstractChannel,
                     confirm_channel: aiormq.abc.AbstractChannel, batch: list[Outgoing],
                     acks: list[_Ack], confirmed: list[tuple[Outgoing, asyncio.Future[None]]]) -> None:
        parts: list[bytes] = []
        for ack in acks:
            if not ack.channel.is_closed:
                parts.append(pamqp.frame.marshal(spec.Basic.Ack(delivery_tag=ack.delivery_tag),
                                                 ack.channel.number))
        number, max_content = channel.number, channel.max_content_size  # type: ignore[attr-defined]
        for item in batch:
            parts.extend(item.frames(number, max_content))
        if confirmed and not _numbers_its_confirms(confirm_channel):
            self._publish_one_by_one(confirm_channel, confirmed)
        elif confirmed:
            parts.extend(self._confirmed_frames(confirm_channel, confirmed))
        if not parts:
            return
        # aiormq's writer sends each queued ChannelFrame with one write; its queue is
        # bounded, so ``put`` waits while the socket is slow (backpressure from the broker).
        drained = self._loop.create_future()
        await channel.write_queue.put(  # type: ignore[attr-defined]
            ChannelFrame(payload=b"".join(parts), should_close=False, drain_future=drained))
        # Written once the writer drained the socket; a connection that dies first never
        # says so, hence the wait on the channel's end too.
        await asyncio.wait({drained, channel.closing}, timeout=30,
                           return_when=asyncio.FIRST_COMPLETED)
        if not drained.done():
            drained.cancel()
            raise ConnectionError("the connection ended before the batch was written")

    def _publish_one_by_one(self, channel: Any,
                            confirmed: list[tuple[Outgoing, asyncio.Future[None]]]) -> None:
        """The slow, public way, should an aiormq release change what batching relies on."""
        for item, done in confirmed:
            publish = asyncio.ensure_future(channel.basic_publish(
                item.body, exchange=item.exchange, routing_key=item.routing_key,
                properties=item.properties))
            publish.add_done_callback(lambda f, done=done: _settle(done, f))

    @staticmethod
    def _confirmed_frames(channel: Any, confirmed: list[tuple[Outgoing, asyncio.Future[None]]]
                          ) -> list[bytes]:
        """Frames of publishes whose confirms aiormq's reader will resolve.

        What ``aiormq.Channel.basic_publish`` does per message, for a whole batch: number
        the publish (the broker confirms by that number, in publish order) and register a
        future under it, which aiormq resolves on the broker's ack (also ``multiple`` ones),
        fails on a nack and rejects when the channel closes. Only the outbox publishes on
        this channel, so the numbers and the order of the frames agree.
        """
        parts: list[bytes] = []
        number, max_content = channel.number, channel.max_content_size
        for item, done in confirmed:
            channel.delivery_tag += 1
            confirmation = channel.create_future()
            channel.confirmations[channel.delivery_tag] = confirmation
            confirmation.add_done_callback(lambda f, done=done: _settle(done, f))
            parts.extend(item.frames(number, max_content))
        return parts


def _numbers_its_confirms(channel: Any) -> bool:
    """True if ``channel`` has the aiormq internals ``_confirmed_frames`` relies on."""
    return all(hasattr(channel, name) for name in ("delivery_tag", "confirmations", "create_future"))


def _settle(done: asyncio.Future[None], confirmation: asyncio.Future[Any]) -> None:
    if done.done():
        return
    if confirmation.cancelled():
        done.set_exception(BrokerConnectionError("the channel closed before the broker confirmed"))
    elif confirmation.exception() is not None:
        exc = confirmation.exception()
        done.set_exception(exc if isinstance(exc, aiormq.exceptions.DeliveryError)
                           else BrokerConnectionError(f"no confirm: {exc!r}"))
    else:
        done.set_result(None)
