"""One thread's pika connection: what moves the bytes of the blocking client's calls.

pika is not thread-safe, so each calling thread of a
:class:`~.client.PikaClientTransport` gets a :class:`Caller` of its own: a
``BlockingConnection`` used only while a call runs, with two channels. Requests (RPCs, the
``jobs`` query) go on one that consumes RabbitMQ's direct reply-to, without publisher
confirms: the reply, or the return of an unroutable request, is the broker's answer, and
waiting for a confirm first would cost a round trip. Launches and control messages, which
must be stored, go on a channel in confirm mode. :meth:`Caller.run` drives a call of
:mod:`brokerexec.protocol.calls` or :mod:`~brokerexec.protocol.lookups`; reading the journal
and browsing queues are in ``journal_reader.py``. Every pika error becomes one of ours:
connection trouble :class:`Lost` (a :class:`~brokerexec.BrokerConnectionError`), a refusal
by the broker :class:`~brokerexec.BrokerExecError`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import pika
import pika.exceptions

from ...errors import AccessRefused, BrokerConnectionError, BrokerExecError
from ...protocol import calls
from ...protocol.commands import (
    Browse,
    Call,
    Gather,
    Incoming,
    NextReply,
    Publish,
    QueueExists,
    ReadJournal,
    Request,
    Routed,
)
from ...protocol.names import DIRECT_REPLY_TO
from ...urls import redacted_url
from .internals import closing_reason, join_frame_writes
from .journal_reader import browse, read_journal

if TYPE_CHECKING:
    from ...protocol.topology import QueueSpec

__all__ = ["Caller", "Lost"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = 404
_ACCESS_REFUSED = 403
_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionClosed,
         pika.exceptions.StreamLostError, pika.exceptions.ChannelWrongStateError,
         pika.exceptions.ConnectionWrongStateError, OSError)


class Lost(BrokerConnectionError):
    """The caller's connection broke during a call."""


