"""Reading the journal, and browsing launch queues, with pika: the byte-moving half of
:class:`~brokerexec.protocol.commands.ReadJournal` and :class:`~brokerexec.protocol.
commands.Browse` for the blocking client (``caller.py``)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions

from ...errors import AccessRefused, BrokerExecError
from ...protocol.commands import Incoming, JournalReader
from ...protocol.journal import STREAM_OFFSET_HEADER, probe_message
from .internals import closing_reason

__all__ = ["browse", "read_journal"]

_NOT_FOUND = 404
#: How long a browse waits for the messages a queue said it holds.
BROWSE_SECONDS = 1.0
#: A journal reader acknowledges every this many deliveries (less than its prefetch), at once.
ACK_EVERY = 50

Pump = Callable[[Callable[[], bool], "float | None", Any], bool]


def _incoming(method: Any, props: pika.BasicProperties, body: bytes) -> Incoming:
    headers = props.headers or {}
    offset = headers.get(STREAM_OFFSET_HEADER)
    return Incoming(body, props.content_type, props.message_id, props.type, props.reply_to,
                    method.exchange, offset if isinstance(offset, int) else None, headers)


def read_journal(parameters: Sequence[pika.ConnectionParameters], reader: JournalReader,
                 seconds: float | None, pump: Pump) -> JournalReader:
    """Feed ``reader`` from its streams, on a connection of its own, closed afterwards.

    Of its own because of how pika ends a consumer: it rejects the deliveries it holds but
    has not dispatched yet, and RabbitMQ answers a reject on a stream by closing the whole
    connection (540 NOT_IMPLEMENTED). Once the reader is done, nothing more is acknowledged:
    each ack would let the broker send more, read in the same pass. The journal's streams
    are declared together, by every worker: if one is missing, no worker has ever run and
    all of them are.
    """
    read_so_far = [0]

    def read(stream: str, ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        if reader.done:
            return
        read_so_far[0] += 1
        if read_so_far[0] % ACK_EVERY == 0:
            # Acks only give the stream consumer credit back: one for many. pika flushes each
            # ack at once, a system call and a poll: per message, that was most of a look-up.
            ch.basic_ack(method.delivery_tag, multiple=True)
        reader.feed(stream, _incoming(method, props, body))

    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=reader.PREFETCH)
        try:
            for stream in reader.streams:
                channel.basic_consume(stream, functools.partial(read, stream),
                                      arguments={"x-stream-offset": reader.offset})
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != _NOT_FOUND:
                raise
            for stream in reader.streams:
                reader.missing(stream)
            return reader
        for stream, probe_id in reader.probes.items():
            probe = probe_message(stream, probe_id)
            channel.basic_publish(probe.exchange, probe.routing_key, probe.body,
                                  pika.BasicProperties(content_type=probe.content_type,
                                                       message_id=probe.message_id, type=probe.type))
        pump(lambda: reader.done or not channel.is_open, seconds, connection)
        if not reader.done and not channel.is_open:
            # The probe was refused (a user without write on the probes exchange): say so
            # at once rather than wait out the read's time-out.
            reason = closing_reason(channel) or "channel closed"
            kind = AccessRefused if reason.startswith("403 ") else BrokerExecError
            raise kind(f"the broker refused reading the journal: {reason}")
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return reader


def browse(connection: pika.BlockingConnection, queues: Sequence[str], limit: int,
           pump: Pump) -> dict[str, list[Incoming]]:
    """The messages waiting in ``queues`` (at most ``limit`` each), taken unacknowledged on a
    channel of their own and given back when it closes."""
    found: dict[str, list[Incoming]] = {name: [] for name in queues}
    expected: dict[str, int] = {}
    channel = connection.channel()
    try:
        for name in queues:
            try:
                declared = channel.queue_declare(name, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != _NOT_FOUND:
                    raise
                channel = connection.channel()  # that one closed: the queue is not there
                continue
            expected[name] = min(declared.method.message_count, limit)
        channel.basic_qos(prefetch_count=max(limit, 1))
        for name, count in expected.items():
            if count:
                channel.basic_consume(name, functools.partial(
                    lambda name, _ch, method, props, body:
                    found[name].append(_incoming(method, props, body)), name))
        deadline = time.monotonic() + BROWSE_SECONDS
        pump(lambda: all(len(found[n]) >= c for n, c in expected.items()),
             max(deadline - time.monotonic(), 0.0), connection)
    finally:
        with contextlib.suppress(Exception):
            channel.close()  # every message taken goes back to its queue
    return found
