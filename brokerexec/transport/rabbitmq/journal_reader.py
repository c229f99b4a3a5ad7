"""Reading the journal, browsing launch queues and checking that a queue exists, with
aio-pika: the byte-moving half of :class:`~brokerexec.protocol.commands.ReadJournal`,
:class:`~brokerexec.protocol.commands.Browse` and :class:`~brokerexec.protocol.commands.
QueueExists`, driven on a connection's loop (by the worker's ownership and the asyncio
client). Each on a channel of its own, closed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from ...errors import AccessRefused
from ...protocol.commands import Incoming, JournalReader
from ...protocol.journal import STREAM_OFFSET_HEADER, probe_message
from .connection import AmqpConnection

__all__ = ["browse", "queue_exists", "read_journal"]

Consumer = Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]
#: How long a browse waits for the messages a queue said it holds.
BROWSE_SECONDS = 1.0
#: A journal reader acknowledges every this many deliveries (less than its prefetch), at once.
ACK_EVERY = 50


def _incoming(message: aio_pika.abc.AbstractIncomingMessage) -> Incoming:
    headers = message.headers or {}
    offset = headers.get(STREAM_OFFSET_HEADER)
    return Incoming(message.body, message.content_type, message.message_id, message.type,
                    message.reply_to, message.exchange, offset if isinstance(offset, int) else None,
                    headers)


class _Feeder:
    """Feeds a reader the deliveries of its streams until ``over`` is done."""

    def __init__(self, reader: JournalReader, over: asyncio.Future[None]) -> None:
        self.reader, self.over, self.read = reader, over, 0

    def of(self, stream: str) -> Consumer:
        async def read(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if self.over.done():
                return
            self.read += 1
            if self.read % ACK_EVERY == 0:  # credit back for many at once
                await message.ack(multiple=True)
            try:
                if self.reader.feed(stream, _incoming(message)) and not self.over.done():
                    self.over.set_result(None)
            except Exception as exc:  # an undecodable entry: say so rather than wait
                if not self.over.done():
                    self.over.set_exception(exc)
        return read


async def read_journal(connection: AmqpConnection, reader: JournalReader,
                       seconds: float | None) -> JournalReader:
    """Feed ``reader`` from its streams until it is done or ``seconds`` pass.

    Once it is done nothing more is acknowledged: each ack would let the broker send more.
    The journal's streams are declared together, by every worker: if one is missing, no
    worker has ever run and all of them are.
    """
    await connection.wait_connected(connection.settings.connect_timeout)
    channel = await asyncio.wait_for(connection.open_channel(), 10)
    over: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        await channel.set_qos(prefetch_count=reader.PREFETCH)

        feeder = _Feeder(reader, over)

        def closed(_channel: object, exc: BaseException | None = None) -> None:
            # The broker refused the probe (no write on the probes exchange): say so at
            # once rather than wait out the read's time-out.
            if isinstance(exc, aiormq.exceptions.ChannelAccessRefused) and not over.done():
                over.set_exception(AccessRefused(f"the broker refused reading the journal: {exc}"))

        channel.close_callbacks.add(closed)
        try:
            for stream in reader.streams:
                queue = await channel.get_queue(stream, ensure=False)
                await queue.consume(feeder.of(stream), arguments={"x-stream-offset": reader.offset})
        except aiormq.exceptions.ChannelNotFoundEntity:
            for stream in reader.streams:
                reader.missing(stream)
            return reader
        for stream, probe_id in reader.probes.items():
            probe = probe_message(stream, probe_id)
            exchange = await channel.get_exchange(probe.exchange, ensure=False)
            await exchange.publish(aio_pika.Message(
                probe.body, content_type=probe.content_type, message_id=probe.message_id,
                type=probe.type), probe.routing_key)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(over), seconds)
        if over.done() and over.exception() is not None:
            raise over.exception()  # type: ignore[misc]
        return reader
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), 5)


async def queue_exists(connection: AmqpConnection, name: str) -> bool:
    """True if queue ``name`` exists (a passive declare, on a channel it may close)."""
    await connection.wait_connected(connection.settings.connect_timeout)
    channel = await connection.open_channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        with contextlib.suppress(Exception):
            if not channel.is_closed:
                await channel.close()
    return True


async def browse(connection: AmqpConnection, queues: Sequence[str],
                 limit: int) -> dict[str, list[Incoming]]:
    """The messages waiting in ``queues`` (at most ``limit`` each), taken unacknowledged on a
    channel of their own and given back when it closes."""
    found: dict[str, list[Incoming]] = {name: [] for name in queues}
    expected: dict[str, int] = {}
    for name in queues:
        channel = await connection.open_channel()
        try:
            declared = await channel.declare_queue(name, passive=True)
            expected[name] = min(declared.declaration_result.message_count or 0, limit)
        except aiormq.exceptions.ChannelNotFoundEntity:
            continue
        finally:
            with contextlib.suppress(Exception):
                if not channel.is_closed:
                    await channel.close()
    channel = await connection.open_channel()
    complete = asyncio.Event()

    def taking(name: str) -> Consumer:
        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            found[name].append(_incoming(message))
            if all(len(found[n]) >= count for n, count in expected.items()):
                complete.set()
        return take

    try:
        await channel.set_qos(prefetch_count=max(limit, 1))
        for name, count in expected.items():
            if count:
                await (await channel.get_queue(name, ensure=False)).consume(taking(name))
        if all(count == 0 for count in expected.values()):
            complete.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(complete.wait(), BROWSE_SECONDS)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), 5)  # what it took goes back to its queue
    return found
