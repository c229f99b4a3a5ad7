"""Declaring brokerexec's objects with aio-pika, from :mod:`brokerexec.protocol.topology`.

Idempotent, and run again after every reconnect (a setup of the connection): kiwipy's
exchange is transient and loses its bindings with a broker restart.

Workers declare everything, including the launch queues of the services they offer: a
launch queue exists once some worker has offered its service, which is how a client tells
an unknown service from one whose workers are merely busy or down. Clients declare only the
exchanges and the control stream (:func:`declare_for_clients`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import aio_pika
import aio_pika.abc
import aiormq.abc
import aiormq.exceptions

from ...errors import ConfigurationError
from ...protocol import topology

__all__ = ["declare_all", "declare_for_clients"]

log = logging.getLogger(__name__)


async def _exchanges(channel: aio_pika.abc.AbstractChannel) -> dict[str, aio_pika.abc.AbstractExchange]:
    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
    for spec in topology.EXCHANGES:
        exchanges[spec.name] = await channel.declare_exchange(
            spec.name, aio_pika.ExchangeType(spec.kind), durable=spec.durable, auto_delete=False,
            arguments=dict(spec.arguments) or None)
    for binding in topology.EXCHANGE_BINDINGS:
        await exchanges[binding.destination].bind(exchanges[binding.source], binding.routing_key,
                                                  arguments=dict(binding.arguments) or None)
    return exchanges


async def _queue(channel: aio_pika.abc.AbstractChannel, spec: topology.QueueSpec) -> None:
    queue = await channel.declare_queue(spec.name, durable=True, arguments=dict(spec.arguments) or None)
    for exchange in spec.bound_to:
        await queue.bind(exchange, spec.routing_key)


async def _journal(channel: aio_pika.abc.AbstractChannel, max_age: float) -> None:
    # On aiormq's channel: 512 declares and binds at every (re)connection, without aio-pika's
    # objects for each (about 0.2 s for all when they exist; creating them takes the broker
    # about 2 s, once). aiormq's ``nowait`` would save the round trips, but hangs in 6.8.
    underlay = await channel.get_underlay_channel()
    specs = topology.journal_specs(max_age)
    as_made = not await _journal_takes(underlay, specs[0])  # then only looked at, as it is
    for spec in specs:
        await underlay.queue_declare(spec.name, durable=True, passive=as_made,
                                     arguments=None if as_made else dict(spec.arguments))
        for exchange in spec.bound_to:
            await underlay.queue_bind(spec.name, exchange, spec.routing_key)


async def _journal_takes(underlay: aiormq.abc.AbstractChannel, spec: topology.QueueSpec) -> bool:
    """Declare the first journal stream as ``spec`` on a channel of its own: False if it
    exists with another retention (``PRECONDITION_FAILED`` closes that channel only). A
    stream keeps the retention it was made with: the journal is then used as it is."""
    trial = await underlay.connection.channel()
    try:
        await trial.queue_declare(spec.name, durable=True, arguments=dict(spec.arguments))
        return True
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        log.warning("the journal keeps its entries as long as when its streams were made, not "
                    "--journal-max-age %s: a stream's retention cannot change once made. To "
                    "change it, set a RabbitMQ policy on ^brokerexec\\.jobs\\. (docs/durability.md). "
                    "The broker said: %s", spec.arguments.get("x-max-age"), exc)
        return False
    finally:
        with contextlib.suppress(Exception):
            if not trial.is_closed:
                await trial.close()


async def declare_all(channel: aio_pika.abc.AbstractChannel, services: Sequence[str] = (),
                      queue_type: topology.QueueType = "classic",
                      journal_max_age: float = topology.JOURNAL_MAX_AGE) -> None:
    """Declare every shared exchange, queue and binding, and the launch queues of
    ``services``; the dead-letter and launch queues as ``queue_type`` queues (idempotent).

    Raises ``ConfigurationError`` if one of those exists with another type or arguments:
    RabbitMQ cannot change a queue's type (``PRECONDITION_FAILED``, and the channel closes).
    """
    await _exchanges(channel)
    dead_letters, control = topology.shared_queue_specs(queue_type)
    await _typed(channel, dead_letters, queue_type, "the dead-letter queue")
    await _queue(channel, control)
    await _journal(channel, journal_max_age)
    for service in services:
        await _typed(channel, topology.launch_queue_spec(service, queue_type), queue_type,
                     f"the launch queue of service {service!r}")


async def _typed(channel: aio_pika.abc.AbstractChannel, spec: topology.QueueSpec,
                 queue_type: topology.QueueType, what: str) -> None:
    try:
        await _queue(channel, spec)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigurationError(
            f"{what} ({spec.name}) exists with other arguments than a {queue_type} queue's, "
            f"and RabbitMQ cannot change a queue's type: run every worker of the vhost with "
            f"the same queue type, or delete the queue once it is empty (docs/clusters.md). "
            f"The broker said: {exc}") from exc


async def declare_for_clients(channel: aio_pika.abc.AbstractChannel) -> None:
    """What a client needs before any worker has run: the exchanges, and the control stream
    (so a pause sent now is kept for the first worker)."""
    await _exchanges(channel)
    await _queue(channel, topology.CONTROL)
