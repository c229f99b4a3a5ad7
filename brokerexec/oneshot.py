"""A plain blocking pika client for one-shot commands (``brokerexec status ID`` and friends).

One-shot CLI verbs need no event-loop thread and no reconnection: one connection, one or
two round trips, exit. This transport speaks the very protocol of the RabbitMQ client
transport (``docs/protocol.md``) and declares objects with the same arguments, imported from
:mod:`brokerexec.transport.amqp_topology` (which imports nothing heavy), so the two can
never disagree. It never declares kiwipy's exchange: that exists once a worker has run, and
its absence (``NOT_FOUND``) means no worker holds any job.

Every pika error is turned into one of ours where it crosses out of here: connection
trouble into :class:`~brokerexec.BrokerConnectionError`, an unroutable RPC into
:class:`~brokerexec.JobNotFound`, a refusal by the broker into
:class:`~brokerexec.BrokerExecError`. Not thread-safe: one thread, one transport.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions

from . import codec
from .constants import (
    CONTROL_EXCHANGE,
    CONTROL_STREAM,
    DEADLINE_MS_HEADER,
    DEFAULT_LOCATE_TIMEOUT,
    DIRECT_REPLY_TO,
    JOB_ID_HEADER,
    KIWIPY_EXCHANGE,
    LAUNCH_QUEUE,
    PROBE_TYPE,
    RECORD_TYPE,
    RESULTS_STREAM,
    WORKERS_EXCHANGE,
    rpc_routing_key,
)
from .errors import BrokerConnectionError, BrokerExecError, DecodeError, JobNotFound, Timeout
from .protocol import Event, deadline_header, result_from_reply
from .transport import amqp_topology as topology
from .transport.base import ClientTransport, Subscription, redacted_url

__all__ = ["PikaTransport"]

log = logging.getLogger(__name__)

_NOT_FOUND = 404
#: pika ships no type hints: its BlockingChannel is ``Any`` to mypy.
BlockingChannel = Any


class PikaTransport(ClientTransport):
    """A blocking, single-threaded client transport for one command.

    Parameters:
        url: ``amqp://user:pass@host:port/vhost``.
        connect_timeout: seconds for the one connection attempt (socket and handshake).
        name: connection name shown by ``rabbitmqctl list_connections``.
        heartbeat: AMQP heartbeat (None: the broker's); 0 for a connection used in bursts.
        locate_timeout: how long an RPC to a job not claimed yet waits for its worker.

    Raises:
        BrokerConnectionError: the broker cannot be reached or refuses the login.
    """

    def __init__(self, url: str, *, connect_timeout: float = 3.0, name: str = "brokerexec-cli",
                 heartbeat: int | None = None, locate_timeout: float = DEFAULT_LOCATE_TIMEOUT) -> None:
        self.url = url
        self.locate_timeout = locate_timeout
        params = pika.URLParameters(url)
        if heartbeat is not None:
            params.heartbeat = heartbeat
        params.connection_attempts = 1
        params.retry_delay = 0
        params.socket_timeout = connect_timeout
        params.stack_timeout = connect_timeout * 2
        params.blocked_connection_timeout = connect_timeout * 2
        params.client_properties = {"connection_name": name}
        try:
            self.connection = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError as exc:
            raise BrokerConnectionError(
                f"cannot reach the broker at {redacted_url(url)}: {_reason(exc)}") from exc
        _send_frames_together(self.connection)
        self._channel: BlockingChannel = None
        self._declared = False  # the launch queue and records stream, once per connection
        self._replies: dict[str, list[dict[str, Any]]] = {}

    # ---- plumbing ----------------------------------------------------------------------------

    def _open_channel(self) -> BlockingChannel:
        """The channel, (re)opened after the broker closed it: confirms on, replies consumed.

        Direct reply-to only works on the channel that consumes it, so every RPC-like
        publish goes through this one channel.
        """
        if self._channel is None or not self._channel.is_open:
            with self._errors():
                channel = self.connection.channel()
                channel.confirm_delivery()
                channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
            self._channel = channel
        return self._channel

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn pika's exceptions into brokerexec's (see the module docstring)."""
        try:
            yield
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            raise BrokerExecError(f"the broker refused: {exc.reply_code} {exc.reply_text}") from exc
        except pika.exceptions.NackError as exc:
            raise BrokerConnectionError("the broker did not accept the message (nack)") from exc
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionClosed,
                pika.exceptions.StreamLostError, pika.exceptions.ChannelWrongStateError,
                OSError) as exc:
            raise BrokerConnectionError(
                f"lost the connection to {redacted_url(self.url)}: {_reason(exc)}") from exc

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        waiting = self._replies.get(props.correlation_id or "")
        if waiting is None:
            return  # a late reply to something we gave up on
        try:
            reply, _ = codec.decode_object(body, props.content_type)
        except DecodeError as exc:
            reply = {"exception": f"undecodable reply: {exc}"}
        waiting.append(reply)

    def _publish(self, exchange: str, routing_key: str, body: dict[str, Any], *,
                 mandatory: bool = False, persistent: bool = False, correlation_id: str | None = None,
                 message_id: str | None = None, headers: dict[str, Any] | None = None) -> None:
        properties = pika.BasicProperties(
            content_type=codec.JSON, delivery_mode=2 if persistent else 1,
            correlation_id=correlation_id, message_id=message_id, headers=headers,
            reply_to=DIRECT_REPLY_TO if correlation_id else None)
        self._open_channel().basic_publish(exchange, routing_key, codec.encode(body), properties,
                                           mandatory=mandatory)

    def _wait(self, until: Callable[[], bool], timeout: float | None) -> bool:
        """Pump the connection until ``until()`` or the time-out; True if it came true."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._errors():
            while not until():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.connection.process_data_events(time_limit=min(0.05, remaining or 0.05))
        return True

    # ---- ClientTransport -----------------------------------------------------------------------

    def rpc(self, job_id: str, body: dict[str, Any], timeout: float) -> Any:
        correlation_id = uuid.uuid4().hex
        replies: list[dict[str, Any]] = []
        self._replies[correlation_id] = replies
        try:
            try:
                with self._errors():
                    self._publish(KIWIPY_EXCHANGE, rpc_routing_key(job_id), body, mandatory=True,
                                  correlation_id=correlation_id)
            except pika.exceptions.UnroutableError:  # basic.return: not claimed (yet)
                self._locate(job_id, body, correlation_id, replies)
            except BrokerExecError as exc:
                if _reply_code(exc) == _NOT_FOUND:  # kiwipy's exchange: no worker has ever run
                    raise JobNotFound(f"no worker holds job {job_id}: no worker has run on "
                                      f"{redacted_url(self.url)} yet") from None
                raise
            if not self._wait(lambda: any("pending" not in r for r in replies), timeout):
                raise Timeout(f"job {job_id} did not answer {body.get('intent')!r} within {timeout} s")
            return result_from_reply(next(r for r in replies if "pending" not in r))
        finally:
            self._replies.pop(correlation_id, None)

    def _locate(self, job_id: str, body: dict[str, Any], correlation_id: str,
                replies: list[dict[str, Any]]) -> None:
        """Send the RPC to every worker: the one running the job claims it and answers.

        The deadline makes a worker that reads it late drop it, rather than act on it
        after we have given up.
        """
        not_found = JobNotFound(f"no worker holds job {job_id} (it ended, is still queued, "
                                "or never existed)")
        headers = {JOB_ID_HEADER: job_id, DEADLINE_MS_HEADER: deadline_header(self.locate_timeout)}
        try:
            with self._errors():
                self._publish(WORKERS_EXCHANGE, "", body, mandatory=True,
                              correlation_id=correlation_id, headers=headers)
        except pika.exceptions.UnroutableError:  # no worker at all
            raise not_found from None
        if not self._wait(lambda: bool(replies), self.locate_timeout + 0.3):
            raise not_found

    def launch(self, body: dict[str, Any], *, reply_to: str | None = None) -> None:
        """Queue a launch (``reply_to``: a queue the worker sends the final record to)."""
        job_id = str(body.get("job_id"))
        with self._errors():
            channel = self._open_channel()
            if not self._declared:
                try:
                    channel.queue_declare(LAUNCH_QUEUE, durable=True,
                                          arguments=topology.LAUNCH_QUEUE_ARGUMENTS)
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code != 406:  # PRECONDITION_FAILED: made by an older version
                        raise
                    log.warning(topology.OLD_LAUNCH_QUEUE_WARNING, LAUNCH_QUEUE, LAUNCH_QUEUE)
                    channel = self._open_channel()
                # Declared now, so the record has its stream even before any worker ran.
                channel.queue_declare(RESULTS_STREAM, durable=True,
                                      arguments=topology.RESULTS_STREAM_ARGUMENTS)
                self._declared = True
            try:
                channel.basic_publish("", LAUNCH_QUEUE, codec.encode(body), pika.BasicProperties(
                    content_type=codec.JSON, delivery_mode=2, message_id=job_id, reply_to=reply_to),
                    mandatory=True)
            except pika.exceptions.UnroutableError as exc:
                raise BrokerConnectionError(f"the launch of job {job_id} was not routed") from exc

    def control(self, body: dict[str, Any]) -> None:
        with self._errors():
            channel = self._open_channel()
            # The exchange and its stream may not exist yet if no worker has run: declare
            # them exactly as workers do, so the message is retained for the first one.
            channel.exchange_declare(CONTROL_EXCHANGE, "fanout", durable=True)
            channel.queue_declare(CONTROL_STREAM, durable=True,
                                  arguments=topology.CONTROL_STREAM_ARGUMENTS)
            channel.queue_bind(CONTROL_STREAM, CONTROL_EXCHANGE, "")
            self._publish(CONTROL_EXCHANGE, "", body, persistent=True, message_id=uuid.uuid4().hex)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        raise NotImplementedError("one-shot commands do not subscribe; use Client(url)")

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """Read the records stream from the job's launch time until its record shows.

        Without a wait (``timeout == 0``) a probe is appended and reading stops when it comes
        back: a stream has no end marker over AMQP 0-9-1, and all stored before the probe
        comes before it.
        """
        found: list[dict[str, Any] | None] = []
        probe = f"probe-{uuid.uuid4().hex}" if timeout == 0 else None

        def read(ch: BlockingChannel, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            ch.basic_ack(method.delivery_tag)
            if found:
                return
            if props.message_id == job_id and props.type == RECORD_TYPE:
                found.append(codec.decode_object(body, props.content_type)[0])
            elif probe is not None and props.message_id == probe:
                found.append(None)

        with self._errors():
            channel = self.connection.channel()  # a missing stream closes it: keep it apart
            try:
                channel.basic_qos(prefetch_count=500)  # streams need a prefetch
                channel.basic_consume(RESULTS_STREAM, read,
                                      arguments={"x-stream-offset": topology.records_offset(job_id)})
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == _NOT_FOUND:
                    return None  # no worker or launch has ever declared it: no record
                raise
            if probe is not None:
                channel.basic_publish("", RESULTS_STREAM, b"{}", pika.BasicProperties(
                    content_type=codec.JSON, message_id=probe, type=PROBE_TYPE))
        try:
            self._wait(lambda: bool(found), None if probe is not None else timeout)
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                channel.close()
        return found[0] if found else None

    def query_jobs(self, timeout: float) -> list[dict[str, Any]]:
        correlation_id = uuid.uuid4().hex
        replies: list[dict[str, Any]] = []
        self._replies[correlation_id] = replies
        try:
            try:
                with self._errors():
                    self._publish(WORKERS_EXCHANGE, "", {"intent": "jobs"}, correlation_id=correlation_id)
            except BrokerExecError as exc:
                if _reply_code(exc) == _NOT_FOUND:
                    return []  # no worker has ever declared the exchange
                raise
            self._wait(lambda: False, timeout)  # every worker answers once; gather for `timeout`
        finally:
            self._replies.pop(correlation_id, None)
        jobs: list[dict[str, Any]] = []
        for reply in replies:
            answer = reply.get("result")
            if isinstance(answer, dict):
                jobs.extend(job for job in answer.get("jobs") or [] if isinstance(job, dict))
        return jobs

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            if self.connection.is_open:
                self.connection.close()



def _reply_code(exc: BaseException) -> int | None:
    cause = exc.__cause__
    return cause.reply_code if isinstance(cause, pika.exceptions.ChannelClosedByBroker) else None


def _reason(exc: BaseException) -> str:
    """pika nests the cause in args and ``.exception``; dig out something a person can read."""
    for _ in range(5):
        inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
        inner = inner or getattr(exc, "exception", None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return str(exc) or type(exc).__name__


def _send_frames_together(connection: pika.BlockingConnection) -> None:
    """Make pika write a message's frames (method, header, body) with one ``send()``.

    pika queues each frame as a buffer of its own and sends each with a system call: three
    per publish, the largest single cost of a launch on the client. Joining them changes
    nothing on the wire. Left as it is if pika's internals are not the ones expected.
    """
    impl = getattr(connection, "_impl", None)
    output = getattr(impl, "_output_marshaled_frames", None)
    if output is None:
        return

    def output_together(frames: Any) -> None:
        output([b"".join(frames)] if len(frames) > 1 else frames)

    impl._output_marshaled_frames = output_together  # type: ignore[union-attr]
