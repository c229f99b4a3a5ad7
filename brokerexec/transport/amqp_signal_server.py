"""What a worker receives besides launches: RPCs to its jobs, broadcasts, control, queries.

Everything here runs on the connection's loop thread, the worker's *handler thread*: it
decodes, calls the worker's hooks (which never block) and publishes replies. The worker
transport (:mod:`.amqp_worker`) builds on this and adds launches and job ownership.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures as cf
import logging
import time
import traceback
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

import aio_pika
import aio_pika.abc

from .. import codec
from ..constants import (
    JOB_ID_HEADER,
    KIWIPY_OTHERS_EXCHANGE,
    STATE_CHANGED_TYPE,
    WORKERS_EXCHANGE,
)
from ..errors import BrokerExecError, DecodeError
from ..protocol import reply_error, reply_pending, reply_result
from . import amqp_topology as topology
from .amqp import AmqpConnection, ConnectionSettings
from .base import WorkerHooks

__all__ = ["WorkerSignals"]

log = logging.getLogger(__name__)

#: How many (reply_to, correlation_id) pairs, and control message ids, are remembered.
_RECENT = 4096


class WorkerSignals(abc.ABC):
    """RPC, broadcast, control-stream and ``jobs``-query handling of a worker transport."""

    settings: ConnectionSettings
    connection: AmqpConnection
    hooks: WorkerHooks | None
    host_info: dict[str, Any]

    def __init__(self) -> None:
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._stream_offset: int | None = None
        self._listening_since: float | None = None
        self._seen_control: OrderedDict[str, None] = OrderedDict()

    @abc.abstractmethod
    async def _locate(self, job_id: str) -> bool:
        """Make ``job_id`` addressable if this worker runs it; False if it does not."""

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
        if len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        return False

    # ---- kiwipy broadcasts and the control stream --------------------------------------------

    async def _setup_broadcasts(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, arguments=topology.BROADCAST_QUEUE_ARGUMENTS)
        # Through the filter (constants.KIWIPY_FILTER_EXCHANGE), not from kiwipy's exchange
        # directly: the broker drops the jobs' state_changed broadcasts on the way.
        exchange = await channel.get_exchange(KIWIPY_OTHERS_EXCHANGE, ensure=False)
        await queue.bind(exchange, "")
        await queue.consume(self._on_kiwipy_broadcast, no_ack=True)

    async def _on_kiwipy_broadcast(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.type == STATE_CHANGED_TYPE:
            return  # a job's state_changed, if an older topology let it through
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
            if len(self._seen_control) > _RECENT:
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

    # ---- the workers exchange: the jobs query, and RPCs to jobs not yet claimed -------------

    async def _setup_workers(self, channel: aio_pika.abc.AbstractChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(WORKERS_EXCHANGE, ensure=False)
        await queue.bind(exchange, "")
        await queue.consume(self._on_workers_message, no_ack=True)

    async def _on_workers_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self.hooks is not None
        job_id = (message.headers or {}).get(JOB_ID_HEADER)
        if isinstance(job_id, bytes):
            job_id = job_id.decode("utf-8", "replace")
        if isinstance(job_id, str):
            # An RPC its sender could not route: the job may be one of ours not claimed yet.
            # Only the worker that runs it answers (after claiming it); the others are silent.
            if not topology.expired(message) and await self._locate(job_id):
                await self._on_rpc(job_id, message)
            return
        if not message.reply_to:
            return
        answer = reply_result({"worker": self.host_info, "jobs": self.hooks.describe_jobs()})
        await self._reply(message.reply_to, message.correlation_id or "", answer, "json")


def _tb(exc: BaseException | None) -> str:
    if exc is None or exc.__traceback__ is None or isinstance(exc, BrokerExecError):
        return ""
    return "".join(traceback.format_exception(exc))
