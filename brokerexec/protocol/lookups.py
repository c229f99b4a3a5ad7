"""The client's calls that read the journal: a job's status and result wherever it is in its
life, the abort of a job that has not started, and the listing of the fleet's jobs.

Sans-I/O, like :mod:`.calls` (whose commands they yield): the blocking and the asyncio
transports drive them alike.

* ``status``: the job's worker answers if one holds it; else the journal tells: ended (its
  record), ``queued`` (launched, not started), ``resuming`` (its worker was lost, or handed
  it over; another takes it from its last checkpoint); else :class:`~brokerexec.JobNotFound`.
  An ended job is answered from the history store when an indexer runs and has its record,
  else from the journal, without asking every worker.
* ``abort``: a job that no worker holds yet is *cancelled*: a control message tells every
  worker never to start it, and an aborted record ends it in the journal now, pushed to its
  launching client too.
* ``result``: the record, from the history store when it has it, else from the journal; an
  id neither knows is :class:`~brokerexec.JobNotFound` at once, not a wait.
* ``listing``: the running jobs (every worker answers), the queued ones (browsed in the
  launch queues of the services offered), and with ``ended_since`` the records since then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import codec
from ..constants import MAX_ENTRY_BYTES
from ..errors import DecodeError, InvalidState, JobNotFound, Timeout
from .calls import Fleet, fleet_query, rpc
from .commands import Browse, Call, Incoming, Message, Publish, ReadJournal, Routed
from .history import stored_record
from .intents import Intent, Signal
from .journal import BackSearch, Entry, JournalScan, JournalSearch, JournalWindow, attempt_of
from .names import (
    BCC_HEADER,
    CONTROL_EXCHANGE,
    LEASE_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
    journal_stream,
    launch_queue,
    new_job_id,
)

__all__ = ["Listing", "abort", "listing", "result", "status"]

#: How long a read of the journal to its probe may take at most (seconds): it ends at the
#: probe, in milliseconds, unless the broker is in trouble.
READ_LIMIT = 30.0


def _unknown(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id}: no worker holds it and the journal has no trace of it "
                       "(never launched, or ended longer ago than the journal keeps entries)")


def search_back(job_id: str, seconds: float | None,
                enough: Callable[[list[Entry]], bool] | None = None) -> Call[BackSearch]:
    """Read the job's journal backwards from its end (:class:`~.journal.BackSearch`), for
    ``seconds`` at most in all."""
    search = BackSearch(job_id, enough=enough)
    deadline = None if seconds is None else time.monotonic() + seconds
    while (window := search.next_window()) is not None:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        read = yield ReadJournal(window, left)
        assert isinstance(read, JournalWindow)
        search.took(read)
    return search


def _started(entries: list[Entry]) -> bool:
    # A status needs no more than the newest attempt's start (where it ran, since when).
    return any(entry.kind == STARTED_TYPE for entry in entries)


def _read(job_id: str, seconds: float | None) -> Call[BackSearch]:
    return (yield from search_back(job_id, seconds, _started))


def status(job_id: str, *, timeout: float, locate_timeout: float, max_bytes: int) -> Call[dict[str, Any]]:
    """The job's status, from its worker or from the journal (see the module docstring)."""
    read: list[BackSearch] = []

    def ended() -> Call[dict[str, Any] | None]:
        # No worker claims it: ended, most likely. The history store answers in milliseconds
        # where the journal is read back from its end (seconds, with millions of entries);
        # the journal still answers what the store has no record of (yet).
        stored = yield from stored_record(job_id, timeout=timeout, max_bytes=max_bytes)
        if stored is not None:
            return _ended_status(stored)
        search = yield from _read(job_id, timeout)
        read.append(search)
        history = search.history
        return history.status() if history.record is not None else None

    try:
        value: dict[str, Any] = yield from rpc(job_id, Signal.of(Intent.STATUS), timeout=timeout,
                                               locate_timeout=locate_timeout, max_bytes=max_bytes,
                                               unclaimed=ended)
        return value
    except JobNotFound:
        # Not looked up while the workers were asked: the store, then the journal, now.
        if not read and (answer := (yield from ended())) is not None:
            return answer
        search = read[0]
    if not search.complete:
        raise Timeout(f"reading the journal of job {job_id} took over {timeout} s")
    answer = search.history.status()
    if answer is None:  # neither the store (asked first) nor the journal has it
        raise _unknown(job_id) from None
    return answer


def _ended_status(record: dict[str, Any]) -> dict[str, Any]:
    """The status of an ended job, from its record (the shape the journal's has)."""
    return {"state": record.get("state"), "paused": False, "record": record, "attempt": attempt_of(record)}


