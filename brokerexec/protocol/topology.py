"""Every RabbitMQ object brokerexec declares, with its exact arguments, as data.

Workers, clients and the one-shot CLI all declare from here, whatever library moves the
bytes (``transport/rabbitmq/declare.py`` for aio-pika, ``transport/pika/client.py`` for pika):
RabbitMQ closes the channel of anyone who declares an existing object with other arguments
(``PRECONDITION_FAILED``), so the arguments must never drift between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, get_args

from ..constants import JOURNAL_MAX_AGE
from ..errors import ConfigurationError
from ..settings.model import QueueType
from .names import (
    BROADCAST_TOPIC,
    CONTROL_EXCHANGE,
    CONTROL_STREAM,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DISCARD_EXCHANGE,
    EVENTS_EXCHANGE,
    HISTORY_EXCHANGE,
    JOURNAL_BUCKETS,
    KIWIPY_EXCHANGE,
    KIWIPY_FILTER_EXCHANGE,
    KIWIPY_MESSAGE_TTL_MS,
    KIWIPY_OTHERS_EXCHANGE,
    LAUNCHES_EXCHANGE,
    LEASES_EXCHANGE,
    PROBES_EXCHANGE,
    STATE_CHANGED_HEADER,
    STATUS_EXCHANGE,
    WORKERS_EXCHANGE,
    journal_stream_of_bucket,
    launch_queue,
    lease_queue,
)

__all__ = [
    "BROADCAST_QUEUE_ARGUMENTS",
    "CONTROL",
    "EXCHANGES",
    "EXCHANGE_BINDINGS",
    "HISTORY",
    "JOURNAL",
    "JOURNAL_MAX_AGE",
    "QUEUE_TYPES",
    "RPC_QUEUE_ARGUMENTS",
    "ExchangeBinding",
    "ExchangeSpec",
    "QueueSpec",
    "QueueType",
    "check_queue_type",
    "journal_specs",
    "launch_queue_spec",
    "lease_queue_spec",
    "max_age_text",
    "shared_queue_specs",
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
    #: The routing key of those bindings.
    routing_key: str = ""


@dataclass(frozen=True)
class ExchangeBinding:
    """``destination`` bound to ``source`` (an exchange-to-exchange binding)."""

    destination: str
    source: str
    routing_key: str = ""
    arguments: _Arguments = field(default_factory=_frozen)


#: kiwipy's exchange is topic, not durable, not auto-deleted, exactly as kiwipy 0.9 declares it.
KIWIPY: Final = ExchangeSpec(KIWIPY_EXCHANGE, "topic", durable=False)
#: History queries: the indexers bind their queue here (``transport/pika/history_server.py``).
HISTORY: Final = ExchangeSpec(HISTORY_EXCHANGE, "direct")
EXCHANGES: Final = (
    KIWIPY,
    ExchangeSpec(EVENTS_EXCHANGE, "topic"),
    ExchangeSpec(CONTROL_EXCHANGE, "fanout"),
    ExchangeSpec(WORKERS_EXCHANGE, "fanout"),
    ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout"),
    ExchangeSpec(KIWIPY_OTHERS_EXCHANGE, "fanout"),
    ExchangeSpec(DISCARD_EXCHANGE, "fanout"),
    ExchangeSpec(LAUNCHES_EXCHANGE, "direct"),
    ExchangeSpec(LEASES_EXCHANGE, "direct"),
    ExchangeSpec(PROBES_EXCHANGE, "direct"),
    ExchangeSpec(STATUS_EXCHANGE, "direct"),
    HISTORY,
    # The workers' view of kiwipy broadcasts, without the jobs' own state_changed ones
    # (names.KIWIPY_FILTER_EXCHANGE says how).
    ExchangeSpec(KIWIPY_FILTER_EXCHANGE, "headers",
                 arguments=_frozen(**{"alternate-exchange": KIWIPY_OTHERS_EXCHANGE})),
)

CONTROL: Final = QueueSpec(CONTROL_STREAM, _frozen(**{"x-queue-type": "stream", "x-max-age": "1h"}),
                           bound_to=(CONTROL_EXCHANGE,))
#: The journal streams, each bound to the launches exchange with its own name: a launch
#: reaches its job's stream too, by the ``CC`` routing key it carries (one publish, one
#: confirm); and to the probes exchange with the same name, for the readers' probes.
#: Retention applies per segment: small segments let old entries go close to
#: their age.
#: A stream's retention is set when it is made (the setting ``journal_max_age``, 7 days by
#: default); streams made earlier with ``24h`` keep it (``transport/rabbitmq/declare.py``).
JOURNAL_SEGMENT_BYTES: Final = 4_000_000


def max_age_text(seconds: float) -> str:
    """``seconds`` as RabbitMQ writes an ``x-max-age``: ``7D``, ``24h``, ``10m``, ``90s``
    (the broker compares the text, not the duration, when a stream is declared again)."""
    whole = max(int(seconds), 1)
    if whole % 86_400 == 0 and whole > 86_400:
        return f"{whole // 86_400}D"
    for size, unit in ((3_600, "h"), (60, "m")):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def journal_specs(max_age: float = JOURNAL_MAX_AGE) -> tuple[QueueSpec, ...]:
    """The journal's streams, keeping entries ``max_age`` seconds."""
    arguments = _frozen(**{"x-queue-type": "stream", "x-max-age": max_age_text(max_age),
                           "x-stream-max-segment-size-bytes": JOURNAL_SEGMENT_BYTES})
    return tuple(QueueSpec(name, arguments, bound_to=(LAUNCHES_EXCHANGE, PROBES_EXCHANGE), routing_key=name)
                 for name in (journal_stream_of_bucket(bucket) for bucket in range(JOURNAL_BUCKETS)))


