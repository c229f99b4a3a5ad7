"""What a client does on the wire, decided once and free of I/O ("sans-I/O", as h11 does).

A *call* is a generator that yields the commands of :mod:`.commands` and is sent back what
happened; the blocking adapter (``transport/pika/caller.py``) and the asyncio adapter
(``transport/rabbitmq/client.py``) drive the same calls and differ only in how bytes move.
The calls that read the journal (``status``, ``abort`` of a queued job, ``result``, the
listing) are in :mod:`.lookups`.

The decisions that live here, and only here:

* a launch goes to the launches exchange, routed by its service to that service's queue,
  and by its ``CC`` key to its job's journal stream (one publish, one confirm); many
  launches at once instead write one ``launches`` entry per journal stream; a service
  whose queue does not exist was never offered by any worker: :class:`~brokerexec.
  UnknownService`, at once;
* an RPC to a job that is not claimed yet comes back unroutable: it goes once more to every
  worker, with the job id and a deadline in its headers, and the worker that runs the job
  claims it and answers; no answer (not even ``pending``) shortly after the deadline means
  no worker runs it: :class:`~brokerexec.JobNotFound`;
* a read-only RPC (``status``) goes through the status exchange, where each claimed job's
  queue is bound by its id and every worker's queue of the workers exchange with ``""``
  (to locate a job not claimed yet): a user allowed to look jobs up there (a watcher)
  cannot steer them (workers answer nothing else from there); if that exchange is missing
  (workers of an older version), through kiwipy's and the workers exchange as before;
* an RPC skips any number of ``pending`` replies; a reply's error is raised typed; a
  ``set``/``invoke``/``checkpoint`` whose job's execution is lost while it waits (its
  worker died: the job is resumed elsewhere, or its attempt changed) is
  :class:`~brokerexec.NotApplied`, found by asking the job's status now and then;
* kiwipy's exchange missing (``NOT_FOUND``) means no worker has ever run on the broker;
* the ``jobs`` query gathers every worker's answer for as long as the caller waits (and
  returns at once when no worker is there to answer).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, MutableSet, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import codec
from ..errors import BrokerConnectionError, DecodeError, JobNotFound, NotApplied, Timeout, UnknownService
from .commands import (
    Browse,
    Call,
    Command,
    Gather,
    Incoming,
    Message,
    NextReply,
    Publish,
    QueueExists,
    ReadJournal,
    Request,
    Routed,
    drive,
    drive_async,
)
from .intents import Answered, Intent, Signal
from .journal import launches_entry_of, launches_parts
from .names import (
    CC_HEADER,
    CONTROL_EXCHANGE,
    DEADLINE_MS_HEADER,
    DIRECT_REPLY_TO,
    JOB_ID_HEADER,
    KIWIPY_EXCHANGE,
    LAUNCH_TYPE,
    LAUNCHES_EXCHANGE,
    LAUNCHES_TYPE,
    STATUS_EXCHANGE,
    WORKERS_EXCHANGE,
    deadline_ms,
    journal_stream,
    launch_queue,
    rpc_routing_key,
)
from .replies import Reply

if TYPE_CHECKING:
    from .messages import Control, Launch

__all__ = ["Browse", "Call", "Command", "Fleet", "Gather", "Incoming", "Message", "NextReply",
           "Publish", "QueueExists", "ReadJournal", "Request", "Routed", "control", "drive",
           "drive_async", "fleet_query", "launches", "rpc"]

#: How long after its deadline a located RPC may still get its first reply (the worker
#: that runs the job claims it first: a queue declare and a bind).
LOCATE_SLACK = 0.3
#: While a set/invoke/checkpoint waits for ``ready()``, its job's status is asked this often
#: (seconds without a reply), to learn whether the execution holding it is still there.
PROBE_EVERY = 2.0
#: A request answered at once (``status``, ``pause``, ...) with no reply at all after this
#: long is sent again, afresh: one routed to a job's queue just as the job ended was lost
#: with the queue (the broker drops what a deleted queue held), and the job may be found
#: elsewhere now (its record, another attempt).
RESEND_AFTER = 2.0


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
        correlation_id: str | None = None, clock: Callable[[], float] = time.monotonic,
        probe_every: float = PROBE_EVERY,
        unclaimed: Callable[[], Call[Any]] | None = None) -> Call[Any]:
    """Send ``signal`` to job ``job_id``; return its final value (see the module docstring).

    ``unclaimed``: a call made when no claimed job answers, before asking every worker; if
    it returns something other than None, that is the answer (``status`` reads the journal
    there: an ended job needs no worker).

    Raises:
        JobNotFound: no worker runs the job (it ended, is still queued, or never existed).
        NotApplied: accepted, but the execution holding it was lost before applying it.
        Timeout: no final reply within ``timeout`` seconds.
        RemoteError: the job refused or failed (typed: ``SignalRefused``, ...).
    """
    correlation_id = correlation_id or uuid.uuid4().hex
    request = _request(KIWIPY_EXCHANGE, rpc_routing_key(job_id), signal.encode(), correlation_id)
    spec = signal.intent.spec
    started = clock()
    # Sent again if unanswered (RESEND_AFTER): only what may be sent twice, and is answered
    # at once, so that silence means the request was lost, not that it waits for ready().
    resend = spec.resendable and spec.answered is Answered.AT_ONCE and timeout > RESEND_AFTER
    first_wait = RESEND_AFTER if resend else timeout
    incoming, locate_through = yield from _send(job_id, request, read_only=spec.read_only, wait=first_wait)
    if incoming is None and resend:
        return (yield from rpc(job_id, signal, timeout=max(timeout - (clock() - started), 0.0),
                               locate_timeout=locate_timeout, max_bytes=max_bytes, clock=clock,
                               probe_every=probe_every, unclaimed=unclaimed))
    if incoming is Routed.NO_EXCHANGE:
        raise JobNotFound(f"no worker holds job {job_id}: no worker has run on this broker yet")
    if incoming is Routed.RETURNED:  # not claimed (yet): ask every worker
        if unclaimed is not None:
            answer = yield from unclaimed()
            if answer is not None:
                return answer
        headers = {JOB_ID_HEADER: job_id, DEADLINE_MS_HEADER: deadline_ms(locate_timeout)}
        # Dropped by the broker once the asker stops waiting (its clock, not the asker's);
        # the deadline header tells stock tools, and a worker honours it with a skew margin.
        incoming = yield Request(request._replace(
            exchange=locate_through, routing_key="", headers=headers,
            expiration_ms=int((locate_timeout + LOCATE_SLACK) * 1000)), locate_timeout + LOCATE_SLACK)
        if not isinstance(incoming, Incoming):  # no worker at all, or none owned up in time
            raise JobNotFound(f"no worker holds job {job_id} (it ended, is still queued, "
                              "or never existed)")
    deadline = clock() + timeout
    reply = None if incoming is None else read_reply(incoming, max_bytes)
    held_by = reply.attempt if reply is not None else None
    # Only what waits for ready() can be lost with its execution; the rest is answered at once.
    probing = signal.intent.spec.answered is Answered.AT_READY and probe_every > 0
    while reply is not None and reply.pending:
        remaining = max(deadline - clock(), 0.0)
        incoming = yield NextReply(correlation_id, min(remaining, probe_every) if probing else remaining)
        if incoming is None and probing and clock() < deadline:
            if (yield from _execution_lost(job_id, held_by, locate_timeout, max_bytes)):
                raise NotApplied(f"job {job_id}'s execution was lost before the {signal.describe()} "
                                 "was applied: it was not applied")
            continue
        reply = None if incoming is None else read_reply(incoming, max_bytes)
    if reply is None:
        raise Timeout(f"job {job_id} did not answer {signal.describe()} within {timeout} s")
    return reply.outcome()


def _send(job_id: str, request: Message, *, read_only: bool, wait: float) -> Call[tuple[Any, str]]:
    """Send an RPC the way its intent goes; what came back first, and the exchange through
    which to locate the job should it be unroutable."""
    if read_only:
        incoming = yield Request(request._replace(exchange=STATUS_EXCHANGE, routing_key=job_id), wait)
        if incoming is not Routed.NO_EXCHANGE:
            return incoming, STATUS_EXCHANGE
        # older workers: the way every intent goes
    return (yield Request(request, wait)), WORKERS_EXCHANGE


def _execution_lost(job_id: str, attempt: int | None, locate_timeout: float,
                    max_bytes: int) -> Call[bool]:
    """True if the execution of job ``job_id`` that holds a signal (``attempt``) is gone."""
    try:
        status = yield from rpc(job_id, Signal.of(Intent.STATUS), timeout=PROBE_EVERY,
                                locate_timeout=locate_timeout, max_bytes=max_bytes, probe_every=0)
    except JobNotFound:
        return True  # no worker holds it: ended (then the reply is on its way) or lost
    except Timeout:
        return False  # cannot tell: keep waiting
    now = status.get("attempt") if isinstance(status, dict) else None
    return attempt is not None and isinstance(now, int) and now != attempt


@dataclass
class Fleet:
    """The workers that answered the ``jobs`` query, and the jobs they run."""

    workers: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def services(self) -> set[str]:
        """Every service some answering worker offers."""
        return {name for worker in self.workers for name in worker.get("services") or ()
                if isinstance(name, str)}


def fleet_query(*, timeout: float, max_bytes: int, correlation_id: str | None = None,
                clock: Callable[[], float] = time.monotonic) -> Call[Fleet]:
    """Every worker's answer to the ``jobs`` query, gathered for ``timeout`` seconds."""
    from .messages import JobsQuery, WorkerJobs  # a status needs neither: one-shot verbs skip them

    correlation_id = correlation_id or uuid.uuid4().hex
    started = clock()
    first = yield Request(_request(WORKERS_EXCHANGE, "", JobsQuery().encode(), correlation_id), timeout)
    fleet = Fleet()
    if not isinstance(first, Incoming):
        return fleet  # no worker is there (or has ever run), or none answered in time
    # Every worker answers once; their number is unknown, so gather for `timeout`.
    rest = yield Gather(correlation_id, max(timeout - (clock() - started), 0.0))
    for incoming in [first, *rest]:
        reply = read_reply(incoming, max_bytes)
        if reply.error is None and isinstance(reply.value, dict):
            answer = WorkerJobs.decode(reply.value)
            fleet.workers.append({**answer.worker, "services": answer.services,
                                  "running": len(answer.jobs), "descriptions": answer.descriptions})
            fleet.jobs.extend(answer.jobs)
    return fleet


