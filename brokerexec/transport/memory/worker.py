"""A worker's side of the in-memory transport (``memory.py``)."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from typing import Any

from ...errors import CheckpointFailed
from ...protocol.events import Event
from ...protocol.messages import Launch, Record
from ..base import WorkerHooks, WorkerTransport
from .broker import MemoryBroker, Waiting

__all__ = ["MemoryWorkerTransport"]


def _done(error: BaseException | None = None) -> cf.Future[None]:
    future: cf.Future[None] = cf.Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


class MemoryWorkerTransport(WorkerTransport):
    """A worker's side of a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.hooks: WorkerHooks | None = None
        self.services: tuple[str, ...] = ()
        self.free = 0
        self.consuming = False
        self._running: dict[str, tuple[Launch, int]] = {}

    def serve(self, hooks: WorkerHooks, capacity: int, services: Sequence[str] = ()) -> None:
        self.hooks, self.free, self.consuming = hooks, capacity, True
        self.services = tuple(services)
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
            job.attempt, job.resumed = waiting.attempt + 1, waiting.resumed
        if self.broker.claim(job.job_id, self, job.attempt):
            self._running[job.job_id] = (waiting.launch, job.attempt)
            self.hooks.begin(job)
        else:
            self.hooks.cancel(job, f"job {job.job_id} is owned by another worker, or ended")

    def publish_event(self, event: Event) -> None:
        self.broker.publish(event)

    def finish(self, record: Record) -> cf.Future[None]:
        self._running.pop(record.job_id, None)
        self.broker.store_result(record)
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
        launch, attempt = self._running.pop(job_id)
        self.broker.hand_back(job_id, launch, attempt)
        return _done()

    def stop_taking_work(self) -> None:
        self.consuming = False

    def close(self) -> None:
        self.consuming = False
        self.broker.remove_worker(self)
