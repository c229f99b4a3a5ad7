"""The seams between brokerexec's logic and a transport.

A worker transport *drives* the worker: it receives launches, claims each job's RPC endpoint
(the claim is what makes one worker the only owner of a job id), decodes every message into
the protocol's objects, and calls the :class:`WorkerHooks` synchronously on its own thread.
Hooks never block: a hook whose answer comes later returns a
:class:`concurrent.futures.Future`, and the transport replies "pending" first and the value
when the future is done (kiwipy's convention, which plumpy relies on).

A client transport comes in two I/O models with the same methods: :class:`ClientTransport`
(blocking, thread-safe) for :class:`~brokerexec.Client`, :class:`AsyncClientTransport`
(awaited) for :class:`~brokerexec.AsyncClient`. Each transport implements every method.

Threads: worker hooks run on the transport thread. ``publish_event`` and ``finish`` are
called from any thread (the computation thread among them) and must never block it.
"""

from __future__ import annotations

import abc
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigurationError, HistoryUnavailable

if TYPE_CHECKING:  # annotations only: a one-shot CLI verb imports this module
    from concurrent.futures import Future

    from ..protocol.events import Event
    from ..protocol.history import HistoryPage, HistoryQuery
    from ..protocol.intents import Signal
    from ..protocol.lookups import Listing
    from ..protocol.messages import Control, JobSummary, Launch, Record
    from ..protocol.operation_log import FoundOperation, OperationHeader

__all__ = ["AsyncClientTransport", "ClientTransport", "PreparedJob", "Resumed", "Subscription",
           "WorkerHooks", "WorkerTransport", "client_info"]


def client_info() -> dict[str, Any]:
    """Who this client is, in the records it writes (a job it cancelled)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid(), "client": True}


@dataclass(frozen=True)
class Resumed:
    """What a job resumed on this worker continues from: its previous execution was lost
    (its worker died or was cut off) or handed it over (a graceful stop)."""

    #: The newest stored checkpoint's state, if ``has_checkpoint``.
    state: Any = None
    has_checkpoint: bool = False
    #: The worker that held it before.
    previous_worker: dict[str, Any] | None = None
    handed_over: bool = False
    #: The values of the service's declared settable attributes in that checkpoint.
    settable: dict[str, Any] = field(default_factory=dict)
    #: The sets and invokes applied after it (``brokerexec.core.change_log``): its senders
    #: were told they were applied.
    changes: list[dict[str, Any]] = field(default_factory=list)
    #: When the checkpoint it resumes from was taken (epoch seconds), if any.
    checkpoint_time: float | None = None
    #: The newest change that checkpoint covers (``changes`` are those after it).
    covers: int = 0


@dataclass
class PreparedJob:
    """A launch that was decoded, checked, and given a slot; not yet claimed.

    The worker returns its own subclass, with what it needs to begin the job. The transport
    sets ``attempt`` (which execution of the job this is) and, for a job it resumes,
    ``resumed``, before :meth:`WorkerHooks.begin`.
    """

    job_id: str
    service: str
    launch: Launch
    attempt: int = 1
    resumed: Resumed | None = None
    #: True for a launch older than the control messages the worker remembers: an abort
    #: sent while it was queued may be forgotten, so the journal (a record) is read first.
    check_journal: bool = False


class WorkerHooks(Protocol):
    """What a worker transport calls, on its own thread; none of these may block."""

    def prepare(self, launch: Launch) -> PreparedJob | None:
        """Check a launch and reserve a slot for it.

        Returns ``None`` when the launch was answered already (e.g. an unknown service: the
        worker recorded the failure through ``finish``).
        """

    def begin(self, job: PreparedJob) -> None:
        """The claim succeeded: start the computation (returns at once)."""

    def cancel(self, job: PreparedJob, reason: str) -> None:
        """The claim failed (another worker owns the id): release the slot."""

    def on_rpc(self, job_id: str, signal: Signal) -> Any:
        """Answer an RPC to a job: a value, or a ``Future`` of one; raise for an error reply."""

    def on_control(self, control: Control) -> None:
        """Apply a control message (pause_all, abort_all, ...) to the matching jobs."""

    def describe_jobs(self) -> list[JobSummary]:
        """One summary per job this worker runs, for the ``jobs`` query."""

    def describe_services(self) -> dict[str, dict[str, Any]]:
        """What each service this worker offers declares (``Service.describe()``), by name."""

    def superseded(self, job_id: str, reason: str) -> None:
        """Another execution of the job owns it now: stop this copy at its next ``ready()``,
        silently (no events, no record)."""


class WorkerTransport(abc.ABC):
    """The worker's side of a transport."""

    @abc.abstractmethod
    def serve(self, hooks: WorkerHooks, capacity: int, services: Sequence[str]) -> None:
        """Start consuming the launches of ``services``, control messages and queries;
        return once consuming."""

    @abc.abstractmethod
    def set_free_capacity(self, free: int) -> None:
        """Tell the transport how many more launches it may take now (thread-safe)."""

    @abc.abstractmethod
    def publish_event(self, event: Event) -> None:
        """Publish an event: ordered, never blocking, kept across reconnects (best-effort)."""

    @abc.abstractmethod
    def finish(self, record: Record) -> Future[None]:
        """Store a job's final record durably, then release its RPC endpoint."""

    @abc.abstractmethod
    def store_checkpoint(self, job_id: str, state: Any, settable: dict[str, Any],
                         covers: int) -> Future[None]:
        """Store a checkpoint of a running job durably (atomic: the previous one stays the
        one to resume from until this one is stored), with ``settable`` (the values of the
        service's declared settable attributes) and ``covers`` (the newest change of
        :meth:`note_changes` it includes). Thread-safe; the future fails with
        ``CheckpointFailed``."""

    @abc.abstractmethod
    def note_changes(self, job_id: str, changes: list[dict[str, Any]]) -> Future[None]:
        """Make the sets and invokes applied to a running job since its newest stored
        checkpoint durable (``brokerexec.core.change_log``: the whole log each time), so that
        the job resumed after a crash gets them (``Resumed.changes``). Thread-safe; the
        future fails if the broker did not take them."""

    @abc.abstractmethod
    def hand_over(self, job_id: str) -> Future[None]:
        """Give a running job back, to be resumed by another worker from its last stored
        checkpoint (a graceful stop); no record. Thread-safe."""

    @abc.abstractmethod
    def stop_taking_work(self) -> None:
        """Stop consuming launches (first step of a graceful shutdown)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything; after ``finish`` futures are done, nothing is lost."""