def launches(batch: Sequence[Launch], *, reply_to: str | None = None,
             offered: MutableSet[str] | None = None) -> Call[None]:
    """Queue launches durably (persistent, confirmed, in flight together).

    ``reply_to``: a queue of the caller's that each job's final record is pushed to.
    ``offered``: services known to have a launch queue (the caller's cache, added to here).

    Raises:
        UnknownService: no worker has ever offered one of the services (nothing was sent).
    """
    offered = set() if offered is None else offered
    for service in sorted({launch.service for launch in batch} - set(offered)):
        if not (yield QueueExists(launch_queue(service))):
            raise UnknownService(f"no worker has ever offered service {service!r} on this broker "
                                 f"(there is no queue {launch_queue(service)})")
        offered.add(service)
    bodies = [codec.encode(launch.encode()) for launch in batch]
    entries = _launches_entries(batch, [len(body) for body in bodies], reply_to) if len(batch) > 1 else []
    messages = [Message(LAUNCHES_EXCHANGE, launch.service, body,
                        persistent=True, message_id=launch.job_id, reply_to=reply_to,
                        type=LAUNCH_TYPE,
                        headers=None if entries else {CC_HEADER: [journal_stream(launch.job_id)]})
                for launch, body in zip(batch, bodies, strict=True)]
    # The entries first: a worker may take a launch before this call returns. Their outcome
    # is not checked: the streams exist wherever a worker made the launch queues.
    outcomes = (yield Publish([*entries, *messages], mandatory=True))[len(entries):]
    for launch, routed in zip(batch, outcomes, strict=True):
        if routed is not Routed.DELIVERED:
            offered.discard(launch.service)
            raise UnknownService(f"the launch of job {launch.job_id} was not routed "
                                 f"({routed.value}): no queue of service {launch.service!r}")


