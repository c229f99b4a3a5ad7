"""The writes that need a job to be this worker's: its checkpoints, its record, its handover.

Each waits until :class:`~.ownership.Ownership` says the proof of ownership is good on
the current connection (claiming the job first if need be), and writes nothing for a copy
that was superseded: an older execution never overrides the job's owner.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ....errors import CheckpointFailed, NotDurable
from ....protocol.changes import uncovered
from ....protocol.messages import Record
from .ownership import Ownership

__all__ = ["OwnerWrites"]

log = logging.getLogger(__name__)

class OwnerWrites:
    """See the module docstring (loop thread)."""

    def __init__(self, ownership: Ownership) -> None:
        self.ownership = ownership
        self.connection = ownership.connection
        self.journal = ownership.journal
        self.leases = ownership.leases

    async def store_checkpoint(self, job_id: str, body: bytes, taken: float, covers: int) -> None:
        """Store a checkpoint entry, then point the lease at it: atomic, as the journal entry
        either is whole or is not there, and the lease moves only after it is. The changes
        it ``covers`` leave the lease with it.

        Raises:
            CheckpointFailed: the job is not (or no longer) this worker's.
        """
        owned = self.ownership.get(job_id)
        # A stored checkpoint is worth something only with a lease pointing at it: claimed.
        if (owned is None or not await self.ownership.ensure_claimed(owned)
                or not await self.ownership.until_valid(owned)):
            raise CheckpointFailed(f"job {job_id} is not this worker's any more: checkpoint not stored")
        pointer: dict[str, Any] = {"time": taken, "attempt": owned.job.attempt, "covers": covers}
        try:  # the lease points at the very entry: a resume reads it and nothing else
            pointer["offset"] = await self.journal.checkpoint(job_id, owned.job.attempt, body, taken)
        except TimeoutError as exc:  # stored, not found again: a resume searches for it
            log.warning("the offset of job %s's checkpoint was not found (%r)", job_id, exc)
        if pointer.get("offset") is None:
            pointer.pop("offset", None)
        owned.checkpoint = pointer
        owned.covered = max(owned.covered, covers)
        owned.changes = uncovered(owned.changes, owned.covered)
        await self.leases.hold(job_id, self.ownership.lease_of(owned))

    async def note_changes(self, job_id: str, changes: list[dict[str, Any]]) -> None:
        """Make the sets and invokes applied since the job's newest checkpoint durable: the
        lease is replaced by one that carries them (confirmed, and back in this worker's
        hands), before their senders are told they were applied.

        Raises:
            NotDurable: the job is not (or no longer) this worker's.
        """
        owned = self.ownership.get(job_id)
        if (owned is None or not await self.ownership.ensure_claimed(owned)
                or not await self.ownership.until_valid(owned)):
            raise NotDurable(f"job {job_id} is not this worker's any more")
        owned.changes = uncovered(changes, owned.covered)
        await self.leases.hold(job_id, self.ownership.lease_of(owned))

    async def finish(self, record: Record, reply_to: str | None = None) -> None:
        """Store ``record`` (confirmed, retried across reconnects), then let the job go.

        A copy that lost its claim stores nothing. ``reply_to``: where the record also goes
        for a job that never ran here (a launch refused as it came).
        """
        owned = self.ownership.get(record.job_id)
        if owned is None:
            await self._store_refusal(record, reply_to)
            return
        owned.record = record
        await self.ownership.end(owned)

    async def _store_refusal(self, record: Record, reply_to: str | None) -> None:
        delay = self.connection.settings.backoff_initial
        while True:
            try:
                await self.journal.record(record, reply_to)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connection.closing:
                    raise
                log.warning("storing the record of %s failed (%r); retrying", record.job_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.connection.settings.backoff_max)

    async def hand_over(self, job_id: str) -> None:
        """Give the job back to its launch queue, as a lease to resume from its last stored
        checkpoint, and let it go here (a graceful stop): no record. The queue goes first:
        whoever takes the handed-over lease claims it at once; until it is sent, the lease
        held here stands for the job, should this worker die."""
        owned = self.ownership.get(job_id)
        if owned is not None:
            await self.ownership.end(owned, handover=True)
