"""The client's side of the RabbitMQ transport (docs/protocol.md is its specification).

RPCs use RabbitMQ's direct reply-to: requests are published on the very channel that
consumes ``amq.rabbitmq.reply-to``, as mandatory, so a job no worker holds comes back as a
``basic.return`` at once instead of a time-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from .. import codec
from ..constants import (
    CONTROL_EXCHANGE,
    DIRECT_REPLY_TO,
    EVENTS_EXCHANGE,
    KIWIPY_EXCHANGE,
    LAUNCH_QUEUE,
    WORKERS_EXCHANGE,
    result_queue,
    rpc_routing_key,
)
from ..errors import BrokerConnectionError, DecodeError, JobNotFound, Timeout
from ..protocol import Event, result_from_reply
from . import amqp_topology as topology
from .amqp import AmqpConnection, ConnectionSettings
from .base import ClientTransport

__all__ = ["RabbitClientTransport"]

log = logging.getLogger(__name__)
_subscription_ids = itertools.count()


class _AmqpSubscription:
    def __init__(self, transport: RabbitClientTransport, key: str) -> None:
        self._transport, self._key = transport, key

    def close(self) -> None:
        if self._transport.connection.loop.is_running():
            self._transport.connection.remove_setup(self._key).result(10)


class RabbitClientTransport(ClientTransport):
    """See the module docstring."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self.connection = AmqpConnection(settings)
        #: correlation id -> what to do with each reply to it (on the loop thread)
        self._waiting: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._local = threading.local()  # the fast RPC path: one pika channel per thread
        self._fast_all: list[Any] = []
        self._fast_lock = threading.Lock()
        self.connection.start()
        self.connection.add_setup("topology", topology.declare_all).result(30)
        self.connection.add_setup("rpc", self._setup_rpc, confirms=True).result(30)

    # ---- RPC -------------------------------------------------------------------------------

    async def _setup_rpc(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await queue.consume(self._on_reply, no_ack=True)

    def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> Any:
        deliver = self._waiting.get(message.correlation_id or "")
        if deliver is None:
            return None
        try:
            body, _ = codec.decode_object(message.body, message.content_type,
                                          max_bytes=self.settings.max_message_bytes)
        except DecodeError as exc:
            body = {"exception": f"undecodable reply: {exc}"}
        deliver(body)
        return None

    async def _publish_rpc(self, exchange: str, routing_key: str, body: dict[str, Any],
                           correlation_id: str, mandatory: bool) -> None:
        await self.connection.wait_connected(self.settings.connect_timeout)
        channel = self.connection.channel_of("rpc")
        if channel is None:
            raise BrokerConnectionError("the reply channel is not open (reconnecting)")
        target = (channel.default_exchange if not exchange
                  else await channel.get_exchange(exchange, ensure=False))
        await target.publish(aio_pika.Message(
            codec.encode(body), content_type=codec.JSON, correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
            routing_key, mandatory=mandatory)

    async def _rpc(self, job_id: str, body: dict[str, Any], timeout: float) -> Any:
        correlation_id = uuid.uuid4().hex
        final: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def deliver(reply: dict[str, Any]) -> None:
            # "pending" replies only say the final one follows; the deadline stays.
            if "pending" not in reply and not final.done():
                final.set_result(reply)

        self._waiting[correlation_id] = deliver
        try:
            try:
                await self._publish_rpc(KIWIPY_EXCHANGE, rpc_routing_key(job_id), body,
                                        correlation_id, mandatory=True)
            except aiormq.exceptions.DeliveryError:  # returned unroutable: nobody holds it
                raise JobNotFound(f"no worker holds job {job_id} (it ended or never existed)"
                                  ) from None
            return result_from_reply(await asyncio.wait_for(final, timeout))
        except asyncio.TimeoutError:
            raise Timeout(f"job {job_id} did not answer {body.get('intent')!r} "
                          f"within {timeout} s") from None
        except (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                RuntimeError) as exc:  # the connection died under the call: say so plainly
            raise BrokerConnectionError(f"connection lost during {body.get('intent')!r} to job "
                                        f"{job_id}: {exc!r}") from exc
        finally:
            self._waiting.pop(correlation_id, None)

    def rpc(self, job_id: str, body: dict[str, Any], timeout: float) -> Any:
        # Fast path: a blocking pika channel of the calling thread, used only during a call
        # (so it needs no heartbeats), saves the hop to the loop thread and back: on par
        # with raw aio-pika instead of about 1.4x (docs/performance.md).
        fast = self._fast_rpc()
        if fast is not None:
            try:
                return fast.rpc(job_id, body, timeout)
            except BrokerConnectionError:
                self._local.pika = None  # a fresh one next time
                if body.get("intent") in ("set", "invoke"):
                    raise  # it may have run: never send it twice
        return self.connection.submit(self._rpc(job_id, body, timeout)).result(timeout + 30)

    def _fast_rpc(self) -> Any:
        fast = getattr(self._local, "pika", None)
        if fast is None and self.connection.connected:
            from ..oneshot import PikaTransport  # pika: only loaded by clients that call

            try:
                fast = PikaTransport(self.settings.plain_url(), connect_timeout=self.settings.connect_timeout,
                                     name=f"{self.settings.name}-rpc", heartbeat=0)
            except BrokerConnectionError:
                return None
            self._local.pika = fast
            with self._fast_lock:
                self._fast_all.append(fast)
        return fast

    # ---- launch, control ---------------------------------------------------------------------

    def launch(self, body: dict[str, Any]) -> None:
        message = aio_pika.Message(codec.encode(body), content_type=codec.JSON,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   message_id=str(body.get("job_id")))
        self.connection.submit(self.connection.publish(
            "", LAUNCH_QUEUE, message, mandatory=True, timeout=self.settings.connect_timeout * 2)
        ).result()

    def control(self, body: dict[str, Any]) -> None:
        message = aio_pika.Message(codec.encode(body), content_type=codec.JSON,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   message_id=uuid.uuid4().hex)
        self.connection.submit(self.connection.publish(
            CONTROL_EXCHANGE, "", message, timeout=self.settings.connect_timeout * 2)).result()

    # ---- events ----------------------------------------------------------------------------

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> _AmqpSubscription:
        def deliver(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            try:
                body, _ = codec.decode_object(message.body, message.content_type,
                                              max_bytes=self.settings.max_message_bytes)
                event = Event.decode(body)
            except DecodeError as exc:
                log.warning("event refused: %s", exc)
                return
            try:
                callback(event)
            except Exception:
                log.exception("subscriber callback failed")

        async def setup(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
            for pattern in patterns:
                await queue.bind(exchange, pattern)
            await queue.consume(deliver, no_ack=True)  # type: ignore[arg-type]

        key = f"subscription:{next(_subscription_ids)}"
        self.connection.add_setup(key, setup).result(30)
        return _AmqpSubscription(self, key)

    # ---- results and the jobs query ---------------------------------------------------------

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        while True:  # a reconnect in the middle of waiting: wait again on the new connection
            try:
                return self.connection.submit(self._fetch_result(job_id, timeout)).result()
            except (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                    RuntimeError, asyncio.TimeoutError) as exc:
                log.warning("fetching the result of %s interrupted (%r); again", job_id, exc)

    async def _fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        await self.connection.wait_connected(self.settings.connect_timeout)
        assert self.connection._connection is not None
        channel = await asyncio.wait_for(
            self.connection._connection.channel(publisher_confirms=False), 10)
        try:
            await asyncio.wait_for(topology.declare_result_queue(channel, job_id), 10)
            queue = await channel.get_queue(result_queue(job_id), ensure=False)
            if timeout == 0:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    return None
                await message.nack(requeue=True)
                return codec.decode_object(message.body, message.content_type)[0]
            found: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

            async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                # Read it and put it back: the record stays for every other reader.
                await message.nack(requeue=True)
                if not found.done():
                    try:
                        found.set_result(codec.decode_object(message.body, message.content_type)[0])
                    except DecodeError as exc:
                        found.set_exception(exc)

            await channel.set_qos(prefetch_count=1)
            tag = await queue.consume(take)
            try:
                return await asyncio.wait_for(asyncio.shield(found), timeout)
            except asyncio.TimeoutError:
                return None
            finally:
                await queue.cancel(tag)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 5)

    def query_jobs(self, timeout: float) -> list[dict[str, Any]]:
        return self.connection.submit(self._query_jobs(timeout)).result(timeout + 30)

    async def _query_jobs(self, timeout: float) -> list[dict[str, Any]]:
        correlation_id = uuid.uuid4().hex
        jobs: list[dict[str, Any]] = []

        def deliver(reply: dict[str, Any]) -> None:
            answer = reply.get("result")
            if isinstance(answer, dict):
                for job in answer.get("jobs") or []:
                    job.setdefault("worker", answer.get("worker"))
                    jobs.append(job)

        self._waiting[correlation_id] = deliver
        try:
            await self._publish_rpc(WORKERS_EXCHANGE, "", {"intent": "jobs"}, correlation_id,
                                    mandatory=False)
            # Every worker answers once; their number is unknown, so gather for `timeout`.
            await asyncio.sleep(timeout)
        finally:
            self._waiting.pop(correlation_id, None)
        return jobs

    def close(self) -> None:
        with self._fast_lock:
            fast_all, self._fast_all = self._fast_all, []
        for fast in fast_all:
            with contextlib.suppress(Exception):
                fast.close()
        self.connection.close()


