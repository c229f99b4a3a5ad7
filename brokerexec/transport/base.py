"""The seams between brokerexec's logic and a transport.

A worker transport *drives* the worker: it receives launches, claims each job's RPC endpoint
(the claim is what makes one worker the only owner of a job id), and calls the
:class:`WorkerHooks` synchronously on its own thread. Hooks never block: a hook whose answer
comes later returns a :class:`concurrent.futures.Future`, and the transport replies "pending"
first and the value when the future is done (kiwipy's convention, which plumpy relies on).

Threads: hooks run on the transport thread. ``publish_event`` and ``finish`` are called from
any thread (the computation thread among them) and must never block it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlparse, urlunparse

from ..protocol import Event

__all__ = ["ClientTransport", "PreparedJob", "Subscription", "WorkerHooks", "WorkerTransport",
           "redacted_url"]


def redacted_url(url: str) -> str:
    """The URL without its password or query, for logs and error messages."""
    parts = urlparse(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    return urlunparse(parts._replace(netloc=netloc, query=""))


@dataclass
class PreparedJob:
    """A launch that was decoded, checked, and given a slot; not yet claimed."""

    job_id: str
    service: str
    launch: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


class WorkerHooks(Protocol):
    """What a worker transport calls, on its own thread; none of these may block."""

    def prepare(self, launch: dict[str, Any]) -> PreparedJob | None:
        """Check a launch and reserve a slot for it.

        Returns ``None`` when the launch was answered already (e.g. an unknown service: the
        worker recorded the failure through ``finish``). Raises ``DecodeError`` for a launch
        that is malformed; the transport then dead-letters it.
        """

    def begin(self, job: PreparedJob) -> None:
        """The claim succeeded: start the computation (returns at once)."""

    def cancel(self, job: PreparedJob, reason: str) -> None:
        """The claim failed (another worker owns the id): release the slot."""

    def on_rpc(self, job_id: str, body: dict[str, Any]) -> Any:
        """Answer an RPC to a job: a value, or a ``Future`` of one; raise for an error reply."""

    def on_control(self, body: dict[str, Any]) -> None:
        """Apply a control message (pause_all, abort_all, ...) to the matching jobs."""

    def describe_jobs(self) -> list[dict[str, Any]]:
        """One summary per job this worker runs, for the ``jobs`` query."""


class WorkerTransport(abc.ABC):
    """The worker's side of a transport."""

    @abc.abstractmethod
    def serve(self, hooks: WorkerHooks, capacity: int) -> None:
        """Start consuming launches, control messages and queries; return once consuming."""

    @abc.abstractmethod
    def set_free_capacity(self, free: int) -> None:
        """Tell the transport how many more launches it may take now (thread-safe)."""

    @abc.abstractmethod
    def publish_event(self, event: Event) -> None:
        """Publish an event: ordered, never blocking, kept and retried across reconnects."""

    @abc.abstractmethod
    def finish(self, job_id: str, record: dict[str, Any]) -> Future[None]:
        """Store a job's final record durably, then release its RPC endpoint."""

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
    """The client's side of a transport. Every method is thread-safe and blocking."""

    @abc.abstractmethod
    def launch(self, body: dict[str, Any]) -> None:
        """Queue a launch durably; returns once the broker has it."""

    def launch_many(self, bodies: list[dict[str, Any]]) -> None:
        """Queue many launches durably; returns once the broker has them all."""
        for body in bodies:
            self.launch(body)

    @abc.abstractmethod
    def rpc(self, job_id: str, body: dict[str, Any], timeout: float) -> Any:
        """Send an RPC to a job and return its final value (``pending`` replies are waited out).

        Raises ``RemoteError`` for an error reply, ``JobNotFound`` when no worker holds the
        job id, ``Timeout`` when nothing final arrives in ``timeout`` seconds.
        """

    @abc.abstractmethod
    def control(self, body: dict[str, Any]) -> None:
        """Send a control message to every worker, retained for those disconnected now."""

    @abc.abstractmethod
    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        """Receive events whose routing key matches any topic pattern (server-side binding).

        The callback runs on a transport thread; it must return quickly.
        """

    @abc.abstractmethod
    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        """The final record of a job, waiting up to ``timeout`` s (None: forever, 0: no wait)."""

    def record_future(self, job_id: str) -> Future[dict[str, Any]] | None:
        """A future of the job's final record, if it will come to this connection by itself
        (``ConnectionError`` if the connection changes first); None if it will not, and
        :meth:`fetch_result` must look for it. For waiting without a thread (``brokerexec.aio``).
        """
        return None

    @abc.abstractmethod
    def query_jobs(self, timeout: float) -> list[dict[str, Any]]:
        """Summaries of the jobs every worker runs, gathered for at most ``timeout`` s."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""