def _reason(exc: BaseException) -> str:
    """pika nests the cause in args and ``.exception``; dig out something a person can read."""
    for _ in range(5):
        inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        inner = inner or getattr(exc, "exception", None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return str(exc) or type(exc).__name__


class Caller:
    """One thread's connection and confirm channel: moves the bytes of its calls."""

    def __init__(self, parameters: Sequence[pika.ConnectionParameters], url: str, max_bytes: int) -> None:
        self.url = url
        self.max_bytes = max_bytes
        self._parameters = parameters
        try:
            self.connection = pika.BlockingConnection(parameters)
        except (pika.exceptions.AMQPError, OSError) as exc:  # OSError: pika lets TLS's through
            raise BrokerConnectionError(
                f"cannot reach the broker at {redacted_url(url)}: {_reason(exc)}") from exc
        join_frame_writes(self.connection)
        self.owner = threading.current_thread()
        self._requests: Any = None  # no confirms; consumes direct reply-to
        self._confirming: Any = None  # confirm mode, for what must be stored
        self._transacting: Any = None  # a transaction: many stored with one round trip
        self._passive: Any = None  # passive declares: a missing queue closes it
        self._returned_ids: set[str] = set()  # message ids of a transaction's returns
        self._declared: set[str] = set()  # objects declared on this connection
        self._replies: dict[str, deque[Incoming]] = {}
        self._returned: set[str] = set()  # correlation ids of requests that came back
        self._idle_since = time.monotonic()

    #: A connection idle this long is checked before a call: one the broker closed
    #: meanwhile is then noticed before anything is sent on it.
    IDLE_CHECK = 1.0

    @property
    def alive(self) -> bool:
        """False once the connection is known broken."""
        if not self.connection.is_open:
            return False
        if time.monotonic() - self._idle_since < self.IDLE_CHECK:
            return True  # pumped a moment ago: a close sent before then was seen
        try:
            self.connection.process_data_events(time_limit=0)
        except _LOST:
            return False
        return bool(self.connection.is_open)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn pika's exceptions into brokerexec's (see the module docstring)."""
        try:
            yield
        except BrokerExecError:
            raise  # ours already (a Timeout is an OSError too)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._confirming = None
            kind = AccessRefused if exc.reply_code == _ACCESS_REFUSED else BrokerExecError
            raise kind(f"the broker refused: {exc.reply_code} {exc.reply_text}") from exc
        except pika.exceptions.NackError as exc:
            raise BrokerConnectionError("the broker did not accept the message (nack)") from exc
        except _LOST as exc:
            raise Lost(f"lost the connection to {redacted_url(self.url)}: {_reason(exc)}") from exc

    def requests(self) -> Any:
        """The request channel, (re)opened after the broker closed it.

        Direct reply-to only works on the channel that consumes it, so every request goes
        through this one channel.
        """
        if self._requests is None or not self._requests.is_open:
            channel = self.connection.channel()
            channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
            channel.add_on_return_callback(self._on_return)
            self._requests = channel
        return self._requests

    def confirming(self) -> Any:
        """The confirm-mode channel, (re)opened after the broker closed it."""
        if self._confirming is None or not self._confirming.is_open:
            channel = self.connection.channel()
            channel.confirm_delivery()
            self._confirming = channel
        return self._confirming

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        waiting = self._replies.get(props.correlation_id or "")
        if waiting is not None:  # else a late reply to something we gave up on
            waiting.append(Incoming(body, props.content_type))

    def _on_return(self, _ch: Any, _method: Any, props: pika.BasicProperties, _body: bytes) -> None:
        if props.correlation_id in self._replies:
            self._returned.add(props.correlation_id)

    def pump(self, until: Callable[[], bool], timeout: float | None, connection: Any = None) -> bool:
        """Pump the connection until ``until()`` or the time-out; True if it came true."""
        connection = connection or self.connection
        deadline = None if timeout is None else time.monotonic() + timeout
        while not until():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            connection.process_data_events(time_limit=min(0.05, remaining or 0.05))
        self._idle_since = time.monotonic()
        return True

    # ---- running a call ----------------------------------------------------------------------

    def run(self, call: Call[T]) -> T:
        """Drive ``call`` (``brokerexec.protocol.calls``) to its answer."""
        correlation_ids: list[str] = []

        def act(command: Any) -> Any:
            if isinstance(command, Publish) and len(command.messages) > 1:
                return self._publish_together(command)
            if isinstance(command, Publish):
                return [self._publish(message, command.mandatory) for message in command.messages]
            if isinstance(command, QueueExists):
                return self.queue_exists(command.name)
            if isinstance(command, ReadJournal):
                return read_journal(self._parameters, command.reader, command.seconds, self.pump)
            if isinstance(command, Browse):
                return browse(self.connection, command.queues, command.limit, self.pump)
            if isinstance(command, Request):
                if command.message.correlation_id not in self._replies:
                    self._replies[command.message.correlation_id or ""] = deque()
                    correlation_ids.append(command.message.correlation_id or "")
                return self._request(command)
            inbox = self._replies.setdefault(command.correlation_id, deque())
            if isinstance(command, NextReply):
                self.pump(lambda: bool(inbox), command.seconds)
                return inbox.popleft() if inbox else None
            assert isinstance(command, Gather)
            self.pump(lambda: False, command.seconds)
            gathered = list(inbox)
            inbox.clear()
            return gathered

        try:
            with self.errors():
                return calls.drive(call, act)
        finally:
            for correlation_id in correlation_ids:
                self._replies.pop(correlation_id, None)
                self._returned.discard(correlation_id)

    def _publish(self, message: calls.Message, mandatory: bool) -> Routed:
        """A confirmed publish (launches, control)."""
        try:
            self.confirming().basic_publish(message.exchange, message.routing_key, message.body,
                                            _properties(message), mandatory=mandatory)
        except pika.exceptions.UnroutableError:
            return Routed.RETURNED
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != _NOT_FOUND:
                raise
            self._confirming = None
            return Routed.NO_EXCHANGE
        return Routed.DELIVERED

    def _publish_together(self, command: Publish) -> list[Routed]:
        """Many publishes in flight together, with one round trip for all: a transaction.

        pika's blocking channel waits for each confirm in turn; ``tx.commit`` answers once
        every message of the transaction is stored (as a confirm would, for all at once).
        Returns of mandatory messages arrive before the ``commit-ok``.
        """
        if self._transacting is None or not self._transacting.is_open:
            channel = self.connection.channel()
            channel.tx_select()
            channel.add_on_return_callback(
                lambda _ch, _m, props, _b: self._returned_ids.add(props.message_id or ""))
            self._transacting = channel
        channel = self._transacting
        self._returned_ids.clear()
        try:
            for message in command.messages:
                channel.basic_publish(message.exchange, message.routing_key, message.body,
                                      _properties(message), mandatory=command.mandatory)
            channel.tx_commit()
            self.connection.process_data_events(time_limit=0)  # the returns, dispatched
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._transacting = None
            if exc.reply_code != _NOT_FOUND:
                raise
            return [Routed.NO_EXCHANGE] * len(command.messages)
        return [Routed.RETURNED if (m.message_id or "") in self._returned_ids else Routed.DELIVERED
                for m in command.messages]

    def _request(self, command: Request) -> Incoming | Routed | None:
        """Publish a request (mandatory, unconfirmed); wait for its reply or its return."""
        message, correlation_id = command.message, command.message.correlation_id or ""
        inbox, channel = self._replies[correlation_id], self.requests()
        self._returned.discard(correlation_id)  # a locate resends what came back just now
        channel.basic_publish(message.exchange, message.routing_key, message.body,
                              _properties(message), mandatory=True)
        self.pump(lambda: bool(inbox) or correlation_id in self._returned or not channel.is_open,
                  command.seconds)
        if inbox:
            return inbox.popleft()
        if correlation_id in self._returned:
            return Routed.RETURNED
        if not channel.is_open:  # the broker closed it: the exchange is missing, or a refusal
            return self._why_closed(message.exchange, closing_reason(channel))
        return None

    def _why_closed(self, exchange: str, reason: str | None) -> Routed:
        """The request channel was closed by the broker after a publish to ``exchange``:
        NO_EXCHANGE if that exchange does not exist; else the refusal, raised."""
        probe = self.connection.channel()
        try:
            probe.exchange_declare(exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == _NOT_FOUND:
                return Routed.NO_EXCHANGE
            raise
        with contextlib.suppress(*_LOST, pika.exceptions.AMQPError):
            probe.close()
        if reason:
            kind = AccessRefused if reason.startswith(f"{_ACCESS_REFUSED} ") else BrokerExecError
            raise kind(f"the broker refused a request to {exchange!r}: {reason}")
        raise BrokerExecError(f"the broker closed the channel of a request to {exchange!r}")

    # ---- declarations ------------------------------------------------------------------------

    def queue_exists(self, name: str) -> bool:
        """True if queue ``name`` exists (a passive declare)."""
        if self._passive is None or not self._passive.is_open:
            self._passive = self.connection.channel()
        try:
            self._passive.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._passive = None
            if exc.reply_code != _NOT_FOUND:
                raise
            return False
        return True

    def declare_queue(self, spec: QueueSpec) -> None:
        """Declare a queue (and its bindings) once per connection, exactly as workers do."""
        if spec.name in self._declared:
            return
        from ...protocol import topology  # only control declares: not a status
        with self.errors():
            channel = self.confirming()
            for exchange in topology.EXCHANGES:
                if exchange.name in spec.bound_to:
                    channel.exchange_declare(exchange.name, exchange.kind, durable=exchange.durable)
            channel.queue_declare(spec.name, durable=True, arguments=dict(spec.arguments))
            for exchange_name in spec.bound_to:
                channel.queue_bind(spec.name, exchange_name, spec.routing_key)
        self._declared.add(spec.name)

    def close(self) -> None:
        with contextlib.suppress(*_LOST, pika.exceptions.AMQPError):
            if self.connection.is_open:
                self.connection.close()


def _properties(message: calls.Message) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=message.content_type, delivery_mode=2 if message.persistent else 1,
        correlation_id=message.correlation_id, reply_to=message.reply_to,
        message_id=message.message_id, type=message.type,
        expiration=None if message.expiration_ms is None else str(message.expiration_ms),
        headers=dict(message.headers) if message.headers else None)
