"""Final records for a client: pushed to its own queue, or read from the records stream.

A worker publishes each job's record to the stream ``brokerexec.results`` and, by the same
publish (a ``BCC`` header), to the queue of the client that launched the job. So a client
waits for the records of its own jobs in that queue, as long as the connection they were
launched on lasts; for any other job (launched elsewhere, or before a reconnect: the queue is
exclusive and goes with its connection) it reads the stream from the job's launch time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from .. import codec
from ..constants import PROBE_TYPE, RECORD_TYPE, RESULTS_STREAM
from ..errors import DecodeError
from . import amqp_topology as topology
from .amqp import AmqpConnection, ConnectionSettings

__all__ = ["Records", "read_record"]

log = logging.getLogger(__name__)


class Records:
    """The records of one client's jobs; see the module docstring."""

    #: How many records (and launch notes) of jobs launched here are kept.
    KEPT = 10_000

    def __init__(self, connection: AmqpConnection, settings: ConnectionSettings) -> None:
        self.connection = connection
        self.settings = settings
        #: The client's own queue, named in each launch's ``reply_to``.
        self.queue = f"brokerexec.client.{uuid.uuid4().hex}"
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._launched_at: dict[str, int] = {}  # job id -> connection number at launch
        self._records_changed = threading.Condition()
        self._record_futures: dict[str, list[cf.Future[dict[str, Any]]]] = {}  # aio waiters

    def note_launched(self, bodies: list[dict[str, Any]]) -> None:
        """Remember the connection each job was launched on: its record is pushed to us."""
        with self._records_changed:
            for body in bodies:
                self._launched_at[str(body.get("job_id"))] = self.connection.reconnects
            while len(self._launched_at) > self.KEPT:
                del self._launched_at[next(iter(self._launched_at))]

    async def setup(self, channel: aio_pika.abc.AbstractChannel) -> None:
        # Exclusive: it goes with our connection. Records pushed while it was gone are
        # found in the stream instead (``fetch`` knows when to look there).
        queue = await channel.declare_queue(self.queue, exclusive=True)
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
            while len(self._records) > self.KEPT:
                evicted, _ = self._records.popitem(last=False)
                self._launched_at.pop(evicted, None)  # read from the stream from now on
            self._records_changed.notify_all()
            futures = self._record_futures.pop(job_id, [])
        for future in futures:
            if not future.done():
                future.set_result(record)

    def future(self, job_id: str) -> cf.Future[dict[str, Any]] | None:
        """See ``ClientTransport.record_future``."""
        future: cf.Future[dict[str, Any]] = cf.Future()
        with self._records_changed:
            if job_id in self._records:
                future.set_result(self._records[job_id])
                return future
            if (self._launched_at.get(job_id) != self.connection.reconnects
                    or not self.connection.connected):
                return None  # not launched on this connection: the stream has it
            self._record_futures.setdefault(job_id, []).append(future)
        future.add_done_callback(lambda f: self._forget(job_id, f))
        return future

    def _forget(self, job_id: str, future: cf.Future[dict[str, Any]]) -> None:
        if not future.cancelled():
            return  # resolved: already taken out of the table
        with self._records_changed:
            futures = self._record_futures.get(job_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._record_futures.pop(job_id, None)

    def fetch(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """The job's record, waiting up to ``timeout`` s (None: until it ends; 0: no wait)."""
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
                return self.connection.submit(
                    read_record(self.connection, job_id, remaining)).result()
            except (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                    RuntimeError, asyncio.TimeoutError) as exc:
                log.warning("reading the record of %s interrupted (%r); again", job_id, exc)


async def read_record(connection: AmqpConnection, job_id: str,
                      timeout: float | None) -> dict[str, Any] | None:
    """Read the records stream from the job's launch time until its record shows.

    Without a wait (``timeout == 0``) we append a probe and stop when we read it back:
    a stream has no end marker over AMQP 0-9-1, and everything stored before the probe
    comes before it.
    """
    await connection.wait_connected(connection.settings.connect_timeout)
    assert connection._connection is not None
    channel = await asyncio.wait_for(
        connection._connection.channel(publisher_confirms=False), 10)
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
