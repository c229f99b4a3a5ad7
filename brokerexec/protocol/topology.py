"""Every RabbitMQ object brokerexec declares, with its exact arguments, as data.

Workers, clients and the one-shot CLI all declare from here, whatever library moves the
bytes (``transport/amqp_declare.py`` for aio-pika, ``transport/pika_client.py`` for pika):
RabbitMQ closes the channel of anyone who declares an existing object with other arguments
(``PRECONDITION_FAILED``), so the arguments must never drift between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from .names import (
    BROADCAST_TOPIC,
    CONTROL_EXCHANGE,
    CONTROL_STREAM,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DISCARD_EXCHANGE,
    EVENTS_EXCHANGE,
    KIWIPY_EXCHANGE,
    KIWIPY_FILTER_EXCHANGE,
    KIWIPY_MESSAGE_TTL_MS,
    KIWIPY_OTHERS_EXCHANGE,
    LAUNCH_QUEUE,
    RESULTS_STREAM,
    STATE_CHANGED_HEADER,
    WORKERS_EXCHANGE,
)

__all__ = [
    "BROADCAST_QUEUE_ARGUMENTS",
    "CONTROL",
    "EXCHANGES",
    "EXCHANGE_BINDINGS",
    "LAUNCH",
    "OLD_LAUNCH_QUEUE_ARGUMENTS",
    "OLD_LAUNCH_QUEUE_WARNING",
    "QUEUES",
    "RESULTS",
    "RPC_QUEUE_ARGUMENTS",
    "ExchangeBinding",
    "ExchangeSpec",
    "QueueSpec",
]

_Arguments = MappingProxyType[str, Any]


def _frozen(**arguments: Any) -> _Arguments:
    return MappingProxyType(arguments)


@dataclass(frozen=True)
class ExchangeSpec:
    """An exchange: name, type, durability, arguments (auto-delete is always false)."""

    name: str
    kind: str
    durable: bool = True
    arguments: _Arguments = field(default_factory=_frozen)


@dataclass(frozen=True)
class QueueSpec:
    """A durable queue, bound to ``bound_to`` (exchange names, routing key ``""``)."""

    name: str
    arguments: _Arguments = field(default_factory=_frozen)
    bound_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExchangeBinding:
    """``destination`` bound to ``source`` (an exchange-to-exchange binding)."""

    destination: str
    source: str
    routing_key: str = ""
    arguments: _Arguments = field(default_factory=_frozen)


#: kiwipy's exchange is topic, not durable, not auto-deleted, exactly as kiwipy 0.9 declares it.
KIWIPY: Final = ExchangeSpec(KIWIPY_EXCHANGE, "topic", durable=False)
EXCHANGES: Final = (
    KIWIPY,
    ExchangeSpec(EVENTS_EXCHANGE, "topic"),
    ExchangeSpec(CONTROL_EXCHANGE, "fanout"),
    ExchangeSpec(WORKERS_EXCHANGE, "fanout"),
    ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout"),
    ExchangeSpec(KIWIPY_OTHERS_EXCHANGE, "fanout"),
    ExchangeSpec(DISCARD_EXCHANGE, "fanout"),
    # The workers' view of kiwipy broadcasts, without the jobs' own state_changed ones
    # (names.KIWIPY_FILTER_EXCHANGE says how).
    ExchangeSpec(KIWIPY_FILTER_EXCHANGE, "headers",
                 arguments=_frozen(**{"alternate-exchange": KIWIPY_OTHERS_EXCHANGE})),
)

#: A version-2 classic queue confirms a persistent launch in about half the time of a
#: version-1 one (0.6 against 1.2 ms here, RabbitMQ 3.10), and costs the broker less CPU.
LAUNCH: Final = QueueSpec(LAUNCH_QUEUE, _frozen(**{"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                                                   "x-queue-version": 2}))
#: What a launch queue made before version 2 was asked for has; still accepted as it is.
OLD_LAUNCH_QUEUE_ARGUMENTS: Final = _frozen(**{"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE})
OLD_LAUNCH_QUEUE_WARNING: Final = (
    "the queue %s is a version-1 classic queue, made by an older brokerexec: it works, but "
    "launches take about twice as long to confirm. To upgrade it, stop the workers once it is "
    "empty and delete it (rabbitmqctl delete_queue %s); the next worker declares it anew.")
DEAD_LETTERS: Final = QueueSpec(DEAD_LETTER_QUEUE, bound_to=(DEAD_LETTER_EXCHANGE,))
#: Retention applies per segment: small segments let old records go close to their age.
RESULTS: Final = QueueSpec(RESULTS_STREAM, _frozen(**{
    "x-queue-type": "stream", "x-max-age": "24h", "x-stream-max-segment-size-bytes": 8_000_000}))
CONTROL: Final = QueueSpec(CONTROL_STREAM, _frozen(**{"x-queue-type": "stream", "x-max-age": "1h"}),
                           bound_to=(CONTROL_EXCHANGE,))
#: The launch queue apart: a queue made by an older version must not close the channel
#: that declares the others (``transport/amqp_declare.py``).
QUEUES: Final = (DEAD_LETTERS, CONTROL, RESULTS)

EXCHANGE_BINDINGS: Final = (
    # kiwipy's transient exchange loses this binding with a broker restart: declared again
    # after every reconnect, like everything here.
    ExchangeBinding(KIWIPY_FILTER_EXCHANGE, KIWIPY_EXCHANGE, BROADCAST_TOPIC),
    ExchangeBinding(DISCARD_EXCHANGE, KIWIPY_FILTER_EXCHANGE, arguments=_frozen(**{
        "x-match": "all", STATE_CHANGED_HEADER[0]: STATE_CHANGED_HEADER[1]})),
)

#: The per-job RPC queue (exclusive, auto-delete) and a worker's broadcast queue (exclusive)
#: take kiwipy's message time-to-live.
RPC_QUEUE_ARGUMENTS: Final = _frozen(**{"x-message-ttl": KIWIPY_MESSAGE_TTL_MS})
BROADCAST_QUEUE_ARGUMENTS: Final = _frozen(**{"x-message-ttl": KIWIPY_MESSAGE_TTL_MS})
