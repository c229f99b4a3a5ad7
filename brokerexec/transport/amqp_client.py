"""The client's side of the RabbitMQ transport (docs/protocol.md is its specification).

RPCs use RabbitMQ's direct reply-to: requests are published on the very channel that
consumes ``amq.rabbitmq.reply-to``, as mandatory, so a job no worker holds comes back as a
``basic.return`` at once instead of a time-out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
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
    DEADLINE_MS_HEADER,
    DEFAULT_LOCATE_TIMEOUT,
    DIRECT_REPLY_TO,
    EVENTS_EXCHANGE,
    JOB_ID_HEADER,
    KIWIPY_EXCHANGE,
    LAUNCH_QUEUE,
    WORKERS_EXCHANGE,
    rpc_routing_key,
)
from ..errors import BrokerConnectionError, DecodeError, JobNotFound, Timeout
from ..protocol import Event, deadline_header, result_from_reply
from . import amqp_topology as topology
from .amqp import AmqpConnection, ConnectionSettings
from .amqp_records import Records
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
        #: correlation id -> what to do with each reply to it (on the loop thread)
        self._waiting: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._local = threading.local()  # the fast RPC path: one pika channel per thread
        self._fast_all: list[Any] = []
        self._fast_lock = threading.Lock()
        self.records = Records(self.connection, settings)  # of jobs launched here
        self.connection.start()
        self.connection.add_setup("topology", topology.declare_all).result(30)
        self.connection.add_setup("records", self.records.setup).result(30)
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
                           correlation_id: str, mandatory: bool,
                           headers: dict[str, Any] | None = None) -> None:
        await self.connection.wait_connected(self.settings.connect_timeout)
        channel = self.connection.channel_of("rpc")
        if channel is None:
            raise BrokerConnectionError("the reply channel is not open (reconnecting)")
        target = (channel.default_exchange if not exchange
                  else await channel.get_exchange(exchange, ensure=False))
        await target.publish(aio_pika.Message(
            codec.encode(body), content_type=codec.JSON, correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            headers=headers), routing_key, mandatory=mandatory)

    async def _rpc(self, job_id: str, body: dict[str, Any], timeout: float) -> Any:
        correlation_id = uuid.uuid4().hex
        final: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        answered = asyncio.Event()

        def deliver(reply: dict[str, Any]) -> None:
            # "pending" replies only say the final one follows; the deadline stays.
            answered.set()
            if "pending" not in reply and not final.done():
                final.set_result(reply)

        self._waiting[correlation_id] = deliver
        not_found = JobNotFound(f"no worker holds job {job_id} (it ended, is still queued, "
                                "or never existed)")
        try:
            try:
                await self._publish_rpc(KIWIPY_EXCHANGE, rpc_routing_key(job_id), body,
                                        correlation_id, mandatory=True)
            except aiormq.exceptions.DeliveryError:  # returned unroutable: not claimed (yet)
                # Ask every worker; the one running the job claims it and answers. The
                # deadline makes a late worker drop it rather than act after we gave up.
                headers = {JOB_ID_HEADER: job_id, DEADLINE_MS_HEADER: deadline_header(self.locate_timeout)}
                try:
                    await self._publish_rpc(WORKERS_EXCHANGE, "", body, correlation_id,
                                            mandatory=True, headers=headers)
                    await asyncio.wait_for(answered.wait(), self.locate_timeout + 0.3)
                except (aiormq.exceptions.DeliveryError, asyncio.TimeoutError):
                    raise not_found from None
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
                                     name=f"{self.settings.name}-rpc", heartbeat=0,
                                     locate_timeout=self.locate_timeout)
            except BrokerConnectionError:
                return None
            self._local.pika = fast
            with self._fast_lock:
                self._fast_all.append(fast)
        return fast

    # ---- launch, control ---------------------------------------------------------------------

    def launch(self, body: dict[str, Any]) -> None:
        self.records.note_launched([body])
        fast = self._fast_rpc()  # like RPCs: the calling thread's pika channel, no hop
        if fast is not None:
            try:
                fast.launch(body, reply_to=self.records.queue)
                return
            except BrokerConnectionError:
                self._local.pika = None
                # Not confirmed: it may or may not be queued. Sending it again is safe: the
                # job id is the same, and of two runs of it only one keeps going once claimed.
        self._publish_launches([body])

    def launch_many(self, bodies: list[dict[str, Any]]) -> None:
        self.records.note_launched(bodies)
        self._publish_launches(bodies)

    def _publish_launches(self, bodies: list[dict[str, Any]]) -> None:
        """On the loop thread, all in flight at once, confirms awaited together."""
        messages = [aio_pika.Message(codec.encode(body), content_type=codec.JSON,
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                     message_id=str(body.get("job_id")), reply_to=self.records.queue)
                    for body in bodies]
        timeout = self.settings.connect_timeout * 2 + len(messages) / 1000

        async def send_all() -> None:
            await asyncio.gather(*[self.connection.publish("", LAUNCH_QUEUE, message, mandatory=True,
                                                           timeout=timeout) for message in messages])

        self.connection.submit(send_all()).result()

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

    # ---- records and the jobs query ---------------------------------------------------------

    def record_future(self, job_id: str) -> cf.Future[dict[str, Any]] | None:
        return self.records.future(job_id)

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        return self.records.fetch(job_id, timeout)

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



