"""What a worker writes to the journal (``protocol/journal.py``): ``started``, ``checkpoint``
and ``record`` entries, each one confirmed publish to the job's journal stream, and what it
reads back there when it must know a job's history (a resume, a claim after a reconnect).

A record also goes to the launching client's queue, by sender-selected distribution (a
``BCC`` routing key the broker strips before delivery): one publish, one confirm.
"""

from __future__ import annotations

import time
from typing import Any

from .... import codec
from ....errors import CheckpointFailed
from ....protocol.journal import JournalSearch, checkpoint_entry, started_entry
from ....protocol.messages import Lease, Record
from ....protocol.names import (
    ATTEMPT_HEADER,
    BCC_HEADER,
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

    async def _write(self, job_id: str, kind: str, body: bytes, attempt: int,
                     bcc: str | None = None) -> None:
        headers: dict[str, Any] = {ATTEMPT_HEADER: attempt}
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

    def encode_checkpoint(self, job_id: str, service: str, attempt: int, state: Any) -> bytes:
        """A checkpoint entry's body (any thread).

        Raises:
            CheckpointFailed: not JSON-able, or larger than the limit.
        """
        try:
            body = codec.encode(checkpoint_entry(job_id, service, attempt, time.time(), state))
        except (TypeError, ValueError) as exc:
            raise CheckpointFailed(f"the checkpoint of job {job_id} is not JSON-able: {exc}") from exc
        if len(body) > self.max_checkpoint_bytes:
            raise CheckpointFailed(
                f"the checkpoint of job {job_id} is {len(body):,} bytes, over the limit of "
                f"{self.max_checkpoint_bytes:,} (--max-checkpoint-bytes): not stored")
        return body

    async def checkpoint(self, job_id: str, attempt: int, body: bytes) -> None:
        """Store a checkpoint entry made by :meth:`encode_checkpoint`."""
        await self._write(job_id, CHECKPOINT_TYPE, body, attempt)

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

    async def history(self, job_id: str, since: float | None = None) -> JournalSearch:
        """Everything the journal holds of the job now, from ``since`` (epoch seconds)."""
        search = JournalSearch(job_id, wait=False, since=since)
        await read_journal(self.connection, search, READ_TIMEOUT)
        if not search.done:
            raise TimeoutError(f"reading the journal of job {job_id} took over {READ_TIMEOUT} s")
        return search
