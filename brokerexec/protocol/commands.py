"""The commands a client call yields to its transport, and the loops that answer them.

A *call* (:mod:`.calls`, :mod:`.lookups`) is a generator. It yields commands — publish these
messages, send a request and wait for what comes back, read the journal — and is sent back
what happened. The blocking adapter (``transport/pika/caller.py``) and the asyncio adapter
(``transport/rabbitmq/client.py``) answer the same commands and differ only in how bytes move.

The commands are named tuples: cheap to define, and imported by every one-shot CLI verb.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from .names import JSON_CONTENT_TYPE

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["Browse", "Call", "Command", "Gather", "Incoming", "JournalReader", "Message",
           "NextReply", "Publish", "QueueExists", "ReadJournal", "Request", "Routed", "drive",
           "drive_async"]

T = TypeVar("T")


class Message(NamedTuple):
    """An outgoing AMQP message, with the properties brokerexec uses."""

    exchange: str
    routing_key: str
    body: bytes
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: Mapping[str, Any] | None = None
    persistent: bool = False
    message_id: str | None = None
    type: str | None = None
    content_type: str = JSON_CONTENT_TYPE
    #: Milliseconds the broker keeps it waiting in a queue before dropping it (AMQP
    #: ``expiration``): the broker's own clock, which every host agrees on.
    expiration_ms: int | None = None


class Incoming(NamedTuple):
    """A delivered message as a call sees it: body and the properties it reads."""

    body: bytes
    content_type: str | None = None
    message_id: str | None = None
    type: str | None = None
    reply_to: str | None = None
    #: The exchange it was published to, as the broker reports it on delivery (a stream
    #: keeps it): what a journal reader trusts, unlike any header the sender chose.
    exchange: str | None = None
    #: Its offset in the stream it was read from (the broker's ``x-stream-offset``).
    offset: int | None = None
    #: Its headers (a journal reader's: an entry found by them, its body left undecoded).
    headers: Mapping[str, Any] | None = None


class Routed(enum.Enum):
    """What the broker did with a published message."""

    DELIVERED = "delivered"  # confirmed, routed to at least one queue
    RETURNED = "returned"  # mandatory, and routed nowhere (basic.return)
    NO_EXCHANGE = "no exchange"  # the exchange does not exist (NOT_FOUND)


class Publish(NamedTuple):
    """Publish ``messages`` (confirmed, in flight together); answered with a ``Routed`` each."""

    messages: Sequence[Message]
    mandatory: bool = False


class Request(NamedTuple):
    """Publish ``message`` (mandatory) and wait up to ``seconds`` for what comes back first.

    Answered with the first reply (:class:`Incoming`), ``Routed.RETURNED`` (no queue took
    it), ``Routed.NO_EXCHANGE``, or None (nothing within ``seconds``). The reply, or the
    return, is the broker's answer: a request needs no publisher confirm, which saves a
    round trip on the way to the reply.
    """

    message: Message
    seconds: float | None


class NextReply(NamedTuple):
    """Wait up to ``seconds`` (None: forever) for the next reply with ``correlation_id``;
    answered with the :class:`Incoming` reply, or None on time-out."""

    correlation_id: str
    seconds: float | None


class Gather(NamedTuple):
    """Collect every reply with ``correlation_id`` for ``seconds``; answered with a list."""

    correlation_id: str
    seconds: float


class QueueExists(NamedTuple):
    """Does queue ``name`` exist? (a passive declare); answered True or False."""

    name: str


class JournalReader(Protocol):
    """What :class:`ReadJournal` drives: a reader of some journal streams."""

    PREFETCH: int
    streams: tuple[str, ...]
    #: ``{stream: message id}`` of the probe to publish to each stream once consuming.
    probes: dict[str, str]
    done: bool

    @property
    def offset(self) -> datetime | str | int:
        """Where to start reading each stream: a time, ``"first"``, ``"last"`` (the start of
        its last chunk) or an offset."""

    def feed(self, stream: str, message: Incoming) -> bool:
        """Take in one message of ``stream``; True once the reading is over."""

    def missing(self, stream: str) -> bool:
        """``stream`` does not exist: nothing was ever written there; True if over."""


class ReadJournal(NamedTuple):
    """Feed ``reader`` (:mod:`.journal`) the journal streams it names until it is done, or
    for ``seconds`` (None: no limit); answered with the reader.

    The adapter consumes each of ``reader.streams`` from ``reader.offset`` with a prefetch
    of ``reader.PREFETCH`` (RabbitMQ requires one for streams), acknowledging each message
    while the reader is not done, and publishes each probe of ``reader.probes`` to its stream
    once it consumes. A stream that does not exist holds nothing: ``reader.missing(stream)``.
    """

    reader: JournalReader
    seconds: float | None


class Browse(NamedTuple):
    """The messages waiting in ``queues`` (at most ``limit`` of each), left where they are;
    answered with ``{queue: [Incoming, ...]}`` (a missing queue has none).

    Taken unacknowledged and given back: each comes back marked redelivered, which costs its
    worker a claim before it starts (``transport/rabbitmq/worker/ownership.py``).
    """

    queues: Sequence[str]
    limit: int


Command = Publish | Request | NextReply | Gather | QueueExists | ReadJournal | Browse
#: A call: yields commands, is sent their outcomes, returns the answer.
Call = Generator[Command, Any, T]


def drive(call: Call[T], act: Callable[[Command], Any]) -> T:
    """Run ``call`` to its end, answering each command with ``act(command)`` (blocking I/O)."""
    try:
        command = next(call)
        while True:
            command = call.send(act(command))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def drive_async(call: Call[T], act: Callable[[Command], Awaitable[Any]]) -> T:
    """Run ``call`` to its end, answering each command with ``await act(command)``."""
    try:
        command = next(call)
        while True:
            command = call.send(await act(command))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
