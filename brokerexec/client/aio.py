"""The asyncio twin of :class:`~brokerexec.Client`: the same API, awaited.

::

    async with AsyncClient("amqp://guest:guest@127.0.0.1/") as client:
        job = await client.launch("fit", {"points": 400})
        await job.set(learning_rate=0.01)
        async for progress in job.progress():
            print(progress)
        print(await job.result())

Over RabbitMQ it drives the asyncio transport (:mod:`brokerexec.transport.rabbitmq.client`), whose
connection lives on a thread of its own (heartbeats never wait for the caller's event
loop); every call is awaited from the caller's loop, and no thread is held while waiting,
however long. Event callbacks run on the caller's loop (a coroutine function as a task).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..constants import DEFAULT_JOBS_TIMEOUT, DEFAULT_RPC_TIMEOUT, DEFAULT_URL
from ..errors import Timeout
from ..protocol.events import Event
from ..protocol.history import HistoryPage, HistoryQuery
from ..protocol.intents import Intent, Signal
from ..protocol.messages import Launch
from ..protocol.names import check_name
from ..transport.base import AsyncClientTransport, Subscription
from ..transport.schemes import scheme_of
from .embedded import embedded_worker
from .job import Attempts, event_patterns, quiet_ends, result_of
from .messages import control_message, handler_settings

if TYPE_CHECKING:
    from ..core.service import Service
    from ..operations.registry import Plan
    from ..protocol.lookups import Listing
    from ..settings import WorkerSettings
    from ..worker.worker import Worker
    from .aio_operation import AsyncOperation
    from .blocking import Client

__all__ = ["AsyncClient", "AsyncJob"]


class AsyncClient:
    """Launch and steer jobs from asyncio code; see the module docstring.

    Takes the arguments of :class:`~brokerexec.Client`. Connect with ``async with`` or
    :meth:`connect`.
    """

    def __init__(self, url: str = DEFAULT_URL, *, services: Iterable[type[Service]] = (),
                 concurrency: int = 4, timeout: float = DEFAULT_RPC_TIMEOUT, heartbeat: int = 10,
                 worker_settings: WorkerSettings | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._services, self._concurrency = list(services), concurrency
        self._heartbeat, self._worker_settings = heartbeat, worker_settings
        self._transport: AsyncClientTransport | None = None
        self._worker: Worker | None = None
        self._blocking: Client | None = None  # the connection of its operations, made at the first

    async def connect(self) -> AsyncClient:
        """Open the connection (for ``memory://``: start the embedded worker)."""
        if self._transport is not None:
            return self
        scheme = scheme_of(self.url)
        if not scheme.shared:  # the broker lives in this process: so must a worker
            self._worker = embedded_worker(self.url, self._services, self._concurrency,
                                           self._worker_settings)
        transport = scheme.async_client(self.url, self._heartbeat)
        await transport.connect()
        self._transport = transport
        return self

    @property
    def transport(self) -> AsyncClientTransport:
        """The transport underneath."""
        if self._transport is None:
            raise RuntimeError("not connected: use `async with AsyncClient(...)` or `await connect()`")
        return self._transport

    # ---- Client's API ---------------------------------------------------------------------

    async def launch(self, name: str, request: dict[str, Any] | None = None, *,
                     job_id: str | None = None, progress_delta: float | None = None,
                     checkpoint_delta: float | None = None,
                     improved_delta: float | None = None) -> AsyncJob:
        """Queue a job; return its handle once the broker holds the launch."""
        launch = Launch.new(name, request, job_id=job_id, settings=handler_settings(
            progress_delta, checkpoint_delta, improved_delta))
        await self.transport.launch([launch])
        return AsyncJob(self, launch.job_id, name)

    async def launch_many(self, name: str, requests: Iterable[dict[str, Any]], *,
                          progress_delta: float | None = None, checkpoint_delta: float | None = None,
                          improved_delta: float | None = None) -> list[AsyncJob]:
        """Queue one job per request (a sweep), the launches in flight together."""
        settings = handler_settings(progress_delta, checkpoint_delta, improved_delta)
        launches = [Launch.new(name, request, settings=settings) for request in requests]
        await self.transport.launch(launches)
        return [AsyncJob(self, launch.job_id, name) for launch in launches]

    def job(self, job_id: str, service: str | None = None) -> AsyncJob:
        """A handle on an existing job."""
        self.transport  # noqa: B018 - says "not connected" now rather than at the first await
        return AsyncJob(self, check_name("job id", job_id), service)

    def subscribe(self, pattern: str | list[str],
                  callback: Callable[[Event], Awaitable[None] | None]) -> Subscription:
        """Like ``Client.subscribe``; ``callback`` runs on this event loop (a coroutine
        function is run as a task). Returns once the broker binds."""
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        return self.transport.subscribe(patterns, _as_task(callback))

    async def pause_all(self, service: str | None = None) -> None:
        """Pause every running job (of one service, if given), on every worker."""
        await self.transport.control(control_message(Intent.PAUSE, service))

    async def resume_all(self, service: str | None = None) -> None:
        """Resume every paused job (of one service, if given)."""
        await self.transport.control(control_message(Intent.RESUME, service))

    async def abort_all(self, service: str | None = None) -> None:
        """Abort every running job (of one service, if given)."""
        await self.transport.control(control_message(Intent.ABORT, service))

    async def jobs(self, timeout: float = DEFAULT_JOBS_TIMEOUT, *, ended_within: float | None = None,
                   services: Iterable[str] = ()) -> list[dict[str, Any]]:
        """As ``Client.jobs``."""
        return (await self.listing(timeout, ended_within=ended_within, services=services)).jobs

    async def listing(self, timeout: float = DEFAULT_JOBS_TIMEOUT, *,
                      ended_within: float | None = None, services: Iterable[str] = ()) -> Listing:
        """As ``Client.listing``."""
        since = None if ended_within is None else time.time() - ended_within
        return await self.transport.list_jobs(timeout, services=services, ended_since=since)

    async def history(self, service: str | None = None, state: str | None = None,
                      since: float | None = None, until: float | None = None, worker: str | None = None,
                      operation: str | None = None, text: str | None = None, limit: int = 50,
                      cursor: str | None = None, *, count: bool = False,
                      timeout: float | None = None) -> HistoryPage:
        """As ``Client.history``."""
        query = HistoryQuery(service, state, since, until, worker, operation, text, limit, cursor, count)
        return await self.transport.history(query, timeout or self.timeout)

    # ---- operations ------------------------------------------------------------------------

    async def _operations_client(self) -> Client:
        """The blocking client of this one's operations (``client/aio_operation.py``): on the
        same broker, opened at the first operation."""
        self.transport  # noqa: B018 - says "not connected" first
        if self._blocking is None:
            from .blocking import Client

            scheme = scheme_of(self.url)
            transport = await asyncio.to_thread(scheme.client, self.url, self._heartbeat)
            self._blocking = Client(self.url, timeout=self.timeout, transport=transport)
        return self._blocking

    async def operation(self, service: str, requests: Iterable[Any], **options: Any) -> AsyncOperation:
        """As ``Client.operation`` (the same options; ``requests`` a list, an iterator or a
        grid, not an async iterator): launch one job per request as one operation, or
        resume the one of that ``name``."""
        from .aio_operation import AsyncOperation

        client = await self._operations_client()
        return AsyncOperation(await asyncio.to_thread(client.operation, service, requests, **options))

    async def operation_of(self, operation_id: str, *, timeout: float = 60.0) -> AsyncOperation:
        """As ``Client.operation_of``."""
        from .aio_operation import AsyncOperation

        client = await self._operations_client()
        return AsyncOperation(await asyncio.to_thread(client.operation_of, operation_id, timeout=timeout))

    async def operation_plan(self, service: str, requests: Iterable[Any], *, name: str | None,
                             **options: Any) -> Plan:
        """As ``Client.operation_plan``."""
        client = await self._operations_client()
        return await asyncio.to_thread(client.operation_plan, service, requests, name=name, **options)

    async def operations(self, since: float | None = None, limit: int = 100, *,
                         timeout: float = 60.0) -> list[dict[str, Any]]:
        """As ``Client.operations``."""
        client = await self._operations_client()
        return await asyncio.to_thread(client.operations, since, limit, timeout=timeout)

    async def close(self) -> None:
        """Close the connection (and stop an embedded worker); confirmed launches stay queued."""
        if self._blocking is not None:
            blocking, self._blocking = self._blocking, None
            await asyncio.to_thread(blocking.close)
        transport, self._transport = self._transport, None
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await asyncio.to_thread(worker.stop, 0)
        if transport is not None:
            await transport.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncJob:
    """The asyncio twin of :class:`~brokerexec.Job`."""

    def __init__(self, client: AsyncClient, job_id: str, service: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.service = service

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, service={self.service!r})"

    async def signal(self, intent: Intent, timeout: float | None = None, **fields: Any) -> Any:
        """Send ``intent`` (with its keys) to the job; return the final reply's value."""
        return await self.client.transport.rpc(self.id, Signal.of(intent, **fields),
                                               timeout or self.client.timeout)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        """As ``Job.status``."""
        return await self.client.transport.status(self.id, timeout or self.client.timeout)

    async def pause(self, timeout: float | None = None) -> bool:
        return bool(await self.signal(Intent.PAUSE, timeout))

    async def resume(self, timeout: float | None = None) -> bool:
        return bool(await self.signal(Intent.RESUME, timeout))

    async def abort(self, timeout: float | None = None) -> bool:
        """As ``Job.abort``: a job no worker holds yet is cancelled."""
        return await self.client.transport.abort(self.id, timeout or self.client.timeout)

    async def checkpoint(self, timeout: float | None = None) -> dict[str, Any]:
        """As ``Job.checkpoint``."""
        taken: dict[str, Any] = await self.signal(Intent.CHECKPOINT, timeout)
        return taken

    async def set(self, attrs: dict[str, Any] | None = None, /, *,
                  rpc_timeout: float | None = None, **more: Any) -> dict[str, Any]:
        """Set declared attributes; returns once applied at ``ready()`` (as ``Job.set``)."""
        applied: dict[str, Any] = await self.signal(Intent.SET, rpc_timeout, attrs={**(attrs or {}), **more})
        return applied

    async def invoke(self, method: str, *args: Any, rpc_timeout: float | None = None,
                     **kwargs: Any) -> Any:
        """Call a declared method at the job's next ``ready()`` (as ``Job.invoke``)."""
        return await self.signal(Intent.INVOKE, rpc_timeout, method=method, args=list(args), kwargs=kwargs)

    async def record(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The job's final record, waiting up to ``timeout`` s (None: until it ends)."""
        return await self.client.transport.fetch_result(self.id, timeout)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end and return its result (raises as ``Job.result`` does)."""
        record = await self.record(timeout)
        if record is None:
            raise Timeout(f"job {self.id} did not end within {timeout} s")
        return result_of(self.id, record)

    def subscribe(self, callback: Callable[[Event], Awaitable[None] | None],
                  kinds: Iterable[str] = ("#",)) -> Subscription:
        """Call ``callback(event)`` on this loop for this job's events of the given kinds."""
        return self.client.subscribe(event_patterns(self.id, kinds), callback)

    async def events(self, kinds: Iterable[str] | None = None,
                     idle_timeout: float | None = None) -> AsyncIterator[Event]:
        """Iterate over this job's events until it ends (as ``Job.events``)."""
        wanted = set(kinds) if kinds is not None else None
        attempts = Attempts()
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        subscription = self.subscribe(inbox.put_nowait)
        try:
            # Subscribed first, then checked: a job that ended before we listened is seen.
            if await self.record(0) is not None:
                return
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), idle_timeout or 1.0)
                except asyncio.TimeoutError:
                    if quiet_ends(self.id, await self.record(0) is not None, idle_timeout):
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

    async def progress(self, idle_timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Iterate over progress messages (their data) until the job ends."""
        async for event in self.events(("progress",), idle_timeout):
            yield event.data


def _as_task(callback: Callable[[Event], Awaitable[None] | None]) -> Callable[[Event], None]:
    """``callback``, run on the loop it is called on; what it returns, if awaitable, as a task."""
    tasks: set[asyncio.Task[Any]] = set()

    def run(event: Event) -> None:
        outcome = callback(event)
        if inspect.isawaitable(outcome):
            task = asyncio.ensure_future(outcome)
            tasks.add(task)  # keep a reference until it ends
            task.add_done_callback(tasks.discard)

    return run
