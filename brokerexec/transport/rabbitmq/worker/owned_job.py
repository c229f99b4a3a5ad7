"""One job a worker owns, as :mod:`.ownership` tracks it: its proofs of ownership, and
its events held while those are verified again after a reconnect."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...base import PreparedJob
from ..delivery import Delivery
from ..outbox import Outgoing

__all__ = ["HELD_EVENTS", "OwnedJob"]

#: How many events of a job are held while its claim is verified again.
HELD_EVENTS = 1_000


@dataclass(eq=False)
class OwnedJob:
    """A job this worker runs, and what makes it this worker's."""

    job: PreparedJob
    delivery: Delivery | None  # the unacked launch, until claimed
    generation: int  # of the launch channel that delivered it
    reply_to: str | None
    locked: bool = False  # holds the job's exclusive queue
    claimed: bool = False  # and its started entry and lease are written
    check_journal: bool = False  # an earlier execution may exist: read the journal first
    resuming: bool = False  # taken from a lease, its journal not read yet: claimed by the resume only
    verified: int = 0  # the connection generation its claim was last verified in
    lock_runs: int = 0
    started_at: float = 0.0
    checkpoint: dict[str, Any] | None = None  # where its newest stored checkpoint is
    changes: list[dict[str, Any]] = field(default_factory=list)  # applied since it (its lease's)
    covered: int = 0  # the newest change a stored checkpoint covers
    superseded: bool = False
    superseded_why: str = ""
    ending: bool = False  # its record or its handover is on the way
    record_due: bool = False  # its leases say its record is on the way
    ending_held: bool = False  # and such a lease is held: the record may be written
    claiming: asyncio.Task[bool] | None = None
    locking: asyncio.Task[bool] | None = None
    timer: asyncio.TimerHandle | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[Outgoing] = field(default_factory=list)  # its events, until it may speak
    held_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def speak(self, items: list[Outgoing], may: Callable[[], bool], post: Callable[[Outgoing], None]) -> None:
        """Post the job's events if ``may()`` (its proof holds), else hold them for
        :meth:`flush`; nothing once muted (any thread)."""
        with self.held_lock:
            if self.superseded:
                return
            if not self.held and may():
                for item in items:
                    post(item)
            elif len(self.held) < HELD_EVENTS:
                self.held.extend(items)

    def flush(self, post: Callable[[Outgoing], None]) -> None:
        """The job may speak: post what it held, in order."""
        with self.held_lock:
            held, self.held = self.held, []
            for item in held:
                post(item)

    def mute(self, reason: str) -> None:
        """Superseded: publish nothing from now on, and drop what is held."""
        with self.held_lock:
            self.superseded, self.superseded_why = True, reason
            self.held.clear()
        self.changed.set()
