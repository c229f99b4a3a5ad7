"""The pool behind ``handler.map`` and ``handler.imap``: parallel kernels inside one job.

(Its class is :class:`WorkerPool` in the public API, after its pool workers: threads or
processes of this machine, not brokerexec workers.)

The pool runs plain functions on threads (for code that releases the GIL: NumPy, I/O) or
processes (for pure-Python CPU work; the function and items must be picklable, which is a
local matter: nothing here crosses the network). While results are awaited the computation
thread keeps calling ``ready()``, so pause and abort work in the middle of a map.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..settings import PoolKind

__all__ = ["WorkerPool", "imap"]


class WorkerPool:
    """A lazily started pool of ``size`` threads or processes.

    Parameters:
        size: number of workers (default: the number of CPUs).
        kind: ``"thread"`` or ``"process"``.
    """

    def __init__(self, size: int | None = None, kind: PoolKind = "thread") -> None:
        if kind not in ("thread", "process"):
            raise ValueError(f"pool kind must be 'thread' or 'process', not {kind!r}")
        self.size = max(1, size or os.cpu_count() or 1)
        self.kind: PoolKind = kind
        self._executor: cf.Executor | None = None
        self._lock = threading.Lock()

    @property
    def executor(self) -> cf.Executor:
        """The executor, started on first use."""
        with self._lock:
            if self._executor is None:
                if self.kind == "process":
                    self._executor = cf.ProcessPoolExecutor(self.size)
                else:
                    self._executor = cf.ThreadPoolExecutor(self.size, thread_name_prefix="brokerexec-pool")
            return self._executor

    def shutdown(self) -> None:
        """Stop the workers; queued work is cancelled."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"WorkerPool(size={self.size}, kind={self.kind!r})"


def imap(pool: WorkerPool, ready: Callable[[], None], fn: Callable[[Any], Any],
         items: Iterable[Any], *, enumerated: bool = False, ordered: bool = True,
         poll: float = 0.05) -> Iterator[Any]:
    """Yield ``fn(x)`` for each item, calling ``ready()`` while waiting.

    ``ordered=True`` yields in input order, ``ordered=False`` as results complete;
    ``enumerated=True`` yields ``(index, result)``. At most ``2 * pool.size`` items are in
    flight, so a long iterable is never submitted at once. If ``ready()`` raises (abort),
    work not yet started is cancelled and the exception propagates.
    """
    executor = pool.executor
    source = enumerate(items)
    window = 2 * pool.size
    in_flight: deque[tuple[int, cf.Future[Any]]] = deque()

    def refill() -> None:
        while len(in_flight) < window:
            try:
                index, item = next(source)
            except StopIteration:
                return
            in_flight.append((index, executor.submit(fn, item)))

    try:
        refill()
        while in_flight:
            if ordered:
                index, future = in_flight[0]
                while not _wait([future], poll):
                    ready()
                in_flight.popleft()
                value = future.result()
            else:
                while not (finished := _wait([f for _, f in in_flight], poll)):
                    ready()
                index, future = next(pair for pair in in_flight if pair[1] in finished)
                in_flight.remove((index, future))
                value = future.result()
            refill()
            ready()
            yield (index, value) if enumerated else value
    finally:
        for _, future in in_flight:
            future.cancel()


def _wait(futures: list[cf.Future[Any]], timeout: float) -> set[cf.Future[Any]]:
    done, _ = cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
    return done