JOURNAL: Final = journal_specs()


#: What a launch queue is declared as (the setting ``queue_type``): a classic queue lives on
#: one node of a cluster (its launches are out of reach while that node is down); a quorum
#: queue is replicated to a majority of nodes and survives the loss of a minority
#: (docs/clusters.md).
QUEUE_TYPES: Final[tuple[QueueType, ...]] = get_args(QueueType)


def check_queue_type(queue_type: str) -> QueueType:
    """``queue_type`` if it is one of :data:`QUEUE_TYPES`; else ``ConfigurationError``."""
    for known in QUEUE_TYPES:
        if queue_type == known:
            return known
    raise ConfigurationError(f"queue type {queue_type!r}: expected one of {', '.join(QUEUE_TYPES)}")


def shared_queue_specs(queue_type: QueueType = "classic") -> tuple[QueueSpec, ...]:
    """The shared queues besides the journal (declared apart, JOURNAL): the dead letters
    (refused launches), of ``queue_type`` like the launch queues that dead-letter to it, and
    the control stream."""
    arguments = {"x-queue-type": "quorum"} if check_queue_type(queue_type) == "quorum" else {}
    return (QueueSpec(DEAD_LETTER_QUEUE, _frozen(**arguments), bound_to=(DEAD_LETTER_EXCHANGE,)),
            CONTROL)


def launch_queue_spec(service: str, queue_type: QueueType = "classic") -> QueueSpec:
    """A service's launch queue, of ``queue_type``. A version-2 classic queue confirms a
    persistent launch in about half the time of a version-1 one (0.6 against 1.2 ms here,
    RabbitMQ 3.10)."""
    kind = ({"x-queue-version": 2} if check_queue_type(queue_type) == "classic"
            else {"x-queue-type": "quorum"})
    return QueueSpec(launch_queue(service),
                     _frozen(**{"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE, **kind}),
                     bound_to=(LAUNCHES_EXCHANGE,), routing_key=service)


#: How long a lease lives once nobody holds it: it expires at once, since its time-to-live
#: counts from when it was published.
LEASE_TTL_MS: Final = 1_000
#: A worker's lease queue is dropped this long after its worker last consumed it (a worker
#: killed leaves one behind). Harmless to a worker that comes back later: its leases left the
#: queue a second after its connection did (their time-to-live), and it declares it again.
LEASE_QUEUE_EXPIRES_MS: Final = 60_000


def lease_queue_spec(worker_id: str) -> QueueSpec:
    """One worker's lease queue: a quorum queue, so that leases survive a broker restart and
    are dead-lettered at least once (into the launch queue their ``CC`` key names)."""
    name = lease_queue(worker_id)
    return QueueSpec(name, _frozen(**{
        "x-queue-type": "quorum", "x-message-ttl": LEASE_TTL_MS,
        "x-dead-letter-exchange": LAUNCHES_EXCHANGE, "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish", "x-expires": LEASE_QUEUE_EXPIRES_MS}),
        bound_to=(LEASES_EXCHANGE,), routing_key=name)

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
