"""The blocking client: launch jobs, steer them, watch them, over any transport.

``Client("amqp://...")`` talks to workers through RabbitMQ, on the blocking pika transport
(:mod:`brokerexec.transport.pika`). ``Client("memory://")`` starts an in-process worker on
the in-memory transport and offers exactly the same API: the embedded default, for laptops,
notebooks and tests. Which transport a URL gets is :mod:`brokerexec.transport.schemes`'
table. :class:`~brokerexec.AsyncClient` is the same API for asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..constants import (
    DEFAULT_JOBS_TIMEOUT,
    DEFAULT_RPC_TIMEOUT,
    DEFAULT_URL,
    OPERATION_RESUME_WITHIN,
    OPERATION_SEARCH_TIMEOUT,
)
from ..errors import InvalidRequest
from ..protocol.history import HistoryPage, HistoryQuery
from ..protocol.intents import Intent
from ..protocol.names import check_name
from ..transport.schemes import scheme_of
from .embedded import embedded_worker
from .job import Job
from .messages import control_message, handler_settings

if TYPE_CHECKING:
    from ..core.service import Service
    from ..operations.registry import Plan
    from ..protocol.events import Event
    from ..protocol.lookups import Listing
    from ..settings import WorkerSettings
    from ..transport.base import ClientTransport, Subscription
    from ..worker.worker import Worker
    from .operation import Operation

__all__ = ["Client"]


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
        ConfigurationError: no transport serves the URL's scheme (amqp, amqps, memory).
    """

    def __init__(self, url: str = DEFAULT_URL, *, services: Iterable[type[Service]] = (),
                 concurrency: int = 4, timeout: float = DEFAULT_RPC_TIMEOUT,
                 heartbeat: int = 10, worker_settings: WorkerSettings | None = None,
                 transport: ClientTransport | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._worker: Worker | None = None
        if transport is not None:
            self.transport = transport
            return
        scheme = scheme_of(url)
        if not scheme.shared:  # the broker lives in this process: so must a worker
            self._worker = embedded_worker(url, services, concurrency, worker_settings)
        self.transport = scheme.client(url, heartbeat)

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
        from ..protocol.messages import Launch  # messages: not for a one-shot `status`

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
        from ..protocol.messages import Launch

        settings = handler_settings(progress_delta, checkpoint_delta, improved_delta)
        launches = [Launch.new(name, request, settings=settings) for request in requests]
        self.transport.launch(launches)
        return [Job(self, launch.job_id, name) for launch in launches]

    def operation(self, service: str, requests: Iterable[Any], *, name: str | None = None,
                  on_error: str = "continue", max_failures: int | float | None = None,
                  max_in_flight: int | None = None, resume: bool = True,
                  resume_within: float = OPERATION_RESUME_WITHIN, progress_delta: float | None = None,
                  checkpoint_delta: float | None = None, improved_delta: float | None = None) -> Operation:
        """Launch one job of ``service`` per request, as one operation; return its handle at
        once (``docs/operations.md``).

        ``requests``: dicts, or ``(key, dict)`` pairs to name the items yourself; a list, an
        iterator (taken as it is launched, never held whole first) or
        :func:`brokerexec.grid`. An item's key is otherwise a hash of the service and its
        request. ``on_error="fail_fast"`` aborts the rest at the first failure;
        ``max_failures``: after that many (an int) or that fraction of the items (a float);
        ``max_in_flight``: at most that many jobs launched and not ended at once. The
        intervals are each job's, as for :meth:`launch`.

        With a ``name`` that an operation of ``service`` made in the last ``resume_within``
        seconds has (the newest), this is a **resume** of that operation (unless ``resume``
        is False): the handle is that operation's, and each request's item is skipped if it
        finished, left to go on (or to resume from its newest checkpoint) if it is under way,
        and launched again if it failed or was aborted; new requests are new items.
        :meth:`operation_plan` says which, launching nothing. Finding it reads the journal
        from then.

        Raises:
            UnknownService: no worker has ever offered ``service`` (at once).
            InvalidRequest: a request of the first batch is not a JSON object, two items
                share a key, or a bad ``max_in_flight``.
            ConfigurationError: a bad ``on_error`` or ``max_failures``.
        """
        from ..operations.outcomes import FailurePolicy
        from .operation import Operation

        policy = FailurePolicy(on_error, max_failures)
        settings = handler_settings(progress_delta, checkpoint_delta, improved_delta)
        earlier = self._named_operation(service, name, resume_within) if name is not None and resume else None
        if earlier is not None:
            operation = self.operation_of(earlier)
            operation.policy, operation.max_in_flight = policy, max_in_flight or operation.max_in_flight
            operation.settings = {**operation.settings, **settings}
            operation._resubmit(requests)
            return operation
        operation = Operation(self, check_name("service name", service), name=name, policy=policy,
                              max_in_flight=max_in_flight, settings=settings)
        operation._start(requests)
        return operation

    def operation_plan(self, service: str, requests: Iterable[Any], *, name: str | None,
                       resume_within: float = OPERATION_RESUME_WITHIN) -> Plan:
        """What ``client.operation(service, requests, name=name)`` would do, launching
        nothing: the operation it would resume (``plan.operation``; None: a new one, whose
        items are all in ``plan.launch``; always, without a ``name``) and, by key, the items
        it would skip, leave to resume or go on, run again, or launch.

        Raises:
            InvalidRequest: a request is not a JSON object, or two share a key.
        """
        from ..operations.registry import Plan
        from ..operations.requests import keyed_requests

        earlier = self._named_operation(service, name, resume_within) if name is not None else None
        if earlier is None:
            keys, seen = [], set()
            for key, _ in keyed_requests(check_name("service name", service), requests):
                if key in seen:
                    raise InvalidRequest(f"two requests of key {key!r}")
                seen.add(key)
                keys.append(key)
            return Plan(launch=keys)
        with self.operation_of(earlier) as found:
            plan: Plan = found.plan_of(requests)
            return plan

    def _named_operation(self, service: str, name: str, within: float) -> str | None:
        """The id of the newest operation of ``service`` named ``name`` made in the last
        ``within`` seconds, if any (``client/operation_index.py``)."""
        from .operation_index import find_headers

        named = find_headers(self.transport, time.time() - within, 1, OPERATION_SEARCH_TIMEOUT,
                             service=service, name=name)
        return named[0].id if named else None

    def operation_of(self, operation_id: str, *, timeout: float = 60.0) -> Operation:
        """The operation of that id, as the journal has it, watched from now on: any client
        reattaches, also after the one that launched it was killed. It follows the items
        launched until now (``docs/operations.md``).

        Raises:
            JobNotFound: the journal has no operation of that id.
            Timeout: the journal was not read within ``timeout`` s.
        """
        from ..errors import JobNotFound
        from ..protocol.operation_log import time_of_id
        from .operation import Operation

        if time_of_id(check_name("operation id", operation_id)) is None:
            raise JobNotFound(f"no operation {operation_id}: an operation's id starts with the time "
                              f"it was made (32 hex digits, as `brokerexec sweep` prints)")
        # Listening before the journal is read: a job that ends while it is read is heard.
        ended: dict[str, None] = {}

        def note(event: Event) -> None:
            if event.ends_job:
                ended[event.job_id] = None

        listening = self.subscribe("state.*.*", note)
        try:
            found = self.transport.find_operation(operation_id, timeout)
            return Operation._found(self, operation_id, found, ended_meanwhile=ended)  # read once it listens
        finally:
            listening.close()  # the operation listens to its service's events by now

    def operations(self, since: float | None = None, limit: int = 100, *, service: str | None = None,
                   name: str | None = None, timeout: float = 60.0) -> list[dict[str, Any]]:
        """The operations made since ``since`` (epoch seconds; the last day by default), of
        ``service`` and named ``name`` if given, newest first: id, name, service, created,
        policy, max_in_flight, and how many requests (``expected``, when they could be
        counted). From the history store when an indexer runs (also those the journal no
        longer keeps), the newest from the journal (``client/operation_index.py``)."""
        from .operation_index import find_headers

        since = time.time() - 86400 if since is None else since
        return [header.encode() | {"id": header.id} for header in
                find_headers(self.transport, since, limit, timeout, service=service, name=name)]

    def operation_counts(self, operation_id: str, *, timeout: float | None = None) -> dict[str, int]:
        """How many of an operation's jobs are in each state, from the history store: at once,
        whatever the size of the operation (``client.operation_of`` reads the journal instead).
        Items not launched yet are not counted; a re-run item counts each of its jobs.

        Raises:
            HistoryUnavailable: no indexer runs on the broker, or only older ones.
        """
        from ..errors import DecodeError, HistoryUnavailable

        query = HistoryQuery(operation=check_name("operation id", operation_id), limit=1, by_state=True)
        try:
            page = self.transport.history(query, timeout or self.timeout)
        except DecodeError as exc:  # an indexer older than by_state refuses it
            raise HistoryUnavailable(f"the history indexer cannot count an operation's jobs: {exc}") from exc
        if page.states is None:
            raise HistoryUnavailable("the history indexer did not count the operation's jobs (an older one)")
        return page.states

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

    def history(self, service: str | None = None, state: str | None = None, since: float | None = None,
                until: float | None = None, worker: str | None = None, operation: str | None = None,
                text: str | None = None, limit: int = 50, cursor: str | None = None, *,
                count: bool = False, timeout: float | None = None) -> HistoryPage:
        """A page of every job kept in the history store, newest first, from a history indexer
        on the broker (``brokerexec history``; ``docs/history.md``). Filters all apply:
        ``since``/``until`` are epoch seconds of when the job last moved; ``text`` is looked
        for in its id, request, result and error; ``count`` also counts every match. Pass a
        page's ``cursor`` for the next one (stable while jobs end meanwhile).

        Raises:
            HistoryUnavailable: no indexer runs on the broker.
            DecodeError: a bad filter, limit or cursor.
        """
        query = HistoryQuery(service, state, since, until, worker, operation, text, limit, cursor, count)
        return self.transport.history(query, timeout or self.timeout)

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
