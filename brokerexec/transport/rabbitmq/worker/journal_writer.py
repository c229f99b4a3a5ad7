"""What a worker writes to the journal (``protocol/journal.py``): ``started``, ``checkpoint``
and ``record`` entries, each one confirmed publish to the job's journal stream, and what it
reads back there when it must know a job's history (a resume, a claim after a reconnect).

A record also goes to the launching client's queue, by sender-selected distribution (a
``BCC`` routing key the broker strips before delivery): one publish, one confirm.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .... import codec
from ....errors import CheckpointFailed
from ....protocol.journal import (
    BackSearch,
    Entry,
    JournalWindow,
    checkpoint_entry,
    started_entry,
)
from ....protocol.messages import Lease, Record
from ....protocol.names import (
    ATTEMPT_HEADER,
    BCC_HEADER,
    CHECKPOINT_TIME_HEADER,
    CHECKPOINT_TYPE,
    LAUNCHES_EXCHANGE,
    LEASE_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
    journal_stream,
)
from ..connection import AmqpConnection, Outgoing
from ..journal_reader import read_journal

__all__ = ["JournalWriter"]

#: How long reading a job's history may take before the worker gives up (and retries).
READ_TIMEOUT = 30.0
#: How many reads of the journal one worker makes at once; the rest wait their turn. After
#: a broker restart every claim is verified again and every lease comes back, each with a
#: read: all at once they would only queue in the broker, time out together, and hold a
#: channel each (a connection has about 2,000).
READS_AT_ONCE = 16


class JournalWriter:
    """A worker's writes to the journal, and its reads of one job's history (loop thread).

    Parameters:
        connection: the worker's connection.
        worker: who this worker is, in ``started`` entries.
        max_checkpoint_bytes: the largest checkpoint entry stored.
    """

    def __init__(self, connection: AmqpConnection, worker: dict[str, Any], *,
                 max_checkpoint_bytes: int) -> None:
        self.connection = connection
        self.worker = worker
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.reads = asyncio.Semaphore(READS_AT_ONCE)
        self.reads_waiting = 0  # reads waiting their turn now

    async def _write(self, job_id: str, kind: str, body: bytes, attempt: int,
                     bcc: str | None = None, more: dict[str, Any] | None = None) -> None:
        headers: dict[str, Any] = {ATTEMPT_HEADER: attempt, **(more or {})}
        if bcc:
            headers[BCC_HEADER] = [bcc]
        await self.connection.publish_confirmed([Outgoing.json(
            "", journal_stream(job_id), body, delivery_mode=2, message_id=job_id,
            correlation_id=job_id, message_type=kind, headers=headers)])

    async def started(self, job_id: str, service: str, attempt: int) -> float:
        """Write that execution ``attempt`` of the job starts here; returns its time."""
        now = time.time()
        await self._write(job_id, STARTED_TYPE, codec.encode(
            started_entry(job_id, service, attempt, self.worker, now)), attempt)
        return now

    def encode_checkpoint(self, job_id: str, service: str, attempt: int, state: Any, *,
                          settable: dict[str, Any] | None = None, covers: int = 0,
                          taken: float | None = None) -> bytes:
        """A checkpoint entry's body (any thread); ``taken``: its time (now by default), which
        with its attempt finds it again in the stream.

        Raises:
            CheckpointFailed: not JSON-able, or larger than the limit.
        """
        try:
            body = codec.encode(checkpoint_entry(job_id, service, attempt, taken or time.time(), state,
                                                 settable=settable, covers=covers))
        except (TypeError, ValueError) as exc:
            raise CheckpointFailed(f"the checkpoint of job {job_id} is not JSON-able: {exc}") from exc
        if len(body) > self.max_checkpoint_bytes:
            raise CheckpointFailed(
                f"the checkpoint of job {job_id} is {len(body):,} bytes, over the limit of "
                f"{self.max_checkpoint_bytes:,} (--max-checkpoint-bytes): not stored")
        return body

    async def checkpoint(self, job_id: str, attempt: int, body: bytes, taken: float) -> int | None:
        """Store a checkpoint entry made by :meth:`encode_checkpoint` at time ``taken``;
        return its offset in the stream (None if it was not found: a resume then searches)."""
        stamp = checkpoint_stamp(taken)
        await self._write(job_id, CHECKPOINT_TYPE, body, attempt, more={CHECKPOINT_TIME_HEADER: stamp})
        search = await self.search_back(job_id, lambda entries: _stamped(entries, attempt, stamp) is not None,
                                        decode=False)
        found = _stamped(search.entries, attempt, stamp)
        return found.offset if found is not None else None

    async def record(self, record: Record, reply_to: str | None) -> None:
        """Store a job's final record, pushed to ``reply_to`` as well."""
        await self._write(record.job_id, RECORD_TYPE, codec.encode(record.encode()), record.attempt,
                          bcc=reply_to)

    async def hand_over(self, lease: Lease) -> None:
        """Send a job back to its service's launch queue as a handed-over lease."""
        await self.connection.publish_confirmed([Outgoing.json(
            LAUNCHES_EXCHANGE, lease.launch.service, codec.encode(lease.encode()), delivery_mode=2,
            message_id=lease.launch.job_id, message_type=LEASE_TYPE,
            headers={ATTEMPT_HEADER: lease.attempt})])

    async def search_back(self, job_id: str, enough: Callable[[list[Entry]], bool] | None = None,
                          *, decode: bool = True) -> BackSearch:
        """What the journal holds of the job, read from its end backwards
        (:class:`~brokerexec.protocol.journal.BackSearch`): to its record, its launch, or
        where ``enough`` says.

        Raises:
            TimeoutError: it took over :data:`READ_TIMEOUT` seconds.
        """
        search = BackSearch(job_id, enough=enough, decode=decode)
        async with self._turn():
            deadline = time.monotonic() + READ_TIMEOUT  # from its turn: waiting is not reading
            while (window := search.next_window()) is not None:
                await read_journal(self.connection, window, max(deadline - time.monotonic(), 0.001))
                search.took(window)
        if not search.complete:
            raise TimeoutError(f"reading the journal of job {job_id} took over {READ_TIMEOUT} s")
        return search

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One of the :data:`READS_AT_ONCE` reads running at a time."""
        self.reads_waiting += 1
        try:
            await self.reads.acquire()
        finally:
            self.reads_waiting -= 1
        try:
            yield
        finally:
            self.reads.release()

    async def read_at(self, job_id: str, offset: int) -> list[Entry]:
        """The job's entry at ``offset`` of its stream, if it is there (a list of one, or
        none): a checkpoint a lease points at, read without reading anything else."""
        window = JournalWindow(job_id, offset, offset + 1)
        async with self._turn():
            await read_journal(self.connection, window, READ_TIMEOUT)
        return [entry for entry in window.entries if entry.offset == offset]


def checkpoint_stamp(taken: float) -> int:
    """A checkpoint entry's :data:`CHECKPOINT_TIME_HEADER`: its time in microseconds."""
    return round(taken * 1_000_000)


def _stamped(entries: list[Entry], attempt: int, stamp: int) -> Entry | None:
    """The checkpoint entry of ``attempt`` stamped ``stamp``, found by its headers."""
    return next((entry for entry in reversed(entries) if entry.kind == CHECKPOINT_TYPE
                 and entry.headers.get(ATTEMPT_HEADER) == attempt
                 and entry.headers.get(CHECKPOINT_TIME_HEADER) == stamp), None)
