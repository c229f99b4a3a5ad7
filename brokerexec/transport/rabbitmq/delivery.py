"""A launch as aiormq delivers it, with what the worker reads of it and how it answers it.

The launch queues are consumed through aiormq's own ``basic_consume``: aio-pika's consumer
builds an ``IncomingMessage`` (every property copied into a new object) and starts a second
task for each message, together about 0.1 ms of a trivial job's time on the worker.
:class:`Delivery` reads only what the worker needs, straight from aiormq's frames.
"""

from __future__ import annotations

from typing import Any

import aiormq.abc

__all__ = ["Delivery"]


class Delivery:
    """One delivery of a consumer that acknowledges (see the module docstring)."""

    __slots__ = ("_properties", "body", "channel", "delivery_tag", "redelivered", "routing_key")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        deliver: Any = message.delivery
        self._properties = message.header.properties
        self.channel: aiormq.abc.AbstractChannel = message.channel
        self.delivery_tag: int = deliver.delivery_tag
        self.redelivered: bool = bool(deliver.redelivered)
        self.routing_key: str = deliver.routing_key or ""
        self.body: bytes = message.body

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def type(self) -> str | None:
        return self._properties.message_type

    @property
    def reply_to(self) -> str | None:
        return self._properties.reply_to

    async def ack(self) -> None:
        await self.channel.basic_ack(self.delivery_tag)

    async def nack(self, requeue: bool = True) -> None:
        await self.channel.basic_nack(self.delivery_tag, requeue=requeue)

    async def reject(self, requeue: bool = False) -> None:
        await self.channel.basic_reject(self.delivery_tag, requeue=requeue)

    def __repr__(self) -> str:
        return f"<Delivery {self.delivery_tag} of {self.routing_key!r}: {self.message_id}>"
