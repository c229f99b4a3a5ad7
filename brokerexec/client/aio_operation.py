"""The asyncio face of an operation: :meth:`AsyncClient.operation` returns an :class:`AsyncOperation`.

An operation is watched by threads of its own whatever the caller (its launcher, its
collector, its subscription: ``client/operation.py``), so its asyncio face is the same
:class:`~brokerexec.Operation` over a blocking connection of the :class:`AsyncClient`'s
own, opened at its first operation. What waits (``wait``, ``results``, the steering, which
sends a message) is awaited on a worker thread of the loop, never blocking it; what only
reads the operation's memory (``status``, ``items``, ``plan``) is a plain call.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from ..operations.outcomes import Outcome
from ..operations.registry import Item, ItemState, OperationStatus, Plan
from .operation import Operation

__all__ = ["AsyncOperation"]

_END = object()


class AsyncOperation:
    """An :class:`~brokerexec.Operation`, awaited (see the module docstring). ``operation``
    is the one underneath."""

    def __init__(self, operation: Operation) -> None:
        self.operation = operation

    def __repr__(self) -> str:
        return f"Async{self.operation!r}"

    @property
    def id(self) -> str:
        return self.operation.id

    @property
    def name(self) -> str:
        return self.operation.name

    @property
    def service(self) -> str:
        return self.operation.service

    @property
    def done(self) -> bool:
        return self.operation.done

    @property
    def stopped(self) -> str | None:
        return self.operation.stopped

    # ---- what it holds: plain calls ------------------------------------------------------------

    def status(self, best: str | None = None, lowest: bool = False) -> OperationStatus:
        """As :meth:`Operation.status`."""
        return self.operation.status(best, lowest)

    def items(self, state: ItemState | str | None = None, *, offset: int = 0,
              limit: int | None = None) -> list[Item]:
        """As :meth:`Operation.items`."""
        return self.operation.items(state, offset=offset, limit=limit)

    def outcomes(self) -> list[Outcome]:
        """As :meth:`Operation.outcomes`."""
        return self.operation.outcomes()

    def plan(self) -> Plan:
        """As :meth:`Operation.plan`."""
        return self.operation.plan()

    # ---- what waits: awaited ----------------------------------------------------------------

    async def wait(self, timeout: float | None = None) -> OperationStatus:
        """As :meth:`Operation.wait`."""
        return await asyncio.to_thread(self.operation.wait, timeout)

    async def results(self, ordered: bool = False, errors: str = "collect", *, start: int = 0,
                      timeout: float | None = None) -> AsyncIterator[Outcome]:
        """As :meth:`Operation.results`, an outcome at a time as each comes."""
        outcomes = self.operation.results(ordered, errors, start=start, timeout=timeout)
        try:
            while (outcome := await asyncio.to_thread(next, outcomes, _END)) is not _END:
                assert isinstance(outcome, Outcome)
                yield outcome
        finally:
            close = getattr(outcomes, "close", None)
            try:
                if close is not None:
                    close()
            except ValueError:  # cancelled while a thread waits in it: that wait ends on its own
                pass

    async def consolidate(self, how: str | Callable[[list[Outcome]], Any],
                          path: str | os.PathLike[str] | None = None) -> Any:
        """As :meth:`Operation.consolidate` (run on a thread: ``how`` may take a while)."""
        return await asyncio.to_thread(self.operation.consolidate, how, path)

    async def pause(self) -> int:
        return await asyncio.to_thread(self.operation.pause)

    async def resume(self) -> int:
        return await asyncio.to_thread(self.operation.resume)

    async def abort(self) -> int:
        return await asyncio.to_thread(self.operation.abort)

    async def set(self, attrs: dict[str, Any] | None = None, /, **more: Any) -> int:
        """As :meth:`Operation.set`."""
        return await asyncio.to_thread(self.operation.set, {**(attrs or {}), **more})

    async def add(self, requests: Iterable[Any]) -> None:
        await asyncio.to_thread(self.operation.add, requests)

    async def rerun(self) -> int:
        """As :meth:`Operation.rerun`."""
        return await asyncio.to_thread(self.operation.rerun)

    async def save(self, path: str | os.PathLike[str]) -> None:
        await asyncio.to_thread(self.operation.save, path)

    async def close(self) -> None:
        """Stop watching (the jobs go on)."""
        await asyncio.to_thread(self.operation.close)

    async def __aenter__(self) -> AsyncOperation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
