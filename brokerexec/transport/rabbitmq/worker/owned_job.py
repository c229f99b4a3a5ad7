"""One job a worker owns, as :mod:`.ownership` tracks it: its proofs of ownership, and
its events held while those are verified again after a reconnect."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ....protocol.messages import Lease, Record
from ....protocol.ownership import JobOwnership
from ...base import PreparedJob
from ..delivery import Delivery
from ..outbox import Outgoing

__all__ = ["HELD_EVENTS", "OwnedJob"]

#: How many events of a job are held while its claim is verified again.
HELD_EVENTS = 1_000


@dataclass(eq=False)
class OwnedJob:
    """A job this worker runs: its state machine (:class:`~brokerexec.protocol.ownership.
    JobOwnership`, which decides), and what the driver keeps beside it (the deliveries, the
    lease's contents, the events held)."""

    job: PreparedJob
    machine: JobOwnership
    delivery: Delivery | None  # the unacked launch (or lease), until claimed
    generation: int  # of the launch channel that delivered it
    reply_to: str | None
    lease: Lease | None = None  # the lease it was taken from, if resumed
    lock_runs: int = 0
    started_at: float = 0.0
    checkpoint: dict[str, Any] | None = None  # where its newest stored checkpoint is
    changes: list[dict[str, Any]] = field(default_factory=list)  # applied since it (its lease's)
    covered: int = 0  # the newest change a stored checkpoint covers
    record: Record | None = None  # once it ended: the record to store
    error: BaseException | None = None  # why its last step failed
    superseded: bool = False  # muted (read on any thread)
    superseded_why: str = ""
    timer: asyncio.TimerHandle | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Done once the job is let go here (its machine's ``Forget``).
    let_go: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    held: list[Outgoing] = field(default_factory=list)  # its events, until it may speak
    held_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def claimed(self) -> bool:
        return self.machine.claimed

    @property
    def resuming(self) -> bool:
        return self.machine.resuming

    @property
    def ending(self) -> bool:
        return bool(self.machine.end)

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
