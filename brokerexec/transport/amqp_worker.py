"""The worker's side of the RabbitMQ transport (docs/protocol.md is its specification).

Everything here runs on the connection's loop thread, the worker's *handler thread*: it
decodes, calls the worker's hooks (which never block) and publishes replies. Launches are
acknowledged as soon as the job is claimed, so no delivery stays unacknowledged while a job
runs and RabbitMQ's ``consumer_timeout`` never applies to a job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import time
import traceback
from collections import OrderedDict, deque
from datetime import datetime, timezone
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from .. import codec
from ..constants import (
    BROADCAST_TOPIC,
    EVENTS_EXCHANGE,
    KIWIPY_EXCHANGE,
    LAUNCH_QUEUE,
    WORKERS_EXCHANGE,
    result_queue,
    rpc_queue,
    rpc_routing_key,
)
from ..errors import BrokerExecError, DecodeError
from ..protocol import Event, parse_launch, reply_error, reply_pending, reply_result
from . import amqp_topology as topology
from .amqp import AmqpConnection, ConnectionSettings, Outgoing
from .base import PreparedJob, WorkerHooks, WorkerTransport

__all__ = ["RabbitWorkerTransport"]

log = logging.getLogger(__name__)

#: How many (reply_to, correlation_id) pairs are remembered to refuse duplicates.
_RECENT_REQUESTS = 4096


class RabbitWorkerTransport(WorkerTransport):
    """See the module docstring."""

    def __init__(self, settings: ConnectionSettings, *, host_info: dict[str, Any]) -> None:
        self.settings = settings
        self.host_info = host_info
        self.connection = AmqpConnection(settings)
        self.hooks: WorkerHooks | None = None
        self._free = 0
        self._consumer_tag: str | None = None
        self._capacity = 1
        self._held: deque[tuple[aio_pika.abc.AbstractIncomingMessage, float]] = deque()
        self._taking_work = True
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._stream_offset: int | None = None
        self._listening_since: float | None = None
        self._seen_control: OrderedDict[str, None] = OrderedDict()

    # ---- WorkerTransport -----------------------------------------------------------------

    def serve(self, hooks: WorkerHooks, capacity: int) -> None:
        self.hooks, self._free, self._capacity = hooks, capacity, max(capacity, 1)
        self.connection.start()
        add = self.connection.add_setup
        add("topology", topology.declare_all).result(30)
        add("broadcasts", self._setup_broadcasts).result(30)
        add("control", self._setup_control, prefetch=100).result(30)
        add("workers", self._setup_workers).result(30)
        add("launch", self._setup_launch).result(30)

    def set_free_capacity(self, free: int) -> None:
        if self.connection.on_loop_thread():
            self._set_free(free)  # from a hook: at once, before the next delivery is seen
        else:
            self.connection.call(self._set_free, free)

    def publish_event(self, event: Event) -> None:
        message = aio_pika.Message(codec.encode(event.encode()), content_type=codec.JSON,
                                   delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        self.connection.post(Outgoing(EVENTS_EXCHANGE, event.routing_key, message))
        if event.kind == "state":  # what plumpy processes broadcast, for kiwipy tools
            body = {"body": None, "sender": event.job_id, "correlation_id": None,
                    "subject": f"state_changed.{event.data.get('from')}.{event.data.get('to')}"}
            self.connection.post(Outgoing(KIWIPY_EXCHANGE, BROADCAST_TOPIC, aio_pika.Message(
                codec.encode(body), content_type=codec.JSON,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)))

    def finish(self, job_id: str, record: dict[str, Any]) -> cf.Future[None]:
        return self.connection.submit(self._finish(job_id, record))

    async def _finish(self, job_id: str, record: dict[str, Any]) -> None:
        message = aio_pika.Message(codec.encode(record), content_type=codec.JSON,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        async def declare(channel: aio_pika.abc.AbstractChannel) -> None:
            await topology.declare_result_queue(channel, job_id)

        await self.connection.publish_reliably("", result_queue(job_id), message, declare)
        # Closing the job's channel cancels its consumer, and RabbitMQ deletes the
        # auto-delete queue with it: the job id is free and unroutable from here on.
        await self.connection._remove_setup(f"job:{job_id}", None)

    def stop_taking_work(self) -> None:
        self._taking_work = False
        self.connection.call(self._set_free, 0)

    def close(self) -> None:
        self.connection.close()

    # ---- launches ------------------------------------------------------------------------
    #
    # The consumer's prefetch is the worker's concurrency. A launch that arrives while every
    # slot is busy is *held* (unacknowledged) for at most HOLD_SECONDS: short jobs free a slot
    # long before that and the held launch starts without a broker round trip. If it is still
    # held then, the worker is busy with long jobs: the held launches go back to the queue
    # (for other workers) and the consumer is cancelled until a slot frees. So no delivery
    # stays unacknowledged for long, and a running job never holds one at all.

    HOLD_SECONDS = 1.0

    async def _setup_launch(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self._consumer_tag = None
        self._held.clear()  # deliveries of a dead channel are the broker's again
        await channel.set_qos(prefetch_count=self._capacity)
        await self._consume_launches(channel)

    async def _consume_launches(self, channel: aio_pika.abc.AbstractChannel) -> None:
        if self._consumer_tag is not None or self._free <= 0 or not self._taking_work:
            return
        queue = await channel.get_queue(LAUNCH_QUEUE, ensure=False)
        self._consumer_tag = await queue.consume(self._on_launch)

    def _set_free(self, free: int) -> None:
        self._free = free if self._taking_work else 0
        channel = self.connection.channel_of("launch")
        if channel is None or channel.is_closed:
            return
        if not self._taking_work:
            self.connection._spawn(self._give_back_held(channel, cancel=True))
        elif self._free > 0 and self._held:
            self.connection._spawn(self._start_held())
        elif self._free > 0 and self._consumer_tag is None:
            self.connection._spawn(self._consume_launches(channel))

    async def _start_held(self) -> None:
        while self._held and self._free > 0:
            message, _ = self._held.popleft()
            await self._take(message)

    async def _give_back_held(self, channel: aio_pika.abc.AbstractChannel, *, cancel: bool) -> None:
        if cancel and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            try:
                queue = await channel.get_queue(LAUNCH_QUEUE, ensure=False)
                await queue.cancel(tag)
            except Exception as exc:  # the channel is going away: the setup re-runs
                log.debug("cancel of launch consumer failed: %r", exc)
        while self._held:
            message, _ = self._held.popleft()
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        if self._free > 0 and self._taking_work and not channel.is_closed:
            await self._consume_launches(channel)  # a slot freed meanwhile

    async def _expire_held(self) -> None:
        await asyncio.sleep(self.HOLD_SECONDS)
        now = time.monotonic()
        if self._held and now - self._held[0][1] >= self.HOLD_SECONDS:
            channel = self.connection.channel_of("launch")
            if channel is not None:
                await self._give_back_held(channel, cancel=self._free <= 0)

    async def _on_launch(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if self._free <= 0 or not self._taking_work or self._held:
            if not self._taking_work:
                await message.nack(requeue=True)
                return
            self._held.append((message, time.monotonic()))
            if len(self._held) == 1:
                self.connection._spawn(self._expire_held())
            return
        await self._take(message)

    async def _take(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self.hooks is not None
        try:
            launch, _ = codec.decode_object(message.body, message.content_type,
                                            max_bytes=self.settings.max_message_bytes,
                                            allow_yaml=False)
            job = self.hooks.prepare(parse_launch(launch))
        except DecodeError as exc:
            log.warning("launch dead-lettered: %s", exc)
            await message.reject(requeue=False)
            return
        except Exception:
            log.exception("launch could not be prepared; dead-lettered")
            await message.reject(requeue=False)
            return
        if job is None:
            await message.ack()
            return
        try:
            await self._claim(job)
        except aiormq.exceptions.ChannelLockedResource:
            self.hooks.cancel(job, f"job {job.job_id} is claimed by another worker")
            await message.ack()
            return
        except Exception as exc:
            self.hooks.cancel(job, f"claim failed: {exc!r}")
            await message.nack(requeue=True)
            return
        await message.ack()
        self.hooks.begin(job)

    async def _claim(self, job: PreparedJob) -> None:
        job_id = job.job_id

        async def setup(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.declare_queue(rpc_queue(job_id), exclusive=True, auto_delete=True,
                                                arguments=topology.RPC_QUEUE_ARGUMENTS)
            exchange = await channel.get_exchange(KIWIPY_EXCHANGE, ensure=False)
            await queue.bind(exchange, rpc_routing_key(job_id))
            await queue.consume(lambda message: self._on_rpc(job_id, message), no_ack=True)

        await self.connection._add_setup(f"job:{job_id}", setup, None)

    # ---- RPC -------------------------------------------------------------------------------

    async def _on_rpc(self, job_id: str, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self.hooks is not None
        reply_to, correlation_id = message.reply_to, message.correlation_id or ""
        if not reply_to:
            log.warning("RPC to job %s without reply_to: dropped, nothing executed", job_id)
            return
        fmt = "json"
        try:
            body, fmt = codec.decode_object(message.body, message.content_type,
                                            max_bytes=self.settings.max_message_bytes)
            if topology.expired(message):
                log.info("RPC to job %s past its x-deadline: dropped", job_id)
                return
            if self._seen_before(reply_to, correlation_id):
                raise DecodeError(f"duplicate correlation id {correlation_id!r}")
            answer = self.hooks.on_rpc(job_id, body)
        except Exception as exc:  # every failure is the sender's error reply, never ours
            if not isinstance(exc, BrokerExecError):
                log.info("RPC to job %s failed: %r", job_id, exc)
            await self._reply(reply_to, correlation_id, reply_error(exc, _tb(exc)), fmt)
            return
        if isinstance(answer, cf.Future):
            await self._reply(reply_to, correlation_id, reply_pending(), fmt)
            loop = asyncio.get_running_loop()
            answer.add_done_callback(lambda done: loop.call_soon_threadsafe(
                lambda: loop.create_task(self._reply_outcome(reply_to, correlation_id, done, fmt))))
        else:
            await self._reply(reply_to, correlation_id, reply_result(answer), fmt)

    async def _reply_outcome(self, reply_to: str, correlation_id: str, done: cf.Future[Any],
                             fmt: str) -> None:
        error = done.exception()
        body = reply_error(error, _tb(error)) if error is not None else reply_result(done.result())
        await self._reply(reply_to, correlation_id, body, fmt)

    async def _reply(self, reply_to: str, correlation_id: str, body: dict[str, Any], fmt: str) -> None:
        try:
            encoded = codec.encode(body, fmt)
        except ValueError as exc:
            encoded = codec.encode(reply_error(exc), fmt)
        message = aio_pika.Message(encoded, content_type=codec.content_type_for(fmt),
                                   correlation_id=correlation_id)
        try:
            # Replies go through the default exchange: that reaches kiwipy's reply queues
            # and RabbitMQ's direct reply-to alike.
            await self.connection.publish("", reply_to, message, timeout=10)
        except Exception as exc:
            log.warning("reply to %s lost: %r", reply_to, exc)

    def _seen_before(self, reply_to: str, correlation_id: str) -> bool:
        if not correlation_id:
            return False
        key = (reply_to, correlation_id)
        if key in self._recent:
            return True
        self._recent[key] = None
        if len(self._recent) > _RECENT_REQUESTS:
            self._recent.popitem(last=False)
        return False

    # ---- broadcasts, control, the jobs query ---------------------------------------------

    async def _setup_broadcasts(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, arguments=topology.BROADCAST_QUEUE_ARGUMENTS)
        exchange = await channel.get_exchange(KIWIPY_EXCHANGE, ensure=False)
        await queue.bind(exchange, BROADCAST_TOPIC)
        await queue.consume(self._on_kiwipy_broadcast, no_ack=True)

    async def _on_kiwipy_broadcast(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            body, _ = codec.decode_object(message.body, message.content_type,
                                          max_bytes=self.settings.max_message_bytes)
        except DecodeError as exc:
            log.debug("broadcast not for us or undecodable: %s", exc)  # plumpy tags !uuid etc.
            return
        subject = body.get("subject")
        if not isinstance(subject, str) or subject.startswith("state_changed"):
            return
        inner = body.get("body")
        control = {"intent": subject}
        if isinstance(inner, dict) and isinstance(inner.get("service"), str):
            control["service"] = inner["service"]
        self._apply_control(control)

    async def _setup_control(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.get_queue(topology.CONTROL_STREAM, ensure=False)
        # First start: only what comes next. After a reconnect: everything since the last
        # message seen (or, if none was, since we first listened), so a pause_all sent while
        # this worker was cut off still arrives. message_id dedupes the overlap.
        offset: Any
        if self._stream_offset is not None:
            offset = self._stream_offset + 1
        elif self._listening_since is not None:
            offset = datetime.fromtimestamp(self._listening_since - 1, tz=timezone.utc)
        else:
            offset, self._listening_since = "next", time.time()
        await queue.consume(self._on_control, arguments={"x-stream-offset": offset})

    async def _on_control(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._stream_offset = offset
        await message.ack()
        if message.message_id:
            if message.message_id in self._seen_control:
                return
            self._seen_control[message.message_id] = None
            if len(self._seen_control) > _RECENT_REQUESTS:
                self._seen_control.popitem(last=False)
        try:
            body, _ = codec.decode_object(message.body, message.content_type, allow_yaml=False,
                                          max_bytes=self.settings.max_message_bytes)
        except DecodeError as exc:
            log.warning("control message refused: %s", exc)
            return
        self._apply_control(body)

    def _apply_control(self, body: dict[str, Any]) -> None:
        assert self.hooks is not None
        try:
            self.hooks.on_control(body)
        except Exception as exc:
            log.warning("control message %r refused: %s", body.get("intent"), exc)

    async def _setup_workers(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(WORKERS_EXCHANGE, ensure=False)
        await queue.bind(exchange, "")
        await queue.consume(self._on_workers_query, no_ack=True)

    async def _on_workers_query(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self.hooks is not None
        if not message.reply_to:
            return
        answer = reply_result({"worker": self.host_info, "jobs": self.hooks.describe_jobs()})
        await self._reply(message.reply_to, message.correlation_id or "", answer, "json")


def _tb(exc: BaseException | None) -> str:
    if exc is None or exc.__traceback__ is None or isinstance(exc, BrokerExecError):
        return ""
    return "".join(traceback.format_exception(exc))