class Subscription(Protocol):
    """A live subscription; ``close()`` ends it."""

    def close(self) -> None:
        """Stop receiving events."""


class ClientTransport(abc.ABC):
    """The client's side of a transport, blocking. Every method is thread-safe."""

    @abc.abstractmethod
    def launch(self, launches: list[Launch]) -> None:
        """Queue launches durably; returns once the broker has them all (their confirms
        awaited together)."""

    @abc.abstractmethod
    def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any:
        """Send a signal to a job and return its final value (``pending`` replies are waited out).

        Raises ``RemoteError`` (typed: ``SignalRefused``, ...) for an error reply,
        ``JobNotFound`` when no worker holds the job id, ``Timeout`` when nothing final
        arrives in ``timeout`` seconds.
        """

    @abc.abstractmethod
    def status(self, job_id: str, timeout: float) -> dict[str, Any]:
        """The job's status wherever it is in its life (``protocol/lookups.py``): from its
        worker, or ``queued``, ``resuming`` or ended, from the journal.

        Raises ``JobNotFound`` if nothing knows the job.
        """

    @abc.abstractmethod
    def abort(self, job_id: str, timeout: float) -> bool:
        """Abort the job; one that no worker holds yet is cancelled (it never starts).

        Raises ``InvalidState`` if it has ended, ``JobNotFound`` if nothing knows it.
        """

    @abc.abstractmethod
    def control(self, control: Control) -> None:
        """Send a control message to every worker, retained for those disconnected now."""

    @abc.abstractmethod
    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        """Receive events whose routing key matches any topic pattern (server-side binding).

        The callback runs on a transport thread; it must return quickly.
        """

    @abc.abstractmethod
    def subscribe_controls(self, callback: Callable[[Control], None]) -> Subscription:
        """Hear every control message sent from now on, by any client (an operation's
        launcher hears its operation's pause, resume and abort). The callback runs on a
        transport thread; it must return quickly."""

    @abc.abstractmethod
    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """The final record of a job, waiting up to ``timeout`` s (None: forever, 0: no
        wait); None if it has not ended by then. Raises ``JobNotFound`` if nothing knows it."""

    @abc.abstractmethod
    def list_jobs(self, timeout: float, *, services: Iterable[str] = (),
                  ended_since: float | None = None, limit: int = 1000) -> Listing:
        """The jobs across the fleet: running (the workers' answers, gathered for
        ``timeout`` s), queued, and those ended since ``ended_since`` (epoch seconds)."""

    def history(self, query: HistoryQuery, timeout: float) -> HistoryPage:
        """A page of the history store, from an indexer on the broker (``docs/history.md``).

        Raises:
            HistoryUnavailable: none answers (and, here, none can: this transport keeps none).
        """
        raise HistoryUnavailable(f"{type(self).__name__} keeps no history store")

    def note_operation(self, header: OperationHeader) -> None:
        """Write an operation's header to the journal (``protocol/operation_log.py``)."""
        raise ConfigurationError(f"{type(self).__name__} keeps no operations")

    def find_operation(self, operation_id: str, timeout: float) -> FoundOperation:
        """An operation as the journal has it (empty: it has nothing of that id).

        Raises:
            Timeout: the journal was not read to its end within ``timeout``.
        """
        raise ConfigurationError(f"{type(self).__name__} keeps no operations")

    def find_operations(self, since: float, limit: int, timeout: float) -> list[OperationHeader]:
        """The headers of the operations made since ``since`` (epoch seconds), newest first."""
        raise ConfigurationError(f"{type(self).__name__} keeps no operations")

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""


class AsyncClientTransport(abc.ABC):
    """The client's side of a transport, for asyncio: :class:`ClientTransport`'s methods,
    awaited. ``subscribe``'s callback runs on the caller's event loop."""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection."""

    @abc.abstractmethod
    async def launch(self, launches: list[Launch]) -> None: ...

    @abc.abstractmethod
    async def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any: ...

    @abc.abstractmethod
    async def status(self, job_id: str, timeout: float) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def abort(self, job_id: str, timeout: float) -> bool: ...

    @abc.abstractmethod
    async def control(self, control: Control) -> None: ...

    @abc.abstractmethod
    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        """Like ``ClientTransport.subscribe``, called on the caller's running loop, where the
        callback then runs; returns once the broker binds (a short blocking step)."""

    @abc.abstractmethod
    async def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_jobs(self, timeout: float, *, services: Iterable[str] = (),
                        ended_since: float | None = None, limit: int = 1000) -> Listing: ...

    async def history(self, query: HistoryQuery, timeout: float) -> HistoryPage:
        """As :meth:`ClientTransport.history`."""
        raise HistoryUnavailable(f"{type(self).__name__} keeps no history store")

    @abc.abstractmethod
    async def close(self) -> None: ...

