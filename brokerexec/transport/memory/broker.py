"""The in-memory transport: a whole brokerexec deployment inside one process.

A :class:`MemoryBroker` stands in for RabbitMQ: a launch queue per service, per-job RPC
endpoints with exclusive ownership, topic-matched event subscriptions, control messages,
stored checkpoints and final records, and what the journal tells of a job (queued,
running, resuming, ended). Everything that RabbitMQ would deliver is delivered on one
dispatcher thread (the "handler thread" of every worker on it), and every message goes
through the same codec and the same protocol objects as on the wire, so what works here
works over AMQP. ``memory://`` URLs share one broker per name (``memory://`` and
``memory://lab`` are two brokers). The workers' side is in :mod:`.worker`, the
clients' in :mod:`.clients`.

A broker that keeps history (:meth:`MemoryBroker.keep_history`; the keeper, with its store,
is ``brokerexec.history.embedded``'s) notes there the entries a RabbitMQ journal would hold,
and answers history queries from it.

A process cannot lose a worker the way a fleet does, so nothing here resumes a job after a
crash; a worker that stops gracefully hands its resumable jobs over, and another worker on
the same broker resumes them from their last checkpoint, as over RabbitMQ.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from ... import codec
from ...constants import MAX_ENTRY_BYTES, MAX_MESSAGE_BYTES
from ...errors import ConfigurationError, HistoryUnavailable, InvalidState, JobNotFound, UnknownService
from ...protocol.changes import uncovered
from ...protocol.events import Event
from ...protocol.history import HistoryPage, HistoryQuery
from ...protocol.intents import Signal
from ...protocol.journal import checkpoint_entry, launches_entry_of, launches_parts, started_entry
from ...protocol.lookups import Listing
from ...protocol.messages import Control, Launch, Record, WorkerJobs
from ...protocol.names import (
    CHECKPOINT_TYPE,
    LAUNCH_TYPE,
    LAUNCHES_TYPE,
    OPERATION_TYPE,
    RECORD_TYPE,
    STARTED_TYPE,
)
from ...protocol.operation_log import FoundOperation, OperationHeader
from ...protocol.replies import Reply
from ..base import Resumed, WorkerHooks

__all__ = ["AttachedWorker", "HistoryKeeper", "MemoryBroker", "Waiting", "topic_matches", "wire"]

log = logging.getLogger(__name__)

_brokers: dict[str, MemoryBroker] = {}
_brokers_lock = threading.Lock()


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` is zero or more words."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])


def wire(body: Any, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Encode and decode as the wire would, so the same rules apply here (``max_bytes``: as
    its reader would; what a worker writes for readers, :data:`MAX_ENTRY_BYTES`)."""
    value, _ = codec.decode(codec.encode(body), codec.JSON, max_bytes=max_bytes)
    return value


@dataclass(frozen=True)
class _Checkpoint:
    """A job's newest stored checkpoint."""

    state: Any
    settable: dict[str, Any]
    covers: int
    time: float


@dataclass
class Waiting:
    """A launch in its service's queue; a handed-over job carries what it resumes from."""

    launch: Launch
    attempt: int = 0
    resumed: Resumed | None = None


@dataclass
class _Known:
    """What the journal would say of a job."""

    service: str
    sent: float
    state: str = "queued"
    attempt: int = 0


class AttachedWorker(Protocol):
    """A worker's side of the broker, as the broker sees it (:mod:`.worker`'s)."""

    hooks: WorkerHooks | None
    services: tuple[str, ...]
    free: int
    capacity: int
    consuming: bool

    def deliver_launch(self, waiting: Waiting) -> None:
        """Take one launch off its queue (on the dispatcher thread)."""


class HistoryKeeper(Protocol):
    """Where a memory broker keeps every job (``brokerexec.history.embedded.MemoryHistory``):
    it takes the entries a RabbitMQ journal would hold, and answers history queries."""

    def note(self, kind: str, body: dict[str, Any], job_id: str | None) -> None:
        """Take one journal entry (``kind``: ``protocol/names.py``'s); never waits nor raises."""

    def ask(self, query: HistoryQuery) -> cf.Future[HistoryPage]:
        """A page of the history, once every entry noted before is in it."""

    def flushed(self) -> cf.Future[None]:
        """Resolves once every entry noted before has been offered to the store."""