def abort(job_id: str, *, timeout: float, locate_timeout: float, max_bytes: int,
          by: dict[str, Any]) -> Call[bool]:
    """Abort the job where it runs; cancel it if no worker holds it yet (module docstring).

    Raises:
        InvalidState: it has ended already.
        JobNotFound: the journal has no trace of it.
    """
    from .messages import Control, Record  # not for a one-shot status

    try:
        return bool((yield from rpc(job_id, Signal.of(Intent.ABORT), timeout=timeout,
                                    locate_timeout=locate_timeout, max_bytes=max_bytes)))
    except JobNotFound:
        search = yield from search_back(job_id, timeout)  # to its launch: where its record goes
    if not search.complete:
        raise Timeout(f"reading the journal of job {job_id} took over {timeout} s")
    history = search.history
    if not history.known:
        raise _unknown(job_id) from None
    if history.record is not None:
        raise InvalidState(f"job {job_id} has ended ({history.record.get('state')}): nothing to abort")
    service = str((history.started or history.launch or {}).get("service", ""))
    record = Record.cancelled(job_id, service, by, history.attempt)
    headers = {BCC_HEADER: [search.launch_reply_to]} if search.launch_reply_to else None
    control = Control(Intent.ABORT, service or None, time.time(), job_id)
    outcomes = yield Publish([
        Message(CONTROL_EXCHANGE, "", codec.encode(control.encode()), persistent=True,
                message_id=new_job_id()),
        Message("", journal_stream(job_id), codec.encode(record.encode()), persistent=True,
                message_id=job_id, correlation_id=job_id, type=RECORD_TYPE, headers=headers)])
    return all(routed is Routed.DELIVERED for routed in outcomes)


def result(job_id: str, timeout: float | None, *, max_bytes: int) -> Call[dict[str, Any] | None]:
    """The job's final record, waiting up to ``timeout`` s (0: none; None: no limit); None
    if it has not ended by then. The history store's when an indexer runs and has it (an
    indexer keeps it far longer than the journal, and finds it at once); else the journal's.

    Raises:
        JobNotFound: neither the journal nor the history store has a trace of the job.
    """
    started = time.monotonic()
    # The history store first, as for a status: an ended job's record in milliseconds.
    stored = yield from stored_record(job_id, timeout=timeout or READ_LIMIT, max_bytes=max_bytes)
    if stored is not None:
        return stored
    search = yield from search_back(job_id, READ_LIMIT if timeout is None or timeout == 0
                                    else timeout, _started)
    history = search.history
    if history.record is not None:
        return history.record
    if search.not_found:  # neither the store nor the journal (it no longer has it, or never had)
        raise _unknown(job_id)
    if timeout == 0 or search.end is None:
        return None
    # Not ended yet: wait for its record from where the stream ended when the search began.
    left = None if timeout is None else max(timeout - (time.monotonic() - started), 0.001)
    waiting = yield ReadJournal(JournalSearch(job_id, wait=True, offset=search.end, history=history), left)
    assert isinstance(waiting, JournalSearch)
    return waiting.record


@dataclass
class Listing:
    """What ``jobs`` shows: the workers that answered and the jobs across the fleet."""

    workers: list[dict[str, Any]] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)
    queued: list[dict[str, Any]] = field(default_factory=list)
    ended: list[dict[str, Any]] = field(default_factory=list)

    @property
    def jobs(self) -> list[dict[str, Any]]:
        """Running, then queued (and resuming), then ended jobs; each job once."""
        seen: set[str] = set()
        jobs = []
        for job in (*self.running, *self.queued, *self.ended):
            if job.get("job_id") not in seen:
                seen.add(job.get("job_id", ""))
                jobs.append(job)
        return jobs


def _waiting(incoming: Incoming) -> dict[str, Any] | None:
    """A queued launch, or a lease back in its queue (a job to resume), as a summary."""
    from .messages import Launch, Lease

    try:
        body, _ = codec.decode_object(incoming.body, incoming.content_type, max_bytes=MAX_ENTRY_BYTES)
        if incoming.type == LEASE_TYPE:
            lease = Lease.decode(body)
            return {"job_id": lease.launch.job_id, "service": lease.launch.service,
                    "state": "resuming", "attempt": lease.attempt, "since": lease.launch.sent,
                    "worker": lease.worker}
        launch = Launch.decode(body)
    except DecodeError:
        return None  # its worker will refuse it, with a record
    return {"job_id": launch.job_id, "service": launch.service, "state": "queued", "attempt": 0,
            "since": launch.sent, "worker": {}}


def _ended(record: dict[str, Any]) -> dict[str, Any]:
    return {"job_id": record.get("job_id"), "service": record.get("service"),
            "state": record.get("state"), "start": record.get("start"), "end": record.get("end"),
            "worker": record.get("worker") or {}, "attempt": record.get("attempt", 1)}


def listing(*, timeout: float, max_bytes: int, services: Iterable[str] = (),
            ended_since: float | None = None, limit: int = 1000) -> Call[Listing]:
    """The fleet's jobs (see the module docstring); ``services`` adds launch queues to look
    in beyond those of the services the answering workers offer."""
    fleet: Fleet = yield from fleet_query(timeout=timeout, max_bytes=max_bytes)
    answer = Listing(fleet.workers, fleet.jobs)
    names = sorted(fleet.services | set(services))
    if names:
        waiting = yield Browse([launch_queue(name) for name in names], limit)
        for messages in waiting.values():
            answer.queued.extend(job for job in map(_waiting, messages) if job is not None)
    if ended_since is not None:
        scan = yield ReadJournal(JournalScan(ended_since, limit), None)
        assert isinstance(scan, JournalScan)
        answer.ended = [_ended(record) for record in scan.records]
    return answer
