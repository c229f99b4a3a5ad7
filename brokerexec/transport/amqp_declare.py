"""Every RabbitMQ object brokerexec declares, with its exact arguments, in one place.

Workers, clients and the one-shot CLI client all declare from here: RabbitMQ closes the
channel of anyone who declares an existing object with other arguments
(``PRECONDITION_FAILED``), so the arguments must never drift between them.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # aio-pika is imported where it is used: the one-shot CLI client
    import aio_pika.abc  # reads the arguments below without paying for it

from ..constants import (
    BROADCAST_TOPIC,
    CONTROL_EXCHANGE,
    CONTROL_MAX_AGE,
    CONTROL_STREAM,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEADLINE_HEADER,
    DEADLINE_MS_HEADER,
    DISCARD_EXCHANGE,
    EVENTS_EXCHANGE,
    KIWIPY_EXCHANGE,
    KIWIPY_FILTER_EXCHANGE,
    KIWIPY_MESSAGE_TTL_MS,
    KIWIPY_OTHERS_EXCHANGE,
    LAUNCH_QUEUE,
    RECORD_TIME_MARGIN,
    RESULTS_MAX_AGE,
    RESULTS_SEGMENT_BYTES,
    RESULTS_STREAM,
    STATE_CHANGED_HEADER,
    WORKERS_EXCHANGE,
)
from ..protocol import job_time

__all__ = [
    "BROADCAST_QUEUE_ARGUMENTS",
    "CONTROL_STREAM",
    "CONTROL_STREAM_ARGUMENTS",
    "EXCHANGES",
    "LAUNCH_QUEUE_ARGUMENTS",
    "OLD_LAUNCH_QUEUE_ARGUMENTS",
    "OLD_LAUNCH_QUEUE_WARNING",
    "RESULTS_STREAM_ARGUMENTS",
    "RPC_QUEUE_ARGUMENTS",
    "declare_all",
    "expired",
    "records_offset",
]

log = logging.getLogger(__name__)

#: (name, type, durable). kiwipy's exchange is topic, not durable, not auto-deleted,
#: exactly as kiwipy 0.9 declares it.
EXCHANGES: Final = (
    (KIWIPY_EXCHANGE, "topic", False),
    (EVENTS_EXCHANGE, "topic", True),
    (CONTROL_EXCHANGE, "fanout", True),
    (WORKERS_EXCHANGE, "fanout", True),
    (DEAD_LETTER_EXCHANGE, "fanout", True),
    (KIWIPY_OTHERS_EXCHANGE, "fanout", True),
    (DISCARD_EXCHANGE, "fanout", True),
)
#: A version-2 classic queue confirms a persistent launch in about half the time of a
#: version-1 one (0.6 against 1.2 ms here, RabbitMQ 3.10), and costs the broker less CPU.
LAUNCH_QUEUE_ARGUMENTS: Final[dict[str, Any]] = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                                                 "x-queue-version": 2}
#: What a launch queue made before version 2 was asked for has; still accepted as it is.
OLD_LAUNCH_QUEUE_ARGUMENTS: Final[dict[str, Any]] = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
OLD_LAUNCH_QUEUE_WARNING: Final = (
    "the queue %s is a version-1 classic queue, made by an older brokerexec: it works, but "
    "launches take about twice as long to confirm. To upgrade it, stop the workers once it is "
    "empty and delete it (rabbitmqctl delete_queue %s); the next worker declares it anew.")
RESULTS_STREAM_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "stream", "x-max-age": RESULTS_MAX_AGE,
    "x-stream-max-segment-size-bytes": RESULTS_SEGMENT_BYTES}
RPC_QUEUE_ARGUMENTS: Final[dict[str, Any]] = {"x-message-ttl": KIWIPY_MESSAGE_TTL_MS}
BROADCAST_QUEUE_ARGUMENTS: Final[dict[str, Any]] = {"x-message-ttl": KIWIPY_MESSAGE_TTL_MS}
CONTROL_STREAM_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "stream", "x-max-age": CONTROL_MAX_AGE}


async def declare_all(channel: aio_pika.abc.AbstractChannel) -> None:
    """Declare every shared exchange and queue (idempotent)."""
    import aio_pika

    exchanges = {}
    for name, kind, durable in EXCHANGES:
        exchanges[name] = await channel.declare_exchange(
            name, aio_pika.ExchangeType(kind), durable=durable, auto_delete=False)
    await _declare_launch_queue(channel)
    dead = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)
    await dead.bind(exchanges[DEAD_LETTER_EXCHANGE], "")
    control = await channel.declare_queue(CONTROL_STREAM, durable=True,
                                          arguments=CONTROL_STREAM_ARGUMENTS)
    await control.bind(exchanges[CONTROL_EXCHANGE], "")
    await channel.declare_queue(RESULTS_STREAM, durable=True, arguments=RESULTS_STREAM_ARGUMENTS)
    # The workers' view of kiwipy broadcasts, without the jobs' own state_changed ones
    # (constants.KIWIPY_FILTER_EXCHANGE says how). The bindings from kiwipy's transient
    # exchange go with a broker restart; this setup runs again after every reconnect.
    kiwipy_filter = await channel.declare_exchange(
        KIWIPY_FILTER_EXCHANGE, aio_pika.ExchangeType.HEADERS, durable=True,
        arguments={"alternate-exchange": KIWIPY_OTHERS_EXCHANGE})
    await kiwipy_filter.bind(exchanges[KIWIPY_EXCHANGE], BROADCAST_TOPIC)
    await exchanges[DISCARD_EXCHANGE].bind(kiwipy_filter, arguments={
        "x-match": "all", STATE_CHANGED_HEADER[0]: STATE_CHANGED_HEADER[1]})


async def _declare_launch_queue(channel: aio_pika.abc.AbstractChannel) -> None:
    # On a channel of its own: a queue declared with other arguments before closes the
    # channel that tries (PRECONDITION_FAILED), and this one must live on.
    import aiormq.exceptions

    connection = (await channel.get_underlay_channel()).connection
    trial = await connection.channel(publisher_confirms=False)
    try:
        await trial.queue_declare(LAUNCH_QUEUE, durable=True, arguments=LAUNCH_QUEUE_ARGUMENTS)
    except aiormq.exceptions.ChannelPreconditionFailed:
        await channel.declare_queue(LAUNCH_QUEUE, durable=True, arguments=OLD_LAUNCH_QUEUE_ARGUMENTS)
        log.warning(OLD_LAUNCH_QUEUE_WARNING, LAUNCH_QUEUE, LAUNCH_QUEUE)
    finally:
        if not trial.is_closed:
            await trial.close()


def expired(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
    """True if the request carries an ``x-deadline`` or ``x-deadline-ms`` that has passed."""
    headers = message.headers or {}
    deadline, deadline_ms = headers.get(DEADLINE_HEADER), headers.get(DEADLINE_MS_HEADER)
    now = time.time()
    return ((isinstance(deadline, int | float) and deadline < now)
            or (isinstance(deadline_ms, int) and deadline_ms < now * 1000))


def records_offset(job_id: str) -> Any:
    """Where a reader of the records stream starts for ``job_id``: its launch time, if known."""
    launched = job_time(job_id)
    if launched is None:
        return "first"
    return datetime.fromtimestamp(launched - RECORD_TIME_MARGIN, tz=timezone.utc)