class MemoryBroker:
    """The in-process stand-in for RabbitMQ (see the module docstring)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._results_changed = threading.Condition(self._lock)
        self._queues: dict[str, deque[Waiting]] = {}
        self._workers: list[AttachedWorker] = []
        self._owners: dict[str, AttachedWorker] = {}
        self._known: dict[str, _Known] = {}
        self._checkpoints: dict[str, _Checkpoint] = {}
        self._changes: dict[str, list[dict[str, Any]]] = {}
        self._results: dict[str, dict[str, Any]] = {}
        self._subscriptions: list[_MemorySubscription] = []
        self._control_listeners: list[_MemorySubscription] = []  # clients hearing controls
        # What the journal's operation entries would hold (protocol/operation_log.py): the
        # headers, and each operation's launches in order.
        self._operations: dict[str, OperationHeader] = {}
        self._operation_launches: dict[str, list[Launch]] = {}
        self._started: dict[str, dict[str, Any]] = {}
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                        name=f"brokerexec-memory-{name or 'default'}")
        self._thread.start()
        #: Where every job is kept, if anywhere (:meth:`keep_history`).
        self.history: HistoryKeeper | None = None

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        """The process-wide broker of that name, created on first use."""
        with _brokers_lock:
            if name not in _brokers:
                _brokers[name] = cls(name)
            return _brokers[name]

    @classmethod
    def of_url(cls, url: str) -> MemoryBroker:
        """The process-wide broker a ``memory://[name]`` URL names.

        Raises:
            ConfigurationError: not a ``memory://`` URL.
        """
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigurationError(f"not a memory:// URL: {parts.scheme}://...")
        return cls.named(parts.netloc)

    def keep_history(self, keeper: HistoryKeeper | None) -> None:
        """Note every job's journal entries with ``keeper`` from now on (None: no more)."""
        self.history = keeper

    def call_soon(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the dispatcher thread."""
        self._tasks.put(task)

    def _dispatch(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:  # a bad message never stops the broker
                log.exception("memory broker: task failed")

    # ---- launches ------------------------------------------------------------------------

    def offer(self, services: Sequence[str]) -> None:
        """A worker offers these services: their queues exist from now on."""
        with self._lock:
            for service in services:
                self._queues.setdefault(service, deque())

    def enqueue(self, launches: list[Launch]) -> None:
        """Queue launches; every service must have a queue (some worker offered it)."""
        with self._lock:
            for service in {launch.service for launch in launches}:
                if service not in self._queues:
                    raise UnknownService(f"no worker has ever offered service {service!r} "
                                         f"on broker memory://{self.name}")
            for launch in launches:
                self._queues[launch.service].append(Waiting(Launch.decode(wire(launch.encode()))))
                self._known.setdefault(launch.job_id, _Known(launch.service, launch.sent))
                if launch.operation is not None:
                    self._operation_launches.setdefault(launch.operation, []).append(launch)
        if (history := self.history) is not None:  # before a worker can take them, as over RabbitMQ
            self._note_launches(history, launches)
        self.call_soon(self._deliver_launches)

    @staticmethod
    def _note_launches(history: HistoryKeeper, launches: list[Launch]) -> None:
        """A launch entry for one launch; for a sweep, as over RabbitMQ, ``launches`` entries
        (``protocol/calls.py``)."""
        if len(launches) == 1:
            history.note(LAUNCH_TYPE, wire(launches[0].encode()), launches[0].job_id)
            return
        groups: dict[tuple[str, str | None], list[Launch]] = {}
        for launch in launches:
            groups.setdefault((launch.service, launch.operation), []).append(launch)
        for sweep in groups.values():
            sizes = [len(codec.encode(launch.encode())) for launch in sweep]
            for part in launches_parts(sweep, sizes):
                history.note(LAUNCHES_TYPE, wire(launches_entry_of(part), MAX_ENTRY_BYTES), None)

    def _deliver_launches(self) -> None:
        while True:
            with self._lock:
                taken = None
                for worker in self._workers:
                    if worker.free <= 0 or not worker.consuming:
                        continue
                    waiting = next((self._queues[s] for s in worker.services if self._queues.get(s)), None)
                    if waiting:
                        taken = worker, waiting.popleft()
                        break
                if taken is None:
                    return
            taken[0].deliver_launch(taken[1])

    def lock(self, job_id: str, worker: AttachedWorker) -> bool:
        """Make ``worker`` the job's only owner (its RPCs go there); False if another is."""
        with self._lock:
            return self._owners.setdefault(job_id, worker) is worker

    def unlock(self, job_id: str, worker: AttachedWorker) -> None:
        with self._lock:
            if self._owners.get(job_id) is worker:
                del self._owners[job_id]

    def ended(self, job_id: str) -> bool:
        """True if the job has a record (what the journal would say)."""
        with self._lock:
            return job_id in self._results

    def started(self, job_id: str, attempt: int, worker: dict[str, Any]) -> None:
        """Execution ``attempt`` of the job started on ``worker`` (its journal's started entry)."""
        with self._lock:
            known = self._known.get(job_id)
            if known is not None:
                known.state, known.attempt = "running", attempt
                self._started[job_id] = started_entry(job_id, known.service, attempt, worker, time.time())
        if (history := self.history) is not None and known is not None:
            history.note(STARTED_TYPE, wire(started_entry(job_id, known.service, attempt, worker,
                                                               time.time())), job_id)

    def requeue(self, waiting: Waiting) -> None:
        """A launch taken and given back: first in its queue again."""
        with self._lock:
            self._queues.setdefault(waiting.launch.service, deque()).appendleft(waiting)
        self.call_soon(self._deliver_launches)

    def hand_back(self, job_id: str, launch: Launch, attempt: int) -> None:
        """A worker stopping gracefully gives a job back, to resume from its checkpoint."""
        with self._lock:
            self._owners.pop(job_id, None)
            stored = self._checkpoints.get(job_id)
            changes = uncovered(self._changes.get(job_id, []), stored.covers if stored else 0)
            resumed = Resumed(stored.state if stored else None, stored is not None, None, handed_over=True,
                              settable=stored.settable if stored else {}, changes=changes,
                              checkpoint_time=stored.time if stored else None,
                              covers=stored.covers if stored else 0)
            self._queues.setdefault(launch.service, deque()).appendleft(Waiting(launch, attempt, resumed))
            known = self._known.get(job_id)
            if known is not None:
                known.state = "resuming"
        self.call_soon(self._deliver_launches)

    def store_checkpoint(self, job_id: str, state: Any, settable: dict[str, Any], covers: int) -> None:
        stored = _Checkpoint(wire(state, MAX_ENTRY_BYTES), wire(settable, MAX_ENTRY_BYTES), covers,
                             time.time())
        with self._lock:
            self._checkpoints[job_id] = stored
            known = self._known.get(job_id)
        if (history := self.history) is not None and known is not None:
            history.note(CHECKPOINT_TYPE, checkpoint_entry(
                job_id, known.service, known.attempt, stored.time, stored.state,
                settable=stored.settable, covers=covers), job_id)

    def note_changes(self, job_id: str, changes: list[dict[str, Any]]) -> None:
        """The sets and invokes applied since the job's newest checkpoint (its lease's)."""
        noted = wire(changes, MAX_ENTRY_BYTES)
        with self._lock:
            self._changes[job_id] = noted

    # ---- RPC, control, the jobs query ------------------------------------------------------

    def rpc(self, job_id: str, signal: Signal) -> cf.Future[Any]:
        """Deliver ``signal`` to the job's owner; the future resolves with the final reply."""
        reply: cf.Future[Any] = cf.Future()
        request = Signal.decode(wire(signal.encode()))

        def deliver() -> None:
            with self._lock:
                worker = self._owners.get(job_id)
            if worker is None or worker.hooks is None:
                reply.set_exception(JobNotFound(f"no worker holds job {job_id}"))
                return
            try:
                answer = worker.hooks.on_rpc(job_id, request)
            except Exception as exc:
                reply.set_result(Reply.failure(exc))
                return
            if isinstance(answer, cf.Future):
                answer.add_done_callback(functools.partial(_settle, reply))
            else:
                reply.set_result(Reply.result(answer))

        self.call_soon(deliver)
        return reply

    def journal_status(self, job_id: str) -> dict[str, Any]:
        """What the journal says of a job no worker holds (``protocol/lookups.py``)."""
        with self._lock:
            record, known = self._results.get(job_id), self._known.get(job_id)
        if record is not None:
            return {"state": record["state"], "paused": False, "record": record,
                    "attempt": record.get("attempt", 1)}
        if known is None:
            raise JobNotFound(f"no job {job_id}: no worker holds it and the journal has no trace of it")
        return {"state": known.state, "paused": False, "service": known.service,
                "attempt": known.attempt, "since": known.sent}

    def cancel(self, job_id: str, by: dict[str, Any]) -> bool:
        """Abort a job no worker holds: out of its queue, an aborted record in its place."""
        with self._lock:
            known = self._known.get(job_id)
            if job_id in self._results:
                raise InvalidState(f"job {job_id} has ended ({self._results[job_id]['state']}): "
                                   "nothing to abort")
            if known is None:
                raise JobNotFound(f"no job {job_id}: no worker holds it and the journal has no trace of it")
            waiting = self._queues.get(known.service, deque())
            for item in list(waiting):
                if item.launch.job_id == job_id:
                    waiting.remove(item)
        self.store_result(Record.cancelled(job_id, known.service, by, known.attempt))
        return True

    def control(self, control: Control) -> None:
        message = Control.decode(wire(control.encode()))
        if message.service is not None:
            with self._lock:
                if message.service not in self._queues:
                    raise UnknownService(f"no worker has ever offered service {message.service!r}")
        for worker in self.workers():
            if worker.hooks is not None:
                self.call_soon(functools.partial(worker.hooks.on_control, message))
        with self._lock:
            listeners = list(self._control_listeners)
        for listener in listeners:
            self.call_soon(functools.partial(listener.callback, message))

    def list_jobs(self, ended_since: float | None, limit: int) -> cf.Future[Listing]:
        answer: cf.Future[Listing] = cf.Future()

        def gather() -> None:
            listing = Listing()
            for worker in self.workers():
                if worker.hooks is not None:
                    summaries = [job.encode() for job in worker.hooks.describe_jobs()]
                    who = {**(getattr(worker, "host_info", None) or {}), "concurrency": worker.capacity}
                    reply = WorkerJobs.decode(wire(WorkerJobs(who, summaries, list(worker.services),
                                                              worker.hooks.describe_services()).encode()))
                    listing.workers.append({**reply.worker, "services": reply.services,
                                            "running": len(reply.jobs), "descriptions": reply.descriptions})
                    listing.running.extend(reply.jobs)
            with self._lock:
                for waiting in self._queues.values():
                    listing.queued.extend(
                        {"job_id": item.launch.job_id, "service": item.launch.service,
                         "state": "resuming" if item.resumed else "queued", "attempt": item.attempt,
                         "since": item.launch.sent, "worker": {}} for item in list(waiting)[:limit])
                if ended_since is not None:
                    ended = sorted((r for r in self._results.values() if r.get("end", 0) >= ended_since),
                                   key=lambda r: r.get("end", 0), reverse=True)[:limit]
                    listing.ended = [{"job_id": r["job_id"], "service": r["service"], "state": r["state"],
                                      "start": r.get("start"), "end": r.get("end"),
                                      "worker": r.get("worker") or {}, "attempt": r.get("attempt", 1)}
                                     for r in ended]
            answer.set_result(listing)

        self.call_soon(gather)
        return answer

    # ---- operations ----------------------------------------------------------------------

    def note_operation(self, header: OperationHeader) -> None:
        with self._lock:
            self._operations.setdefault(header.id, header)
            history = self.history
        if history is not None:  # its header entry, as a journal's reader takes it
            history.note(OPERATION_TYPE, wire(header.encode()), None)

    def find_operation(self, operation_id: str) -> FoundOperation:
        """The operation as a journal would have it (``protocol/operation_log.py``)."""
        found = FoundOperation()
        with self._lock:
            found.header = self._operations.get(operation_id)
            for place, launch in enumerate(self._operation_launches.get(operation_id, [])):
                found.service = launch.service
                assert launch.key is not None
                found.launched(launch.key, launch.job_id, wire(launch.request), 0.0, place)  # in launch order
                if launch.job_id in self._started:
                    found.started[launch.job_id] = dict(self._started[launch.job_id])
                if launch.job_id in self._results:
                    found.records[launch.job_id] = dict(self._results[launch.job_id])
        return found

    def find_operations(self, since: float, limit: int) -> list[OperationHeader]:
        with self._lock:
            headers = [header for header in self._operations.values() if header.created >= since]
        return sorted(headers, key=lambda header: header.created, reverse=True)[:limit]

    # ---- results and events ------------------------------------------------------------

    def store_result(self, record: Record) -> None:
        body = wire(record.encode(), MAX_ENTRY_BYTES)
        with self._lock:
            first = self._results.setdefault(record.job_id, body) is body  # the first one counts
            self._owners.pop(record.job_id, None)
            self._checkpoints.pop(record.job_id, None)
            self._changes.pop(record.job_id, None)
            self._known.setdefault(record.job_id, _Known(record.service, record.start))
            self._results_changed.notify_all()
        if first and (history := self.history) is not None:
            history.note(RECORD_TYPE, body, record.job_id)

    def wait_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        with self._lock:
            if job_id not in self._known and job_id not in self._results:
                raise JobNotFound(f"no job {job_id}: no worker holds it and the journal has no trace of it")
            self._results_changed.wait_for(lambda: job_id in self._results, timeout)
            return self._results.get(job_id)

    # ---- history -------------------------------------------------------------------------

    def ask_history(self, query: HistoryQuery) -> cf.Future[HistoryPage]:
        """A page of the broker's history store, once every entry noted before is in it.

        Raises:
            HistoryUnavailable: the broker keeps no history.
        """
        history = self.history
        if history is None:
            raise HistoryUnavailable(f"memory://{self.name} keeps no history: give it a store with "
                                     "brokerexec.history.embedded.keep_history (docs/history.md)")
        return history.ask(HistoryQuery.decode(wire(query.encode())))

    def publish(self, event: Event) -> None:
        body = wire(event.encode(), MAX_ENTRY_BYTES)
        key = event.routing_key
        with self._lock:
            targets = [sub for sub in self._subscriptions if sub.matches(key)]
        for sub in targets:
            self.call_soon(functools.partial(sub.callback, Event.decode(body)))

    def workers(self) -> list[AttachedWorker]:
        with self._lock:
            return list(self._workers)

    def add_worker(self, worker: AttachedWorker) -> None:
        with self._lock:
            self._workers.append(worker)

    def remove_worker(self, worker: AttachedWorker) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> _MemorySubscription:
        sub = _MemorySubscription(self, patterns, callback)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def unsubscribe(self, sub: _MemorySubscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)
            if sub in self._control_listeners:
                self._control_listeners.remove(sub)

    def subscribe_controls(self, callback: Callable[[Control], None]) -> _MemorySubscription:
        """Hear every control message sent from now on (as a client's listener does)."""
        sub = _MemorySubscription(self, [], callback)
        with self._lock:
            self._control_listeners.append(sub)
        return sub


def _settle(reply: cf.Future[Any], answer: cf.Future[Any]) -> None:
    if not reply.done():
        error = answer.exception()
        reply.set_result(Reply.failure(error) if error is not None else Reply.result(answer.result()))


class _MemorySubscription:
    def __init__(self, broker: MemoryBroker, patterns: list[str], callback: Callable[[Any], None]) -> None:
        self.broker = broker
        self._patterns = list(patterns)
        self.callback = callback

    def matches(self, key: str) -> bool:
        return any(topic_matches(pattern, key) for pattern in self._patterns)

    def close(self) -> None:
        self.broker.unsubscribe(self)
