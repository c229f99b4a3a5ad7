"""A worker's side of the in-memory transport (``memory.py``).

Who owns a job is decided by the same state machine as over RabbitMQ
(:class:`~brokerexec.protocol.ownership.JobOwnership`); this module carries out its actions
on a :class:`MemoryBroker`, where each is one call: the broker's owner of a job stands for
its queue and its lease, its records for the journal.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import CheckpointFailed
from ...protocol import ownership as own
from ...protocol.events import Event
from ...protocol.messages import Record
from ..base import PreparedJob, WorkerHooks, WorkerTransport
from .broker import MemoryBroker, Waiting

__all__ = ["MemoryWorkerTransport"]

log = logging.getLogger(__name__)


def _done(error: BaseException | None = None) -> cf.Future[None]:
    future: cf.Future[None] = cf.Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


@dataclass(eq=False)
class _Owned:
    """A job on this worker: its machine, and what the actions need."""

    job: PreparedJob
    machine: own.JobOwnership
    waiting: Waiting
    record: Record | None = None


class MemoryWorkerTransport(WorkerTransport):
    """A worker's side of a :class:`MemoryBroker`.

    Parameters:
        broker: the broker.
        host_info: who the worker is (its records and ``started`` entries name it); None:
            the worker says, in its records only.
    """

    def __init__(self, broker: MemoryBroker, host_info: dict[str, Any] | None = None) -> None:
        self.broker = broker
        self.host_info = host_info
        self.hooks: WorkerHooks | None = None
        self.services: tuple[str, ...] = ()
        self.free = 0
        self.capacity = 0
        self.consuming = False
        self._owned: dict[str, _Owned] = {}
        self._lock = threading.RLock()  # one job's machine is fed by one thread at a time

    def serve(self, hooks: WorkerHooks, capacity: int, services: Sequence[str] = ()) -> None:
        self.hooks, self.free, self.consuming = hooks, capacity, True
        self.services = tuple(services)
        self.capacity = capacity  # the jobs query says it
        self.broker.offer(self.services)
        self.broker.add_worker(self)
        self.broker.call_soon(self.broker._deliver_launches)

    def set_free_capacity(self, free: int) -> None:
        self.free = free
        if free > 0:
            self.broker.call_soon(self.broker._deliver_launches)

    def deliver_launch(self, waiting: Waiting) -> None:
        assert self.hooks is not None
        job = self.hooks.prepare(waiting.launch)
        if job is None:
            return
        if waiting.resumed is not None:
            machine = own.JobOwnership.of_lease(job.job_id, waiting.attempt, handed_over=True)
        else:  # claimed before it runs, the journal read first: a job runs once
            machine = own.JobOwnership.of_launch(job.job_id, check_first=True)
        owned = _Owned(job, machine, waiting)
        with self._lock:
            self._owned[job.job_id] = owned
            self._run(owned, machine.start())

    def _feed(self, job_id: str, event: own.Event) -> bool:
        with self._lock:
            owned = self._owned.get(job_id)
            if owned is None:
                return False
            self._run(owned, owned.machine.handle(event))
            return True

    def _run(self, owned: _Owned, actions: list[own.Action]) -> None:
        """Carry out ``actions`` in order; an action's answer goes to the machine, whose
        actions come before the rest."""
        pending = list(reversed(actions))
        while pending:
            event = self._perform(owned, pending.pop())
            if event is not None:
                pending.extend(reversed(owned.machine.handle(event)))

    def _perform(self, owned: _Owned, action: own.Action) -> own.Event | None:
        """What each action is on a MemoryBroker; the event that answers it, if any."""
        broker, job = self.broker, owned.job
        job.attempt = owned.machine.attempt
        if isinstance(action, own.Lock):
            return own.Locked() if broker.lock(job.job_id, self) else own.LockRefused()
        if isinstance(action, (own.WaitGrace, own.CheckJournal, own.ReadResumePoint)):
            return self._read_journal(owned, action)
        if isinstance(action, own.WriteStarted):
            broker.started(job.job_id, job.attempt, self.host_info or {})
            return own.StartedWritten()
        if isinstance(action, own.HoldLease):
            return own.LeaseHeld(0)  # the broker's owner map is the lease: one connection
        if isinstance(action, own.StoreRecord):
            assert owned.record is not None
            broker.store_result(owned.record)
            return own.RecordStored()
        if isinstance(action, own.SendHandOver):
            broker.hand_back(job.job_id, job.launch, job.attempt)
            return own.HandOverSent()
        self._do(owned, action)
        return None

    def _read_journal(self, owned: _Owned, action: own.Action) -> own.Event:
        ended = self.broker.ended(owned.job.job_id)
        if isinstance(action, own.WaitGrace):
            return own.GraceOver(ended)
        if isinstance(action, own.CheckJournal):
            return own.JournalSays("it ended already" if ended else "")
        owned.job.resumed = owned.waiting.resumed
        return own.ResumePointRead(ended, owned.waiting.attempt)

    def _do(self, owned: _Owned, action: own.Action) -> None:
        """The actions no event answers (AckLaunch, ReleaseLease and Speak are nothing here:
        nothing is unacknowledged or held in memory)."""
        assert self.hooks is not None
        job = owned.job
        if isinstance(action, own.Unlock):
            self.broker.unlock(job.job_id, self)
        elif isinstance(action, own.NackLaunch):
            self.broker.requeue(owned.waiting)
        elif isinstance(action, own.Begin):
            self.hooks.begin(job)
        elif isinstance(action, own.Cancel):
            self.hooks.cancel(job, action.reason)
        elif isinstance(action, own.Supersede):
            self.hooks.superseded(job.job_id, action.reason)
        elif isinstance(action, own.Forget):
            self._owned.pop(job.job_id, None)
        elif isinstance(action, own.ClaimLater):
            log.warning("job %s: a claim failed here; the memory broker does not retry it", job.job_id)

    def publish_event(self, event: Event) -> None:
        self.broker.publish(event)

    def finish(self, record: Record) -> cf.Future[None]:
        with self._lock:
            owned = self._owned.get(record.job_id)
            if owned is None:  # a launch refused as it came
                self.broker.store_result(record)
                return _done()
            owned.record = record
            self._run(owned, owned.machine.handle(own.EndDue()))
        return _done()

    def store_checkpoint(self, job_id: str, state: Any, settable: dict[str, Any],
                         covers: int) -> cf.Future[None]:
        try:
            self.broker.store_checkpoint(job_id, state, settable, covers)
        except (TypeError, ValueError) as exc:
            return _done(CheckpointFailed(f"the checkpoint of job {job_id} is not JSON-able: {exc}"))
        return _done()

    def note_changes(self, job_id: str, changes: list[dict[str, Any]]) -> cf.Future[None]:
        try:
            self.broker.note_changes(job_id, changes)
        except (TypeError, ValueError) as exc:
            return _done(exc)
        return _done()

    def hand_over(self, job_id: str) -> cf.Future[None]:
        self._feed(job_id, own.EndDue(handover=True))
        return _done()

    def stop_taking_work(self) -> None:
        self.consuming = False

    def close(self) -> None:
        self.consuming = False
        self.broker.remove_worker(self)
