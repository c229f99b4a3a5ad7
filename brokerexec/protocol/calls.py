"""What a client does on the wire, decided once and free of I/O ("sans-I/O", as h11 does).

The commands are named tuples: cheap to define, and imported by every one-shot CLI verb.

A *call* is a generator. It yields commands — :class:`Publish` these messages (confirmed),
send a :class:`Request` and wait for what comes back first, wait for the :class:`NextReply`,
:class:`Gather` replies for a while — and is sent back what happened: whether the broker
routed a message, the reply that came (or None on time-out). It returns the answer, or
raises brokerexec's error. The blocking adapter (``transport/pika_client.py``)
and the asyncio adapter (``transport/amqp_client.py``) drive the same calls and differ only
in how bytes move. :class:`RecordSearch` is the same idea for reading the records stream,
which is fed messages as they come rather than asked for them.

The decisions that live here, and only here:

* an RPC to a job that is not claimed yet comes back unroutable: it goes once more to every
  worker, with the job id and a deadline in its headers, and the worker that runs the job
  claims it and answers; no answer (not even ``pending``) shortly after the deadline means
  no worker runs it: :class:`~brokerexec.JobNotFound`;
* an RPC skips any number of ``pending`` replies; a reply's error is raised typed;
* kiwipy's exchange missing (``NOT_FOUND``) means no worker has ever run on the broker;
* the ``jobs`` query gathers every worker's answer for as long as the caller waits (and
  returns at once when no worker is there to answer);
* a record is read from the stream from its job's launch time; without waiting, a probe
  appended to the stream marks where to stop.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .. import codec
from ..errors import BrokerConnectionError, DecodeError, JobNotFound, Timeout
from .intents import Signal
from .names import (
    CONTROL_EXCHANGE,
    DEADLINE_MS_HEADER,
    DIRECT_REPLY_TO,
    JOB_ID_HEADER,
    JSON_CONTENT_TYPE,
    KIWIPY_EXCHANGE,
    LAUNCH_QUEUE,
    PROBE_TYPE,
    RECORD_TIME_MARGIN,
    RECORD_TYPE,
    RESULTS_STREAM,
    WORKERS_EXCHANGE,
    deadline_ms,
    job_time,
    rpc_routing_key,
)
from .replies import Reply

if TYPE_CHECKING:
    from .messages import Control, Launch

__all__ = ["Call", "Gather", "Incoming", "Message", "NextReply", "Publish", "RecordSearch", "Request",
           "Routed", "control", "drive", "drive_async", "jobs_query", "launches", "rpc"]

T = TypeVar("T")

#: How long after its deadline a located RPC may still get its first reply (the worker
#: that runs the job claims it first: a queue declare and a bind).
LOCATE_SLACK = 0.3


class Message(NamedTuple):
    """An outgoing AMQP message, with the properties brokerexec uses."""

    exchange: str
    routing_key: str
    body: bytes
    correlation_id: str | None = None
    reply_to: str | None = None
    headers: Mapping[str, Any] | None = None
    persistent: bool = False
    message_id: str | None = None
    type: str | None = None
    content_type: str = JSON_CONTENT_TYPE


class Incoming(NamedTuple):
    """A delivered message as a call sees it: body and the properties it reads."""

    body: bytes
    content_type: str | None = None
    message_id: str | None = None
    type: str | None = None


class Routed(enum.Enum):
    """What the broker did with a published message."""

    DELIVERED = "delivered"  # confirmed, routed to at least one queue
    RETURNED = "returned"  # mandatory, and routed nowhere (basic.return)
    NO_EXCHANGE = "no exchange"  # the exchange does not exist (NOT_FOUND)


class Publish(NamedTuple):
    """Publish ``messages`` (confirmed, in flight together); answered with a ``Routed`` each."""

    messages: Sequence[Message]
    mandatory: bool = False


class Request(NamedTuple):
    """Publish ``message`` (mandatory) and wait up to ``seconds`` for what comes back first.

    Answered with the first reply (:class:`Incoming`), ``Routed.RETURNED`` (no queue took
    it), ``Routed.NO_EXCHANGE``, or None (nothing within ``seconds``). The reply, or the
    return, is the broker's answer: a request needs no publisher confirm, which saves a
    round trip on the way to the reply.
    """

    message: Message
    seconds: float | None


class NextReply(NamedTuple):
    """Wait up to ``seconds`` (None: forever) for the next reply with ``correlation_id``;
    answered with the :class:`Incoming` reply, or None on time-out."""

    correlation_id: str
    seconds: float | None


class Gather(NamedTuple):
    """Collect every reply with ``correlation_id`` for ``seconds``; answered with a list."""

    correlation_id: str
    seconds: float


Command = Publish | Request | NextReply | Gather
#: A call: yields commands, is sent their outcomes, returns the answer.
Call = Generator[Command, Any, T]


def _request(exchange: str, routing_key: str, body: dict[str, Any], correlation_id: str,
             headers: Mapping[str, Any] | None = None) -> Message:
    return Message(exchange, routing_key, codec.encode(body), correlation_id=correlation_id,
                   reply_to=DIRECT_REPLY_TO, headers=headers)


def read_reply(incoming: Incoming, max_bytes: int) -> Reply:
    """Decode a reply; one that cannot be decoded is an error reply saying why."""
    try:
        body, _ = codec.decode_object(incoming.body, incoming.content_type, max_bytes=max_bytes)
        return Reply.decode(body)
    except DecodeError as exc:
        return Reply(error={"type": "brokerexec.DecodeError", "message": f"undecodable reply: {exc}",
                            "traceback": ""})


def rpc(job_id: str, signal: Signal, *, timeout: float, locate_timeout: float, max_bytes: int,
        correlation_id: str | None = None,
        clock: Callable[[], float] = time.monotonic) -> Call[Any]:
    """Send ``signal`` to job ``job_id``; return its final value (see the module docstring).

    Raises:
        JobNotFound: no worker runs the job (it ended, is still queued, or never existed).
        Timeout: no final reply within ``timeout`` seconds.
        RemoteError: the job refused or failed (typed: ``SignalRefused``, ...).
    """
    correlation_id = correlation_id or uuid.uuid4().hex
    request = _request(KIWIPY_EXCHANGE, rpc_routing_key(job_id), signal.encode(), correlation_id)
    incoming = yield Request(request, timeout)
    if incoming is Routed.NO_EXCHANGE:
        raise JobNotFound(f"no worker holds job {job_id}: no worker has run on this broker yet")
    if incoming is Routed.RETURNED:  # not claimed (yet): ask every worker
        headers = {JOB_ID_HEADER: job_id, DEADLINE_MS_HEADER: deadline_ms(locate_timeout)}
        incoming = yield Request(request._replace(exchange=WORKERS_EXCHANGE, routing_key="",
                                                  headers=headers), locate_timeout + LOCATE_SLACK)
        if not isinstance(incoming, Incoming):  # no worker at all, or none owned up in time
            raise JobNotFound(f"no worker holds job {job_id} (it ended, is still queued, "
                              "or never existed)")
    deadline = clock() + timeout
    reply = None if incoming is None else read_reply(incoming, max_bytes)
    while reply is not None and reply.pending:
        incoming = yield NextReply(correlation_id, max(deadline - clock(), 0.0))
        reply = None if incoming is None else read_reply(incoming, max_bytes)
    if reply is None:
        raise Timeout(f"job {job_id} did not answer {signal.describe()} within {timeout} s")
    return reply.outcome()


def jobs_query(*, timeout: float, max_bytes: int, correlation_id: str | None = None,
               clock: Callable[[], float] = time.monotonic) -> Call[list[dict[str, Any]]]:
    """Summaries of the jobs every worker runs, gathered for ``timeout`` seconds."""
    from .messages import JobsQuery, WorkerJobs  # a status needs neither: one-shot verbs skip them

    correlation_id = correlation_id or uuid.uuid4().hex
    started = clock()
    first = yield Request(_request(WORKERS_EXCHANGE, "", JobsQuery().encode(), correlation_id), timeout)
    if not isinstance(first, Incoming):
        return []  # no worker is there (or has ever run), or none answered in time
    # Every worker answers once; their number is unknown, so gather for `timeout`.
    jobs: list[dict[str, Any]] = []
    rest = yield Gather(correlation_id, max(timeout - (clock() - started), 0.0))
    for incoming in [first, *rest]:
        reply = read_reply(incoming, max_bytes)
        if reply.error is None and isinstance(reply.value, dict):
            jobs.extend(WorkerJobs.decode(reply.value).jobs)
    return jobs


def launches(batch: Sequence[Launch], *, reply_to: str | None = None) -> Call[None]:
    """Queue launches durably (persistent, confirmed, in flight together).

    ``reply_to``: a queue of the caller's that each job's final record is pushed to.
    """
    messages = [Message("", LAUNCH_QUEUE, codec.encode(launch.encode()), persistent=True,
                        message_id=launch.job_id, reply_to=reply_to) for launch in batch]
    outcomes = yield Publish(messages, mandatory=True)
    for launch, routed in zip(batch, outcomes, strict=True):
        if routed is not Routed.DELIVERED:
            raise BrokerConnectionError(f"the launch of job {launch.job_id} was not routed "
                                        f"({routed.value})")


def control(message: Control) -> Call[None]:
    """Send a control message to every worker, kept in the control stream for an hour."""
    body = codec.encode(message.encode())
    (routed,) = yield Publish([Message(CONTROL_EXCHANGE, "", body, persistent=True,
                                       message_id=uuid.uuid4().hex)])
    if routed is not Routed.DELIVERED:
        raise BrokerConnectionError(f"the control message was not routed ({routed.value})")


class RecordSearch:
    """Find job ``job_id``'s final record in the records stream.

    Consume ``RESULTS_STREAM`` from :attr:`offset` with a prefetch of :attr:`PREFETCH`
    (RabbitMQ requires one for streams), acknowledging every message, and :meth:`feed` each
    one until it returns True. Without ``wait``, publish :attr:`probe` once consuming has
    started: a stream has no end marker over AMQP 0-9-1, and everything stored before the
    probe comes before it. Then :attr:`record` is the record, or None if it is not there.
    """

    PREFETCH = 500

    def __init__(self, job_id: str, *, wait: bool) -> None:
        self.job_id = job_id
        self.record: dict[str, Any] | None = None
        self.done = False
        self.probe: Message | None = None
        if not wait:
            self.probe = Message("", RESULTS_STREAM, b"{}", message_id=f"probe-{uuid.uuid4().hex}",
                                 type=PROBE_TYPE)

    @property
    def offset(self) -> datetime | str:
        """Where to start: the job's launch time (less a margin for clock skew), if known."""
        launched = job_time(self.job_id)
        if launched is None:
            return "first"
        return datetime.fromtimestamp(launched - RECORD_TIME_MARGIN, tz=timezone.utc)

    def feed(self, message: Incoming) -> bool:
        """Look at one message of the stream; True once the search is over."""
        if self.done:
            return True
        if message.message_id == self.job_id and message.type == RECORD_TYPE:
            self.record, _ = codec.decode_object(message.body, message.content_type)
            self.done = True
        elif self.probe is not None and message.message_id == self.probe.message_id:
            self.done = True
        return self.done


def drive(call: Call[T], act: Callable[[Command], Any]) -> T:
    """Run ``call`` to its end, answering each command with ``act(command)`` (blocking I/O)."""
    try:
        command = next(call)
        while True:
            command = call.send(act(command))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def drive_async(call: Call[T], act: Callable[[Command], Awaitable[Any]]) -> T:
    """Run ``call`` to its end, answering each command with ``await act(command)``."""
    try:
        command = next(call)
        while True:
            command = call.send(await act(command))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
