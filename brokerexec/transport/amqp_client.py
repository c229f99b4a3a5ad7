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
import time
import uuid
from collections import OrderedDict
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
    PROBE_TYPE,
    RECORD_TYPE,
    RESULTS_STREAM,
    WORKERS_EXCHANGE,
    rpc_routing_key,
)
from ..errors import BrokerConnectionError, DecodeError, JobNotFound, Timeout
from ..protocol import Event, deadline_header, result_from_reply
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
    """See the module docstring.

    Parameters:
        settings: how to reach the broker.
        locate_timeout: how long an RPC to a job not claimed yet waits for its worker.
    """

    #: How many records of jobs launched here are kept for ``fetch_result``.
    RECORDS_KEPT = 10_000

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
        # Records of jobs launched here, pushed by their workers to our own queue.
        self._records_queue = f"brokerexec.client.{uuid.uuid4().hex}"
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._launched_at: dict[str, int] = {}  # job id -> connection number at launch
        self._records_changed = threading.Condition()
        self._record_futures: dict[str, list[cf.Future[dict[str, Any]]]] = {}  # aio waiters
        self.connection.start()
        self.connection.add_setup("topology", topology.declare_all).result(30)
        self.connection.add_setup("records", self._setup_records).result(30)
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
        self._note_launched([body])
        fast = self._fast_rpc()  # like RPCs: the calling thread's pika channel, no hop
        if fast is not None:
            try:
                fast.launch(body, reply_to=self._records_queue)
                return
            except BrokerConnectionError:
                self._local.pika = None
                # Not confirmed: it may or may not be queued. Sending it again is safe: the
                # job id is the same, and of two runs of it only one keeps going once claimed.
        self._publish_launches([body])

    def launch_many(self, bodies: list[dict[str, Any]]) -> None:
        self._note_launched(bodies)
        self._publish_launches(bodies)

    def _note_launched(self, bodies: list[dict[str, Any]]) -> None:
        """Remember the connection each job was launched on: its record is pushed to us."""
        with self._records_changed:
            for body in bodies:
                self._launched_at[str(body.get("job_id"))] = self.connection.reconnects
            while len(self._launched_at) > self.RECORDS_KEPT:
                del self._launched_at[next(iter(self._launched_at))]

    def _publish_launches(self, bodies: list[dict[str, Any]]) -> None:
        """On the loop thread, all in flight at once, confirms awaited together."""
        messages = [aio_pika.Message(codec.encode(body), content_type=codec.JSON,
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                     message_id=str(body.get("job_id")), reply_to=self._records_queue)
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

    # ---- results and the jobs query ---------------------------------------------------------

    async def _setup_records(self, channel: aio_pika.abc.AbstractChannel) -> None:
        # Exclusive: it goes with our connection. Records pushed while it was gone are
        # found in the stream instead (fetch_result knows when to look there).
        queue = await channel.declare_queue(self._records_queue, exclusive=True)
        with self._records_changed:  # a new connection: what waiters expected may be lost
            waiting, self._record_futures = self._record_futures, {}
        for futures in waiting.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ConnectionError("reconnected: read the records stream"))
        await queue.consume(self._on_record, no_ack=True)  # type: ignore[arg-type]

    def _on_record(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        job_id = message.message_id or message.correlation_id or ""
        try:
            record, _ = codec.decode_object(message.body, message.content_type,
                                            max_bytes=self.settings.max_message_bytes)
        except DecodeError as exc:
            log.warning("record of %s refused: %s", job_id, exc)
            return
        with self._records_changed:
            self._records[job_id] = record
            while len(self._records) > self.RECORDS_KEPT:
                evicted, _ = self._records.popitem(last=False)
                self._launched_at.pop(evicted, None)  # read from the stream from now on
            self._records_changed.notify_all()
            futures = self._record_futures.pop(job_id, [])
        for future in futures:
            if not future.done():
                future.set_result(record)

    def record_future(self, job_id: str) -> cf.Future[dict[str, Any]] | None:
        future: cf.Future[dict[str, Any]] = cf.Future()
        with self._records_changed:
            if job_id in self._records:
                future.set_result(self._records[job_id])
                return future
            if (self._launched_at.get(job_id) != self.connection.reconnects
                    or not self.connection.connected):
                return None  # not launched on this connection: the stream has it
            self._record_futures.setdefault(job_id, []).append(future)
        future.add_done_callback(lambda f: self._forget_future(job_id, f))
        return future

    def _forget_future(self, job_id: str, future: cf.Future[dict[str, Any]]) -> None:
        if not future.cancelled():
            return  # resolved: already taken out of the table
        with self._records_changed:
            futures = self._record_futures.get(job_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._record_futures.pop(job_id, None)

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._records_changed:
            launched = self._launched_at.get(job_id)
            # Launched here on the connection we still have: its worker pushes the record to
            # us, so waiting here is enough. Otherwise the stream has it.
            while launched == self.connection.reconnects and self.connection.connected:
                if job_id in self._records:
                    return self._records[job_id]
                remaining = None if deadline is None else deadline - time.monotonic()
                if timeout == 0:
                    break  # "has it ended?": the push may be on its way; the stream knows
                if remaining is not None and remaining <= 0:
                    return None
                self._records_changed.wait(1.0 if remaining is None else min(remaining, 1.0))
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
        while True:  # a reconnect in the middle of reading: read again on the new connection
            try:
                return self.connection.submit(self._read_records(job_id, remaining)).result()
            except (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                    RuntimeError, asyncio.TimeoutError) as exc:
                log.warning("reading the record of %s interrupted (%r); again", job_id, exc)

    async def _read_records(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """Read the records stream from the job's launch time until its record shows.

        Without a wait (``timeout == 0``) we append a probe and stop when we read it back:
        a stream has no end marker over AMQP 0-9-1, and everything stored before the probe
        comes before it.
        """
        await self.connection.wait_connected(self.settings.connect_timeout)
        assert self.connection._connection is not None
        channel = await asyncio.wait_for(
            self.connection._connection.channel(publisher_confirms=False), 10)
        try:
            await channel.set_qos(prefetch_count=500)  # streams need a prefetch
            queue = await channel.get_queue(RESULTS_STREAM, ensure=False)
            found: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
            probe = f"probe-{uuid.uuid4().hex}" if timeout == 0 else None

            async def read(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await message.ack()
                if found.done():
                    return
                if message.message_id == job_id and message.type == RECORD_TYPE:
                    try:
                        found.set_result(codec.decode_object(message.body, message.content_type)[0])
                    except DecodeError as exc:
                        found.set_exception(exc)
                elif probe is not None and message.message_id == probe:
                    found.set_result(None)

            await queue.consume(read, arguments={"x-stream-offset": topology.records_offset(job_id)})
            if probe is not None:
                await channel.default_exchange.publish(aio_pika.Message(
                    b"{}", content_type=codec.JSON, message_id=probe, type=PROBE_TYPE), RESULTS_STREAM)
            try:
                return await asyncio.wait_for(asyncio.shield(found), timeout if timeout else None)
            except asyncio.TimeoutError:
                return None
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



