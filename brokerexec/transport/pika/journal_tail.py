"""Tailing every journal stream with pika, for the history indexer: the byte-moving half of
``brokerexec/history/indexer.py``.

One connection, one channel, one stream consumer per journal stream, each from the offset the
caller says it has read up to. Deliveries are gathered into batches (``batch`` entries, or
``flush_every`` seconds after the first) and handed over with the offset each stream reached;
they are acknowledged (stream credit) only once the caller took the batch, so what is not yet
stored is read again after a crash or a reconnect, from the offsets the caller stored last.
History queries are answered apart, on a connection of their own (``history_server.py``).

For the indexer's metrics it keeps the offsets the caller stored (:meth:`JournalTail.committed`),
and looks at where each stream ends (:func:`stream_ends`, on a connection of its own).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
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


#: Takes a batch and the next offset of each stream it reaches; returns once it is stored.
OnBatch = Callable[[list[TailEntry], dict[str, int]], None]


class JournalTail:
    """See the module docstring.

    Parameters:
        url: the broker (one address or a cluster's, ``amqps://`` for TLS).
        batch: the most entries handed over at once.
        flush_every: seconds after its first entry that a batch is handed over anyway.
        name: the connection's name, as the broker shows it.
    """

    def __init__(self, url: str, *, batch: int = 1000, flush_every: float = 0.25,
                 name: str = "brokerexec-history") -> None:
        self.parameters = connection_parameters(url, 10.0, name, 30)
        self.batch, self.flush_every = batch, flush_every
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
        pending: list[TailEntry] = []
        reached: dict[str, int] = {}
        last_tag = [0]
        first_at = [0.0]
        with self._lock:
            self._committed = dict(start)

        def take(stream: str, _ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            last_tag[0] = method.delivery_tag
            offset = (props.headers or {}).get(STREAM_OFFSET_HEADER)
            if not isinstance(offset, int) or offset < start.get(stream, 0):
                return  # before where it was asked to start: the chunk's head, read already
            if stream not in self._committed:  # read from its first: what retention left
                with self._lock:
                    self._committed.setdefault(stream, offset)
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
            self.connected.set()
            while not stop.is_set():
                connection.process_data_events(time_limit=self.flush_every / 2)
                if pending and (len(pending) >= self.batch
                                or time.monotonic() - first_at[0] >= self.flush_every):
                    batch, moved = list(pending), dict(reached)
                    on_batch(batch, moved)  # stored: now the broker may send more
                    pending.clear()
                    start.update(moved)
                    with self._lock:
                        self._committed.update(moved)
                    channel.basic_ack(last_tag[0], multiple=True)
            if pending:
                on_batch(list(pending), dict(reached))
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                connection.close()


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
