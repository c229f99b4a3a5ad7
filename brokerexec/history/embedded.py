"""The history store embedded with a memory broker, in its process (``docs/history.md``).

``keep_history("memory://lab", "history.db")`` gives the broker of ``memory://lab`` a
:class:`MemoryHistory`: the broker notes there the entries a RabbitMQ journal would hold —
``launch`` (or a sweep's ``launches``), ``started``, ``checkpoint``, ``record`` — and one
thread of its own, the history thread, does everything else: it numbers them in one stream
(``memory://lab``), folds them into the store in batches (``HistoryStore.ingest``) and
answers the clients' ``history()`` queries, each after every entry noted before it (a job
whose result a client has is in the page it asks for next); when nothing else waits, it
brings the store's text-search index up to the rows (``HistoryStore.index_search``). Every
use of the store is on that thread, so an in-memory SQLite store (``sqlite://``: one
database per thread that opens it) works too.

Noting an entry never waits and never fails: a store that is down, full or slow delays only
this thread. A batch it refuses is logged, counted and tried again (backing off to
:data:`RETRY_MAX`), the broker going on meanwhile; past :data:`MAX_BACKLOG` entries waiting,
the oldest are dropped (counted), since memory has no journal to read them again from.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, DecodeError, HistoryUnavailable
from ..protocol.history import HistoryPage, HistoryQuery
from ..transport.memory.broker import MemoryBroker, wire
from . import queries
from .store import Entry, HistoryStore, store_url

__all__ = ["BATCH", "MAX_BACKLOG", "HistoryStats", "MemoryHistory", "keep_history"]

log = logging.getLogger(__name__)

#: The most entries committed at once.
BATCH = 1000
#: The most entries kept waiting for a store that refuses them; the oldest go first.
MAX_BACKLOG = 100_000
#: Seconds before a refused batch is tried again, doubling up to RETRY_MAX (a query tries
#: at once).
RETRY_FIRST, RETRY_MAX = 0.25, 5.0
#: The most rows one call of ``HistoryStore.index_search`` takes: a query waits for it.
SEARCH_BATCH = 500


@dataclass
class HistoryStats:
    """What the history thread has done so far."""

    entries: int = 0  # entries committed
    rows: int = 0  # row changes committed
    batches: int = 0
    store_errors: int = 0  # batches and queries the store refused
    dropped: int = 0  # entries given up on (MAX_BACKLOG)


@dataclass(frozen=True)
class _Noted:
    """One journal entry, not numbered yet."""

    kind: str
    body: dict[str, Any]
    job_id: str | None


_Task = _Noted | Callable[[], None] | None  # None: stop


def keep_history(broker: str | MemoryBroker, store: str | HistoryStore) -> MemoryHistory:
    """Keep every job of a memory broker (``memory://NAME``, or the broker) in ``store`` from
    now on (a :class:`HistoryStore`, or its URL: a file path, ``sqlite://`` in memory,
    ``postgresql://...``); the ``history()`` of the broker's clients answers from it. A broker
    that keeps history in that store already goes on (its keeper is returned).

    Raises:
        ConfigurationError: not a ``memory://`` URL, a store URL of no supported kind, or
            the broker keeps history in another store.
    """
    if isinstance(broker, str):
        broker = MemoryBroker.of_url(broker)
    url = store.url if isinstance(store, HistoryStore) else store_url(store)
    with _attaching:
        kept = broker.history
        if isinstance(kept, MemoryHistory) and kept.store.url == url:
            return kept
        return MemoryHistory(store, broker)


_attaching = threading.Lock()


class MemoryHistory:
    """See the module docstring: made by :func:`keep_history`, it keeps the broker's history
    until :meth:`close`.

    Parameters:
        store: where the rows go (migrated to the newest schema first): a store, or the URL
            of one that this makes, and closes when it closes.
        broker: the memory broker whose jobs it keeps.

    Raises:
        ConfigurationError: the broker keeps history already, or ``store`` is a URL of no
            supported kind.
    """

    def __init__(self, store: str | HistoryStore, broker: MemoryBroker) -> None:
        if broker.history is not None:
            kept = broker.history
            where = f" ({kept.store.redacted_url})" if isinstance(kept, MemoryHistory) else ""
            raise ConfigurationError(f"memory://{broker.name} keeps its history elsewhere already{where}")
        self.owned = isinstance(store, str)  # made here: closed here
        self.store: HistoryStore = HistoryStore(store) if isinstance(store, str) else store
        self.broker = broker
        self.stream = f"memory://{broker.name}"  # the entries' offsets are kept under this name
        self.stats = HistoryStats()
        self._tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self._pending: list[_Noted] = []  # noted, not committed yet (the history thread's)
        self._next: int | None = None  # the next offset (None: the store not read yet)
        self._retry_in = RETRY_FIRST
        self._due = 0.0  # when a refused batch may be tried again (time.monotonic())
        self._closed = False
        self._search_behind = False  # rows committed that the text-search index may not have
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"brokerexec-history-{broker.name or 'default'}")
        self._thread.start()
        broker.keep_history(self)

    # ---- any thread --------------------------------------------------------------------------

    def note(self, kind: str, body: dict[str, Any], job_id: str | None) -> None:
        """Take one journal entry (``body`` as it went through the wire); never waits."""
        if not self._closed:
            self._tasks.put(_Noted(kind, body, job_id))

    def ask(self, query: HistoryQuery) -> cf.Future[HistoryPage]:
        """A page of the store, once every entry noted before is in it (``query.job_id``:
        that job's row alone). The future fails with ``DecodeError`` for a bad cursor,
        ``HistoryUnavailable`` when the store cannot answer."""
        reply: cf.Future[HistoryPage] = cf.Future()
        if self._closed:
            reply.set_exception(HistoryUnavailable(f"the history of {self.stream} is closed"))
        else:
            self._tasks.put(lambda: self._answer(query, reply))
        return reply

    def flushed(self) -> cf.Future[None]:
        """Resolves once every entry noted before has been offered to the store (committed,
        or refused and kept for later)."""
        done: cf.Future[None] = cf.Future()
        if self._closed:
            done.set_result(None)
        else:
            self._tasks.put(lambda: _resolve(done))
        return done

    def close(self, timeout: float = 5.0) -> None:
        """Stop keeping the broker's history: commit what is noted (waiting up to ``timeout``
        s), stop the thread, and close the store if it is this one's own."""
        if self.broker.history is self:
            self.broker.keep_history(None)
        self._closed = True
        self._tasks.put(None)
        self._thread.join(timeout)
        if self.owned and not self._thread.is_alive():
            self.store.close()

    # ---- the history thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._ready()
        while True:
            if self._search_behind and not self._pending and self._tasks.empty():
                self._index_search()  # a batch at a time: a task that comes waits for one at most
                continue
            wait = max(self._due - time.monotonic(), 0.0) if self._pending else None
            try:
                task = self._tasks.get(timeout=wait)
            except queue.Empty:  # a refused batch, due again
                self._commit()
                continue
            if task is None:
                self._commit(now=True)
                return
            if isinstance(task, _Noted):
                self._pending.append(task)
                if self._tasks.empty() or len(self._pending) >= BATCH:  # else one commit for more
                    self._commit()
            else:
                self._commit(now=True)  # what was noted before a question is in its answer
                try:
                    task()
                except Exception:  # never stops the thread
                    log.exception("history of %s: a task failed", self.stream)

    def _ready(self) -> bool:
        """Migrate the store and read where the stream stopped, once; False if it failed."""
        if self._next is not None:
            return True
        try:
            self.store.migrate()
            self._next = self.store.offsets().get(self.stream, 0)
            self._search_behind = True  # rows of before, perhaps
        except Exception as exc:  # a store that cannot be used now: said, and tried again later
            self._refused(exc, "cannot be made ready")
            return False
        return True

    def _commit(self, *, now: bool = False) -> None:
        """Offer the store what is noted (unless a refused batch is not due again yet)."""
        if not now and time.monotonic() < self._due:
            return
        while self._pending and self._ready():
            assert self._next is not None
            part = self._pending[:BATCH]
            entries = [Entry(self.stream, self._next + n, noted.kind, noted.body, noted.job_id)
                       for n, noted in enumerate(part)]
            try:
                rows = self.store.ingest(entries, {self.stream: self._next + len(entries)})
            except Exception as exc:  # down, full, locked: never the launcher's problem
                self._refused(exc, f"refused {len(self._pending)} entries")
                return
            del self._pending[:len(part)]
            self._next += len(part)
            self.stats.entries += len(part)
            self.stats.rows += rows
            self.stats.batches += 1
            self._retry_in, self._due = RETRY_FIRST, 0.0
            self._search_behind = True

    def _index_search(self) -> None:
        try:
            self._search_behind = self.store.index_search(SEARCH_BATCH) >= SEARCH_BATCH
        except Exception as exc:  # tried again after the next commit; questions scan meanwhile
            self._search_behind = False
            self.stats.store_errors += 1
            log.warning("history of %s: the store %s cannot index its text now (%s)", self.stream,
                        self.store.redacted_url, exc)

    def _refused(self, exc: Exception, what: str) -> None:
        self.stats.store_errors += 1
        excess = len(self._pending) - MAX_BACKLOG
        if excess > 0:
            del self._pending[:excess]
            self.stats.dropped += excess
            log.error("history of %s: %d entries dropped, the store refusing them for too long",
                      self.stream, excess)
        log.warning("history of %s: the store %s %s (%s); again in %.2f s", self.stream,
                    self.store.redacted_url, what, exc, self._retry_in)
        self._due = time.monotonic() + self._retry_in
        self._retry_in = min(self._retry_in * 2, RETRY_MAX)

    def _answer(self, query: HistoryQuery, reply: cf.Future[HistoryPage]) -> None:
        if not reply.set_running_or_notify_cancel():
            return  # its asker gave up
        try:
            if not self._ready():
                raise HistoryUnavailable(f"the history store {self.store.redacted_url} cannot be used now")
            page = queries.answer(self.store, query)
            reply.set_result(HistoryPage.decode(wire(page.encode())))  # as a reply would carry it
        except (DecodeError, HistoryUnavailable) as exc:
            reply.set_exception(exc)
        except Exception as exc:
            self.stats.store_errors += 1
            reply.set_exception(HistoryUnavailable(f"the history store cannot answer now: {exc}"))


def _resolve(done: cf.Future[None]) -> None:
    if done.set_running_or_notify_cancel():  # else its waiter gave up
        done.set_result(None)
