"""What a worker receives besides launches: RPCs to its jobs, broadcasts, control, queries.

Everything here runs on the connection's loop thread, the worker's *handler thread*: it
decodes into the protocol's objects, calls the worker's hooks (which never block) and
publishes replies. Every failure is the sender's error reply (or, for a message without
one, a log line), never the worker's end.

* **RPCs** to a claimed job arrive on its queue (:meth:`SignalServer.deliver_rpc`).
* **The workers exchange** carries the ``jobs`` query, and RPCs to jobs not claimed yet
  (with an ``x-job-id`` header): only the worker that runs the job answers, after claiming it.
* **Control** comes from the stream ``brokerexec.control`` — at the worker's start from an
  hour back (all the stream keeps), so that it knows which queued jobs were aborted before
  it came; after a reconnect from where it left off — and from plumpy's
  ``pause_all``/``play_all``/``kill_all`` broadcasts.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.abc

from .... import codec
from ....errors import BrokerExecError, DecodeError, SignalRefused
from ....protocol import topology
from ....protocol.intents import Signal, intent_for_subject
from ....protocol.messages import Control, JobsQuery, WorkerJobs
from ....protocol.names import (
    CONTROL_STREAM,
    JOB_ID_HEADER,
    KIWIPY_OTHERS_EXCHANGE,
    STATE_CHANGED_TYPE,
    STATUS_EXCHANGE,
    WORKERS_EXCHANGE,
    expired,
)
from ....protocol.replies import Reply
from ...base import WorkerHooks
from ..connection import AmqpConnection, Outgoing
from .ownership import Ownership

__all__ = ["Request", "SignalServer"]

log = logging.getLogger(__name__)

#: How many (reply_to, correlation_id) pairs, and control message ids, are remembered.
_RECENT = 4096
#: How far back a worker reads the control stream when it starts (its retention, x-max-age).
CONTROL_REPLAY = 3600.0


@dataclass(frozen=True)
class Request:
    """An incoming request as the signal server reads it, whichever consumer delivered it."""

    body: bytes
    content_type: str | None
    reply_to: str | None
    correlation_id: str
    headers: Mapping[str, Any] | None
    #: The exchange it came through, from the delivery (the broker's word, not the sender's).
    exchange: str = ""

    @classmethod
    def of_aiormq(cls, message: aiormq.abc.DeliveredMessage) -> Request:
        """From aiormq's delivery: the job queues consume there, without aio-pika's wrapper
        and its task per message (the RPC round trip feels both)."""
        props = message.header.properties
        return cls(message.body, props.content_type, props.reply_to, props.correlation_id or "",
                   props.headers, message.exchange or "")

    @classmethod
    def of_aio_pika(cls, message: aio_pika.abc.AbstractIncomingMessage) -> Request:
        return cls(message.body, message.content_type, message.reply_to,
                   message.correlation_id or "", message.headers, message.exchange or "")


class SignalServer:
    """See the module docstring.

    Parameters:
        connection: the worker's connection.
        ownership: asked to claim a job an RPC came for through every worker.
        host_info: who this worker is, in answers to the ``jobs`` query.
    """

    def __init__(self, connection: AmqpConnection, ownership: Ownership,
                 host_info: dict[str, Any],
                 held: Callable[[], list[dict[str, Any]]] = lambda: []) -> None:
        self.connection = connection
        self._held = held
        self.ownership = ownership
        self.host_info = host_info
        self.hooks: WorkerHooks | None = None
        self.services: list[str] = []
        self._max_bytes = connection.settings.max_message_bytes
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._seen_control: OrderedDict[str, None] = OrderedDict()
        self._stream_offset: int | None = None
        self._listening_since: float | None = None

    def start(self, hooks: WorkerHooks, services: Sequence[str] = ()) -> None:
        """The hooks to call and the services offered; the setups below then start consuming."""
        self.hooks, self.services = hooks, list(services)

    # ---- RPC -------------------------------------------------------------------------------

    def deliver_rpc(self, job_id: str, message: Request) -> None:
        """Answer one RPC to job ``job_id``: "pending" first if the answer comes later."""
        assert self.hooks is not None
        reply_to, correlation_id = message.reply_to, message.correlation_id
        if not reply_to:
            log.warning("RPC to job %s without reply_to: dropped, nothing executed", job_id)
            return
        fmt = "json"
        try:
            body, fmt = codec.decode_object(message.body, message.content_type, max_bytes=self._max_bytes)
            if expired(message.headers):
                log.info("RPC to job %s past its x-deadline: dropped", job_id)
                return
            if self._seen_before(reply_to, correlation_id):
                raise DecodeError(f"duplicate correlation id {correlation_id!r}")
            signal = Signal.decode(body)
            if message.exchange == STATUS_EXCHANGE and not signal.intent.spec.read_only:
                # Whoever may write to the status exchange (a watcher) may only look.
                raise SignalRefused(f"{signal.describe()} through {STATUS_EXCHANGE}: only read-only "
                                    "intents are answered there")
            answer = self.hooks.on_rpc(job_id, signal)
        except Exception as exc:
            if not isinstance(exc, BrokerExecError):
                log.info("RPC to job %s failed: %r", job_id, exc)
            self._reply(reply_to, correlation_id, Reply.failure(exc), fmt)
            return
        if not isinstance(answer, cf.Future):
            self._reply(reply_to, correlation_id, Reply.result(answer), fmt)
            return
        # The attempt lets its sender learn, should this execution be lost, that it never will.
        self._reply(reply_to, correlation_id, Reply.pending_in(self.ownership.attempt_of(job_id)), fmt)

        def answered(done: cf.Future[Any]) -> None:  # on the computation (or any) thread
            error = done.exception()
            reply = Reply.failure(error) if error is not None else Reply.result(done.result())
            self._reply(reply_to, correlation_id, reply, fmt)  # the outbox takes any thread's

        answer.add_done_callback(answered)

    def _reply(self, reply_to: str, correlation_id: str, reply: Reply, fmt: str) -> None:
        try:
            encoded = codec.encode(reply.encode(), fmt)
        except ValueError as exc:
            encoded = codec.encode(Reply.failure(exc).encode(), fmt)
        # Unconfirmed, written at once: a reply is its own acknowledgement, and one lost with
        # a connection leaves its caller to its time-out either way.
        self.connection.send(Outgoing.reply(reply_to, encoded, codec.content_type_for(fmt),
                                            correlation_id))

    def _seen_before(self, reply_to: str, correlation_id: str) -> bool:
        if not correlation_id:
            return False
        key = (reply_to, correlation_id)
        if key in self._recent:
            return True
        _remember(self._recent, key)
        return False

    # ---- kiwipy broadcasts and the control stream --------------------------------------------

    async def setup_broadcasts(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """kiwipy broadcasts, through the filter that drops the jobs' ``state_changed`` ones."""
        queue = await channel.declare_queue(exclusive=True,
                                            arguments=dict(topology.BROADCAST_QUEUE_ARGUMENTS))
        exchange = await channel.get_exchange(KIWIPY_OTHERS_EXCHANGE, ensure=False)
        await queue.bind(exchange, "")
        await queue.consume(self._on_kiwipy_broadcast, no_ack=True)

    async def _on_kiwipy_broadcast(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.type == STATE_CHANGED_TYPE:
            return  # a job's state_changed, if an older topology let it through
        try:
            body, _ = codec.decode_object(message.body, message.content_type, max_bytes=self._max_bytes)
        except DecodeError as exc:
            log.debug("broadcast not for us or undecodable: %s", exc)  # plumpy tags !uuid etc.
            return
        intent = intent_for_subject(body.get("subject"))
        if intent is None:
            return  # state_changed of a plumpy process, or anything else not for us
        inner = body.get("body")
        service = inner.get("service") if isinstance(inner, dict) else None
        self._apply_control(Control(intent, service if isinstance(service, str) else None))

    async def setup_control(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """The control stream, from where this worker left off."""
        queue = await channel.get_queue(CONTROL_STREAM, ensure=False)
        # First start: the last hour (what the stream keeps), for the aborts of jobs still
        # queued. After a reconnect: everything since the last message seen (or, if none was,
        # since we first listened), so a pause_all sent while this worker was cut off still
        # arrives. message_id dedupes the overlap.
        offset: Any
        if self._stream_offset is not None:
            offset = self._stream_offset + 1
        elif self._listening_since is not None:
            offset = datetime.fromtimestamp(self._listening_since - 1, tz=timezone.utc)
        else:
            self._listening_since = time.time()
            offset = datetime.fromtimestamp(self._listening_since - CONTROL_REPLAY, tz=timezone.utc)
        await queue.consume(self._on_control, arguments={"x-stream-offset": offset})

    async def _on_control(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self._stream_offset = offset
        await message.ack()
        if message.message_id:
            if message.message_id in self._seen_control:
                return
            _remember(self._seen_control, message.message_id)
        try:
            body, _ = codec.decode_object(message.body, message.content_type, allow_yaml=False,
                                          max_bytes=self._max_bytes)
            control = Control.decode(body)
        except DecodeError as exc:
            log.warning("control message refused: %s", exc)
            return
        self._apply_control(control)

    def _apply_control(self, control: Control) -> None:
        assert self.hooks is not None
        try:
            self.hooks.on_control(control)
        except Exception as exc:
            log.warning("control message %r refused: %s", control.intent.value, exc)

    # ---- the workers exchange: the jobs query, and RPCs to jobs not yet claimed -------------
    # (and the status exchange's read-only RPCs to them)

    async def setup_workers(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """This worker's queue on the workers exchange."""
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(WORKERS_EXCHANGE, ensure=False)
        await queue.bind(exchange, "")
        # Read-only RPCs to jobs not claimed yet come this way too (deliver_rpc refuses the
        # rest of what came through the status exchange).
        await queue.bind(STATUS_EXCHANGE, "")
        await queue.consume(self._on_workers_message, no_ack=True)

    async def _on_workers_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        assert self.hooks is not None
        job_id = (message.headers or {}).get(JOB_ID_HEADER)
        if isinstance(job_id, bytes):
            job_id = job_id.decode("utf-8", "replace")
        if isinstance(job_id, str):
            # An RPC its sender could not route: the job may be one of ours not claimed yet.
            # Only the worker that runs it answers (after claiming it); the others are silent.
            if not expired(message.headers) and await self.ownership.locate(job_id):
                self.deliver_rpc(job_id, Request.of_aio_pika(message))
            return
        if not message.reply_to:
            return
        try:
            body, fmt = codec.decode_object(message.body, message.content_type, max_bytes=self._max_bytes)
        except DecodeError as exc:
            self._reply(message.reply_to, message.correlation_id or "", Reply.failure(exc), "json")
            return
        if not JobsQuery.is_query(body):
            refusal = DecodeError(f"the workers exchange takes the jobs query or an RPC with an "
                                  f"{JOB_ID_HEADER} header; got {body.get('intent')!r}")
            self._reply(message.reply_to, message.correlation_id or "", Reply.failure(refusal), fmt)
            return
        jobs = [job.encode() for job in self.hooks.describe_jobs()] + self._held()
        answer = WorkerJobs(self.host_info, jobs, self.services, self.hooks.describe_services())
        self._reply(message.reply_to, message.correlation_id or "", Reply.result(answer.encode()), fmt)


def _remember(recent: OrderedDict[Any, None], key: Any) -> None:
    recent[key] = None
    if len(recent) > _RECENT:
        recent.popitem(last=False)
