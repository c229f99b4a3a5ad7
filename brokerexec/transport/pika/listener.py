"""The blocking client's listener: one thread and one pika connection for what it receives
without asking — event subscriptions, control messages (an operation's launcher hears its
operation's pause, resume and abort, sent from anywhere), and the records pushed to this
client.

pika is not thread-safe, and its ``BlockingConnection`` answers heartbeats only while its
own thread pumps it: so the listener's thread does nothing but pump. Other threads cross
over with ``add_callback_threadsafe`` (pika's FAQ; dramatiq does the same) and wait for the
outcome. After a lost connection the listener connects again, with backoff, and re-applies
every subscription and a fresh records queue (the broker may still hold the old one);
events sent meanwhile are lost (they are best-effort), records are read from the stream.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions

from ... import codec
from ...constants import MAX_ENTRY_BYTES
from ...errors import BrokerConnectionError, DecodeError
from ...protocol import topology
from ...protocol.events import Event
from ...protocol.messages import Control
from ...protocol.names import CONTROL_EXCHANGE, EVENTS_EXCHANGE
from ..pushed_records import PushedRecords
from .internals import join_frame_writes

__all__ = ["PikaListener"]

log = logging.getLogger(__name__)
_ids = itertools.count(1)

#: What the listener may lose its connection with.
_LOST = (pika.exceptions.AMQPError, OSError)


class _Subscription:
    """One subscription: its patterns and callback, and its queue on the current connection.
    ``patterns`` None: the control messages (the fanout control exchange), not events."""

    def __init__(self, listener: PikaListener, patterns: list[str] | None,
                 callback: Callable[[Any], None]) -> None:
        self.listener = listener
        self.patterns = patterns
        self.callback = callback
        self.consumer_tag: str | None = None
        self.channel: Any = None  # a channel of its own (control messages), else the listener's

    def close(self) -> None:
        self.listener.unsubscribe(self)


class PikaListener:
    """See the module docstring.

    Parameters:
        parameters: how to connect (pika's), heartbeats on.
        records: where pushed records go; None: no records queue.
        backoff_initial, backoff_max: seconds between attempts to connect again.
    """

    def __init__(self, parameters: Sequence[pika.ConnectionParameters], *, records: PushedRecords | None,
                 backoff_initial: float = 0.1, backoff_max: float = 5.0) -> None:
        self._parameters = parameters
        self._records = records
        self._backoff = (backoff_initial, backoff_max)
        self._subscriptions: list[_Subscription] = []
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._closing = threading.Event()
        self._up = threading.Event()
        self._first: cf.Future[None] = cf.Future()
        self.reconnects = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"brokerexec-pika-listener-{next(_ids)}")

    def start(self, timeout: float) -> None:
        """Connect; raise ``BrokerConnectionError`` if the first connection fails."""
        self._thread.start()
        try:
            self._first.result(timeout)
        except cf.TimeoutError:
            self.close()
            raise BrokerConnectionError("the listener could not connect in time") from None

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    # ---- the listener's thread -------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._closing.is_set():
            try:
                self._connect()
                delay = self._backoff[0]
                if not self._first.done():
                    self._first.set_result(None)
                while not self._closing.is_set():
                    assert self._connection is not None
                    self._connection.process_data_events(time_limit=1.0)
            except _LOST as exc:
                if not self._first.done():
                    self._first.set_exception(BrokerConnectionError(f"cannot connect: {exc!r}"))
                    return
                if not self._closing.is_set():
                    log.warning("listener connection lost (%r); connecting again in %.1f s", exc, delay)
            finally:
                self._lost()
            if self._closing.wait(delay):
                return
            delay = min(delay * 2, self._backoff[1])
            self.reconnects += 1

    def _connect(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        join_frame_writes(connection)
        self._connection, self._channel = connection, connection.channel()
        if self._records is not None:
            queue = self._records.connected()
            self._channel.queue_declare(queue, exclusive=True)
            self._channel.basic_consume(queue, self._on_record, auto_ack=True)
        for subscription in list(self._subscriptions):
            self._apply(subscription)
        self._up.set()

    def _lost(self) -> None:
        self._up.clear()
        if self._records is not None:
            self._records.disconnected()
        for subscription in self._subscriptions:
            subscription.consumer_tag, subscription.channel = None, None
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(*_LOST):
                if connection.is_open:
                    connection.close()

    def _apply(self, subscription: _Subscription) -> None:
        """Bind a queue of its own to every pattern (or to the control exchange) and
        consume it (listener thread)."""
        if subscription.patterns is None:
            self._apply_controls(subscription)
            return
        channel = self._channel
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for pattern in subscription.patterns:
            channel.queue_bind(queue, EVENTS_EXCHANGE, pattern)
        subscription.consumer_tag = channel.basic_consume(
            queue, _delivery(subscription, Event.decode, "event", allow_yaml=True), auto_ack=True)

    def _apply_controls(self, subscription: _Subscription) -> None:
        """The control messages, on a channel of their own: a user who may not read them
        (a watcher, ``docs/security.md``) loses that channel, not the events'."""
        channel = subscription.channel = self._connection.channel()  # type: ignore[union-attr]
        try:
            # Declared as workers declare it: a client may listen before any worker ran.
            spec = next(spec for spec in topology.EXCHANGES if spec.name == CONTROL_EXCHANGE)
            channel.exchange_declare(spec.name, spec.kind, durable=spec.durable)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, CONTROL_EXCHANGE, "")
            subscription.consumer_tag = channel.basic_consume(  # JSON only, as workers read them
                queue, _delivery(subscription, Control.decode, "control message", allow_yaml=False),
                auto_ack=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            subscription.channel = None
            log.warning("this client cannot hear control messages (%s): an operation it launches "
                        "goes on launching after a pause or abort sent elsewhere", exc.reply_text)

    def _on_record(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        job_id = props.message_id or props.correlation_id or ""
        try:
            record, _ = codec.decode_object(body, props.content_type, max_bytes=MAX_ENTRY_BYTES)
        except DecodeError as exc:
            log.warning("record of %s refused: %s", job_id, exc)
            return
        assert self._records is not None
        self._records.arrived(job_id, record)

    # ---- other threads -----------------------------------------------------------------------

    def _on_thread(self, fn: Callable[[], None], timeout: float = 30.0) -> None:
        """Run ``fn`` on the listener's thread and wait for it; not at all while disconnected
        (the next connection applies the listener's state anyway)."""
        if threading.current_thread() is self._thread:
            fn()  # a callback of ours, e.g. a subscriber that subscribes
            return
        connection = self._connection
        if connection is None or not self._up.is_set():
            return
        done: cf.Future[None] = cf.Future()

        def run() -> None:
            try:
                fn()
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)

        try:
            connection.add_callback_threadsafe(run)
            done.result(timeout)
        except (*_LOST, cf.TimeoutError) as exc:
            log.warning("listener busy or reconnecting (%r); it applies this once connected", exc)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> _Subscription:
        """Start a subscription; return once it is bound (or, while reconnecting, at once)."""
        subscription = _Subscription(self, list(patterns), callback)
        self._subscriptions.append(subscription)
        self._on_thread(lambda: self._apply(subscription))
        return subscription

    def subscribe_controls(self, callback: Callable[[Control], None]) -> _Subscription:
        """Hear every control message sent from now on; return once bound."""
        subscription = _Subscription(self, None, callback)
        self._subscriptions.append(subscription)
        self._on_thread(lambda: self._apply(subscription))
        return subscription

    def unsubscribe(self, subscription: _Subscription) -> None:
        """End a subscription; its queue goes with its consumer (auto-delete)."""
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

        def cancel() -> None:
            if subscription.channel is not None:
                if subscription.channel.is_open:
                    subscription.channel.close()  # its queue goes with it
                subscription.channel, subscription.consumer_tag = None, None
            elif subscription.consumer_tag is not None and self._channel is not None:
                self._channel.basic_cancel(subscription.consumer_tag)
                subscription.consumer_tag = None

        self._on_thread(cancel)

    def close(self) -> None:
        """Stop the thread and close the connection."""
        self._closing.set()
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(*_LOST):
                connection.add_callback_threadsafe(lambda: None)  # wakes the pump now
        if threading.current_thread() is not self._thread:
            self._thread.join(5)


def _delivery(subscription: _Subscription, decode: Callable[[Any], Any], what: str, *,
              allow_yaml: bool) -> Callable[..., None]:
    """pika's consumer callback for ``subscription``: each body decoded (``decode``), then
    given to its callback; one that cannot be decoded is logged and dropped."""

    def deliver(_ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        try:
            message = decode(codec.decode_object(body, props.content_type, allow_yaml=allow_yaml,
                                                 max_bytes=MAX_ENTRY_BYTES)[0])
        except DecodeError as exc:
            log.warning("%s refused: %s", what, exc)
            return
        try:
            subscription.callback(message)
        except Exception:
            log.exception("subscriber callback failed")

    return deliver
