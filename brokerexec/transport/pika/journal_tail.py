"""Tailing every journal stream with pika, for the history indexer: the byte-moving half of
``brokerexec/history/indexer.py``.

One connection, one channel, one stream consumer per journal stream, each from the offset the
caller says it has read up to. Deliveries are gathered into batches (``batch`` entries, or
``flush_every`` seconds after the first) and handed over with the offset each stream reached;
they are acknowledged (stream credit) only once the caller took the batch, so what is not yet
stored is read again after a crash or a reconnect, from the offsets the caller stored last.
On the same connection, between batches, it answers history queries (``protocol/history.py``)
with the caller's ``answer``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from tenacity import Retrying, retry_if_exception_type, stop_never, wait_exponential

from ...protocol.journal import STREAM_OFFSET_HEADER
from ...protocol.names import HISTORY_QUEUE, JOURNAL_BUCKETS, journal_stream_of_bucket
from .client import connection_parameters

__all__ = ["Answer", "JournalTail", "TailEntry", "TryAgain"]

log = logging.getLogger(__name__)

_NOT_FOUND = 404


@dataclass(frozen=True)
class TailEntry:
    """One message of a journal stream, undecoded."""

    stream: str
    offset: int
    kind: str | None
    message_id: str | None
    content_type: str | None
    body: bytes


#: Takes a batch and the next offset of each stream it reaches; returns once it is stored.
OnBatch = Callable[[list[TailEntry], dict[str, int]], None]
#: Answers one history query (its body and content type) with a reply's body (JSON).
Answer = Callable[[bytes, "str | None"], bytes]


class JournalTail:
    """See the module docstring.

    Parameters:
        url: the broker (one address or a cluster's, ``amqps://`` for TLS).
        batch: the most entries handed over at once.
        flush_every: seconds after its first entry that a batch is handed over anyway.
        name: the connection's name, as the broker shows it.
    """

    def __init__(self, url: str, *, batch: int = 1000, flush_every: float = 0.25,
                 name: str = "brokerexec-history", answer: Answer | None = None) -> None:
        self.parameters = connection_parameters(url, 10.0, name, 30)
        self.batch, self.flush_every = batch, flush_every
        self.answer = answer
        self.connected = threading.Event()

    def run(self, offsets: Callable[[], Mapping[str, int]], on_batch: OnBatch, stop: threading.Event) -> None:
        """Tail until ``stop`` is set; reconnect (backing off to 30 s) when the broker goes,
        or ``on_batch`` (or ``offsets``) raises :class:`TryAgain`, from the offsets
        ``offsets()`` returns then. Any other error of theirs is raised."""
        again = (pika.exceptions.AMQPError, OSError, _NoJournal, TryAgain)
        retrying = Retrying(retry=retry_if_exception_type(again),
                            wait=wait_exponential(multiplier=0.5, max=30), stop=stop_never,
                            before_sleep=lambda state: log.warning(
                                "the journal could not be read (%s); again in %.1f s",
                                state.outcome.exception() if state.outcome else "?",
                                state.next_action.sleep if state.next_action else 0),
                            sleep=functools.partial(_sleep, stop), reraise=True)
        for attempt in retrying:
            with attempt:
                if stop.is_set():
                    return
                self._tail(dict(offsets()), on_batch, stop)

    def _tail(self, start: dict[str, int], on_batch: OnBatch, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(self.parameters)
        pending: list[TailEntry] = []
        reached: dict[str, int] = {}
        last_tag = [0]
        first_at = [0.0]

        def take(stream: str, _ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            last_tag[0] = method.delivery_tag
            offset = (props.headers or {}).get(STREAM_OFFSET_HEADER)
            if not isinstance(offset, int) or offset < start.get(stream, 0):
                return  # before where it was asked to start: the chunk's head, read already
            if not pending:
                first_at[0] = time.monotonic()
            pending.append(TailEntry(stream, offset, props.type, props.message_id, props.content_type, body))
            reached[stream] = offset + 1

        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self.batch * 2)
            try:
                for bucket in range(JOURNAL_BUCKETS):
                    stream = journal_stream_of_bucket(bucket)
                    channel.basic_consume(stream, functools.partial(take, stream),
                                          arguments={"x-stream-offset": start.get(stream, "first")})
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == _NOT_FOUND:
                    raise _NoJournal("no journal streams yet: no worker has run on this broker") from exc
                raise
            if self.answer is not None:
                _serve(channel, self.answer)
            self.connected.set()
            while not stop.is_set():
                connection.process_data_events(time_limit=self.flush_every / 2)
                if pending and (len(pending) >= self.batch
                                or time.monotonic() - first_at[0] >= self.flush_every):
                    batch, moved = list(pending), dict(reached)
                    on_batch(batch, moved)  # stored: now the broker may send more
                    pending.clear()
                    start.update(moved)
                    channel.basic_ack(last_tag[0], multiple=True)
            if pending:
                on_batch(list(pending), dict(reached))
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                connection.close()


def _serve(channel: Any, answer: Answer) -> None:
    """Answer history queries, between batches, on the queue every indexer consumes (it goes
    with the last of them, so that a query with none there comes back unroutable)."""

    def on_query(ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        if not props.reply_to:
            return
        reply = answer(body, props.content_type)
        ch.basic_publish("", props.reply_to, reply, pika.BasicProperties(
            content_type="application/json", correlation_id=props.correlation_id))

    channel.queue_declare(HISTORY_QUEUE, auto_delete=True)
    channel.basic_consume(HISTORY_QUEUE, on_query, auto_ack=True)


def _sleep(stop: threading.Event, seconds: float) -> None:
    stop.wait(seconds)  # a stop ends the wait


class _NoJournal(Exception):
    """The journal's streams do not exist yet."""


class TryAgain(Exception):
    """Raised by a batch's taker that could not store it now (its store is down): the tail
    backs off, reconnects and reads again from the offsets stored last."""
