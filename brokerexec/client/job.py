"""A handle on one launched job: steer it, watch it, get its result."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import JobAborted, Timeout, error_from_wire
from ..protocol.intents import Intent, Signal
from ..protocol.names import job_events_pattern

if TYPE_CHECKING:
    from ..protocol.events import Event
    from ..transport.base import ClientTransport, Subscription

__all__ = ["Attempts", "Job", "JobsClient", "event_patterns", "quiet_ends", "result_of",
           "status_of_record"]


class JobsClient(Protocol):
    """What a :class:`Job` needs of its client (a :class:`~brokerexec.Client`)."""

    transport: ClientTransport
    timeout: float

    def subscribe(self, pattern: str | list[str], callback: Callable[[Event], None]) -> Subscription:
        """Receive the events whose keys match ``pattern``."""


class Job:
    """One job, by id. Every method talks to the worker that runs it.

    Attributes:
        id: the job id (32 hex digits).
        service: the service name, when known.
    """

    def __init__(self, client: JobsClient, job_id: str, service: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.service = service

    def __repr__(self) -> str:
        return f"Job({self.id!r}, service={self.service!r})"

    def signal(self, intent: Intent, timeout: float | None = None, **fields: Any) -> Any:
        """Send ``intent`` (with its keys) to the job; return the final reply's value."""
        return self.client.transport.rpc(self.id, Signal.of(intent, **fields), timeout or self.client.timeout)

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The job's state wherever it is in its life: from its worker while it runs (state,
        last progress, ``attempt``, ``worker``); ``queued`` before it starts; ``resuming``
        (with the ``attempt`` that was lost) between a lost worker and its next execution;
        for an ended job, its state and ``record``.

        Raises:
            JobNotFound: nothing knows the job (never launched, or ended longer ago than the
                journal keeps entries).
        """
        return self.client.transport.status(self.id, timeout or self.client.timeout)

    def pause(self, timeout: float | None = None) -> bool:
        """Ask the job to hold at its next ``ready()``; True if accepted."""
        return bool(self.signal(Intent.PAUSE, timeout))

    def resume(self, timeout: float | None = None) -> bool:
        """Let a paused job continue from where it held; True if accepted."""
        return bool(self.signal(Intent.RESUME, timeout))

    def abort(self, timeout: float | None = None) -> bool:
        """Abort the job at its next ``ready()`` (resuming it first if paused). A job that no
        worker holds yet (queued, or resuming) is cancelled: it never starts again, and its
        record says aborted.

        Raises:
            InvalidState: the job has ended already.
        """
        return self.client.transport.abort(self.id, timeout or self.client.timeout)

    def checkpoint(self, timeout: float | None = None) -> dict[str, Any]:
        """Take a checkpoint at the job's next ``ready()``; returns once it is stored, with
        ``{"time": ...}`` when it was taken (it is published as the job's checkpoint event).

        Raises:
            CheckpointFailed: it could not be stored (too large, say); the job goes on.
        """
        taken: dict[str, Any] = self.signal(Intent.CHECKPOINT, timeout)
        return taken

    def set(self, attrs: dict[str, Any] | None = None, /, *, rpc_timeout: float | None = None,
            **more: Any) -> dict[str, Any]:
        """Set declared attributes; returns once applied at ``ready()``.

        ``job.set(step=2)``, or ``job.set({"step": 2})`` for names that are not Python
        identifiers. ``rpc_timeout`` bounds the wait (default: the client's timeout).

        Raises:
            SignalRefused: the worker refused (undeclared attribute, wrong type, ...).
        """
        applied: dict[str, Any] = self.signal(Intent.SET, rpc_timeout, attrs={**(attrs or {}), **more})
        return applied

    def invoke(self, method: str, *args: Any, rpc_timeout: float | None = None,
               **kwargs: Any) -> Any:
        """Call a declared method in the computation thread at its next ``ready()``.

        Every keyword but ``rpc_timeout`` goes to the method.

        Raises:
            SignalRefused: not an invokable method, or arguments that do not fit it.
        """
        return self.signal(Intent.INVOKE, rpc_timeout, method=method, args=list(args), kwargs=kwargs)

    def record(self, timeout: float | None = 0) -> dict[str, Any] | None:
        """The final record (state, result, error, start, end, worker, attempt, and its last
        progress and improved value when it reported them), if the job ended (waiting up to
        ``timeout`` s for it). From the journal, or from the history store once the journal no
        longer holds the job (``docs/history.md``).

        Raises:
            JobNotFound: neither the history store nor the journal knows the job.
        """
        return self.client.transport.fetch_result(self.id, timeout)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end and return its result.

        Raises:
            RemoteError: the job failed (remote type, message and traceback).
            JobAborted: the job was aborted.
            Timeout: it did not end within ``timeout`` seconds.
            JobNotFound: nothing knows the job (at once, not after ``timeout``).
        """
        record = self.client.transport.fetch_result(self.id, timeout)
        if record is None:
            raise Timeout(f"job {self.id} did not end within {timeout} s")
        return result_of(self.id, record)

    def subscribe(self, callback: Callable[[Event], None],
                  kinds: Iterable[str] = ("#",)) -> Subscription:
        """Call ``callback(event)`` for this job's events of the given kinds."""
        return self.client.subscribe(event_patterns(self.id, kinds), callback)

    def events(self, kinds: Iterable[str] | None = None,
               idle_timeout: float | None = None) -> Iterator[Event]:
        """Iterate over this job's events until it ends (its final state event included).

        ``kinds`` filters what is yielded (state events always end the iteration).
        ``idle_timeout`` raises ``Timeout`` if nothing arrives for that long. A job resumed
        after losing its worker goes on, as its next attempt: what an older attempt sends
        once a newer one was heard is dropped.
        """
        wanted = set(kinds) if kinds is not None else None
        attempts = Attempts()
        inbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        subscription = self.subscribe(inbox.put)
        try:
            # Subscribed first, then checked: a job that ended before we listened is seen.
            if self.record(0) is not None:
                return
            while True:
                try:
                    event = inbox.get(timeout=idle_timeout if idle_timeout else 1.0)
                except queue.Empty:
                    if quiet_ends(self.id, self.record(0) is not None, idle_timeout):
                        return
                    continue
                if not attempts.fresh(event):
                    continue
                if wanted is None or event.kind in wanted:
                    yield event
                if event.ends_job:
                    return
        finally:
            subscription.close()

    def progress(self, idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Iterate over progress messages (their data) until the job ends."""
        for event in self.events(("progress",), idle_timeout):
            yield event.data


# ---- shared with AsyncJob ------------------------------------------------------------------


def event_patterns(job_id: str, kinds: Iterable[str]) -> list[str]:
    """The topic patterns of one job's events of these kinds (``#``: all)."""
    return [job_events_pattern(job_id) if kind == "#" else job_events_pattern(job_id, kind)
            for kind in kinds]


def result_of(job_id: str, record: dict[str, Any]) -> Any:
    """The result a final record stands for: raises its (typed) error, or ``JobAborted``."""
    if record["state"] == "failed":
        raise error_from_wire(record.get("error"))
    if record["state"] == "aborted":
        raise JobAborted(job_id)
    return record.get("result")


def status_of_record(record: dict[str, Any]) -> dict[str, Any]:
    """The status of a job that has ended: its state, and its record."""
    return {"state": record["state"], "paused": False, "record": record,
            "attempt": record.get("attempt", 1)}


class Attempts:
    """Drops the events of executions older than the newest one heard (fencing, on the
    readers' side: a worker cut off and back may have sent some before it learnt)."""

    def __init__(self) -> None:
        self.newest = 0

    def fresh(self, event: Event) -> bool:
        if event.attempt < self.newest:
            return False
        self.newest = event.attempt
        return True


def quiet_ends(job_id: str, ended: bool, idle_timeout: float | None) -> bool:
    """After a spell without events: True if the iteration is over (``ended``: the job's
    record is there); raises ``Timeout`` if ``idle_timeout`` was given; False: keep waiting."""
    if ended:
        return True
    if idle_timeout:
        raise Timeout(f"no event from job {job_id} for {idle_timeout} s")
    return False
