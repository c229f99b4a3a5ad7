"""Answering history queries with pika, for the history indexer: on a connection of its own,
beside the journal's tail (``journal_tail.py``).

Apart, so that a query never waits behind a batch being committed, and so that an indexer
whose store is down (its tail backing off, its offsets unreadable) still answers, with the
store's own reason (``brokerexec.HistoryUnavailable``: "the history store cannot answer
now"), instead of vanishing from the broker and leaving clients to believe no indexer runs.
Every indexer consumes the queue ``brokerexec.history``; it goes with the last of them, so a
query with none there comes back unroutable (``protocol/history.py``). Each binds it to the
exchange ``brokerexec.history`` (declaring it, as workers do), through which clients send
their queries: a user who may write there (a watcher) reaches this queue and nothing else.
Older clients send them through the default exchange, by the queue's name; both are
answered, and nothing that came through any other exchange (the queue bound to one by hand).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import pika

from ...protocol.names import HISTORY_EXCHANGE, HISTORY_QUEUE
from ...protocol.topology import HISTORY
from .client import connection_parameters
from .reconnecting import reconnecting

__all__ = ["Answer", "HistoryServer"]

log = logging.getLogger(__name__)

#: Answers one history query (its body and content type) with a reply's body (JSON).
Answer = Callable[[bytes, "str | None"], bytes]
#: The exchanges a query may come through: the default one (older clients) and the history one.
_ASKED_THROUGH = frozenset({"", HISTORY_EXCHANGE})
#: How often the server looks at its stop event (seconds).
_TICK = 0.25


class HistoryServer:
    """See the module docstring.

    Parameters:
        url: the broker (one address or a cluster's, ``amqps://`` for TLS).
        answer: the reply to each query.
        name: the connection's name, as the broker shows it.
    """

    def __init__(self, url: str, answer: Answer, *, name: str = "brokerexec-history-queries") -> None:
        self.parameters = connection_parameters(url, 10.0, name, 30)
        self.answer = answer
        self.serving = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Answer until ``stop`` is set; reconnect (backing off to 30 s) when the broker goes."""
        for attempt in reconnecting(stop, "history queries cannot be answered", log):
            with attempt:
                if stop.is_set():
                    return
                self._serve(stop)

    def _serve(self, stop: threading.Event) -> None:
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            channel.exchange_declare(HISTORY.name, HISTORY.kind, durable=HISTORY.durable,
                                     arguments=dict(HISTORY.arguments) or None)
            channel.queue_declare(HISTORY_QUEUE, auto_delete=True)
            channel.queue_bind(HISTORY_QUEUE, HISTORY.name, HISTORY_QUEUE)
            channel.basic_consume(HISTORY_QUEUE, self._on_query, auto_ack=True)
            self.serving.set()
            while not stop.is_set():
                connection.process_data_events(time_limit=_TICK)
        finally:
            self.serving.clear()
            with contextlib.suppress(Exception):
                connection.close()

    def _on_query(self, channel: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        if not props.reply_to or method.exchange not in _ASKED_THROUGH:
            return  # nobody to answer, or not a query (the broker names the exchange, not the sender)
        reply = self.answer(body, props.content_type)
        channel.basic_publish("", props.reply_to, reply, pika.BasicProperties(
            content_type="application/json", correlation_id=props.correlation_id))
