"""The client: launch jobs, steer them, watch them, over any transport.

``Client("amqp://...")`` talks to workers through RabbitMQ. ``Client("memory://")`` starts
an in-process worker on the in-memory transport and offers exactly the same API: the
embedded default, for laptops, notebooks and tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .constants import DEFAULT_RPC_TIMEOUT, DEFAULT_URL
from .errors import ConfigurationError
from .job import Job
from .protocol import Event, check_name, launch_body
from .transport.base import ClientTransport, Subscription

if TYPE_CHECKING:
    from .service import Service
    from .worker import Worker, WorkerSettings

__all__ = ["Client"]


class Client:
    """Launch and steer jobs.

    Parameters:
        url: ``amqp://user:pass@host:port/vhost`` (RabbitMQ) or ``memory://[name]``.
        services: for ``memory://``: the services the embedded worker may run (the
            ``brokerexec.services`` entry points are added).
        concurrency: for ``memory://``: how many jobs the embedded worker runs at once.
        timeout: default seconds to wait for a job's answer to a signal.
        heartbeat: AMQP heartbeat in seconds.
    """

    def __init__(self, url: str = DEFAULT_URL, *, services: Iterable[type[Service]] = (),
                 concurrency: int = 4, timeout: float = DEFAULT_RPC_TIMEOUT,
                 heartbeat: int = 10, worker_settings: WorkerSettings | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._worker: Worker | None = None
        scheme = urlparse(url).scheme
        if scheme == "memory":
            # The embedded worker's modules only here: a client of RabbitMQ never needs them.
            from .registry import ServiceRegistry
            from .transport.memory import MemoryBroker, MemoryClientTransport, MemoryWorkerTransport
            from .worker import Worker, WorkerSettings

            broker = MemoryBroker.named(urlparse(url).netloc)
            self.transport: ClientTransport = MemoryClientTransport(broker)
            registry = ServiceRegistry.from_specs([])
            for service in services:
                registry.add(service)
            settings = worker_settings or WorkerSettings(concurrency=concurrency)
            self._worker = Worker(MemoryWorkerTransport(broker), registry, settings).start()
        elif scheme in ("amqp", "amqps"):
            from .transport.amqp import ConnectionSettings
            from .transport.amqp_client import RabbitClientTransport

            self.transport = RabbitClientTransport(
                ConnectionSettings(url=url, heartbeat=heartbeat, name="brokerexec-client",
                                   reconnect_deadline=30.0))
        else:
            raise ConfigurationError(f"unsupported broker URL {url!r}: use amqp://, amqps:// or memory://")

    @classmethod
    def from_transport(cls, transport: ClientTransport, *, url: str = "",
                       timeout: float = DEFAULT_RPC_TIMEOUT) -> Client:
        """A client on a transport made elsewhere (e.g. the CLI's one-shot pika client)."""
        client = cls.__new__(cls)
        client.url, client.timeout, client._worker = url, timeout, None
        client.transport = transport
        return client

    @property
    def worker(self) -> Worker | None:
        """The embedded worker of a ``memory://`` client."""
        return self._worker

    def launch(self, name: str, request: dict[str, Any] | None = None, *,
               job_id: str | None = None, progress_delta: float | None = None,
               checkpoint_delta: float | None = None,
               improved_delta: float | None = None) -> Job:
        """Queue a job of service ``name``; return its handle at once.

        A refusal (unknown service, invalid request) is reported by the worker as a failed
        job: :meth:`Job.result` raises it.
        """
        settings = _handler_settings(progress_delta, checkpoint_delta, improved_delta)
        body = launch_body(name, request or {}, job_id=job_id, settings=settings)
        self.transport.launch(body)
        return Job(self, body["job_id"], name)

    def launch_many(self, name: str, requests: Iterable[dict[str, Any]], *,
                    progress_delta: float | None = None, checkpoint_delta: float | None = None,
                    improved_delta: float | None = None) -> list[Job]:
        """Queue one job of service ``name`` per request (a sweep); return their handles.

        Returns once the broker holds every launch. Over RabbitMQ the launches are in flight
        together, so this is much faster than calling :meth:`launch` in a loop, which waits
        for each launch's confirm in turn.
        """
        settings = _handler_settings(progress_delta, checkpoint_delta, improved_delta)
        bodies = [launch_body(name, request, settings=settings) for request in requests]
        self.transport.launch_many(bodies)
        return [Job(self, body["job_id"], name) for body in bodies]

    def job(self, job_id: str, service: str | None = None) -> Job:
        """A handle on an existing job."""
        return Job(self, check_name("job id", job_id), service)

    def subscribe(self, pattern: str | list[str], callback: Callable[[Event], None]) -> Subscription:
        """Receive events whose ``<kind>.<service>.<job id>`` key matches the pattern(s).

        Examples: ``"*.*.<job id>"`` (one job), ``"*.fit.*"`` (one service),
        ``"progress.#"`` (one kind everywhere). The broker filters, not the client.
        """
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        return self.transport.subscribe(patterns, callback)

    def _control(self, intent: str, service: str | None) -> None:
        body: dict[str, Any] = {"intent": intent, "sent": time.time()}
        if service is not None:
            body["service"] = check_name("service name", service)
        self.transport.control(body)

    def pause_all(self, service: str | None = None) -> None:
        """Pause every running job (of one service, if given), on every worker."""
        self._control("pause", service)

    def resume_all(self, service: str | None = None) -> None:
        """Resume every paused job (of one service, if given)."""
        self._control("resume", service)

    def abort_all(self, service: str | None = None) -> None:
        """Abort every running job (of one service, if given)."""
        self._control("abort", service)

    def jobs(self, timeout: float = 0.5) -> list[dict[str, Any]]:
        """Running jobs across all workers: id, service, state, progress, worker."""
        return self.transport.query_jobs(timeout)

    def close(self) -> None:
        """Close the connection (and stop an embedded worker)."""
        if self._worker is not None:
            self._worker.stop(grace=0)
            self._worker = None
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _handler_settings(progress_delta: float | None, checkpoint_delta: float | None,
                      improved_delta: float | None) -> dict[str, float]:
    """The launch's ``settings``: the intervals given, and only those."""
    return {key: value for key, value in (("progress_delta", progress_delta),
                                         ("checkpoint_delta", checkpoint_delta),
                                         ("improved_delta", improved_delta))
            if value is not None}