def _launches_entries(batch: Sequence[Launch], sizes: Sequence[int], reply_to: str | None) -> list[Message]:
    """The journal entries of many launches (``sizes``: their bodies'): ``launches`` entries
    per stream, service and operation (``launches_parts``) instead of a ``launch`` entry per
    job."""
    groups: dict[tuple[str, str, str | None], tuple[list[Launch], list[int]]] = {}
    for launch, size in zip(batch, sizes, strict=True):
        group = (journal_stream(launch.job_id), launch.service, launch.operation)
        launches, their_sizes = groups.setdefault(group, ([], []))
        launches.append(launch)
        their_sizes.append(size)
    entries = []
    for (stream, _, _), (launches, their_sizes) in groups.items():
        for part in launches_parts(launches, their_sizes):
            body = launches_entry_of(part)
            entries.append(Message(LAUNCHES_EXCHANGE, stream, codec.encode(body), persistent=True,
                                   message_id=uuid.uuid4().hex, reply_to=reply_to, type=LAUNCHES_TYPE))
    return entries


def control(message: Control) -> Call[None]:
    """Send a control message to every worker, kept in the control stream for an hour.

    Raises:
        UnknownService: it names a service no worker has ever offered.
    """
    if message.service is not None and not (yield QueueExists(launch_queue(message.service))):
        raise UnknownService(f"no worker has ever offered service {message.service!r} on this broker")
    body = codec.encode(message.encode())
    (routed,) = yield Publish([Message(CONTROL_EXCHANGE, "", body, persistent=True,
                                       message_id=uuid.uuid4().hex)])
    if routed is not Routed.DELIVERED:
        raise BrokerConnectionError(f"the control message was not routed ({routed.value})")


