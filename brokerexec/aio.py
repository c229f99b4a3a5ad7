"""The asyncio twin of :class:`~brokerexec.Client`: the same API, awaited.

::

    async with AsyncClient("amqp://guest:guest@127.0.0.1/") as client:
        job = await client.launch("fit", {"points": 400})
        await job.set(learning_rate=0.01)
        async for progress in job.progress():
            print(progress)
        print(await job.result())

It drives the same transport as ``Client``, whose connection lives on a thread of its own
(heartbeats never wait for the caller's event loop). Short blocking steps (a launch and its
confirm, an RPC) run in a small thread pool; waiting, which may take hours, does not hold a
thread: a job's record and events come to the caller's loop as callbacks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from .client import Client
from .constants import DEFAULT_RPC_TIMEOUT, DEFAULT_URL
from .errors import Timeout
from .job import Job, ends_job, quiet_ends
from .protocol import Event
from .transport.base import Subscription

__all__ = ["AsyncClient", "AsyncJob"]

T = TypeVar("T")

#: Threads for the short blocking steps (launches, RPCs, queries), per client.
BLOCKING_THREADS = 8


class AsyncClient:
    """Launch and steer jobs from asyncio code; see the module docstring.

    Takes the arguments of :class:`~brokerexec.Client`. Connect with ``async with`` or
    :meth:`connect`.
    """

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = DEFAULT_RPC_TIMEOUT,
                 **client_options: Any) -> None:
        self.url = url
        self.timeout = timeout
        self._options = client_options
        self._client: Client | None = None
        self._pool = cf.ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="brokerexec-aio")

    async def connect(self) -> AsyncClient:
        """Open the connection (for ``memory://``: start the embedded worker)."""
        if self._client is None:
            self._client = await self._blocking(
                Client, self.url, timeout=self.timeout, **self._options)
        return self

    @property
    def client(self) -> Client:
        """The synchronous client underneath."""
        if self._client is None:
            raise RuntimeError("not connected: use `async with AsyncClient(...)` or `await connect()`")
        return self._client

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs))

    # ---- Client's API ---------------------------------------------------------------------

    async def launch(self, name: str, request: dict[str, Any] | None = None, **options: Any) -> AsyncJob:
        """Queue a job; return its handle once the broker holds the launch."""
        return AsyncJob(self, await self._blocking(self.client.launch, name, request, **options))

    async def launch_many(self, name: str, requests: Iterable[dict[str, Any]],
                          **options: Any) -> list[AsyncJob]:
        """Queue one job per request (a sweep), the launches in flight together."""
        jobs = await self._blocking(self.client.launch_many, name, list(requests), **options)
        return [AsyncJob(self, job) for job in jobs]

    def job(self, job_id: str, service: str | None = None) -> AsyncJob:
        """A handle on an existing job."""
        return AsyncJob(self, self.client.job(job_id, service))

    def subscribe(self, pattern: str | list[str],
                  callback: Callable[[Event], Awaitable[None] | None]) -> Subscription:
        """Like ``Client.subscribe``; ``callback`` runs on this event loop (a coroutine
        function is run as a task)."""
        return self.client.subscribe(pattern, _on_loop(asyncio.get_running_loop(), callback))

    async def pause_all(self, service: str | None = None) -> None:
        await self._blocking(self.client.pause_all, service)

    async def resume_all(self, service: str | None = None) -> None:
        await self._blocking(self.client.resume_all, service)

    async def abort_all(self, service: str | None = None) -> None:
        await self._blocking(self.client.abort_all, service)

    async def jobs(self, timeout: float = 0.5) -> list[dict[str, Any]]:
        return await self._blocking(self.client.jobs, timeout)

    async def close(self) -> None:
        """Close the connection; launches already confirmed stay queued."""
        if self._client is not None:
            client, self._client = self._client, None
            await self._blocking(client.close)
        self._pool.shutdown(wait=False)

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncJob:
    """The asyncio twin of :class:`~brokerexec.Job`."""

    def __init__(self, client: AsyncClient, job: Job) -> None:
        self._client = client
        self.sync = job

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def service(self) -> str | None:
        return self.sync.service

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, service={self.service!r})"

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._client._blocking(self.sync.status, timeout)

    async def pause(self, timeout: float | None = None) -> bool:
        return await self._client._blocking(self.sync.pause, timeout)

    async def resume(self, timeout: float | None = None) -> bool:
        return await self._client._blocking(self.sync.resume, timeout)

    async def abort(self, timeout: float | None = None) -> bool:
        return await self._client._blocking(self.sync.abort, timeout)

    async def set(self, attrs: dict[str, Any] | None = None, /, *,
                  rpc_timeout: float | None = None, **more: Any) -> dict[str, Any]:
        """Set declared attributes; returns once applied at ``ready()`` (as ``Job.set``)."""
        return await self._client._blocking(self.sync.set, attrs, rpc_timeout=rpc_timeout, **more)

    async def invoke(self, method: str, *args: Any, rpc_timeout: float | None = None,
                     **kwargs: Any) -> Any:
        """Call a declared method at the job's next ``ready()`` (as ``Job.invoke``)."""
        return await self._client._blocking(self.sync.invoke, method, *args,
                                            rpc_timeout=rpc_timeout, **kwargs)

    async def record(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The job's final record, waiting up to ``timeout`` s (None: until it ends)."""
        transport = self._client.client.transport
        future = transport.record_future(self.id)
        if future is not None and future.done() and future.exception() is None:
            return future.result()
        if future is not None and timeout != 0:  # it comes to this connection: no thread
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
            except asyncio.TimeoutError:
                return None
            except ConnectionError:
                pass  # the connection changed meanwhile: the stream has it
        if future is not None and not future.done():
            future.cancel()  # not waited on after all
        return await self._client._blocking(transport.fetch_result, self.id, timeout)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end and return its result (raises as ``Job.result`` does)."""
        record = await self.record(timeout)
        if record is None:
            raise Timeout(f"job {self.id} did not end within {timeout} s")
        return self.sync.result_of(record)

    async def events(self, kinds: Iterable[str] | None = None,
                     idle_timeout: float | None = None) -> AsyncIterator[Event]:
        """Iterate over this job's events until it ends (as ``Job.events``)."""
        wanted = set(kinds) if kinds is not None else None
        inbox: asyncio.Queue[Event] = asyncio.Queue()
        subscription = self.sync.subscribe(_on_loop(asyncio.get_running_loop(), inbox.put_nowait))
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
                if wanted is None or event.kind in wanted:
                    yield event
                if ends_job(event):
                    return
        finally:
            subscription.close()

    async def progress(self, idle_timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Iterate over progress messages (their data) until the job ends."""
        async for event in self.events(("progress",), idle_timeout):
            yield event.data


def _on_loop(loop: asyncio.AbstractEventLoop,
             callback: Callable[[Event], Awaitable[None] | None]) -> Callable[[Event], None]:
    """``callback`` moved from the transport's thread to ``loop`` (a coroutine as a task)."""
    tasks: set[asyncio.Task[Any]] = set()

    def run(event: Event) -> None:
        outcome = callback(event)
        if inspect.isawaitable(outcome):
            task = asyncio.ensure_future(outcome)
            tasks.add(task)  # keep a reference until it ends
            task.add_done_callback(tasks.discard)

    def hop(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens
            loop.call_soon_threadsafe(run, event)

    return hop
