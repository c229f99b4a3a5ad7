"""The client: launch jobs, steer them, watch them, over any transport.

``Client("amqp://...")`` talks to workers through RabbitMQ, on the blocking pika transport
(``transport/pika_client.py``). ``Client("memory://")`` starts an in-process worker on the
in-memory transport and offers exactly the same API: the embedded default, for laptops,
notebooks and tests. :class:`~brokerexec.AsyncClient` is the same API for asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .constants import DEFAULT_JOBS_TIMEOUT, DEFAULT_RPC_TIMEOUT, DEFAULT_URL
from .errors import ConfigurationError
from .job import Job
from .protocol.intents import Intent
from .protocol.names import check_name
from .transport.base import redacted_url

if TYPE_CHECKING:
    from .protocol.events import Event
    from .protocol.lookups import Listing
    from .protocol.messages import Control
    from .service import Service
    from .transport.base import ClientTransport, Subscription
    from .transport.memory import MemoryBroker
    from .worker import Worker, WorkerSettings

__all__ = ["Client", "handler_settings"]


class Client:
    """Launch and steer jobs.

    Parameters:
        url: ``amqp://user:pass@host:port/vhost`` (RabbitMQ) or ``memory://[name]``.
        services: for ``memory://``: the services the embedded worker may run (the
            ``brokerexec.services`` entry points are added).
        concurrency: for ``memory://``: how many jobs the embedded worker runs at once.
        timeout: default seconds to wait for a job's answer to a signal.
        heartbeat: AMQP heartbeat in seconds (of the connection that receives events).
        worker_settings: for ``memory://``: the embedded worker's settings.
        transport: a transport made elsewhere (``url`` is then only a label).

    Raises:
        BrokerConnectionError: the broker cannot be reached.
        ConfigurationError: the URL's scheme is not amqp, amqps or memory.
    """

    def __init__(self, url: str = DEFAULT_URL, *, services: Iterable[type[Service]] = (),
                 concurrency: int = 4, timeout: float = DEFAULT_RPC_TIMEOUT,
                 heartbeat: int = 10, worker_settings: WorkerSettings | None = None,
                 transport: ClientTransport | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._worker: Worker | None = None
        scheme = urlparse(url).scheme
        if transport is not None:
            self.transport = transport
        elif scheme == "memory":
            from .transport.memory_clients import MemoryClientTransport

            broker, self._worker = embedded(url, services, concurrency, worker_settings)
            self.transport = MemoryClientTransport(broker)
        elif scheme in ("amqp", "amqps"):
            from .transport.pika_client import PikaClientTransport  # pika: only for RabbitMQ

            # Callers' connections are used only during a call: no heartbeats to miss.
            self.transport = PikaClientTransport(url, heartbeat=0, push_records=True,
                                                 listener_heartbeat=heartbeat)
        else:
            raise ConfigurationError(f"unsupported broker URL {redacted_url(url)!r}: "
                                     "use amqp://, amqps:// or memory://")

    @property
    def worker(self) -> Worker | None:
        """The embedded worker of a ``memory://`` client."""
        return self._worker

    def launch(self, name: str, request: dict[str, Any] | None = None, *,
               job_id: str | None = None, progress_delta: float | None = None,
               checkpoint_delta: float | None = None,
               improved_delta: float | None = None) -> Job:
        """Queue a job of service ``name``; return its handle once the broker holds it.

        It waits in the service's queue until a worker that offers the service takes it.
        An invalid request is reported by that worker as a failed job: :meth:`Job.result`
        raises it.

        Raises:
            UnknownService: no worker has ever offered ``name`` on this broker.
        """
        from .protocol.messages import Launch  # messages: not for a one-shot `status`

        settings = handler_settings(progress_delta, checkpoint_delta, improved_delta)
        launch = Launch.new(name, request, job_id=job_id, settings=settings)
        self.transport.launch([launch])
        return Job(self, launch.job_id, name)

    def launch_many(self, name: str, requests: Iterable[dict[str, Any]], *,
                    progress_delta: float | None = None, checkpoint_delta: float | None = None,
                    improved_delta: float | None = None) -> list[Job]:
        """Queue one job of service ``name`` per request (a sweep); return their handles.

        Returns once the broker holds every launch; the launches are in flight together, so
        this is faster than :meth:`launch` in a loop, which waits for each launch in turn.
        """
        from .protocol.messages import Launch

        settings = handler_settings(progress_delta, checkpoint_delta, improved_delta)
        launches = [Launch.new(name, request, settings=settings) for request in requests]
        self.transport.launch(launches)
        return [Job(self, launch.job_id, name) for launch in launches]

    def job(self, job_id: str, service: str | None = None) -> Job:
        """A handle on an existing job."""
        return Job(self, check_name("job id", job_id), service)

    def subscribe(self, pattern: str | list[str], callback: Callable[[Event], None]) -> Subscription:
        """Receive events whose ``<kind>.<service>.<job id>`` key matches the pattern(s).

        Examples: ``"*.*.<job id>"`` (one job), ``"*.fit.*"`` (one service),
        ``"progress.#"`` (one kind everywhere). The broker filters, not the client. The
        callback runs on a transport thread and must return quickly.
        """
        return self.transport.subscribe([pattern] if isinstance(pattern, str) else list(pattern), callback)

    def pause_all(self, service: str | None = None) -> None:
        """Pause every running job (of one service, if given), on every worker."""
        self.transport.control(control_message(Intent.PAUSE, service))

    def resume_all(self, service: str | None = None) -> None:
        """Resume every paused job (of one service, if given)."""
        self.transport.control(control_message(Intent.RESUME, service))

    def abort_all(self, service: str | None = None) -> None:
        """Abort every running job (of one service, if given)."""
        self.transport.control(control_message(Intent.ABORT, service))

    def jobs(self, timeout: float = DEFAULT_JOBS_TIMEOUT, *, ended_within: float | None = None,
             services: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Jobs across the fleet: running ones (id, service, state, progress, worker, attempt,
        from every worker that answers within ``timeout`` s), then queued and resuming ones
        (in the launch queues of the services those workers offer, and of ``services``), then,
        with ``ended_within`` (seconds), those that ended that recently (state, start, end,
        worker, attempt)."""
        return self.listing(timeout, ended_within=ended_within, services=services).jobs

    def listing(self, timeout: float = DEFAULT_JOBS_TIMEOUT, *, ended_within: float | None = None,
                services: Iterable[str] = ()) -> Listing:
        """As :meth:`jobs`, with the workers that answered and the jobs apart by kind."""
        since = None if ended_within is None else time.time() - ended_within
        return self.transport.list_jobs(timeout, services=services, ended_since=since)

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


def embedded(url: str, services: Iterable[type[Service]], concurrency: int,
             settings: WorkerSettings | None) -> tuple[MemoryBroker, Worker]:
    """The in-memory broker of ``url``, with a worker running ``services`` on it, started."""
    # The embedded worker's modules only here: a client of RabbitMQ never needs them.
    from .registry import ServiceRegistry
    from .transport.memory import MemoryBroker
    from .transport.memory_worker import MemoryWorkerTransport
    from .worker import Worker, WorkerSettings

    broker = MemoryBroker.named(urlparse(url).netloc)
    registry = ServiceRegistry.from_specs([])
    for service in services:
        registry.add(service)
    worker = Worker(MemoryWorkerTransport(broker), registry,
                    settings or WorkerSettings(concurrency=concurrency)).start()
    return broker, worker


def control_message(intent: Intent, service: str | None) -> Control:
    """The control message of ``pause_all`` and friends, limited to jobs started before now."""
    from .protocol.messages import Control

    return Control(intent, None if service is None else check_name("service name", service), time.time())


def handler_settings(progress_delta: float | None, checkpoint_delta: float | None,
                     improved_delta: float | None) -> Mapping[str, float]:
    """A launch's ``settings``: the intervals given, and only those."""
    return {key: value for key, value in (("progress_delta", progress_delta),
                                         ("checkpoint_delta", checkpoint_delta),
                                         ("improved_delta", improved_delta))
            if value is not None}
