"""Tailing every journal stream with pika, for the history indexer: the byte-moving half of
``brokerexec/history/indexer.py``.

One connection, one channel, one stream consumer per journal stream, each from the offset the
caller says it has read up to. Deliveries are gathered into batches (``batch`` entries, or
``flush_every`` seconds after the first) and handed over with the offset each stream reached;
they are acknowledged (stream credit) only once the caller stored the batch, so what is not
yet stored is read again after a crash or a reconnect, from the offsets the caller stored
last. The caller stores a batch before it returns, or returns a future that is done once it
is stored (the indexer's store process): then up to ``in_flight`` batches are being stored
while the next is read, and they are acknowledged in the order they were handed over.
History queries are answered apart, on a connection of their own (``history_server.py``).

For the indexer's metrics it keeps the offsets the caller stored (:meth:`JournalTail.committed`),
and looks at where each stream ends (:func:`stream_ends`, on a connection of its own).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions

from ...protocol.journal import STREAM_OFFSET_HEADER
from ...protocol.names import JOURNAL_BUCKETS, journal_stream_of_bucket
from .client import connection_parameters
from .reconnecting import reconnecting

__all__ = ["JournalTail", "TailEntry", "TryAgain", "stream_ends"]

log = logging.getLogger(__name__)

_NOT_FOUND = 404
#: How long a look at the streams' ends waits for their last chunks (an empty stream sends
#: none), and for a quiet moment once each sent its own.
LOOK_SECONDS = 0.5
_QUIET = 0.05


@dataclass(frozen=True)
class TailEntry:
    """One message of a journal stream, undecoded."""

    stream: str
    offset: int
    kind: str | None
    message_id: str | None
    content_type: str | None
    body: bytes


#: Takes a batch and the next offset of each stream it reaches; returns once it is stored, or
#: returns a future done once it is (raising :class:`TryAgain` if it could not be).
OnBatch = Callable[[list[TailEntry], dict[str, int]], "cf.Future[None] | None"]


@dataclass
class _Storing:
    """A batch handed over and not yet stored: its future, last delivery and offsets."""

    future: cf.Future[None]
    last_tag: int
    reached: dict[str, int]


class JournalTail:
    """See the module docstring.

    Parameters:
        url: the broker (one address or a cluster's, ``amqps://`` for TLS).
        batch: the most entries handed over at once.
        flush_every: seconds after its first entry that a batch is handed over anyway.
        name: the connection's name, as the broker shows it.
    """

    def __init__(self, url: str, *, batch: int = 1000, flush_every: float = 0.25, in_flight: int = 2,
                 name: str = "brokerexec-history") -> None:
        self.parameters = connection_parameters(url, 10.0, name, 30)
        self.batch, self.flush_every, self.in_flight = batch, flush_every, in_flight
        self.connected = threading.Event()
        #: Times the journal was read again from the stored offsets (the broker or the
        #: caller's store failed).
        self.reconnects = 0
        self._committed: dict[str, int] = {}
        self._lock = threading.Lock()

    def committed(self) -> dict[str, int]:
        """The next offset of each stream as the caller stored it (what ``offsets()`` said,
        moved by each batch it took); a stream it had none for, from the first entry the
        stream still holds."""
        with self._lock:
            return dict(self._committed)

    def ends(self, seconds: float = LOOK_SECONDS) -> dict[str, int]:
        """The next offset of each journal stream now (:func:`stream_ends`)."""
        return stream_ends(self.parameters, seconds)

    def run(self, offsets: Callable[[], Mapping[str, int]], on_batch: OnBatch, stop: threading.Event) -> None:
        """Tail until ``stop`` is set; reconnect (backing off to 30 s) when the broker goes,
        or ``on_batch`` (or ``offsets``) raises :class:`TryAgain`, from the offsets
        ``offsets()`` returns then. Any other error of theirs is raised."""
        retrying = reconnecting(stop, "the journal could not be read", log, also=(_NoJournal, TryAgain))
        for attempt in retrying:
            with attempt:
                if stop.is_set():
                    return
                if attempt.retry_state.attempt_number > 1:
                    self.reconnects += 1
                self._tail(dict(offsets()), on_batch, stop)

    def _tail(self, start: dict[str, int], on_batch: OnBatch, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(self.parameters)
        with self._lock:
            self._committed = dict(start)
        try:
            channel = connection.channel()
            # Room for the batches being stored and the one being read.
            channel.basic_qos(prefetch_count=self.batch * (self.in_flight + 1))
            session = _Session(self, connection, channel, start, on_batch)
            try:
                for bucket in range(JOURNAL_BUCKETS):
                    stream = journal_stream_of_bucket(bucket)
                    channel.basic_consume(stream, functools.partial(session.take, stream),
                                          arguments={"x-stream-offset": start.get(stream, "first")})
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == _NOT_FOUND:
                    raise _NoJournal("no journal streams yet: no worker has run on this broker") from exc
                raise
            self.connected.set()
            while not stop.is_set():
                connection.process_data_events(time_limit=self.flush_every / 2)
                session.settle()
                if session.due():
                    session.hand_over()
            session.finish()
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                connection.close()

    def _moved(self, reached: dict[str, int]) -> None:
        with self._lock:
            self._committed.update(reached)

    def _first_seen(self, stream: str, offset: int) -> None:
        if stream not in self._committed:  # read from its first: what retention left
            with self._lock:
                self._committed.setdefault(stream, offset)


class _Session:
    """One connection's tail: the deliveries gathered into the next batch, and the batches
    handed over and not yet acknowledged."""

    def __init__(self, tail: JournalTail, connection: pika.BlockingConnection, channel: Any,
                 start: dict[str, int], on_batch: OnBatch) -> None:
        self.tail, self.connection, self.channel = tail, connection, channel
        self.start, self.on_batch = start, on_batch
        self.pending: list[TailEntry] = []
        self.reached: dict[str, int] = {}
        self.last_tag = 0
        self.first_at = 0.0
        self.storing: deque[_Storing] = deque()

    def take(self, stream: str, _ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        self.last_tag = method.delivery_tag
        offset = (props.headers or {}).get(STREAM_OFFSET_HEADER)
        if not isinstance(offset, int) or offset < self.start.get(stream, 0):
            return  # before where it was asked to start: the chunk's head, read already
        self.tail._first_seen(stream, offset)
        if not self.pending:
            self.first_at = time.monotonic()
        self.pending.append(TailEntry(stream, offset, props.type, props.message_id, props.content_type, body))
        self.reached[stream] = offset + 1

    def due(self) -> bool:
        """A batch to hand over: full, or its first entry waited long enough; and room."""
        return bool(self.pending) and len(self.storing) < self.tail.in_flight and (
            len(self.pending) >= self.tail.batch or time.monotonic() - self.first_at >= self.tail.flush_every)

    def hand_over(self) -> None:
        batch, moved = self.pending, dict(self.reached)
        self.pending = []
        future = self.on_batch(batch, moved)
        if future is None:  # stored already
            future = cf.Future()
            future.set_result(None)
        else:  # wake the loop when it is stored, to acknowledge it at once
            future.add_done_callback(lambda _: _suppressed(self.connection.add_callback_threadsafe, _nothing))
        self.storing.append(_Storing(future, self.last_tag, moved))
        self.settle()

    def settle(self) -> None:
        """Acknowledge the batches stored, in the order they were handed over."""
        while self.storing and self.storing[0].future.done():
            done = self.storing.popleft()
            failed = done.future.exception()
            if failed is not None:  # the batches after it are refused too: read again
                cf.wait([later.future for later in self.storing], 60)
                raise failed
            self.start.update(done.reached)
            self.tail._moved(done.reached)
            self.channel.basic_ack(done.last_tag, multiple=True)

    def finish(self) -> None:
        """Hand over what is gathered, and wait until every batch is stored."""
        if self.pending:
            self.hand_over()
        cf.wait([batch.future for batch in self.storing], 60)
        self.settle()


def _nothing() -> None:
    """Run in the tail's thread to wake its loop (which then acknowledges)."""


def _suppressed(call: Callable[..., object], *args: Any) -> None:
    with contextlib.suppress(Exception):  # the connection closed meanwhile: nothing to wake
        call(*args)


def stream_ends(parameters: Sequence[pika.ConnectionParameters],
                seconds: float = LOOK_SECONDS) -> dict[str, int]:
    """The next offset of each journal stream that holds an entry: one past the newest.

    A stream has no end marker over AMQP 0-9-1, and a probe would write to the journal: a
    consumer from ``"last"`` is sent the stream's last chunk whole (with a prefetch of one,
    no more), and the newest offset in it is the stream's. On a connection of its own, as
    ``journal_reader.py`` reads (pika rejects what it did not dispatch when a consumer ends,
    and RabbitMQ closes the whole connection at a reject on a stream); nothing acknowledged,
    so nothing more is sent. Waits at most ``seconds`` for the streams that send nothing
    (empty ones). No journal yet: an empty answer.
    """
    ends: dict[str, int] = {}
    delivered = [0]

    def seen(stream: str, _ch: Any, _method: Any, props: pika.BasicProperties, _body: bytes) -> None:
        delivered[0] += 1
        offset = (props.headers or {}).get(STREAM_OFFSET_HEADER)
        if isinstance(offset, int):
            ends[stream] = max(ends.get(stream, 0), offset + 1)

    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        streams = [journal_stream_of_bucket(bucket) for bucket in range(JOURNAL_BUCKETS)]
        try:
            for stream in streams:
                channel.basic_consume(stream, functools.partial(seen, stream),
                                      arguments={"x-stream-offset": "last"})
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == _NOT_FOUND:
                return {}
            raise
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            before = delivered[0]
            connection.process_data_events(time_limit=_QUIET)
            if len(ends) == len(streams) and delivered[0] == before:
                break  # every stream sent its last chunk, and nothing came since
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return ends


class _NoJournal(Exception):
    """The journal's streams do not exist yet."""


class TryAgain(Exception):
    """Raised by a batch's taker that could not store it now (its store is down): the tail
    backs off, reconnects and reads again from the offsets stored last."""
