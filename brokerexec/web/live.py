"""The live feed of the web view: the broker's job events, once per server, to every browser.

The server subscribes to the broker's events once (not once per browser), and keeps the
newest :data:`KEPT` of them in a ring, each numbered. A browser's Server-Sent Events stream
is a reader of that ring: it holds only where it is, so one that stops reading holds no
memory of the server's (its socket's buffer fills, and its writer waits); one that
reconnects with ``Last-Event-ID`` goes on after that event, nothing missed, as long as the
ring still holds it (else it is told to ``reset``: to load its page again).

Bursts are coalesced here, once for every reader: a job's progress enters the ring at most
every :data:`PROGRESS_EVERY` seconds (the newest one held back meanwhile, never lost: it
enters when its time comes); every other event (states, improved values, checkpoints)
enters as it comes. An event id is ``<epoch>-<number>``: a browser whose id is of another
epoch (the server restarted) is told to reset too.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..protocol.events import Event

__all__ = ["KEPT", "PROGRESS_EVERY", "Behind", "EventHub", "LiveEvent"]

#: Events the ring keeps: a browser that reconnects within them misses none.
KEPT = 20_000
#: The least time between two progress events of one job on the page (seconds).
PROGRESS_EVERY = 0.25


@dataclass(frozen=True)
class LiveEvent:
    """One event as the browsers get it."""

    number: int
    kind: str
    job_id: str
    service: str
    time: float
    data: dict[str, Any]
    attempt: int

    def body(self) -> str:
        return json.dumps({"kind": self.kind, "job_id": self.job_id, "service": self.service,
                           "time": self.time, "data": self.data, "attempt": self.attempt},
                          separators=(",", ":"), default=str)


class EventHub:
    """The ring of events (see the module docstring); any thread publishes, the server's
    event loop reads. :meth:`attach` binds it to that loop."""

    def __init__(self, kept: int = KEPT, progress_every: float = PROGRESS_EVERY) -> None:
        self.epoch = format(int(time.time() * 1000), "x")
        self.progress_every = progress_every
        self._ring: deque[LiveEvent] = deque(maxlen=kept)
        self._lock = threading.Lock()
        self._next = 1
        self._held: dict[str, Event] = {}  # job -> its newest progress, not in the ring yet
        self._progress_at: dict[str, float] = {}  # job -> when its last progress entered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived: asyncio.Event | None = None
        self._waking = False
        self._flusher: threading.Timer | None = None
        self.published = 0  # events taken in (before coalescing)

    # ---- the broker's side (any thread) ---------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Readers wait on ``loop`` (the server's)."""
        self._loop = loop
        self._arrived = asyncio.Event()

    def publish(self, event: Event) -> None:
        """Take one event in (a subscription's callback: returns at once)."""
        with self._lock:
            self.published += 1
            if event.kind == "progress":
                now = time.monotonic()
                if now - self._progress_at.get(event.job_id, 0.0) < self.progress_every:
                    self._held[event.job_id] = event  # its turn comes: the flusher adds it
                    self._flush_later()
                    return
                self._progress_at[event.job_id] = now
                self._held.pop(event.job_id, None)
            elif event.ends_job:
                if (held := self._held.pop(event.job_id, None)) is not None:
                    self._add(held)  # its last progress first, then its end
                self._progress_at.pop(event.job_id, None)
            self._add(event)
        self._wake()

    def _add(self, event: Event) -> None:
        self._ring.append(LiveEvent(self._next, event.kind, event.job_id, event.service, event.time,
                                    event.data, event.attempt))
        self._next += 1

    def _flush_later(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Timer(self.progress_every, self._flush)
            self._flusher.daemon = True
            self._flusher.start()

    def _flush(self) -> None:
        """The held progress events whose time has come enter the ring; the rest wait again."""
        with self._lock:
            self._flusher = None
            now = time.monotonic()
            for job_id, event in list(self._held.items()):
                if now - self._progress_at.get(job_id, 0.0) >= self.progress_every:
                    del self._held[job_id]
                    self._progress_at[job_id] = now
                    self._add(event)
            if self._held:
                self._flush_later()
        self._wake()

    def _wake(self) -> None:
        loop = self._loop
        if loop is None or self._waking:
            return
        self._waking = True
        try:
            loop.call_soon_threadsafe(self._woken)
        except RuntimeError:  # the loop closed: the server is going
            self._waking = False

    def _woken(self) -> None:
        self._waking = False
        if self._arrived is not None:
            arrived, self._arrived = self._arrived, asyncio.Event()
            arrived.set()

    # ---- the browsers' side (the server's loop) --------------------------------------------------

    def newest_id(self) -> str:
        """The id of the newest event so far: a page rendered now follows from it."""
        with self._lock:
            return f"{self.epoch}-{self._next - 1}"

    def after(self, last_id: str | None) -> int | None:
        """The number a stream that last saw ``last_id`` goes on after; None if it cannot go
        on without a gap (another epoch, or older than the ring)."""
        if not last_id:
            return self._next - 1
        epoch, _, number = last_id.partition("-")
        if epoch != self.epoch or not number.isdigit():
            return None
        with self._lock:
            oldest = self._ring[0].number if self._ring else self._next
            return int(number) if int(number) >= oldest - 1 else None

    def recent(self, wanted: Callable[[LiveEvent], bool], limit: int = 200) -> list[LiveEvent]:
        """The newest ``limit`` events the ring holds that are ``wanted``, oldest first."""
        with self._lock:
            found = [event for event in self._ring if wanted(event)]
        return found[-limit:]

    def since(self, number: int, limit: int = 500) -> list[LiveEvent] | None:
        """The events after ``number``, oldest first, at most ``limit``; None if the ring
        no longer holds the first of them (its reader fell too far behind)."""
        with self._lock:
            if not self._ring or self._ring[-1].number <= number:
                return []
            first = self._ring[0].number
            if number + 1 < first:
                return None
            start = number + 1 - first
            return [self._ring[i] for i in range(start, min(start + limit, len(self._ring)))]

    async def follow(self, number: int, wanted: Callable[[LiveEvent], bool], *,
                     ping_every: float = 15.0) -> AsyncIterator[LiveEvent | None]:
        """The events after ``number`` that are ``wanted``, as they come; None now and then
        (every ``ping_every`` s without one), for the stream's keep-alive comment. Ends
        (:class:`Behind`) if the reader falls further behind than the ring holds."""
        assert self._arrived is not None, "attach() the hub to the server's loop first"
        while True:
            arrived = self._arrived
            events = self.since(number)
            if events is None:
                raise Behind(f"the stream fell more than {self._ring.maxlen} events behind")
            for event in events:
                number = event.number
                if wanted(event):
                    yield event
            if events:
                continue
            try:
                await asyncio.wait_for(arrived.wait(), ping_every)
            except asyncio.TimeoutError:
                yield None


class Behind(Exception):
    """A stream's reader fell further behind than the ring holds: its page loads again."""
