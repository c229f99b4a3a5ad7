"""Declaring brokerexec's objects with aio-pika, from :mod:`brokerexec.protocol.topology`.

Idempotent, and run again after every reconnect (a setup of the connection): kiwipy's
exchange is transient and loses its bindings with a broker restart.
"""

from __future__ import annotations

import logging

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from ..protocol import topology
from ..protocol.names import LAUNCH_QUEUE

__all__ = ["declare_all"]

log = logging.getLogger(__name__)


async def declare_all(channel: aio_pika.abc.AbstractChannel) -> None:
    """Declare every shared exchange, queue and binding (idempotent)."""
    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
    for spec in topology.EXCHANGES:
        exchanges[spec.name] = await channel.declare_exchange(
            spec.name, aio_pika.ExchangeType(spec.kind), durable=spec.durable, auto_delete=False,
            arguments=dict(spec.arguments) or None)
    await _declare_launch_queue(channel)
    for queue_spec in topology.QUEUES:
        queue = await channel.declare_queue(queue_spec.name, durable=True,
                                            arguments=dict(queue_spec.arguments) or None)
        for exchange in queue_spec.bound_to:
            await queue.bind(exchanges[exchange], "")
    for binding in topology.EXCHANGE_BINDINGS:
        await exchanges[binding.destination].bind(exchanges[binding.source], binding.routing_key,
                                                  arguments=dict(binding.arguments) or None)


async def _declare_launch_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    # On a channel of its own: a queue declared with other arguments before closes the
    # channel that tries (PRECONDITION_FAILED), and this one must live on.
    trial = await (await channel.get_underlay_channel()).connection.channel(publisher_confirms=False)
    try:
        await trial.queue_declare(LAUNCH_QUEUE, durable=True, arguments=dict(topology.LAUNCH.arguments))
    except aiormq.exceptions.ChannelPreconditionFailed:
        await channel.declare_queue(LAUNCH_QUEUE, durable=True,
                                    arguments=dict(topology.OLD_LAUNCH_QUEUE_ARGUMENTS))
        log.warning(topology.OLD_LAUNCH_QUEUE_WARNING, LAUNCH_QUEUE, LAUNCH_QUEUE)
    finally:
        if not trial.is_closed:
            await trial.close()
