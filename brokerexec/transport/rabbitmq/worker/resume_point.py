"""Where a job taken from a lease resumes: read from the journal without reading its life.

:class:`~brokerexec.protocol.ownership.JobOwnership` decides when (the resume grace, the
lock, then this read); this module reads and applies what was found: the checkpoint, the
settable values and the changes to give the next attempt (docs/durability.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ....protocol.changes import uncovered
from ....protocol.journal import Entry, entry_of
from ....protocol.messages import Lease
from ....protocol.names import CHECKPOINT_TYPE, STARTED_TYPE
from ...base import Resumed
from .journal_writer import JournalWriter
from .owned_job import OwnedJob

__all__ = ["ResumePoint", "apply", "read"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """What the journal says of a leased job: ``ended`` if it has a record; the checkpoint
    to resume from (its body, with its ``offset``), or None; the newest attempt seen."""

    ended: bool
    checkpoint: dict[str, Any] | None
    newest: int


async def read(journal: JournalWriter, job_id: str, lease: Lease) -> ResumePoint:
    """Read the resume point of ``job_id``, without reading the job's life:

    * the checkpoint at the offset its lease points at, one entry;
    * the stream back from its end to the newest entry of the lease's attempt (its last
      checkpoint, or its start), for a record: a copy of a lease may wait in its queue
      while every worker is busy, and meanwhile its worker may have come back, claimed
      the job again and ended it. A handed-over lease was sent after its worker let the
      job go: no record to look for;
    * and back to the newest checkpoint where the pointer does not answer (an older
      lease, an entry gone).
    """
    pointer = lease.checkpoint or {}
    checkpoint: dict[str, Any] | None = None
    at = pointer.get("offset")
    if isinstance(at, int) and not isinstance(at, bool) and at >= 0:
        for entry in await journal.read_at(job_id, at):
            if (entry.kind == CHECKPOINT_TYPE and entry.body.get("attempt") == pointer.get("attempt")
                    and entry.body.get("time") == pointer.get("time")):
                checkpoint = {**entry.body, "offset": at}
        if checkpoint is None:
            log.warning("job %s: no checkpoint at offset %d, where its lease points: searching",
                        job_id, at)
    if lease.handed_over and (checkpoint is not None or not pointer):
        return ResumePoint(False, checkpoint, lease.attempt)  # sent once its worker let go
    attempt = lease.attempt

    def enough(entries: list[Entry]) -> bool:  # nothing older changes the answer
        if checkpoint is None and pointer:
            return any(e.kind == CHECKPOINT_TYPE for e in entries)
        return any(e.kind in (STARTED_TYPE, CHECKPOINT_TYPE) and _attempt_of(e) >= attempt
                   for e in entries)

    search = await journal.search_back(job_id, enough)
    history = search.history
    if checkpoint is None and history.checkpoint is not None:
        found = entry_of(search.entries, CHECKPOINT_TYPE, time=history.checkpoint.get("time"))
        checkpoint = {**history.checkpoint, "offset": found.offset if found else None}
    return ResumePoint(history.record is not None, checkpoint, max(lease.attempt, history.attempt))


def apply(owned: OwnedJob, lease: Lease, point: ResumePoint) -> None:
    """Give the job what it resumes with: its checkpoint, settable values and changes; its
    lease points at that checkpoint and carries the changes until one of its own covers them."""
    job, checkpoint = owned.job, point.checkpoint
    if checkpoint is not None and checkpoint.get("service") not in (None, job.service):
        checkpoint = None
    covers = _covers(checkpoint)
    settable = checkpoint.get("settable") if checkpoint else None
    # The lease's changes were noted after ITS checkpoint: the one found may be newer.
    changes = uncovered(lease.changes, covers)
    job.resumed = Resumed(checkpoint.get("state") if checkpoint else None, checkpoint is not None,
                          lease.worker, lease.handed_over,
                          settable=settable if isinstance(settable, dict) else {}, changes=changes,
                          checkpoint_time=checkpoint.get("time") if checkpoint else None, covers=covers)
    owned.checkpoint = lease.checkpoint
    if checkpoint is not None:
        owned.checkpoint = {"time": checkpoint["time"], "attempt": checkpoint.get("attempt", 1),
                            "covers": covers}
        if checkpoint.get("offset") is not None:
            owned.checkpoint["offset"] = checkpoint["offset"]
    owned.changes, owned.covered = changes, covers


def _covers(checkpoint: dict[str, Any] | None) -> int:
    covers = (checkpoint or {}).get("covers", 0)
    return covers if isinstance(covers, int) and not isinstance(covers, bool) and covers >= 0 else 0


def _attempt_of(entry: Entry) -> int:
    attempt = entry.body.get("attempt", 1)
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 1
