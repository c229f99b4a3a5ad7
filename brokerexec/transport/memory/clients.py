"""The clients' side of the in-memory transport (``memory.py``): blocking and asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from ...errors import DecodeError, JobNotFound, Timeout
from ...protocol.events import Event
from ...protocol.history import HistoryPage, HistoryQuery
from ...protocol.intents import Intent, Signal
from ...protocol.lookups import Listing
from ...protocol.messages import Control, Launch
from ...protocol.operation_log import FoundOperation, OperationHeader
from ...protocol.replies import Reply
from ..base import AsyncClientTransport, ClientTransport, Subscription, client_info
from .broker import MemoryBroker, wire

__all__ = ["MemoryAsyncClientTransport", "MemoryClientTransport"]

#: How long a closing client waits for the broker's history store to take what was noted.
HISTORY_FLUSH_TIMEOUT = 5.0


def _final(job_id: str, signal: Signal, reply: cf.Future[Any], timeout: float) -> Any:
    """The value of an RPC's final reply, through the wire's encoding (errors raise typed)."""
    try:
        answer: Reply = reply.result(timeout)
    except cf.TimeoutError:
        raise Timeout(f"job {job_id} did not answer {signal.describe()} within {timeout} s") from None
    finally:
        reply.cancel()
    try:
        return Reply.decode(wire(answer.encode())).outcome()
    except DecodeError:
        raise
    except ValueError as exc:  # a value the wire cannot carry, as a worker would say
        return Reply.failure(exc).outcome()


def _history_timeout(broker: MemoryBroker, timeout: float) -> Timeout:
    return Timeout(f"the history store of memory://{broker.name} did not answer within {timeout} s")


class MemoryClientTransport(ClientTransport):
    """A client's side of a :class:`MemoryBroker`, blocking."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    def launch(self, launches: list[Launch]) -> None:
        self.broker.enqueue(launches)

    def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any:
        return _final(job_id, signal, self.broker.rpc(job_id, signal), timeout)

    def status(self, job_id: str, timeout: float) -> dict[str, Any]:
        try:
            status: dict[str, Any] = self.rpc(job_id, Signal.of(Intent.STATUS), timeout)
            return status
        except JobNotFound:
            return self.broker.journal_status(job_id)

    def abort(self, job_id: str, timeout: float) -> bool:
        try:
            return bool(self.rpc(job_id, Signal.of(Intent.ABORT), timeout))
        except JobNotFound:
            return self.broker.cancel(job_id, client_info())

    def control(self, control: Control) -> None:
        self.broker.control(control)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        return self.broker.subscribe(patterns, callback)

    def subscribe_controls(self, callback: Callable[[Control], None]) -> Subscription:
        return self.broker.subscribe_controls(callback)

    def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        return self.broker.wait_result(job_id, timeout)

    def list_jobs(self, timeout: float, *, services: Iterable[str] = (),
                  ended_since: float | None = None, limit: int = 1000) -> Listing:
        return self.broker.list_jobs(ended_since, limit).result(timeout + 5)

    def history(self, query: HistoryQuery, timeout: float) -> HistoryPage:
        page = self.broker.ask_history(query)
        try:
            return page.result(timeout)
        except cf.TimeoutError:
            page.cancel()
            raise _history_timeout(self.broker, timeout) from None

    def note_operation(self, header: OperationHeader) -> None:
        self.broker.note_operation(header)

    def find_operation(self, operation_id: str, timeout: float) -> FoundOperation:
        return self.broker.find_operation(operation_id)

    def find_operations(self, since: float, limit: int, timeout: float) -> list[OperationHeader]:
        return self.broker.find_operations(since, limit)

    def close(self) -> None:
        if (history := self.broker.history) is not None:  # its jobs are in the store once it has closed
            with contextlib.suppress(cf.TimeoutError):
                history.flushed().result(HISTORY_FLUSH_TIMEOUT)


class MemoryAsyncClientTransport(AsyncClientTransport):
    """A client's side of a :class:`MemoryBroker`, for asyncio.

    Waits hold no thread: the broker's futures are awaited on the caller's loop, and
    event callbacks are moved to it; only a wait for a record uses a thread, since the
    broker keeps records behind a condition.
    """

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self._sync = MemoryClientTransport(broker)

    async def connect(self) -> None:
        pass

    async def launch(self, launches: list[Launch]) -> None:
        self.broker.enqueue(launches)

    async def rpc(self, job_id: str, signal: Signal, timeout: float) -> Any:
        reply = self.broker.rpc(job_id, signal)
        with contextlib.suppress(asyncio.TimeoutError):  # _final says so, as every transport does
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(reply)), timeout)
        return _final(job_id, signal, reply, 0)

    async def status(self, job_id: str, timeout: float) -> dict[str, Any]:
        try:
            status: dict[str, Any] = await self.rpc(job_id, Signal.of(Intent.STATUS), timeout)
            return status
        except JobNotFound:
            return self.broker.journal_status(job_id)

    async def abort(self, job_id: str, timeout: float) -> bool:
        try:
            return bool(await self.rpc(job_id, Signal.of(Intent.ABORT), timeout))
        except JobNotFound:
            return self.broker.cancel(job_id, client_info())

    async def control(self, control: Control) -> None:
        self.broker.control(control)

    def subscribe(self, patterns: list[str], callback: Callable[[Event], None]) -> Subscription:
        loop = asyncio.get_running_loop()

        def hop(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody listens
                loop.call_soon_threadsafe(callback, event)

        return self.broker.subscribe(patterns, hop)

    async def fetch_result(self, job_id: str, timeout: float | None) -> dict[str, Any] | None:
        if timeout == 0:
            return self.broker.wait_result(job_id, 0)
        return await asyncio.to_thread(self.broker.wait_result, job_id, timeout)

    async def list_jobs(self, timeout: float, *, services: Iterable[str] = (),
                        ended_since: float | None = None, limit: int = 1000) -> Listing:
        return await asyncio.wait_for(asyncio.wrap_future(self.broker.list_jobs(ended_since, limit)),
                                      timeout + 5)

    async def history(self, query: HistoryQuery, timeout: float) -> HistoryPage:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.broker.ask_history(query)), timeout)
        except asyncio.TimeoutError:
            raise _history_timeout(self.broker, timeout) from None

    async def close(self) -> None:
        if (history := self.broker.history) is not None:  # as MemoryClientTransport.close
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.wrap_future(history.flushed()), HISTORY_FLUSH_TIMEOUT)
