"""Reading the records stream with aio-pika: :class:`~brokerexec.protocol.calls.RecordSearch`
driven on a connection's loop (by the worker's ownership and the asyncio client)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
import aio_pika.abc

from ..protocol.calls import Incoming, RecordSearch
from ..protocol.names import RESULTS_STREAM
from .amqp_connection import AmqpConnection

__all__ = ["find_record"]


async def find_record(connection: AmqpConnection, job_id: str,
                      timeout: float | None) -> dict[str, Any] | None:
    """Job ``job_id``'s final record, waiting up to ``timeout`` s (0: only what is stored
    now; None: until it comes). On a channel of its own, closed afterwards."""
    await connection.wait_connected(connection.settings.connect_timeout)
    search = RecordSearch(job_id, wait=timeout != 0)
    channel = await asyncio.wait_for(connection.open_channel(), 10)
    try:
        await channel.set_qos(prefetch_count=search.PREFETCH)
        queue = await channel.get_queue(RESULTS_STREAM, ensure=False)
        over: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def read(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if over.done():
                return  # not acknowledged: each ack would let the broker send more
            await message.ack()
            try:
                if search.feed(Incoming(message.body, message.content_type, message.message_id,
                                        message.type)):
                    over.set_result(None)
            except Exception as exc:  # an undecodable record: say so rather than wait
                over.set_exception(exc)

        await queue.consume(read, arguments={"x-stream-offset": search.offset})
        if search.probe is not None:
            probe = search.probe
            await channel.default_exchange.publish(aio_pika.Message(
                probe.body, content_type=probe.content_type, message_id=probe.message_id,
                type=probe.type), probe.routing_key)
        try:
            await asyncio.wait_for(asyncio.shield(over), timeout if timeout else None)
        except asyncio.TimeoutError:
            return None
        return search.record
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.close(), 5)
