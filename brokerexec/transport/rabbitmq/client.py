"""The asyncio client transport, on aio-pika: what :class:`~brokerexec.AsyncClient` uses.

The connection lives on a thread and event loop of its own
(:class:`~.connection.AmqpConnection`: it comes back by itself, and heartbeats never
wait for the caller's loop). Each method runs there and is awaited from the caller's loop
through a wrapped future: no thread is held while waiting, however long. Event callbacks are
moved to the loop that subscribed.

What a call does on the wire is decided in :mod:`brokerexec.protocol.calls`, the very calls
the blocking transport (``transport/pika/client.py``) drives; this module only moves the bytes. RPCs
use RabbitMQ's direct reply-to on a channel of their own, in confirm mode with returns
raised, so a job no worker holds comes back as a ``basic.return`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from ... import codec
from ...constants import DEFAULT_LOCATE_TIMEOUT, MAX_ENTRY_BYTES
from ...errors import AccessRefused, BrokerConnectionError, DecodeError
from ...protocol import calls, history, lookups
from ...protocol.commands import (
    Browse,
    Gather,
    Incoming,
    NextReply,
    Publish,
    QueueExists,
    ReadJournal,
    Request,
    Routed,
)
from ...protocol.events import Event
from ...protocol.history import HistoryPage, HistoryQuery
from ...protocol.intents import Signal
from ...protocol.lookups import Listing
from ...protocol.messages import Control, Launch
from ...protocol.names import DIRECT_REPLY_TO, EVENTS_EXCHANGE
from ..base import AsyncClientTransport, Subscription, client_info
from ..pushed_records import PushedRecords
from .connection import AmqpConnection
from .connection_settings import ConnectionSettings
from .declare import declare_for_clients
from .journal_reader import browse, queue_exists, read_journal

__all__ = ["RabbitClientTransport"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_subscription_ids = itertools.count()

#: What a connection that died under a call raises in aiormq and aio-pika.
_LOST = (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
         RuntimeError)


class _AmqpSubscription:
    def __init__(self, connection: AmqpConnection, key: str) -> None:
        self._connection, self._key = connection, key

    def close(self) -> None:
        if self._connection.loop.is_running():
            self._connection.submit(self._connection.setups.remove(self._key))


class RabbitClientTransport(AsyncClientTransport):
    """See the module docstring.

    Parameters:
        settings: how to reach the broker.
        locate_timeout: how long an RPC to a job not claimed yet waits for its worker.
    """

    def __init__(self, settings: ConnectionSettings, *,
                 locate_timeout: float = DEFAULT_LOCATE_TIMEOUT) -> None:
        self.settings = settings
        self.locate_timeout = locate_timeout
        self.connection = AmqpConnection(settings)
        self.records = PushedRecords()
        self._replies: dict[str, deque[Incoming]] = {}
        self._replied: dict[str, asyncio.Event] = {}
        self._offered: set[str] = set()  # services known to have a launch queue

    async def _on_connection(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the connection's loop; await it from the caller's."""
        return await asyncio.wrap_future(self.connection.submit(coro))

    async def connect(self) -> None:
        connection = self.connection
        await asyncio.to_thread(connection.start)
        try:
            for key, setup, confirms in (("topology", declare_for_clients, False),
                                         ("records", self._setup_records, False),
                                         ("rpc", self._setup_rpc, True)):
                await self._on_connection(connection.setups.add(key, setup, confirms=confirms))
        except aiormq.exceptions.ChannelAccessRefused as exc:
            # The user may not declare what every client declares (docs/security.md): no
            # retry will mend that, and the connection's thread must not outlive it.
            await asyncio.to_thread(connection.close, 0)
            raise AccessRefused(f"the broker refused: {exc}") from exc

    # ---- the records pushed to us, and the RPC replies ---------------------------------------

    async def _setup_records(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.records.disconnected()  # what was expected on an older connection: the stream has it
        queue = await channel.declare_queue(self.records.connected(), exclusive=True)
        await queue.consume(self._on_record, no_ack=True)  # type: ignore[arg-type]

    def _on_record(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        job_id = message.message_id or message.correlation_id or ""
        try:
            record, _ = codec.decode_object(message.body, message.content_type,
                                            max_bytes=MAX_ENTRY_BYTES)
        except DecodeError as exc:
            log.warning("record of %s refused: %s", job_id, exc)
            return
        self.records.arrived(job_id, record)

    async def _setup_rpc(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)  # type: ignore[arg-type]

    def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        inbox = self._replies.get(correlation_id)
        if inbox is None:
            return  # a late reply to something we gave up on
        inbox.append(Incoming(message.body, message.content_type))
        self._replied[correlation_id].set()

    # ---- moving the bytes of a call (loop thread) --------------------------------------------

    async def _run(self, call: calls.Call[T], what: str) -> T:
        correlation_ids: list[str] = []

        async def next_reply(correlation_id: str, seconds: float | None) -> Incoming | None:
            inbox, replied = self._replies[correlation_id], self._replied[correlation_id]
            if not inbox:
                replied.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(replied.wait(), seconds)
            return inbox.popleft() if inbox else None

        async def act(command: Any) -> Any:
            reading = self._reading(command)
            if reading is not None:
                return await reading
            if isinstance(command, Publish):
                return await asyncio.gather(*(self._publish(message, command.mandatory)
                                              for message in command.messages))
            if isinstance(command, Request):
                correlation_id = command.message.correlation_id or ""
                if correlation_id not in self._replies:
                    self._replies[correlation_id] = deque()
                    self._replied[correlation_id] = asyncio.Event()
                    correlation_ids.append(correlation_id)
                # Confirmed here: aio-pika tells a return only to a confirm-mode channel.
                routed = await self._publish(command.message, mandatory=True)
                return routed if routed is not Routed.DELIVERED else await next_reply(
                    correlation_id, command.seconds)
            if isinstance(command, NextReply):
                return await next_reply(command.correlation_id, command.seconds)
            inbox = self._replies[command.correlation_id]
            assert isinstance(command, Gather)
            await asyncio.sleep(command.seconds)
            gathered = list(inbox)
            inbox.clear()
            return gathered

        try:
            return await calls.drive_async(call, act)
        except _LOST as exc:  # the connection died under the call: say so plainly
            raise BrokerConnectionError(f"connection lost during {what}: {exc!r}") from exc
        finally:
            for correlation_id in correlation_ids:
                self._replies.pop(correlation_id, None)
                self._replied.pop(correlation_id, None)

    def _reading(self, command: Any) -> Coroutine[Any, Any, Any] | None:
        """The commands that read the broker's state rather than exchange messages."""
        if isinstance(command, QueueExists):
            return queue_exists(self.connection, command.name)
        if isinstance(command, ReadJournal):
            return read_journal(self.connection, command.reader, command.seconds)
        if isinstance(command, Browse):
            return browse(self.connection, command.queues, command.limit)
        return None

    async def _publish(self, message: calls.Message, mandatory: bool) -> Routed:
        await self.connection.wait_connected(self.settings.connect_timeout)
        # Requests wanting a reply go on the channel that consumes the direct reply-to.
        channel = self.connection.setups.channel_of("rpc") if message.reply_to == DIRECT_REPLY_TO else None
        if message.reply_to == DIRECT_REPLY_TO and channel is None:
            raise BrokerConnectionError("the reply channel is not open (reconnecting)")
        body = aio_pika.Message(
            message.body, content_type=message.content_type, correlation_id=message.correlation_id,
            reply_to=message.reply_to, headers=dict(message.headers) if message.headers else None,
            message_id=message.message_id, type=message.type,
            expiration=None if message.expiration_ms is None else message.expiration_ms / 1000,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if message.persistent
            else aio_pika.DeliveryMode.NOT_PERSISTENT)
        try:
            if channel is None:
                await self.connection.publish(message.exchange, message.routing_key, body,
                                              mandatory=mandatory,
                                              timeout=self.settings.connect_timeout * 2)
            else:
                target = (channel.default_exchange if not message.exchange
                          else await channel.get_exchange(message.exchange, ensure=False))
                await target.publish(body, message.routing_key, mandatory=mandatory)
        except aio_pika.exceptions.DeliveryError:
            return Routed.RETURNED
        except aiormq.exceptions.ChannelNotFoundEntity:
            return Routed.NO_EXCHANGE
        return Routed.DELIVERED

    # ---- AsyncClientTransport ----------------------------------------------------------------

    async def launch(self, launches: list[Launch]) -> None:
        reply_to = self.records.note_launched([launch.job_id for launch in launches])
        await self._on_connection(self._run(calls.launches(launches, reply_to=reply_to,
                                                           offered=self._offered),
                                            f"the launch of {len(launches)} job(s)"))

    async def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any:
        return await self._on_connection(self._run(calls.rpc(
            job_id, signal, timeout=timeout, locate_timeout=self.locate_timeout,
            max_bytes=self.settings.max_message_bytes), f"{signal.describe()} to job {job_id}"))

    async def status(self, job_id: str, timeout: float) -> dict[str, Any]:
        return await self._on_connection(self._run(lookups.status(
            job_id, timeout=timeout, locate_timeout=self.locate_timeout,
            max_bytes=self.settings.max_message_bytes), f"the status of job {job_id}"))

    async def history(self, query: HistoryQuery, timeout: float) -> HistoryPage:
        return await self._on_connection(self._run(history.ask(
            query, timeout=timeout, max_bytes=self.settings.max_message_bytes), "a history query"))

    async def abort(self, job_id: str, timeout: float) -> bool:
        return await self._on_connection(self._run(lookups.abort(
            job_id, timeout=timeout, locate_timeout=self.locate_timeout,
            max_bytes=self.settings.max_message_bytes, by=client_info()), f"the abort of job {job_id}"))

    async def control(self, control: Control) -> None:
        await self._on_connection(self._run(calls.control(control), f"control {control.intent.value!r}"))

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        loop = asyncio.get_running_loop()

        def deliver(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            try:
                body, _ = codec.decode_object(message.body, message.content_type,
                                              max_bytes=MAX_ENTRY_BYTES)
                event = Event.decode(body)
            except DecodeError as exc:
                log.warning("event refused: %s", exc)
                return
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens
                loop.call_soon_threadsafe(callback, event)

        async def setup(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
            for pattern in patterns:
                await queue.bind(exchange, pattern)
            await queue.consume(deliver, no_ack=True)  # type: ignore[arg-type]

        key = f"subscription:{next(_subscription_ids)}"
        # Bound before this returns, so no event after it is missed (a blocking step of one
        # round trip on the caller's loop, as rare as subscriptions are).
        self.connection.submit(self.connection.setups.add(key, setup)).result(30)
        return _AmqpSubscription(self.connection, key)

    async def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        pushed = self.records.future(job_id)
        if pushed is not None and pushed.done() and pushed.exception() is None:
            return pushed.result()
        if pushed is not None and timeout != 0:  # it comes to this connection: no thread
            try:
                return await asyncio.wait_for(asyncio.wrap_future(pushed), timeout)
            except asyncio.TimeoutError:
                return None
            except ConnectionError:
                pass  # the connection changed meanwhile: the stream has it
        elif pushed is not None:
            pushed.cancel()  # "has it ended?": the push may be on its way; the stream knows
        remaining = None if timeout is None else max(timeout - (loop.time() - started), 0.0)
        return await self._on_connection(self._run(lookups.result(
            job_id, remaining, max_bytes=self.settings.max_message_bytes),
            f"the look-up of job {job_id}'s record"))

    async def list_jobs(self, timeout: float, *, services: Iterable[str] = (),
                        ended_since: float | None = None, limit: int = 1000) -> Listing:
        return await self._on_connection(self._run(lookups.listing(
            timeout=timeout, max_bytes=self.settings.max_message_bytes, services=tuple(services),
            ended_since=ended_since, limit=limit), "the jobs listing"))

    async def close(self) -> None:
        await asyncio.to_thread(self.connection.close)

    @property
    def reconnects(self) -> int:
        """How many times the connection was lost and made again."""
        return self.connection.reconnects
