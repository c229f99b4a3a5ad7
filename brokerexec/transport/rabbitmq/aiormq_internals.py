"""The one place that uses aiormq's internals, for speed; everything else uses its public API.

The outbox (``outbox.py``) hands aiormq's connection writer one batch of marshalled
frames per loop pass, instead of one ``basic_publish`` (a message object, a future, a pass
through the write queue and a ``send()``) per message: together the largest part of a
trivial job's cost on the worker (``docs/performance.md``). For that it needs four things
aiormq does not promise:

* ``channel.write_queue`` and :class:`aiormq.abc.ChannelFrame` (the writer's queue);
* ``channel.delivery_tag``, ``channel.confirmations``, ``channel.create_future`` and
  ``channel.message_id_delivery_tag`` (how a channel in confirm mode numbers its publishes,
  resolves their confirms, and finds the publish a ``basic.return`` is about);
* ``channel.number`` and ``channel.max_content_size`` (to marshal frames for it).

:func:`supported` says whether a channel has them; when it does not (a new aiormq release),
the outbox falls back to :func:`publish_public` and ``basic_ack``, slower and correct.
``tests/test_outbox.py`` fails loudly if the pinned aiormq no longer has them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import aiormq.abc
from pamqp import commands as spec

__all__ = ["expect_confirm", "frame_limits", "publish_public", "supported", "write_frames",
           "write_now"]

_NEEDED = ("write_queue", "delivery_tag", "confirmations", "create_future", "number",
           "max_content_size", "message_id_delivery_tag")


def supported(channel: Any) -> bool:
    """True if ``channel`` has every internal this module relies on."""
    return all(hasattr(channel, name) for name in _NEEDED) and hasattr(aiormq.abc, "ChannelFrame")


def frame_limits(channel: Any) -> tuple[int, int]:
    """The channel's number and the largest body frame it may carry."""
    return int(channel.number), int(channel.max_content_size)


async def write_frames(channel: Any, payload: bytes, timeout: float = 30) -> None:
    """Hand ``payload`` (marshalled frames) to the connection's writer as one write.

    aiormq's writer sends each queued frame batch with one write; its queue is bounded, so
    ``put`` waits while the socket is slow (backpressure from the broker).

    Raises:
        ConnectionError: the connection ended before the batch was written.
    """
    drained: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await channel.write_queue.put(aiormq.abc.ChannelFrame(
        payload=payload, should_close=False, drain_future=drained))
    # Written once the writer drained the socket; a connection that dies first never says
    # so, hence the wait on the channel's end too.
    await asyncio.wait({drained, channel.closing}, timeout=timeout,
                       return_when=asyncio.FIRST_COMPLETED)
    if not drained.done():
        drained.cancel()
        raise ConnectionError("the connection ended before the batch was written")


def write_now(channel: Any, payload: bytes) -> bool:
    """Hand ``payload`` to the writer without waiting for the socket (fire and forget);
    False if the writer's queue is full (the caller then waits its turn instead)."""
    try:
        channel.write_queue.put_nowait(aiormq.abc.ChannelFrame(payload=payload, should_close=False))
    except asyncio.QueueFull:
        return False
    return True


def expect_confirm(channel: Any, message_id: str) -> asyncio.Future[Any]:
    """Number the next publish on ``channel`` and return the future of its confirm.

    What ``aiormq.Channel.basic_publish`` does per message: the broker confirms publishes by
    that number, in publish order; aiormq's reader resolves the future on the ack (also a
    ``multiple`` one), fails it on a nack or a return (``PublishError``: a mandatory publish
    routed to no queue, found by its ``message_id``) and rejects it when the channel closes.
    The caller must write that publish next, be the only one publishing on the channel, and
    have no other publish with that ``message_id`` awaiting its confirm there.
    """
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    confirmation: asyncio.Future[Any] = channel.create_future()
    channel.confirmations[tag] = confirmation
    channel.message_id_delivery_tag[message_id] = tag

    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:  # not a later publish's
            del channel.message_id_delivery_tag[message_id]

    confirmation.add_done_callback(forget)
    return confirmation


def publish_public(channel: aiormq.abc.AbstractChannel, exchange: str, routing_key: str,
                   body: bytes, properties: spec.Basic.Properties, *,
                   mandatory: bool = False) -> asyncio.Future[Any]:
    """The slow, public way to publish (one ``basic_publish``): the fallback."""
    return asyncio.ensure_future(channel.basic_publish(
        body, exchange=exchange, routing_key=routing_key, properties=properties,
        mandatory=mandatory))
