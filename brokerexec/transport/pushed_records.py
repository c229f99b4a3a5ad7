"""The records a worker pushes to the client that launched the job, kept for their waiters.

A worker publishes each job's record to the stream ``brokerexec.results`` and, by the same
publish (a ``BCC`` header), to the queue named in the launch's ``reply_to``: the launching
client's own queue. That queue is exclusive, so it goes with its connection: a record is
known to come here only for jobs launched on the connection we still have. For any other job
(launched elsewhere, or before a reconnect) the client reads the stream instead.

:class:`PushedRecords` is that bookkeeping, free of I/O and thread-safe, shared by the
blocking and asyncio client transports: they tell it which connection they are on
(:meth:`~PushedRecords.connected` / :meth:`~PushedRecords.disconnected`), what they
launched, and what arrived.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from ..protocol.names import CLIENT_QUEUE_PREFIX

__all__ = ["PushedRecords"]


class PushedRecords:
    """See the module docstring."""

    #: How many records (and launch notes) of jobs launched here are kept.
    KEPT = 10_000

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._launched_on: dict[str, int] = {}  # job id -> connection it was launched on
        self._futures: dict[str, list[cf.Future[dict[str, Any]]]] = {}
        self._connection = 0  # counts connections; 0: none yet
        self._live = False
        self._queue = ""

    @property
    def queue(self) -> str | None:
        """The queue to name in launches' ``reply_to`` now, or None while disconnected."""
        return self._queue if self._live else None

    def connected(self) -> str:
        """A new connection: return the name of the queue to declare (exclusive) and consume."""
        with self._cond:
            self._connection += 1
            # A fresh name each time: the broker may still hold the old one for a while.
            self._queue = f"{CLIENT_QUEUE_PREFIX}{uuid.uuid4().hex}"
            self._live = True
            return self._queue

    def disconnected(self) -> None:
        """The connection is gone: its records will not come here any more."""
        with self._cond:
            self._live = False
            futures, self._futures = self._futures, {}
            self._cond.notify_all()
        for waiting in futures.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(ConnectionError("reconnected: read the records stream"))

    def note_launched(self, job_ids: list[str]) -> str | None:
        """Remember that these jobs are launched now; return the ``reply_to`` to send them
        with (None while disconnected: their records are then read from the stream)."""
        with self._cond:
            if not self._live:
                return None
            for job_id in job_ids:
                self._launched_on[job_id] = self._connection
            while len(self._launched_on) > self.KEPT:
                del self._launched_on[next(iter(self._launched_on))]
            return self._queue

    def arrived(self, job_id: str, record: dict[str, Any]) -> None:
        """A record came to our queue (the transport's thread)."""
        with self._cond:
            self._records[job_id] = record
            while len(self._records) > self.KEPT:
                evicted, _ = self._records.popitem(last=False)
                self._launched_on.pop(evicted, None)  # read from the stream from now on
            self._cond.notify_all()
            futures = self._futures.pop(job_id, [])
        for future in futures:
            if not future.done():
                future.set_result(record)

    def _comes_here(self, job_id: str) -> bool:
        return self._live and self._launched_on.get(job_id) == self._connection

    def wait(self, job_id: str, timeout: float | None) -> tuple[bool, dict[str, Any] | None]:
        """Wait for a pushed record: ``(True, record)`` once it is here; ``(True, None)`` on
        time-out; ``(False, None)`` if it will not come here and the stream has it (or, with
        ``timeout == 0``, may have it already: the push may be on its way)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._comes_here(job_id):
                if job_id in self._records:
                    return True, self._records[job_id]
                if timeout == 0:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return True, None
                self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))
            return False, self._records.get(job_id)

    def future(self, job_id: str) -> cf.Future[dict[str, Any]] | None:
        """A future of the job's pushed record (failing with ``ConnectionError`` if the
        connection goes first), or None if it will not come here."""
        future: cf.Future[dict[str, Any]] = cf.Future()
        with self._cond:
            if job_id in self._records:
                future.set_result(self._records[job_id])
                return future
            if not self._comes_here(job_id):
                return None
            self._futures.setdefault(job_id, []).append(future)
        future.add_done_callback(lambda f: self._forget(job_id, f))
        return future

    def _forget(self, job_id: str, future: cf.Future[dict[str, Any]]) -> None:
        if not future.cancelled():
            return  # resolved: already taken out of the table
        with self._cond:
            waiting = self._futures.get(job_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._futures.pop(job_id, None)
